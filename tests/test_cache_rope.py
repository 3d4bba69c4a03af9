"""NQKVCache on models with scaled RoPE (llama3, linear, dynamic, YaRN, LongRoPE) and without RoPE.

The RoPE-aware key centre takes the model's frequencies from :mod:`nqkv_core.rope`. With 16-bit
storage the cache must give DynamicCache's logits (the centre is subtracted and its score added back
exactly); at 4 bits it must give the fake-quantized reference of the same scheme.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nqkv_core.cache import NQKVCache, enable  # noqa: E402
from nqkv_core.lab import evaluate  # noqa: E402
from nqkv_core.rope import check_rope  # noqa: E402
from nqkv_core.scheme import KVScheme, nqkv_preset  # noqa: E402

NEW = 12
V5 = int(transformers.__version__.split(".")[0]) >= 5
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def rope(rope_type: str, theta: float = 10000.0, **params) -> dict:
    """Config keywords for a RoPE: ``rope_parameters`` (transformers 5) or ``rope_theta`` and
    ``rope_scaling`` (4.x)."""
    if V5:
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": rope_type, **params}}


def _phi3_longrope():
    half = 8  # head_dim 16: 8 frequency pairs
    factors = dict(short_factor=[1.0 + i / half for i in range(half)],
                   long_factor=[2.0 + i / half for i in range(half)])
    return transformers.Phi3ForCausalLM, transformers.Phi3Config(
        **{**SIZES, "max_position_embeddings": 256}, original_max_position_embeddings=64, pad_token_id=0,
        **(rope("longrope", original_max_position_embeddings=64, **factors) if V5
           else {"rope_scaling": {"type": "longrope", **factors}}))  # 4.x Phi-3 takes exactly these fields


MODELS = {
    "llama3": lambda: (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **SIZES, **rope("llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16))),
    "linear": lambda: (transformers.LlamaForCausalLM,
                       transformers.LlamaConfig(**SIZES, **rope("linear", factor=4.0))),
    "dynamic": lambda: (transformers.LlamaForCausalLM,
                        transformers.LlamaConfig(**SIZES, **rope("dynamic", factor=2.0))),
    "yarn": lambda: (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        **SIZES, **rope("yarn", factor=4.0, original_max_position_embeddings=16))),
    "longrope": _phi3_longrope,
}

ROPE_CENTRE = KVScheme("d", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True,
                       k_centre_rope=True, v_centre=True, sinks=2, window=4, unbiased=True,
                stats_tokens=4)  # a fit period of 6 tokens: short sequences are mostly past it


# The reference decode strategy: plain torch, the arithmetic of fake quantization.
REF = dict(decode="reference")


def tiny(name: str, seed: int = 0):
    """A random tiny model with ``name``'s RoPE and larger queries and keys than the init gives (so
    that quantization shows in the logits)."""
    cls, cfg = MODELS[name]()
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            k_proj = attn.k_proj if hasattr(attn, "k_proj") else None
            if k_proj is None:  # Phi-3: one fused qkv projection, query rows then key rows
                q_rows = cfg.num_attention_heads * cfg.hidden_size // cfg.num_attention_heads
                k_rows = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
                attn.qkv_proj.weight[:q_rows + k_rows].mul_(4)
                continue
            k_proj.weight.mul_(4)
            attn.q_proj.weight.mul_(4)
    return model


def generate(model, ids, scheme=None, cache=None):
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0)
    if cache is None and scheme is not None:
        evaluate.register_attention()
        model.set_attn_implementation(evaluate.ATTN_NAME)
        with evaluate.active_scheme(scheme):
            out = model.generate(ids, **kw)
    elif cache is None:
        model.set_attn_implementation("eager")
        out = model.generate(ids, **kw)  # DynamicCache
    else:
        out = model.generate(ids, **cache, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_16bit_rope_centred_cache_gives_dynamic_cache_logits(name):
    model = tiny(name)
    assert check_rope(model.config).rope_type == name
    ids = torch.randint(1, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    ref_seq, ref_logits = generate(model, ids)
    nq = enable(model, scheme=ROPE_CENTRE.replace(k_bits=16, v_bits=16), **REF)
    seq, logits = generate(model, ids, cache=nq.generate_kwargs())
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_4bit_rope_centred_cache_matches_fake_quantization(name):
    model = tiny(name)
    # a prompt of window tokens: the cache attends its prompt in full precision, the reference does too
    ids = torch.randint(1, 96, (1, ROPE_CENTRE.window), generator=torch.Generator().manual_seed(1))
    nq = enable(model, scheme=ROPE_CENTRE, **REF)
    kwargs = nq.generate_kwargs()
    seq, logits = generate(model, ids, cache=kwargs)
    cache = next(v for v in kwargs.values() if isinstance(v, NQKVCache))
    assert torch.equal(cache.rope.inv_freq, check_rope(model.config).inv_freq)  # the model's frequencies
    ref_seq, ref_logits = generate(model, ids, ROPE_CENTRE)
    _, fp_logits = generate(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-4)
    assert torch.equal(seq, ref_seq)
    assert (ref_logits - fp_logits).abs().max() > 1e-2  # the quantized body really is read


def test_unsupported_rope_raises_at_cache_creation_and_enable_falls_back_to_a_plain_centre():
    # GPT-J: a rotary_dim outside the rope parameters, which transformers' RoPE functions do not describe
    gptj = transformers.GPTJConfig(vocab_size=96, n_embd=64, n_head=4, n_layer=2, n_positions=64, rotary_dim=8)
    with pytest.raises(NotImplementedError, match="rotary_dim.*k_centre_rope=False"):
        NQKVCache(ROPE_CENTRE, config=gptj)
    NQKVCache(ROPE_CENTRE.replace(k_centre_rope=False), config=gptj)  # the workaround works
    model = transformers.GPTJForCausalLM(gptj).eval()
    with pytest.raises(NotImplementedError, match="rotary_dim"):
        enable(model, scheme=ROPE_CENTRE)
    with pytest.warns(UserWarning, match="rotary_dim"):
        nq = enable(model, bits=4)
    assert nq.scheme.k_centre and not nq.scheme.k_centre_rope and "plain-centre" in nq.scheme.name


def test_model_without_rope_gets_a_plain_centre():
    opt = transformers.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    with pytest.raises(NotImplementedError, match="no RoPE"):
        NQKVCache(ROPE_CENTRE, config=opt)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(opt).eval()
    nq = enable(model, bits=4)
    assert nq.scheme.k_centre and not nq.scheme.k_centre_rope and nq.scheme.name == "NQKV-4 plain-centre b16 S4 W32"
    scheme = nq.scheme.replace(window=4, stats_tokens=4)  # so that the new tokens reach the quantized body
    nq = enable(model, scheme=scheme, **REF)
    ids = torch.randint(1, 96, (1, scheme.window), generator=torch.Generator().manual_seed(1))
    seq, logits = generate(model, ids, cache=nq.generate_kwargs())
    ref_seq, ref_logits = generate(model, ids, scheme)
    _, fp_logits = generate(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-4)
    assert torch.equal(seq, ref_seq) and (ref_logits - fp_logits).abs().max() > 1e-3


def test_user_schemes_are_fitted_to_the_head_dim():
    # nqkv_preset(4, v_bits=3) has blocks of 64; this model's head_dim is 16
    model = tiny("llama3")
    nq = enable(model, scheme=nqkv_preset(4, v_bits=3), **REF)
    assert (nq.scheme.k_block, nq.scheme.v_block) == (16, 16)
    assert nq.scheme.name == "NQKV-K4V3 [head_dim 16: blocks 64->16]"
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    generate(model, ids, cache=nq.generate_kwargs())  # stores and reads 4- and 3-bit blocks of 16
    cache = NQKVCache(nqkv_preset(4), config=model.config)
    assert cache.scheme.k_block == 16
    unfitted = NQKVCache(nqkv_preset(4), num_layers=2)  # no config: no head_dim to fit to
    with pytest.raises(ValueError, match=r"fit_head_dim\(16\)"):
        unfitted.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
