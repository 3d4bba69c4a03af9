"""transformers' generate features on an NQKV cache: crop semantics, assisted decoding, chunking.

Every multi-token forward (a prompt, a chunk, assisted decoding's candidates) reads each key the way
a one-token step at that query's position would, so results do not depend on how a sequence is
split into forward passes; assisted decoding then gives the tokens of plain greedy decoding.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nqkv_core._hf import transformers_version  # noqa: E402
from nqkv_core.cache import NQKVCache, enable  # noqa: E402
from nqkv_core.lab import evaluate  # noqa: E402
from nqkv_core.scheme import KVScheme  # noqa: E402

SCHEME = KVScheme("t", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True, k_centre_rope=True,
                  v_centre=True, sinks=2, window=8, stats_tokens=16, unbiased=True)


def tiny(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger K/V than the tiny init gives, so that quantization shows in the logits
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(4)
            layer.self_attn.q_proj.weight.mul_(4)
    return model


def repetitive_prompt(n: int = 48, seed: int = 1) -> torch.Tensor:
    """A prompt that repeats itself, so that prompt lookup proposes candidates (some accepted)."""
    base = torch.randint(1, 96, (1, n // 2), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base, base], dim=1)


def greedy(model, ids, cache_kwargs, max_new_tokens: int = 24, **kw):
    return model.generate(ids, **cache_kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                          **kw)


@pytest.mark.parametrize("decode", ["reference", "auto"])
def test_chunking_does_not_change_logits(decode):
    # The same 100 tokens as one forward, as three chunks and token by token: the logits of every
    # position agree (to fp32 rounding) with each other and with the fake-quantized reference. (The
    # first forward crosses the fit period, 18 tokens, and the RoPE table's first 64 positions.)
    model = tiny()
    ids = torch.randint(1, 96, (1, 100), generator=torch.Generator().manual_seed(2))
    nq = enable(model, scheme=SCHEME, decode=decode)
    with torch.no_grad():
        whole = model(ids, past_key_values=nq.new_cache(), use_cache=True).logits
        # without config: the RoPE frequencies (and table) come with the first forward's fit
        unconfigured = model(ids, past_key_values=NQKVCache(SCHEME, num_layers=2, decode=decode), use_cache=True).logits
        cache = nq.new_cache()
        chunks = torch.cat([model(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                            for a, b in ((0, 70), (70, 77), (77, 100))], dim=1)
        cache = nq.new_cache()
        steps = [model(ids[:, :10], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits for i in range(10, 100)]
        steps = torch.cat(steps, dim=1)
        with evaluate.fake_quantized(model, SCHEME):
            ref = model(ids).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        quant_effect = (model(ids).logits - ref).abs().max()
    assert quant_effect > 1e-2  # the quantized keys are really read
    for x in (whole, unconfigured, chunks, steps):
        if decode == "reference":  # the same arithmetic
            torch.testing.assert_close(x, ref, rtol=0, atol=2e-4)
        else:  # the fused ops' bf16 products
            assert (x - ref).abs().max() < 0.25 * quant_effect


def test_crop_follows_transformers_semantics():
    model = tiny()
    nq = enable(model, scheme=SCHEME, crop_margin=4)
    cache = nq.new_cache()
    with torch.no_grad():
        model(torch.randint(1, 96, (1, 29)), past_key_values=cache, use_cache=True)
        model(torch.randint(1, 96, (1, 1)), past_key_values=cache, use_cache=True)  # past the fit period
    assert cache.layers[0].prefix is None
    cache.crop(0)
    expected_zero = 30 if transformers_version() >= (5, 0) else 0  # 5.x: "remove nothing"; 4.x: "keep 0"
    assert cache.get_seq_length() == expected_zero
    if expected_zero:
        cache.crop(-3)  # drop the last three
        assert cache.get_seq_length() == 27
        cache.crop(26)  # keep 26 (the legacy positive form)
        assert cache.get_seq_length() == 26
        with pytest.raises(ValueError, match="crop_margin"):
            cache.crop(-10)  # beyond the full-precision margin


@pytest.mark.parametrize("prompt, margin, kept", [(29, 0, False), (29, 4, False), (20, 0, False), (20, 4, True)])
def test_fit_tokens_are_kept_only_while_a_crop_can_reach_them(prompt, margin, kept):
    # SCHEME fits on 18 tokens and keeps 7 + margin ring slots: a 20-token prompt with a margin of 4
    # can be cropped to 16 tokens (its fit is then redone), so its exact fit tokens stay one step;
    # otherwise they are dropped with the prompt's forward.
    model = tiny()
    cache = enable(model, scheme=SCHEME, crop_margin=margin).new_cache()
    with torch.no_grad():
        model(torch.randint(1, 96, (1, prompt)), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.transform is not None and (layer.prefix is not None) == kept
    floor = layer.crop_floor(prompt)
    assert (floor < SCHEME.fit_tokens) == kept
    if kept:
        cache.crop(floor)  # into the fit tokens: exact again, fitted at the next step
        assert layer.transform is None and cache.get_seq_length() == floor
    elif floor:
        with pytest.raises(ValueError, match="crop_margin"):
            cache.crop(floor - 1)


QUERY_FITTED = SCHEME.replace(name="t-query", k_rounding="query", k_equalize="qk", v_equalize=True)


@pytest.mark.skipif(transformers_version() < (5, 0), reason="assisted decoding of transformers 5")
@pytest.mark.parametrize("prompt_len, scheme", [(48, SCHEME), (10, SCHEME), (4, SCHEME), (10, QUERY_FITTED)])
def test_assisted_decoding_equals_greedy(prompt_len, scheme):
    # Prompt lookup and a draft model verify several candidate tokens per forward and crop the rejected
    # ones; with a crop margin covering the candidates the tokens are those of plain greedy decoding.
    # A prompt shorter than fit_tokens (18; 132 with query statistics) is decoded in the fit period,
    # where the first forward also holds candidates and crops can remove tokens the transform was
    # fitted on: it is fitted on the same tokens as in plain greedy decoding all the same.
    model, draft = tiny(0), tiny(5, layers=1)
    ids = repetitive_prompt(prompt_len)
    nq = enable(model, scheme=scheme, crop_margin=10)
    plain = greedy(model, ids, nq.generate_kwargs(), max_new_tokens=48 if prompt_len < 48 else 24)
    lookup = greedy(model, ids, nq.generate_kwargs(), prompt_lookup_num_tokens=6,
                    max_new_tokens=plain.shape[1] - prompt_len)
    assert torch.equal(lookup, plain)
    drafted = greedy(model, ids, nq.generate_kwargs(), assistant_model=draft, num_assistant_tokens=5,
                     max_new_tokens=plain.shape[1] - prompt_len)
    assert torch.equal(drafted, plain)


def test_assisted_decoding_without_margin_says_what_to_change():
    model = tiny()
    nq = enable(model, scheme=SCHEME)
    with pytest.raises(ValueError, match="crop_margin"):
        greedy(model, repetitive_prompt(48), nq.generate_kwargs(), prompt_lookup_num_tokens=6)


def test_cache_without_config_counts_as_empty_before_the_first_forward():
    cache = NQKVCache(SCHEME, num_layers=1)
    assert cache.get_seq_length() == 0


def test_enable_is_reversible():
    import nqkv_core

    model = tiny()
    model.set_attn_implementation("eager")
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).logits
        with nqkv_core.enable(model, scheme=SCHEME) as nq:
            assert model.config._attn_implementation == "nqkv"
            model(ids, **nq.generate_kwargs())
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
        nqkv_core.enable(model, bits=4)
        nqkv_core.enable(model, bits=4)  # enabling twice still restores the original
        nqkv_core.disable(model)
        assert model.config._attn_implementation == "eager"
        nqkv_core.disable(model)  # not enabled: nothing to undo
        assert model.config._attn_implementation == "eager"
