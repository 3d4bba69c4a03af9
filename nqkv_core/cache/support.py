"""Which models an NQKV cache serves: layer types from the config, the support check, RoPE frequencies.

Whatever the cache cannot serve is refused here, when the cache is created or ``enable`` is called,
with the model feature named and what to do instead.
"""

from __future__ import annotations

from typing import Any

import torch

from nqkv_core import _hf
from nqkv_core.scheme import KVScheme, rope_layout

# The attention layer types (transformers' ``config.layer_types``) an NQKV cache serves.
LAYER_TYPES = ("full_attention", "sliding_attention")
_WORKAROUND = "run this model with transformers' own cache (DynamicCache) instead"


def layer_types(config: Any) -> list[str]:
    """The attention type of each decoder layer: transformers' ``layer_types`` if the config has them,
    else what older configs say: ``sliding_window`` with ``use_sliding_window`` (from layer
    ``max_window_layers`` on, Qwen2) or ``sliding_window_pattern`` (every n-th layer full, Gemma 3),
    a ``sliding_window`` alone (every layer, Mistral), ``attention_chunk_size`` (chunked)."""
    text = _hf.text_config(config)
    n = text.num_hidden_layers
    types = getattr(text, "layer_types", None)
    if types:
        return list(types)
    if getattr(text, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    if getattr(text, "sliding_window", None) is None or getattr(text, "use_sliding_window", True) is False:
        return ["full_attention"] * n
    pattern = getattr(text, "sliding_window_pattern", None)
    if pattern:
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    first = getattr(text, "max_window_layers", 0) if hasattr(text, "use_sliding_window") else 0
    return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]


def check_supported(config: Any) -> None:
    """Raise ``NotImplementedError`` for models whose attention the cache cannot serve.

    Supported: decoder-only causal self-attention whose layers are full or sliding-window
    (``layer_types``), with soft-capped logits, a custom query scale or learned attention sinks
    (Llama, Mistral, Qwen2/3, Gemma 2/3, GPT-OSS, Phi-3, ...). Rejected, each with the feature named:
    encoder-decoder models (cross-attention), non-causal or bidirectional attention, chunked,
    linear and other attention layer types. (K and V of different head dims are refused at the
    first step.)
    """
    text = _hf.text_config(config)
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{name}: NQKVCache serves decoder-only models, not cross-attention; {_WORKAROUND}")
    # (not ``is_decoder``: transformers 4.x leaves it False on decoder-only models such as Llama)
    if getattr(text, "is_causal", True) is False or getattr(text, "use_bidirectional_attention", False):
        raise NotImplementedError(
            f"{name}: NQKVCache needs causal attention (this model attends bidirectionally); {_WORKAROUND}"
        )
    if getattr(text, "attention_chunk_size", None) is not None:
        raise NotImplementedError(
            f"{name}: NQKVCache does not serve chunked attention (attention_chunk_size); {_WORKAROUND}"
        )
    if getattr(text, "kv_lora_rank", None):  # DeepSeek-V2/V3, Kimi: latent K/V, no per-head K/V to store
        raise NotImplementedError(
            f"{name}: NQKVCache stores per-head keys and values; this model's multi-head latent attention"
            f" (kv_lora_rank={text.kv_lora_rank}) caches a compressed latent instead; {_WORKAROUND}"
        )
    if not getattr(text, "num_attention_heads", None):
        raise NotImplementedError(f"{name}: NQKVCache needs attention layers; this model has none; {_WORKAROUND}")
    types = layer_types(config)
    other = sorted(set(types) - set(LAYER_TYPES))
    if other:
        raise NotImplementedError(
            f"{name}: NQKVCache serves {' and '.join(LAYER_TYPES)} layers; this model has {', '.join(other)}"
            f" layers (config.layer_types); {_WORKAROUND}"
        )
    window = getattr(text, "sliding_window", None)
    if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
        raise NotImplementedError(f"{name}: sliding_attention layers without a positive sliding_window ({window!r})")


def rope_layouts(config: Any, head_dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The RoPE of each layer type of ``config`` as a RoPE-centred scheme takes it:
    ``(inv_freq, k_order)`` of :func:`~nqkv_core.transform.rope_layout`, per layer type for models
    whose RoPE differs by type (Gemma 3); equal tensors of different types are one object.

    Raises:
        ValueError: the model has no RoPE (:func:`~nqkv_core.transform.rope_layout`).
        NotImplementedError: a RoPE the cache cannot serve (multimodal, ...).
    """
    layouts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for t in sorted(set(layer_types(config))):
        f, order = rope_layout(_hf.text_config(config), head_dim, layer_type=t)
        f = next((g for g, _ in layouts.values() if torch.equal(g, f)), f)
        if order is not None:
            order = next((o for _, o in layouts.values() if o is not None and torch.equal(o, order)), order)
        layouts[t] = (f, order)
    return layouts


def rope_inv_freqs(config: Any, head_dim: int) -> dict[str, torch.Tensor]:
    """The RoPE inverse frequencies of each layer type of ``config`` (a RoPE-centred scheme's), as
    transformers computes them: those of :func:`rope_layouts`, in the key channel order it gives
    with them (the model's own for rotate-half RoPE over the whole head); types with equal
    frequencies share one tensor.

    Raises:
        As :func:`rope_layouts`.
    """
    return {t: f for t, (f, _) in rope_layouts(config, head_dim).items()}


def scheme_rope_layouts(scheme: KVScheme, config: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`rope_layouts` if ``scheme`` centres keys with RoPE, else ``{}``.

    Raises:
        NotImplementedError: for a RoPE-centred scheme on a model without RoPE or with one the cache
            cannot serve (:func:`nqkv_core.rope.check_rope`).
    """
    if not (scheme.k_centre and scheme.k_centre_rope):
        return {}
    try:
        return rope_layouts(config, _hf.head_dim(config))
    except ValueError as e:
        raise NotImplementedError(
            f"{type(config).__name__}: scheme {scheme.name!r} centres keys with the model's RoPE, and {e};"
            " use a scheme without k_centre_rope (scheme.replace(k_centre_rope=False))"
        ) from e
