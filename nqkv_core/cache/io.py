"""Saving and loading a cache's contents (prefix reuse): safetensors with a checksum.

A file holds the used part of each layer's buffers, its frozen transform and token count, and
metadata naming the format version, the scheme and the number of layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from nqkv_core import _hf
from nqkv_core.scheme import KVScheme, KVTransform, key_feedback

FORMAT_VERSION = "1"
# The transform's saved fields (the feedback matrix is derived from the stored metric on load).
TRANSFORM_FIELDS = tuple(f.name for f in dataclasses.fields(KVTransform) if f.name != "k_feedback")


def layer_state(layer) -> dict[str, torch.Tensor]:
    """The tensors that define the cache contents (used parts of the body only)."""
    if not layer.is_initialized:
        return {"length": layer.length.clone()}
    n_body = layer._body_capacity(int(layer.length))
    out = {"length": layer.length.clone()}
    for side in ("k", "v"):
        for i, x in enumerate(getattr(layer, f"{side}_body")):
            out[f"{side}_body{i}"] = x[:, :, :n_body]
        out[f"{side}_sink"] = getattr(layer, f"{side}_sink")[:, :, : layer.n_sinks]
        out[f"{side}_ring"] = getattr(layer, f"{side}_ring")[:, :, : layer.n_ring]
    if layer.transform is not None:
        for f in TRANSFORM_FIELDS:
            x = getattr(layer.transform, f)
            if x is not None:
                out[f"t_{f}"] = x
    return out

def load_layer_state(layer, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Inverse of :func:`layer_state` on a fresh layer of the same scheme; ``dtype``: the model's."""
    n = int(state["length"])
    layer.reset()
    if "k_sink" not in state:
        return
    k = state["k_sink"]
    empty = torch.zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=dtype, device=k.device)
    layer.lazy_initialization(empty, empty)
    layer._grow(n)
    n_body = layer._body_capacity(n)
    for side in ("k", "v"):
        for i, x in enumerate(getattr(layer, f"{side}_body")):
            x[:, :, :n_body].copy_(state[f"{side}_body{i}"])
        getattr(layer, f"{side}_sink")[:, :, : layer.n_sinks].copy_(state[f"{side}_sink"])
        getattr(layer, f"{side}_ring")[:, :, : layer.n_ring].copy_(state[f"{side}_ring"])
    fields = {f: state.get(f"t_{f}") for f in TRANSFORM_FIELDS}
    layer.transform = KVTransform(**fields)
    layer.transform.k_feedback = key_feedback(layer.transform)
    if layer.transform.inv_freq is not None:
        if layer.rope.inv_freq is None:
            layer.rope.inv_freq = layer.transform.inv_freq
        layer.rope.ensure(n, layer.device)
    layer.length.fill_(n)
    layer._step_length = None



def cache_meta(cache) -> dict[str, str]:
    s = cache.scheme
    scheme = {f: (str(getattr(s, f)).removeprefix("torch.") if f == "scale_dtype" else getattr(s, f))
              for f in s.__dataclass_fields__}
    first = cache.layers[0] if cache.layers else None
    return {
        "format": "nqkv-cache",
        "version": FORMAT_VERSION,
        "scheme": json.dumps(scheme, sort_keys=True),
        "num_layers": str(len(cache.layers)),
        "dtype": str(getattr(first, "dtype", "")).removeprefix("torch."),
    }

def save(cache, path: str | Path) -> None:
    """Write the cache contents to a safetensors file (used parts only, with a checksum)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, layer in enumerate(cache.layers):
        if layer._pending is not None:
            raise RuntimeError("cannot save an NQKVCache in the middle of a forward pass")
        for name, x in layer_state(layer).items():
            # clone: layers share the RoPE frequencies, and safetensors refuses shared storage
            tensors[f"layer{i}.{name}"] = x.clone() if name == "t_inv_freq" else x.contiguous()
    meta = cache_meta(cache)
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)

def load(
    cls,
    path: str | Path,
    scheme: KVScheme,
    config: Any = None,
    max_cache_len: int | None = None,
    crop_margin: int = 0,
    device: torch.device | str | None = None,
    decode: str = "auto",
) -> "Any":
    """Read a cache written by :meth:`save` and check it against ``scheme`` and ``config``.

    Raises:
        ValueError: unreadable or corrupted file (checksum), another scheme, another number of
            layers, or a shape that does not fit ``config``.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        raise ValueError(f"{path}: not a readable safetensors NQKV cache ({type(e).__name__}: {e})") from e
    if meta.get("format") != "nqkv-cache" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an NQKV cache file of format version {FORMAT_VERSION} (metadata {meta})")
    expected = meta.get("sha256")
    if _digest(tensors, {k: v for k, v in meta.items() if k != "sha256"}) != expected:
        raise ValueError(f"{path}: checksum mismatch; the file is corrupted or was modified")
    cache = cls(scheme, config=config, num_layers=int(meta["num_layers"]), max_cache_len=max_cache_len,
                crop_margin=crop_margin, decode=decode)
    mine = cache_meta(cache)
    if mine["scheme"] != meta["scheme"]:
        raise ValueError(f"{path}: saved with scheme {meta['scheme']}, not {mine['scheme']}")
    if len(cache.layers) != int(meta["num_layers"]):
        raise ValueError(f"{path}: {meta['num_layers']} layers saved, the model has {len(cache.layers)}")
    dtype = getattr(torch, meta.get("dtype") or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path}: unknown dtype {meta.get('dtype')!r}")
    for i, layer in enumerate(cache.layers):
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"layer{i}.")}
        if "k_sink" in state and config is not None:
            _check_shape(state["k_sink"], config, path)
        try:
            load_layer_state(layer, state, dtype)
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"{path}: layer {i} does not fit the scheme ({type(e).__name__}: {e})") from e
    return cache



def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        x = tensors[name].contiguous()
        h.update(f"{name}:{x.dtype}:{tuple(x.shape)}".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def _check_shape(k_sink: torch.Tensor, config: Any, path) -> None:
    heads, head_dim = _hf.kv_heads(config), _hf.head_dim(config)
    if k_sink.shape[1] != heads or k_sink.shape[3] != head_dim:
        raise ValueError(
            f"{path}: cache has {k_sink.shape[1]} kv heads of dim {k_sink.shape[3]}; the model has"
            f" {heads} of dim {head_dim}"
        )

