"""nqkv_core.rope: the RoPE read from transformers reproduces each model's own rotary embedding."""

import importlib

import pytest
import torch
import transformers

from nqkv_core.rope import RopeSpec, apply_rope, check_rope, rope_spec, rotate_half_order

SMALL = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, vocab_size=32)
GQA = dict(SMALL, num_key_value_heads=1)
V5 = int(transformers.__version__.split(".")[0]) >= 5


def rope(rope_type: str = "default", theta: float = 10000.0, **params) -> dict:
    """Config keywords for a RoPE: ``rope_parameters`` (transformers 5) or ``rope_theta`` and
    ``rope_scaling`` (4.x)."""
    if V5:
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}
    return {"rope_theta": theta, "rope_scaling": None if rope_type == "default" else {"rope_type": rope_type, **params}}


def _longrope_phi3():
    # head_dim 96 (Phi-3's), 48 frequency pairs, short and long factors of their own
    half = 48
    factors = dict(short_factor=[1.0 + i / half for i in range(half)],
                   long_factor=[2.0 + 3 * i / half for i in range(half)])
    return transformers.Phi3Config(
        hidden_size=192, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1, intermediate_size=64,
        vocab_size=32, max_position_embeddings=256, original_max_position_embeddings=64,
        **(rope("longrope", original_max_position_embeddings=64, **factors) if V5
           else {"rope_scaling": {"type": "longrope", **factors}}),  # 4.x Phi-3 takes exactly these fields
    )


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**GQA),
    "llama-llama3": lambda: transformers.LlamaConfig(
        **GQA, max_position_embeddings=256, **rope("llama3", 500000.0, factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=32)),
    "llama-linear": lambda: transformers.LlamaConfig(**GQA, **rope("linear", factor=4.0)),
    "llama-dynamic": lambda: transformers.LlamaConfig(**GQA, max_position_embeddings=64, **rope("dynamic", factor=2.0)),
    "qwen2-yarn": lambda: transformers.Qwen2Config(
        **GQA, max_position_embeddings=256, **rope("yarn", 1e6, factor=4.0, original_max_position_embeddings=64)),
    "phi3-longrope": _longrope_phi3,
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL),  # partial_rotary_factor 0.25
    "stablelm": lambda: transformers.StableLmConfig(**GQA),  # partial 0.25, split by the attention
    "phi": lambda: transformers.PhiConfig(**SMALL),  # partial 0.5, split by the attention
    "cohere": lambda: transformers.CohereConfig(**GQA),  # interleaved
    "glm": lambda: transformers.GlmConfig(**GQA),  # interleaved, partial 0.5
}


def _model_rope(config, x, pos):
    """``x`` rotated by the model's own rotary module and ``apply_rotary_pos_emb`` (the part the
    model rotates: the first ``cos.shape[-1]`` channels, as its attention splits them)."""
    module = importlib.import_module(type(config).__module__.replace("configuration_", "modeling_"))
    rotary = next(v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and "Vision" not in k)
    cos, sin = rotary(config)(x, pos[None])
    rd = cos.shape[-1]
    _, rotated = module.apply_rotary_pos_emb(x[..., :rd], x[..., :rd], cos, sin)
    return torch.cat([rotated, x[..., rd:]], dim=-1)


@pytest.mark.parametrize("name", CONFIGS)
def test_apply_rope_reproduces_the_models_rotary_embedding(name):
    config = CONFIGS[name]()
    spec = rope_spec(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, head_dim, generator=g)
    pos = torch.arange(40) + 7
    ref = _model_rope(config, x, pos)
    torch.testing.assert_close(apply_rope(x, pos, spec), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(apply_rope(ref, pos, spec, inverse=True), x, atol=1e-5, rtol=1e-5)
    assert spec.rotary_dim <= head_dim and spec.inv_freq.dtype == torch.float32
    assert spec.interleaved == (name in ("cohere", "glm"))
    assert spec.rotary_dim < head_dim if name in ("gpt_neox", "stablelm", "phi", "glm") else spec.rotary_dim == head_dim


def test_attention_scaling_and_rope_types_come_from_transformers():
    yarn, longrope, llama3 = rope_spec(CONFIGS["qwen2-yarn"]()), rope_spec(_longrope_phi3()), rope_spec(
        CONFIGS["llama-llama3"]())
    assert yarn.rope_type == "yarn" and yarn.attention_scaling > 1.0 and yarn.max_len is None
    assert longrope.rope_type == "longrope" and longrope.attention_scaling > 1.0 and longrope.max_len == 64
    assert llama3.attention_scaling == 1.0 and llama3.max_len is None
    plain = rope_spec(transformers.LlamaConfig(**GQA, **rope("default", 500000.0)))
    assert not torch.equal(llama3.inv_freq, plain.inv_freq)  # the llama3 scaling really is applied


@pytest.mark.parametrize("name,long_len", [("llama-dynamic", 100), ("phi3-longrope", 100)])
def test_length_dependent_frequencies_are_exact_up_to_max_len(name, long_len):
    config = CONFIGS[name]()
    spec = rope_spec(config)
    assert spec.max_len == (64 if name == "phi3-longrope" else config.max_position_embeddings)
    head_dim = config.hidden_size // config.num_attention_heads
    x = torch.randn(1, 1, long_len, head_dim, generator=torch.Generator().manual_seed(1))
    n = spec.max_len
    pos = torch.arange(n)
    torch.testing.assert_close(apply_rope(x[..., :n, :], pos, spec), _model_rope(config, x[..., :n, :], pos))
    # a longer sequence makes the model recompute its frequencies: the spec says where that starts
    pos = torch.arange(long_len)
    assert not torch.allclose(apply_rope(x, pos, spec), _model_rope(config, x, pos), atol=1e-3)


def test_models_without_rope_give_none():
    assert rope_spec(transformers.OPTConfig()) is None and check_rope(transformers.OPTConfig()) is None
    assert rope_spec(transformers.GPT2Config()) is None
    assert rope_spec(transformers.BloomConfig()) is None
    assert rope_spec(transformers.FalconConfig(alibi=True)) is None
    assert rope_spec(transformers.FalconConfig(alibi=False)) is not None


@pytest.mark.parametrize("config,feature", [
    (lambda: transformers.GPTJConfig(n_embd=64, n_head=2, n_layer=1, rotary_dim=16), "rotary_dim"),
    (lambda: transformers.Gemma3TextConfig(**GQA), "per layer type.*pass layer_type"),
    (lambda: transformers.GPTNeoXConfig(**{**SMALL, "hidden_size": 66}, rotary_pct=0.5), "leaves no even number"),
], ids=["gptj", "gemma3", "gpt_neox_odd_pass_through"])
def test_check_rope_refuses_what_the_cache_cannot_serve(config, feature):
    with pytest.raises(NotImplementedError, match=feature) as e:
        check_rope(config())
    assert "k_centre_rope=False" in str(e.value)


def test_check_rope_accepts_rotate_half_interleaved_and_partial_models():
    # interleaved and partial layouts are served in the channel order of rotate_half_order
    for name in ("llama", "llama-llama3", "llama-linear", "qwen2-yarn", "phi3-longrope", "llama-dynamic", "gpt_neox",
                 "cohere", "glm"):
        assert isinstance(check_rope(CONFIGS[name]()), RopeSpec)


def test_transformers_4_field_names():
    # transformers 4.x configs carry rope_theta / rope_scaling instead of rope_parameters
    class Old:
        model_type = "llama"
        hidden_size, num_attention_heads, head_dim, max_position_embeddings = 64, 2, 32, 128
        rope_theta, rope_scaling = 5000.0, None
        rope_parameters = None

    from nqkv_core.rope import _rope_parameters

    assert _rope_parameters(Old(), None)[0] == {"rope_theta": 5000.0, "rope_type": "default"}
    Old.rope_scaling = {"type": "linear", "factor": 2.0}
    assert _rope_parameters(Old(), None)[0] == {"rope_theta": 5000.0, "type": "linear", "factor": 2.0,
                                                "rope_type": "linear"}
    # 4.x Gemma 3: sliding layers turn with rope_local_base_freq
    Old.rope_local_base_freq = 100.0
    with pytest.raises(NotImplementedError, match="layer_type"):
        _rope_parameters(Old(), None)
    params, config, _ = _rope_parameters(Old(), "sliding_attention")
    assert params["rope_theta"] == config.rope_theta == 100.0 and Old.rope_theta == 5000.0


def test_apply_rope_rejects_too_few_channels():
    spec = RopeSpec(torch.ones(8))
    with pytest.raises(ValueError, match="16 channels"):
        apply_rope(torch.zeros(3, 8), torch.arange(3), spec)


@pytest.mark.parametrize("name", ["llama-llama3", "qwen2-yarn", "phi3-longrope", "gpt_neox", "llama-linear"])
def test_the_centre_through_the_spec_removes_a_pre_rope_offset(name):
    # Keys = the model's RoPE of (offset + noise): a RoPE-aware centre measured with the spec's
    # frequencies (unscaled: YaRN's / LongRoPE's attention factor folds into mu) removes the offset at
    # every position; plain RoPE over the whole head (what scheme.rope_inv_freq assumed before) does not.
    from nqkv_core.scheme import KVScheme, fit_transform

    config = CONFIGS[name]()
    spec = rope_spec(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(3)
    pre = 5 * torch.randn(1, 2, 1, head_dim, generator=g) + 0.1 * torch.randn(1, 2, 60, head_dim, generator=g)
    pos = torch.arange(60)
    k = _model_rope(config, pre, pos)
    scheme = KVScheme("c", k_centre=True, k_centre_rope=True, sinks=0, stats_tokens=60)

    def residual(inv_freq):
        t = fit_transform(scheme, k, k, None, inv_freq)
        return float((k - t.key_centre(60)).pow(2).mean() / k.pow(2).mean())

    assert residual(spec.inv_freq) < 1e-3
    plain = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert residual(plain) > 10 * residual(spec.inv_freq)


@pytest.mark.parametrize("name", ["gpt_neox", "glm", "cohere", "phi", "llama"])
def test_rotate_half_order_turns_any_layout_into_plain_rotate_half(name):
    import dataclasses

    config = CONFIGS[name]()
    spec = dataclasses.replace(rope_spec(config), attention_scaling=1.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    perm, inv_freq = rotate_half_order(spec, head_dim)
    assert sorted(perm.tolist()) == list(range(head_dim)) and inv_freq.shape == (head_dim // 2,)
    x = torch.randn(2, 3, 20, head_dim, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(20) + 5
    plain = RopeSpec(inv_freq)
    torch.testing.assert_close(apply_rope(x, pos, spec)[..., perm], apply_rope(x[..., perm], pos, plain))
    with pytest.raises(ValueError):
        rotate_half_order(spec, spec.rotary_dim - 2)


def test_rope_per_layer_type():
    # Gemma 3: sliding and full layers turn with their own theta
    config = transformers.Gemma3TextConfig(**{**GQA, "num_hidden_layers": 6}, head_dim=32)  # 5 sliding, 1 full
    sliding, full = (check_rope(config, layer_type=t) for t in ("sliding_attention", "full_attention"))
    assert not torch.equal(sliding.inv_freq, full.inv_freq)
    module = importlib.import_module("transformers.models.gemma3.modeling_gemma3")
    rotary = module.Gemma3RotaryEmbedding(config)
    x = torch.randn(1, 1, 12, 32, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(12)
    for t, spec in (("sliding_attention", sliding), ("full_attention", full)):
        cos, sin = rotary(x, pos[None], layer_type=t)
        _, ref = module.apply_rotary_pos_emb(x, x, cos, sin)
        torch.testing.assert_close(apply_rope(x, pos, spec), ref)
    with pytest.raises(ValueError, match="chunked_attention"):
        rope_spec(config, layer_type="chunked_attention")
    # a model with one RoPE for all layers ignores the layer type
    llama = transformers.LlamaConfig(**GQA)
    assert torch.equal(rope_spec(llama, layer_type="sliding_attention").inv_freq, rope_spec(llama).inv_freq)
