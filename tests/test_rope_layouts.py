"""The RoPE-aware key centre on RoPE layouts that are not rotate-half over the whole head.

Interleaved pairs (Cohere) and partial rotary embeddings (GPT-NeoX, StableLM) are served in the
channel order of :func:`nqkv_core.transform.rope_layout`, which the exact transform applies to keys
and queries first. Tiny random models with a constant pre-RoPE key offset (a key-projection bias,
as trained models have) make the centre matter.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nqkv_core import native  # noqa: E402
from nqkv_core._hf import transformers_version  # noqa: E402
from nqkv_core.cache import NQKVCache, enable  # noqa: E402
from nqkv_core.lab import evaluate  # noqa: E402
from nqkv_core.rope import RopeSpec, apply_rope, rope_spec  # noqa: E402
from nqkv_core.scheme import KVScheme, default_scheme, fit_transform, rope_layout  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
# head_dim 16: interleaved over all of it (Cohere), rotary over its first 8 channels, or both (GLM)
CONFIGS = {
    "cohere": lambda: transformers.CohereConfig(**SMALL, num_key_value_heads=2, attention_bias=True, logit_scale=1.0),
    "stablelm": lambda: transformers.StableLmConfig(**SMALL, num_key_value_heads=2, partial_rotary_factor=0.5,
                                                     use_qkv_bias=True),
    "gpt-neox": lambda: transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.5, attention_bias=True),
    "phi": lambda: transformers.PhiConfig(**SMALL, num_key_value_heads=2),  # partial 0.5
    "glm": lambda: transformers.GlmConfig(**SMALL, num_key_value_heads=2, head_dim=16, pad_token_id=0),  # both
}
ROPE = KVScheme("rope", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True, k_centre_rope=True,
                v_centre=True, sinks=2, window=4, unbiased=True,
                stats_tokens=4)  # a fit period of 6 tokens: short sequences are mostly past it
NEW = 16


def tiny_model(name: str, key_offset: float = 3.0):
    """A random model of family ``name`` whose keys carry a constant pre-RoPE offset of scale ``key_offset``."""
    if name == "stablelm" and transformers_version() < (5, 0):
        pytest.skip("StableLM attends through transformers' AttentionInterface from transformers 5 on")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval().float()
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "k_proj"):  # larger K/V than the tiny init gives, and the key offset
                module.k_proj.weight.mul_(4)
                module.q_proj.weight.mul_(4)
                for proj in (module.q_proj, module.v_proj):
                    proj.bias.zero_()
                module.k_proj.bias.copy_(key_offset * torch.randn(module.k_proj.bias.shape))
            elif hasattr(module, "query_key_value"):  # GPT-NeoX: per head [q | k | v]
                qkv = module.query_key_value
                qkv.weight.mul_(4)
                bias = qkv.bias.view(-1, 3, d)
                bias.zero_()
                bias[:, 1].copy_(key_offset * torch.randn(bias[:, 1].shape))
    return model


def generate(model, ids, scheme=None, cache=None):
    """Greedy tokens and per-step logits; ``cache=None`` runs ``scheme`` as fake quantization."""
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    if cache is None:
        with evaluate.fake_quantized(model, scheme):
            out = model.generate(ids, **kw)
    else:
        out = model.generate(ids, **cache, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_centre_in_key_order_fits_keys_turned_by_the_models_rope(name):
    # keys that are one pre-RoPE vector turned by the model's own RoPE are the centre exactly: the
    # centred keys vanish at every position, and the transform stays exact
    config = CONFIGS[name]()
    spec = rope_spec(config)
    assert spec.interleaved == (name in ("cohere", "glm")) and (spec.rotary_dim < 16) == (name != "cohere")
    inv_freq, order = rope_layout(config, 16)
    assert order is not None and sorted(order.tolist()) == list(range(16)) and inv_freq.shape == (8,)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 2, 1, 16, generator=g)
    pos = torch.arange(40)
    k = apply_rope(mu, pos, RopeSpec(spec.inv_freq, interleaved=spec.interleaved))
    v, q = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 4, 40, 16, generator=g)
    t = fit_transform(ROPE, k, v, q, inv_freq, order)
    assert torch.equal(t.k_order, order)
    assert t.keys(k).abs().max() < 1e-4 * k.abs().max()
    torch.testing.assert_close(t.keys_back(t.keys(k)), k, rtol=0, atol=1e-5)
    # the stored basis changes no score: q . k == queries(q) . keys(k) + q . R(p) mu
    kk = t.keys(k, centre=False)
    torch.testing.assert_close(t.queries(q, 2) @ kk.repeat_interleave(2, 1).transpose(-1, -2),
                               q @ k.repeat_interleave(2, 1).transpose(-1, -2), rtol=1e-4, atol=1e-4)
    # without the order, a rotate-half centre of the same frequencies does not fit these keys
    plain = fit_transform(ROPE, k, v, q, inv_freq)
    assert plain.keys(k).abs().max() > 0.1 * k.abs().max()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_default_scheme_is_rope_centred_without_a_warning(name, recwarn):
    config = CONFIGS[name]()
    scheme = default_scheme(4, 16, config=config)
    assert scheme.k_centre_rope and "plain-centre" not in scheme.name
    assert not [w for w in recwarn if "plain mean" in str(w.message)]
    cache = NQKVCache(ROPE, config=config)
    assert cache.rope.order is not None and cache.rope.inv_freq.shape == (8,)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_decode_strategy_matches_fake_quantization(name, monkeypatch):
    # the reference step equals fake quantization of the same scheme; the folded and native steps
    # (keys and queries taken in the key order before the table's rows) agree with the unfolded one
    model = tiny_model(name)
    ids = torch.randint(1, 96, (2, ROPE.window), generator=torch.Generator().manual_seed(1))
    ref_seq, ref = generate(model, ids, ROPE)
    _, fp = generate(model, ids)
    assert (ref - fp).abs().max() > 2e-3  # the quantized body really is read
    seq, got = generate(model, ids, cache=enable(model, scheme=ROPE, decode="reference").generate_kwargs())
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)
    assert torch.equal(seq, ref_seq)
    _, ops = generate(model, ids, cache=enable(model, scheme=ROPE, decode="ops").generate_kwargs())
    calls = []
    run = native.DecodeStep.run
    monkeypatch.setattr(native.DecodeStep, "run", lambda *a, **k: calls.append(1) or run(*a, **k))  # a spy
    for decode in ("folded", "native"):
        kwargs = enable(model, scheme=ROPE, decode=decode).generate_kwargs()
        seq, got = generate(model, ids, cache=kwargs)
        cache = next(v for v in kwargs.values() if isinstance(v, NQKVCache))
        assert all(layer.transform.k_order is not None for layer in cache.layers)
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(got, ops, rtol=0, atol=2e-3)
    assert bool(calls) == native.available()


def test_saved_key_order_round_trips_and_is_checked(tmp_path):
    # the key order is part of the transform: saved, loaded (from the file without config), and a
    # file whose order is not a permutation, or not the model's, is refused naming it
    from test_cache_io import edited, tiny_model as llama

    model = tiny_model("cohere")
    cache = enable(model, scheme=ROPE).new_cache()
    ids = torch.randint(1, 96, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids[:, :12], past_key_values=cache, use_cache=True)
    path = tmp_path / "c.safetensors"
    cache.save(path)
    loads = (NQKVCache.load(path, ROPE, config=model.config), NQKVCache.load(path, ROPE))
    with torch.no_grad():
        ref = model(ids[:, 12:], past_key_values=cache, use_cache=True).logits
        for loaded in loads:
            assert all(torch.equal(a.transform.k_order, b.transform.k_order)
                       for a, b in zip(cache.layers, loaded.layers))
            assert torch.equal(model(ids[:, 12:], past_key_values=loaded, use_cache=True).logits, ref)
    cases = [
        (dict(layer1__t_k_order=lambda x: x * 0), "layer 1: t_k_order must be a permutation"),
        (dict(layer1__t_k_order=lambda x: x.roll(1)), "layer 1: t_k_order differs from the channel order"),
        (dict(layer1__t_k_order=lambda x: x.int()), r"layer 1: t_k_order is int32 \(16,\), expected int64"),
        (dict(layer1__t_k_order=lambda x: x[:8]), r"layer 1: t_k_order is int64 \(8,\), expected int64 \(16,\)"),
        (dict(layer0__t_k_order=None), "layer 0: t_k_order differs .*a permutation expected"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            NQKVCache.load(edited(path, tmp_path / "bad.safetensors", **edit), ROPE, config=model.config)
    # a rotate-half model's file with an order added: not the model's
    rotate_half = llama()
    path = tmp_path / "l.safetensors"
    filled = enable(rotate_half, scheme=ROPE).new_cache()
    with torch.no_grad():
        rotate_half(ids[:, :12], past_key_values=filled, use_cache=True)
    filled.save(path)
    bad = edited(path, tmp_path / "o.safetensors", layer0__t_k_order=torch.arange(16).flip(0))
    with pytest.raises(ValueError, match="layer 0: t_k_order differs .*none expected"):
        NQKVCache.load(bad, ROPE, config=rotate_half.config)


@pytest.mark.slow
@pytest.mark.parametrize("compiled_step", ["op", "traced"])
def test_compiled_step_takes_the_key_order(compiled_step):
    # the traced step puts the key order into the graph, the opaque op runs the eager step: both
    # give the eager logits across the window, in one graph
    from test_cache import positions

    model = tiny_model("stablelm")
    nq = enable(model, scheme=ROPE, max_cache_len=32)
    eager, other = nq.new_cache(), nq.new_cache(compiled_step=compiled_step)
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(9))

    def step(tok, cache):
        return model(tok, past_key_values=cache, use_cache=True, **positions(model, cache)).logits

    with torch.no_grad():
        nxt = model(ids, past_key_values=eager, use_cache=True).logits[:, -1:].argmax(-1)
        model(ids, past_key_values=other, use_cache=True)
        compiled = torch.compile(step, fullgraph=True)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=False):
            for _ in range(10):  # crosses the window: tokens get quantized inside the graph
                a, b = step(nxt, eager), compiled(nxt, other)
                torch.testing.assert_close(b, a, rtol=0, atol=5e-3)
                nxt = a[:, -1:].argmax(-1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert all(layer.transform.k_order is not None for layer in other.layers)
