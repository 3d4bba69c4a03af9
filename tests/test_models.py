"""NQKVCache on the attention variants of other model families, on tiny random models.

Sliding-window layers (Mistral, Ministral, Qwen2, Gemma 2/3, GPT-OSS), soft-capped logits and a custom query
scale (Gemma 2), per-layer-type RoPE (Gemma 3) and learned attention sinks (GPT-OSS). Each model
is checked three ways: with 16-bit storage the cache reproduces transformers' own cache
(``DynamicCache``) over a prompt longer than the sliding window and a few decode steps; at 4 bits it
follows the fake-quantized reference of the same scheme (``nqkv_core.lab.evaluate``) far more
closely than that reference follows full precision; what the cache cannot serve is refused when it
is set up, naming the feature.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CohereConfig, CohereForCausalLM, DynamicCache, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
    Gemma3TextConfig, GptOssConfig, GptOssForCausalLM, LlamaConfig, MinistralConfig, MinistralForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

from nqkv_core.cache import NQKVCache, NQKVSlidingLayer, enable, layer_types  # noqa: E402
from nqkv_core.lab import evaluate  # noqa: E402
from nqkv_core.scheme import FULL_PRECISION, default_scheme  # noqa: E402

SW = 16  # sliding window
PROMPT, STEPS = 30, 8
DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def _mistral():
    return MistralForCausalLM(MistralConfig(**DIMS, sliding_window=SW))


def _ministral():  # sliding and full layers by layer_types
    return MinistralForCausalLM(MinistralConfig(**DIMS, sliding_window=SW,
                                                layer_types=["full_attention", "sliding_attention"]))


def _qwen2():  # layers from max_window_layers on slide
    return Qwen2ForCausalLM(Qwen2Config(**DIMS, use_sliding_window=True, sliding_window=SW, max_window_layers=1))


def _gemma2():  # sliding + global layers, soft-capped logits, query scale 1/sqrt(7) (not 1/sqrt(head_dim))
    return Gemma2ForCausalLM(Gemma2Config(**DIMS, sliding_window=SW, query_pre_attn_scalar=7,
                                          attn_logit_softcapping=3.0, final_logit_softcapping=None))


def _gemma3():  # a RoPE base per layer type
    return Gemma3ForCausalLM(Gemma3TextConfig(**DIMS, sliding_window=SW, query_pre_attn_scalar=7,
                                              layer_types=["sliding_attention", "full_attention"]))


def _gpt_oss():  # alternating layers, learned sinks, a tiny mixture of experts
    return GptOssForCausalLM(GptOssConfig(**DIMS, sliding_window=SW, num_local_experts=2, num_experts_per_tok=1,
                                          layer_types=["sliding_attention", "full_attention"]))


MODELS = {"mistral": _mistral, "ministral": _ministral, "qwen2": _qwen2, "gemma2": _gemma2, "gemma3": _gemma3, "gpt_oss": _gpt_oss}


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    with torch.no_grad():  # larger scores than the tiny init gives: quantization and soft-capping show
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(4)
            layer.self_attn.q_proj.weight.mul_(4)
            if hasattr(layer.self_attn, "sinks"):
                layer.self_attn.sinks.copy_(2 * torch.randn_like(layer.self_attn.sinks))
    return model


def ids_for(n: int = PROMPT + STEPS, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_logits(model, ids, cache, chunks=((0, PROMPT),)):
    """Logits of every position: the prompt in ``chunks``, then one token per forward (teacher-forced)."""
    out = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in chunks]
    out += [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits
            for i in range(chunks[-1][1], ids.shape[1])]
    return torch.cat(out, dim=1)


@torch.no_grad()
def eager_logits(model, ids, cache=None):
    model.set_attn_implementation("eager")
    out = decode_logits(model, ids, cache) if cache is not None else model(ids).logits
    return out


@torch.no_grad()
def fakequant_logits(model, ids, scheme):
    with evaluate.fake_quantized(model, scheme):
        return model(ids).logits


def scheme4(model, window: int):
    """The 4-bit default scheme for the model (RoPE-centred with the model's RoPE, YaRN included)."""
    return default_scheme(4, model.config.head_dim, window=window, config=model.config).replace(stats_tokens=16)


# every token stored as 16-bit "codes" (window 1), or 2 sinks and 4 exact tokens before them
@pytest.mark.parametrize("scheme", [FULL_PRECISION, FULL_PRECISION.replace(sinks=2, window=4)], ids=["W1", "S2W4"])
@pytest.mark.parametrize("name", MODELS)
def test_sixteen_bit_storage_reproduces_dynamic_cache(name, scheme):
    model, ids = tiny(name), ids_for()
    expected = eager_logits(model, ids, DynamicCache(config=model.config))
    for decode in ("reference", "auto"):
        nq = enable(model, scheme=scheme, decode=decode)
        cache = nq.new_cache()
        got = decode_logits(model, ids, cache)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        kinds = [type(layer) is NQKVSlidingLayer for layer in cache.layers]
        assert kinds == [t == "sliding_attention" for t in layer_types(model.config)]
        assert any(kinds)
    # the window really cuts: attending to everything gives other logits
    model.set_attn_implementation("eager")
    with torch.no_grad():
        wide = model(ids).logits
        model.config.sliding_window = 10_000
        assert (model(ids).logits - wide).abs().max() > 1e-3


def test_soft_capping_and_sinks_change_the_logits():
    # Guards the 16-bit test above: soft-capping (Gemma 2) and the learned sinks (GPT-OSS) of the tiny
    # models are strong enough to matter, so a cache that ignored them would fail it.
    ids = ids_for()
    gemma = tiny("gemma2")
    capped = eager_logits(gemma, ids)
    for layer in gemma.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (eager_logits(gemma, ids) - capped).abs().max() > 1e-2
    oss = tiny("gpt_oss")
    sunk = eager_logits(oss, ids)
    with torch.no_grad():
        for layer in oss.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert (eager_logits(oss, ids) - sunk).abs().max() > 1e-2


# W=4: the sliding layers quantize (a ring of codes, 16 > 4); W=16: their window is all exact.
@pytest.mark.parametrize("window", [4, SW])
@pytest.mark.parametrize("name", MODELS)
def test_four_bits_follow_the_fake_quantized_reference(name, window):
    model, ids = tiny(name), ids_for()
    scheme = scheme4(model, window)
    ref = fakequant_logits(model, ids, scheme)
    quant_effect = (ref - eager_logits(model, ids)).abs().max()
    if window < SW or "full_attention" in layer_types(model.config):
        assert quant_effect > 3e-3  # some keys are really read quantized (20x the tolerance below)
    for decode in ("reference", "auto"):
        nq = enable(model, scheme=scheme, decode=decode)
        # the prompt whole and as two chunks (the first holds the transform's statistics tokens)
        for chunks in (((0, PROMPT),), ((0, 20), (20, PROMPT))):
            got = decode_logits(model, ids, nq.new_cache(), chunks)
            err = (got - ref).abs().max()
            if decode == "reference":  # the same arithmetic
                assert err < 2e-4, (decode, chunks, err)
            else:  # the fused ops' bf16 products, well inside the quantization's own effect
                assert err < max(0.5 * quant_effect, 2e-4), (decode, chunks, err, quant_effect)


def test_sliding_layer_holds_a_bounded_ring():
    # A sliding layer's storage stops growing once the window is full (a full layer's body keeps growing).
    model = tiny("gemma2")
    nq = enable(model, scheme=scheme4(model, 4))
    cache = nq.new_cache()
    decode_logits(model, ids_for(PROMPT + 40), cache)
    sliding, full = cache.layers
    assert isinstance(sliding, NQKVSlidingLayer) and not isinstance(full, NQKVSlidingLayer)
    assert sliding.capacity <= SW - 4 + PROMPT  # one-token steps need SW - W slots; the prompt's forward PROMPT more
    assert full.capacity >= PROMPT + 40 - 4 - 4


def test_unsupported_models_are_refused_naming_the_feature():
    scheme = FULL_PRECISION
    with pytest.raises(NotImplementedError, match="linear_attention"):
        NQKVCache(scheme, config=LlamaConfig(**DIMS, layer_types=["full_attention", "linear_attention"]))
    with pytest.raises(NotImplementedError, match="chunked"):
        NQKVCache(scheme, config=LlamaConfig(**DIMS, attention_chunk_size=8))
    with pytest.raises(NotImplementedError, match="bidirectional"):
        NQKVCache(scheme, config=Gemma3TextConfig(**DIMS, use_bidirectional_attention=True))
    # interleaved RoPE is served in the channel order where it is rotate-half (tests/test_rope_layouts.py)
    cohere = CohereForCausalLM(CohereConfig(**DIMS)).eval()
    assert enable(cohere, scheme=default_scheme(4, 16)).new_cache().rope.order is not None
    assert NQKVCache(default_scheme(4, 16), config=cohere.config).rope.order is not None


def test_sliding_layers_save_and_load_with_16_bit_storage(tmp_path):
    # (the quantized ring of codes and the file checks: tests/test_cache_io_sliding.py)
    model, ids = tiny("gemma2"), ids_for()
    cache = enable(model, scheme=FULL_PRECISION).new_cache()
    decode_logits(model, ids[:, :-1], cache)
    cache.save(tmp_path / "c.safetensors")
    loaded = NQKVCache.load(tmp_path / "c.safetensors", cache.scheme, config=model.config)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in cache.layers]
    with torch.no_grad():
        x = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
        assert torch.equal(model(ids[:, -1:], past_key_values=loaded, use_cache=True).logits, x)


def test_cache_without_config_on_a_sliding_model_says_what_to_change():
    model = tiny("mistral")
    enable(model, scheme=FULL_PRECISION)
    with pytest.raises(ValueError, match="config=model.config"):
        decode_logits(model, ids_for(), NQKVCache(FULL_PRECISION, num_layers=2))


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gpt_oss"])
def test_padded_batch_generates_as_dynamic_cache(name):
    # Left padding: the padding mask and the sliding window together, at 16 bits, through generate.
    model = tiny(name)
    ids = torch.randint(1, 96, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    model.set_attn_implementation("eager")
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
    got = model.generate(ids, **enable(model, scheme=FULL_PRECISION).generate_kwargs(), **kw)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_assisted_decoding_equals_greedy_on_sliding_layers(name):
    # Prompt lookup verifies candidates in multi-token forwards and crops the rejected ones: the
    # sliding layers' ring of codes must still hold the window's quantized tokens after cropping.
    model = tiny(name)
    half = ids_for(15, seed=4)
    prompt = torch.cat([half, half], dim=1)
    nq = enable(model, scheme=scheme4(model, 4), crop_margin=10)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    plain = model.generate(prompt, **nq.generate_kwargs(), **kw)
    lookup = model.generate(prompt, **nq.generate_kwargs(), prompt_lookup_num_tokens=6, **kw)
    assert torch.equal(lookup, plain)


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gpt_oss"])
def test_nqkv_attention_without_a_cache_is_exact(name):
    # No NQKV cache (use_cache=False): the attention function is exact attention with the model's
    # window, soft-capping and sinks.
    model, ids = tiny(name), ids_for()
    expected = eager_logits(model, ids)
    enable(model, scheme=FULL_PRECISION)
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("compiled_step", ["auto", "traced"])
def test_compiled_decode_steps_on_sliding_and_soft_capped_layers(compiled_step):
    # Gemma 2 (a sliding layer with a ring of codes, a full layer, soft-capping): one-token steps
    # compiled with fullgraph=True, the full layer as the opaque op ("auto" on CPU) or traced and the
    # sliding one traced, give the eager steps' logits.
    model, ids = tiny("gemma2"), ids_for(PROMPT + 6)
    nq = enable(model, scheme=scheme4(model, 4), max_cache_len=64)
    expected = decode_logits(model, ids, nq.new_cache(compiled_step=compiled_step))  # (the same fit period)
    cache = nq.new_cache(compiled_step=compiled_step)
    step = torch.compile(lambda x, pos: model(x, past_key_values=cache, use_cache=True, cache_position=pos).logits,
                         fullgraph=True)
    with torch.no_grad():
        out = [model(ids[:, :PROMPT], past_key_values=cache, use_cache=True).logits]
        out += [step(ids[:, i : i + 1], torch.tensor([i])) for i in range(PROMPT, ids.shape[1])]
    torch.testing.assert_close(torch.cat(out, dim=1), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("window", [3, 8, 12])  # a ring of (16-bit) codes; an exact window as long; longer
@pytest.mark.parametrize("decode", ["reference", "auto"])
def test_sliding_layer_alone_is_exact_sliding_attention(window, decode):
    # A sliding layer driven without any mask, in forwards of several sizes: with 16-bit storage its
    # output is exact attention over the last 8 positions (sinks that left the window are not read).
    torch.manual_seed(0)
    sw, n = 8, 48
    layer = NQKVSlidingLayer(FULL_PRECISION.replace(sinks=2, window=window), sw, decode=decode)
    k, v, q = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 4, n, 16)
    outs, start = [], 0
    for size in (5, 1, 1, 7, 1, 12, 1, 1, 3, 16):
        end = start + size
        layer.update(k[:, :, start:end], v[:, :, start:end])
        outs.append(layer.attention(q[:, :, start:end], None, 0.3))
        start = end
    pos = torch.arange(n)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - sw)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected.transpose(1, 2), rtol=0, atol=1e-5)
    assert layer.capacity <= sw - min(window, sw) + 16  # one-token steps' ring plus the largest forward
