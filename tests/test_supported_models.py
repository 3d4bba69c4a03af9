"""The cache on the architectures people serve: tiny random-weight models of each family.

For every supported model: with 16-bit storage the cache reproduces ``DynamicCache``'s logits; at 4
bits (the default scheme for its head_dim) it reproduces the same scheme applied as fake
quantization; and its logit fidelity to full precision is at least that of transformers'
``QuantizedCache`` (quanto, int4) on the same model and tokens, measured here. Models the cache
cannot serve are refused by ``enable`` with a message naming the feature.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nqkv_core import _hf  # noqa: E402
from nqkv_core.cache import enable, layer_types  # noqa: E402
from nqkv_core.lab import evaluate  # noqa: E402
from nqkv_core.scheme import KVScheme, default_scheme  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=256, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)


def _rope(rope_type: str, theta: float = 10000.0, **kw) -> dict:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **kw}}


MODELS = {
    "llama-gqa": ("LlamaConfig", {}),
    "llama3-rope": ("LlamaConfig", _rope("llama3", 5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=32)),
    "qwen2-yarn": ("Qwen2Config", _rope("yarn", 1e6, factor=4.0, original_max_position_embeddings=32)),
    "llama-linear": ("LlamaConfig", _rope("linear", factor=2.0)),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=16)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=64)),
    "gemma2": ("Gemma2Config", dict(head_dim=64, sliding_window=16, query_pre_attn_scalar=64,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=64, sliding_window=16, query_pre_attn_scalar=64)),
    "phi3-head-dim-96": ("Phi3Config", dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=2,
                                           pad_token_id=0)),
    "opt": ("OPTConfig", dict(ffn_dim=96, word_embed_proj_dim=256, init_std=0.1)),
    "gpt2": ("GPT2Config", dict(n_embd=256, n_head=4, n_layer=2, n_positions=256)),
    "gpt-neox": ("GPTNeoXConfig", dict(rotary_pct=0.25)),
    "stablelm": ("StableLmConfig", dict(partial_rotary_factor=0.25)),
    "cohere": ("CohereConfig", {}),
}
UNSUPPORTED = {
    "deepseek-v3-mla": ("DeepseekV3Config", dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                                 qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                                 num_experts_per_tok=2, moe_intermediate_size=32)),
    "mamba": ("MambaConfig", dict(state_size=4, num_hidden_layers=2)),
    "qwen3-next-hybrid": ("Qwen3NextConfig", dict(head_dim=16, linear_num_value_heads=2, linear_num_key_heads=2,
                                                  linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                                  layer_types=["linear_attention", "full_attention"])),
}


def build(name: str, table=MODELS):
    cls_name, kw = table[name]
    config = getattr(transformers, cls_name)(**{**BASE, **kw})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model.float()


def prompt(model, n: int = 48) -> torch.Tensor:
    return torch.randint(1, 96, (1, n), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def step_logits(model, ids: torch.Tensor, cache_kwargs: dict, prefill: int) -> torch.Tensor:
    """Logits of the last prompt position and of each later token fed one at a time (teacher-forced)."""
    out = [model(ids[:, :prefill], **cache_kwargs, use_cache=True).logits[:, -1]]
    for i in range(prefill, ids.shape[1]):
        out.append(model(ids[:, i : i + 1], **cache_kwargs, use_cache=True).logits[:, -1])
    return torch.stack(out, 1).float()


def cache_key() -> str:
    return "cache" if _hf.transformers_version() >= (5, 24) else "past_key_values"


def dynamic_logits(model, ids, prefill):
    from transformers import DynamicCache

    model.set_attn_implementation("eager")
    return step_logits(model, ids, {cache_key(): DynamicCache(config=model.config)}, prefill)


def small_scheme(model) -> KVScheme:
    """The default 4-bit scheme for the model (its head_dim and RoPE), with few exact tokens so
    that a short sequence reaches the quantized body."""
    return default_scheme(4, _hf.head_dim(model.config), config=model.config).replace(sinks=2, window=8,
                                                                                      stats_tokens=16)


@pytest.mark.parametrize("name", list(MODELS))
def test_16_bit_storage_reproduces_dynamic_cache(name):
    model = build(name)
    ids = prompt(model, 40)
    ref = dynamic_logits(model, ids, 30)
    fp = KVScheme("fp16", k_bits=16, v_bits=16, sinks=2, window=8)
    nq = enable(model, scheme=fp)
    got = step_logits(model, ids, {cache_key(): nq.new_cache()}, 30)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_4_bit_cache_reproduces_fake_quantization(name):
    model = build(name)
    ids = prompt(model, 40)
    scheme = small_scheme(model)
    nq = enable(model, scheme=scheme, decode="reference")
    got = step_logits(model, ids, {cache_key(): nq.new_cache()}, 30)
    with evaluate.fake_quantized(model, scheme):
        ref = torch.stack([model(ids[:, : i + 1]).logits[:, -1] for i in range(29, 40)], 1).float()
    fp = dynamic_logits(model, ids, 30)
    effect = (ref - fp).abs().amax(-1)
    assert effect.max() > 1e-3  # the quantized body is really read
    # The reference recomputes each prefix, so a key's fp32 rounding can differ from the cache's by
    # an ulp, and a code at a level boundary then flips (one in thousands): most steps agree to fp32
    # rounding, and none by more than a fraction of the quantization's own effect.
    err = (got - ref).abs().amax(-1)
    assert (err <= 5e-4).float().mean() >= 0.8, err
    assert (err <= 0.25 * effect.max()).all(), (err, effect)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Logit fidelity: the cosine similarity of two runs' logits, averaged over the decode steps."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_fidelity_at_least_quanto_int4(name):
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache

    model = build(name)
    if set(layer_types(model.config)) != {"full_attention"}:
        pytest.skip("transformers' QuantizedCache serves models with only full-attention layers")
    ids = prompt(model, 96)
    start = default_scheme(4, _hf.head_dim(model.config)).fit_tokens  # steps past the fit period
    fp = dynamic_logits(model, ids, start)
    nq = enable(model, bits=4)
    ours = mean_cosine(step_logits(model, ids, {cache_key(): nq.new_cache()}, start), fp)
    model.set_attn_implementation("eager")
    # (groups of head_dim, as the NQKV blocks; 32 recent tokens exact, as the NQKV window)
    quanto = QuantizedCache(backend="quanto", config=model.config, nbits=4, axis_key=0, axis_value=0,
                            q_group_size=_hf.head_dim(model.config), residual_length=32)
    theirs = mean_cosine(step_logits(model, ids, {cache_key(): quanto}, start), fp)
    assert ours >= theirs - 1e-4, (ours, theirs)


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_are_refused_at_enable(name):
    model = build(name, UNSUPPORTED)
    with pytest.raises(NotImplementedError, match="NQKV"):
        enable(model, bits=4)
