"""transformers integration: ``NQKVCache``, the ``"nqkv"`` attention function and ``enable(model)``.

A step is split between the two hooks transformers gives a cache:

* ``Cache.update`` (called by the model after RoPE) only parks the new K/V on the layer and returns
  a handle instead of tensors, so attention that is not NQKV fails loudly instead of silently
  attending to a partial cache.
* the registered attention function (``attn_implementation="nqkv"``) fits the scheme's transform
  once a sequence holds its first ``scheme.fit_tokens`` tokens (it may need their queries; until
  then every token is exact, :mod:`nqkv_core.cache.fitting`), attends to
  ``[body | sinks | window | new]`` with the new tokens exact, and then commits the new tokens
  (quantizing those that leave the window).

Each decoder layer gets the cache layer of its type in the config
(:func:`~nqkv_core.cache.support.layer_types`): full attention or a sliding window; the model's query scale, soft-capping and learned sinks come with
each attention call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nqkv_core import _hf
from nqkv_core.cache import io
from nqkv_core.cache.attend import Logits, sdpa, softmax_attention
from nqkv_core.cache.format import RopeTable, side_format, storage_bytes
from nqkv_core.cache.handle import Handle
from nqkv_core.cache.layer import CompiledStep, NQKVLayer
from nqkv_core.cache.sliding import NQKVSlidingLayer
from nqkv_core.cache.step import Decode, StepMemo, check_decode
from nqkv_core.cache.support import check_supported, layer_types, scheme_rope_layouts
from nqkv_core.scheme import KVScheme, default_scheme

try:  # transformers is an optional dependency of the package; the cache needs it.
    from transformers.cache_utils import Cache
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("nqkv_core.cache needs transformers>=4.57: pip install 'nqkv[eval]'") from e

ATTN_NAME = "nqkv"


class NQKVCache(Cache):
    """A quantized KV cache for transformers models: one :class:`NQKVLayer` per full-attention layer,
    one :class:`NQKVSlidingLayer` per sliding-window layer (types from the config, :func:`layer_types`).

    Args:
        scheme: how K/V are stored (codebook schemes with blocks along head_dim).
        config: the model config; gives the number of layers and their types, fits the scheme's
            blocks to the head_dim (:meth:`~nqkv_core.scheme.KVScheme.fit_head_dim`), gives a
            RoPE-centred scheme the model's RoPE frequencies (:func:`nqkv_core.rope.check_rope`: every
            ``rope_type`` transformers computes), and is checked for support. Needed for models with
            sliding-window layers (without it every layer is full).
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
        ropes: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.layer_types: list[str] = []
        self.sliding_window: int | None = None
        if config is not None:
            check_supported(config)
            num_layers = _hf.num_layers(config)
            self.layer_types = layer_types(config)
            self.sliding_window = getattr(_hf.text_config(config), "sliding_window", None)
            scheme = scheme.fit_head_dim(_hf.head_dim(config))
            ropes = scheme_rope_layouts(scheme, config)
        if scheme.layer_bits and num_layers is not None and num_layers != len(scheme.layer_bits):
            raise ValueError(
                f"scheme {scheme.name!r} has widths for {len(scheme.layer_bits)} layers; the model has {num_layers}"
            )
        self.scheme = scheme
        self._max_len = max_cache_len
        self.crop_margin = crop_margin
        self.compiled_step = compiled_step
        self.decode = check_decode(decode)
        # One table of RoPE cos/sin per position for all layers of a type (RoPE-centred schemes only);
        # the types share one table unless their frequencies differ.
        full = ropes.get("full_attention", (None, None))
        self.rope = RopeTable(full[0], max_cache_len, full[1])
        self.ropes = {"full_attention": self.rope}
        for t, (inv_freq, order) in ropes.items():
            if t not in self.ropes:
                same = inv_freq is full[0] and order is full[1]
                self.ropes[t] = self.rope if same else RopeTable(inv_freq, max_cache_len, order)
        self.step_memo = StepMemo()
        layers = [self._new_layer(i) for i in range(num_layers or 0)]
        super().__init__(layers=layers)

    def _new_layer(self, layer_idx: int) -> NQKVLayer:
        kind = self.layer_types[layer_idx] if layer_idx < len(self.layer_types) else "full_attention"
        rope = self.ropes.get(kind, self.rope)
        args = (self.max_cache_len, self.crop_margin, rope, self.step_memo, self.compiled_step, self.decode)
        if kind == "sliding_attention":
            return NQKVSlidingLayer(self.scheme.for_layer(layer_idx), self.sliding_window, *args)
        return NQKVLayer(self.scheme.for_layer(layer_idx), *args)

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
        """Bytes of every tensor the cache holds (buffers at their allocated capacity, transforms,
        prepared decode state, the shared RoPE table), each storage counted once."""
        return storage_bytes(x for layer in self.layers for x in layer.held_tensors())

    def bytes_per_token(self) -> float:
        """Storage bytes per quantized token over all layers (K and V, all kv heads, one sequence)."""
        return sum(layer.bytes_per_token() for layer in self.layers)


    # -- save / load (prefix reuse) ------------------------------------------------------------------

    def save(self, path: str | Path, key: bytes | None = None) -> None:
        """Write the cache contents to a safetensors file (used parts only, with a SHA-256 checksum).

        ``key``: a secret; adds an HMAC-SHA256 that :meth:`load` with the same key requires. The plain
        checksum detects corruption, not tampering (anyone can recompute it). A sliding-window
        layer's ring of codes is saved whole, slot for slot.
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
                another scheme, another number of layers, kv heads or head_dim than ``config``,
                sliding-window layers other than ``config``'s (a file with sliding layers needs
                ``config``), or a wrong ``key``.
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
    cache. Without one (no cache, or another cache type) it is exact attention over the given tensors.
    The model's ``scaling``, ``sliding_window`` (a query at ``p`` sees ``(p - sliding_window, p]``),
    ``softcap`` (Gemma 2) and ``s_aux`` (learned sink logits per query head, GPT-OSS) are honoured.

    Raises:
        ValueError: if the cache layer's sliding window is not the model's (a cache made without
            ``config``).
    """
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{type(module).__name__}: NQKV attention is causal only")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    logits = Logits(kwargs.get("softcap"), kwargs.get("s_aux"))
    if isinstance(key, Handle):
        layer = key.layer
        if layer.sliding_window != window:
            raise ValueError(
                f"{type(module).__name__} attends with sliding_window={window}, but its NQKV cache layer was made"
                f" for sliding_window={layer.sliding_window}: create the cache with config=model.config (or with"
                " enable(model).new_cache()), whose layer_types and sliding_window must be what the model attends with"
            )
        config = getattr(module, "config", None)
        return layer.attention(query, attention_mask, scale, config, logits if logits.active else None), None
    T, tk = query.shape[2], key.shape[2]
    pos_q = torch.arange(tk - T, tk, device=query.device)[:, None]
    pos_k = torch.arange(tk, device=query.device)
    mask = pos_k <= pos_q
    if window is not None:
        mask = mask & (pos_k > pos_q - window)
    if attention_mask is not None:
        mask = _hf.bool_mask(attention_mask[:, :, -T:, -tk:]) & mask
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    if logits.active:
        out = softmax_attention(query, key, value, mask, scale, logits)
    else:
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

    def __enter__(self) -> "NQKVModel":
        return self

    def __exit__(self, *exc) -> None:
        disable(self.model)


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
        model: a transformers decoder-only causal LM with full and/or sliding-window attention layers.
        bits: code bits for K and V of the default scheme (:func:`default_scheme` with the
            model's config: a plain key centre for a model without RoPE or with one the cache's
            RoPE-aware centre cannot serve); ignored if ``scheme`` is given.
        scheme: the storage scheme (its blocks are fitted to the model's head_dim).
        max_cache_len: preallocate caches for this many tokens (compileable decode); None grows.
        crop_margin: see :class:`NQKVCache`.
        decode: the decode strategy of its caches (see :class:`NQKVCache`).

    Raises:
        NotImplementedError: for an unsupported model (:func:`check_supported`) or scheme (e.g. a
            RoPE-centred scheme on a model without RoPE or with multimodal RoPE,
            :func:`nqkv_core.rope.check_rope`).
        ValueError: widths the head_dim cannot hold (:meth:`~nqkv_core.scheme.KVScheme.fit_head_dim`).

    Example::

        nq = nqkv_core.enable(model, bits=4)
        out = model.generate(ids, max_new_tokens=32, **nq.generate_kwargs())
    """
    config = model.config
    check_supported(config)
    check_decode(decode)
    head_dim = _hf.head_dim(config)
    # the default follows the model's RoPE (a plain key centre without one); any scheme's blocks are
    # fitted to the head_dim (KVScheme.fit_head_dim names the change in the scheme's name)
    scheme = (scheme or default_scheme(bits, head_dim, config=config)).fit_head_dim(head_dim)
    side_format(scheme, "k"), side_format(scheme, "v")
    scheme_rope_layouts(scheme, config)  # raises now for a RoPE the cache cannot serve
    register()
    previous = _attn_implementation(model)
    _set_attn_implementation(model, ATTN_NAME)
    if _attn_implementation(model) != ATTN_NAME:  # (transformers declined, with a logged warning)
        raise NotImplementedError(
            f"{type(model).__name__} on transformers {'.'.join(map(str, _hf.transformers_version()))} does"
            " not let its attention function be replaced (it does not attend through transformers'"
            " AttentionInterface), so the NQKV cache cannot be read; a newer transformers may support it"
        )
    if previous != ATTN_NAME:
        model._nqkv_previous_attn = previous
    return NQKVModel(model, scheme, max_cache_len, crop_margin, decode)


def disable(model: torch.nn.Module) -> None:
    """Undo :func:`enable`: the model attends with the implementation it had before (a no-op if
    NQKV is not enabled). ``with nqkv_core.enable(model) as nq: ...`` calls it on leaving the block."""
    previous = getattr(model, "_nqkv_previous_attn", None)
    if previous is None:
        return
    _set_attn_implementation(model, previous)
    del model._nqkv_previous_attn


def _attn_implementation(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name

