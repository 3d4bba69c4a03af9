"""transformers integration: ``NQKVCache``, the ``"nqkv"`` attention function and ``enable(model)``.

A step is split between the two hooks transformers gives a cache:

* ``Cache.update`` (called by the model after RoPE) only parks the new K/V on the layer and returns
  a handle instead of tensors, so attention that is not NQKV fails loudly instead of silently
  attending to a partial cache.
* the registered attention function (``attn_implementation="nqkv"``) fits the scheme's transform
  on the first call (it needs the queries), attends to ``[body | sinks | window | new]`` with the new
  tokens exact, and then commits the new tokens (quantizing those that leave the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nqkv_core import _hf
from nqkv_core.cache import io
from nqkv_core.cache.attend import sdpa
from nqkv_core.cache.format import RopeTable, side_format
from nqkv_core.cache.layer import CompiledStep, NQKVLayer, _Handle
from nqkv_core.cache.step import Decode, StepMemo, check_decode
from nqkv_core.scheme import KVScheme, default_scheme, rope_inv_freq

try:  # transformers is an optional dependency of the package; the cache needs it.
    from transformers.cache_utils import Cache
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("nqkv_core.cache needs transformers>=4.57: pip install 'nqkv[eval]'") from e

ATTN_NAME = "nqkv"


def check_supported(config: Any) -> None:
    """Raise ``NotImplementedError`` for models whose attention the cache cannot serve.

    Supported: decoder-only causal self-attention over every position (Llama, Mistral without a
    sliding window, Qwen2/3, Phi-3, ...). Rejected: sliding-window or chunked layers, encoder-decoder
    models (cross-attention), non-causal models, and K/V of different head dims.
    """
    text = _hf.text_config(config)
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{name}: NQKVCache serves decoder-only models, not cross-attention")
    # (not ``is_decoder``: transformers 4.x leaves it False on decoder-only models such as Llama)
    if getattr(text, "is_causal", True) is False:
        raise NotImplementedError(f"{name}: NQKVCache needs causal attention")
    layer_types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    sliding = getattr(text, "sliding_window", None)
    if sliding is not None and getattr(text, "use_sliding_window", True):
        other.append(f"sliding_window={sliding}")
    if getattr(text, "attention_chunk_size", None) is not None:
        other.append("chunked attention")
    if other:
        raise NotImplementedError(
            f"{name}: NQKVCache supports full causal attention only; this model has {', '.join(map(str, other))}"
        )


class NQKVCache(Cache):
    """A quantized, append-only KV cache for transformers models (one :class:`NQKVLayer` per layer).

    Args:
        scheme: how K/V are stored (codebook schemes with blocks along head_dim).
        config: the model config; gives the number of layers and is checked for support.
        num_layers: the number of layers, if no ``config`` (otherwise layers are added as needed).
        max_cache_len: preallocate for this many tokens (prompt plus new tokens): a decode step then
            allocates nothing and can be compiled; exceeding it raises ``ValueError``. None: grow.
        crop_margin: extra full-precision tokens kept so that :meth:`crop` can go back that far.
        compiled_step: how a ``torch.compile``'d step runs each layer. ``"op"``: as one opaque op,
            ``torch.ops.nqkv.cache_step``, that runs the eager step (on CPU one native call per layer):
            a small graph that compiles quickly and steps as fast as eager decoding (CPU only).
            ``"traced"``: the step's torch ops traced into the graph, which CUDA graphs can capture.
            ``"auto"``: ``"op"`` on CPU, ``"traced"`` elsewhere. Eager steps are the same either way.
        decode: the decode strategy (:mod:`nqkv_core.cache.step`): ``"auto"`` (the fastest the
            device has), ``"native"``, ``"folded"``, ``"ops"``, or ``"reference"`` (plain torch, the
            arithmetic of fake quantization, for checking the others).

    Use with a model whose attention is ``"nqkv"`` (see :func:`enable`).
    """

    def __init__(
        self,
        scheme: KVScheme,
        config: Any = None,
        num_layers: int | None = None,
        max_cache_len: int | None = None,
        crop_margin: int = 0,
        compiled_step: CompiledStep = "auto",
        decode: Decode = "auto",
    ):
        inv_freq = None
        if config is not None:
            check_supported(config)
            num_layers = _hf.num_layers(config)
            if scheme.k_centre and scheme.k_centre_rope:
                inv_freq = rope_inv_freq(_hf.text_config(config), _hf.head_dim(config))
        if scheme.layer_bits and num_layers is not None and num_layers != len(scheme.layer_bits):
            raise ValueError(
                f"scheme {scheme.name!r} has widths for {len(scheme.layer_bits)} layers; the model has {num_layers}"
            )
        self.scheme = scheme
        self._max_len = max_cache_len
        self.crop_margin = crop_margin
        self.compiled_step = compiled_step
        self.decode = check_decode(decode)
        # One table of RoPE cos/sin per position for all layers (used by RoPE-centred schemes only).
        self.rope = RopeTable(inv_freq, max_cache_len)
        self.step_memo = StepMemo()
        layers = [self._new_layer(i) for i in range(num_layers or 0)]
        super().__init__(layers=layers)

    def _new_layer(self, layer_idx: int) -> NQKVLayer:
        return NQKVLayer(self.scheme.for_layer(layer_idx), self.max_cache_len, self.crop_margin, self.rope,
                         self.step_memo, self.compiled_step, self.decode)

    def _layer(self, layer_idx: int) -> NQKVLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """transformers' hook (``cache_kwargs`` before 5.12, ``*args, **kwargs`` after): park new K/V."""
        return self._layer(layer_idx).update(key_states, value_states)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               query_states: torch.Tensor | None = None) -> None:
        """Store post-RoPE K/V ``(b, h, T, d)`` of layer ``layer_idx`` without attending."""
        self._layer(layer_idx).append(key_states, value_states, query_states)

    def get_seq_length(self, layer_idx: int = 0, *args) -> int | torch.Tensor:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.12 passes cache_position
            query_length = query_length.shape[0]
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_len if self.max_cache_len is not None else -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5.18
        return self.get_max_length()

    @property
    def max_cache_len(self) -> int | None:  # type: ignore[override]
        """Preallocated length (None: grows); read-only, as transformers 5.17's base class has it."""
        return self._max_len

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return self.max_cache_len is not None and len(self.layers) > 0

    @property
    def nbytes(self) -> int:
        """Bytes of all allocated cache storage."""
        return sum(layer.nbytes for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Storage bytes per quantized token over all layers (K and V, all kv heads, one sequence)."""
        return sum(layer.bytes_per_token() for layer in self.layers)


    # -- save / load (prefix reuse) ------------------------------------------------------------------

    def save(self, path: str | Path, key: bytes | None = None) -> None:
        """Write the cache contents to a safetensors file (used parts only, with a SHA-256 checksum).

        ``key``: a secret; adds an HMAC-SHA256 that :meth:`load` with the same key requires. The plain
        checksum detects corruption, not tampering (anyone can recompute it).
        """
        io.save(self, path, key)

    @classmethod
    def load(
        cls,
        path: str | Path,
        scheme: KVScheme,
        config: Any = None,
        max_cache_len: int | None = None,
        crop_margin: int = 0,
        device: torch.device | str | None = None,
        decode: Decode = "auto",
        key: bytes | None = None,
    ) -> "NQKVCache":
        """Read a cache written by :meth:`save`, checking every tensor before use (:mod:`nqkv_core.cache.io`).

        A file is untrusted input: its metadata, every tensor's dtype and shape, and the values of
        the transforms and full-precision tokens are checked against ``scheme`` (and ``config``)
        before anything is built from them. ``key``: the secret the file was saved with (its
        HMAC-SHA256 must match); without it only the plain checksum is checked.

        Raises:
            ValueError: unreadable, corrupted or inconsistent file (naming the layer and tensor),
                another scheme, another number of layers, kv heads or head_dim than ``config``, or a
                wrong ``key``.
        """
        return io.load(cls, path, scheme, config, max_cache_len, crop_margin, device, decode, key)


# -- the attention function and the one-call setup ---------------------------------------------------


def nqkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``attn_implementation="nqkv"``.

    With an :class:`NQKVCache`, ``key``/``value`` are layer handles and attention reads the quantized
    cache. Without one (no cache, or another cache type) it is exact SDPA over the given tensors.
    """
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{type(module).__name__}: NQKV attention is causal only")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(f"{type(module).__name__}: NQKV attention does not support sliding windows")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(key, _Handle):
        return key.layer.attention(query, attention_mask, scale, getattr(module, "config", None)), None
    T, tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        mask = torch.ones(T, tk, dtype=torch.bool, device=query.device).tril(tk - T)
    else:
        mask = _hf.bool_mask(attention_mask[:, :, -T:, -tk:])
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    out = sdpa(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`nqkv_attention` and its (SDPA-style boolean) mask under ``"nqkv"``."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, nqkv_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    except ImportError:  # pragma: no cover - older layouts build the mask from the attention name
        pass
    return ATTN_NAME



@dataclass
class NQKVModel:
    """What :func:`enable` returns: the model, its scheme and cache settings, and generate helpers."""

    model: torch.nn.Module
    scheme: KVScheme
    max_cache_len: int | None = None
    crop_margin: int = 0
    decode: Decode = "auto"

    def new_cache(self, max_cache_len: int | None = None, compiled_step: CompiledStep = "auto") -> NQKVCache:
        """A fresh cache for one ``generate`` call (``max_cache_len`` overrides the default;
        ``compiled_step``: see :class:`NQKVCache`)."""
        return NQKVCache(self.scheme, config=self.model.config,
                         max_cache_len=max_cache_len if max_cache_len is not None else self.max_cache_len,
                         crop_margin=self.crop_margin, compiled_step=compiled_step, decode=self.decode)

    def generate_kwargs(self, max_cache_len: int | None = None) -> dict[str, Any]:
        """``{"cache": ...}`` (transformers >= 5.24) or ``{"past_key_values": ...}`` with a fresh cache."""
        key = "cache" if _hf.transformers_version() >= (5, 24) else "past_key_values"
        return {key: self.new_cache(max_cache_len), "use_cache": True}

    def generate(self, *args, **kwargs):
        """``model.generate`` with a fresh NQKV cache."""
        return self.model.generate(*args, **self.generate_kwargs(), **kwargs)


def enable(
    model: torch.nn.Module,
    bits: int = 4,
    scheme: KVScheme | None = None,
    max_cache_len: int | None = None,
    crop_margin: int = 0,
    decode: Decode = "auto",
) -> NQKVModel:
    """Make ``model`` attend through NQKV caches; returns the cache factory and generate kwargs.

    Args:
        model: a transformers decoder-only causal LM with full attention.
        bits: code bits for K and V of the default scheme (:func:`default_scheme`); ignored if
            ``scheme`` is given.
        scheme: the storage scheme.
        max_cache_len: preallocate caches for this many tokens (compileable decode); None grows.
        crop_margin: see :class:`NQKVCache`.
        decode: the decode strategy of its caches (see :class:`NQKVCache`).

    Raises:
        NotImplementedError: for an unsupported model or scheme.

    Example::

        nq = nqkv_core.enable(model, bits=4)
        out = model.generate(ids, max_new_tokens=32, **nq.generate_kwargs())
    """
    config = model.config
    check_supported(config)
    check_decode(decode)
    scheme = scheme or default_scheme(bits, _hf.head_dim(config))
    side_format(scheme, "k"), side_format(scheme, "v")
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
    else:  # pragma: no cover - older transformers
        config._attn_implementation = ATTN_NAME
    return NQKVModel(model, scheme, max_cache_len, crop_margin, decode)

