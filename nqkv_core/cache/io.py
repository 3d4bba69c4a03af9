"""Saving and loading a cache's contents (prefix reuse): safetensors with a checksum.

A file holds the used part of each layer's buffers (a sliding-window layer's ring of codes whole),
its frozen transform and token count (and, for a left-padded batch, each row's leading padding
slots, ``starts``; a file without them is a batch without padding), and metadata naming the format
version, the scheme, the number of layers, the model dtype, and the sliding-window layers and
window if there are any.

A file is untrusted input. :func:`load` checks, in this order and before it builds any layer:
the metadata (format, version, scheme, a bounded number of layers, a known dtype, the sliding
layers of ``config``); the name, dtype and shape of every tensor, from the file's header (what
:func:`layer_spec` says the scheme, the token count and the layer layout imply); the digest; then
the values (finite full-precision tokens, scales and transforms, positive equalisation,
orthogonal rotations, RoPE frequencies and channel order that match the model's). Every failure
is a ``ValueError`` naming the file, the layer and the tensor.

The SHA-256 digest detects corruption, not tampering: anyone can recompute it. With ``key=``,
:func:`save` adds an HMAC-SHA256 of the same contents, which :func:`load` with the same key
requires: only holders of the key can produce a file that passes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import torch

from nqkv_core import _hf
from nqkv_core.cache.state import (Spec, check_layer_spec, check_period_spec, check_length, check_sliding_layer_spec, layer_state,
                                   load_layer_state, load_sliding_layer_state, sliding_layer_state)
from nqkv_core.scheme import KVScheme

# 2: a RoPE-centred layer's keys are centred by transform.centre_rows (the angles of a position's tile
# start and offset, added); a version-1 file's were centred by others, which the key bias would not undo.
FORMAT_VERSION = "2"
# Bounds on what a file may ask :func:`load` to build, checked before anything is allocated: a
# header can claim any count or shape (a zero-length tensor of a huge batch costs no file bytes).
MAX_LAYERS = 10_000
MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' header dtype names (others are reported as the header spells them)
_FILE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
_DIGESTS = ("sha256", "hmac_sha256")
_KEY = re.compile(r"layer(0|[1-9][0-9]{0,4})\.([a-z0-9_]+)")


def _sliding_layers(path, meta: dict[str, str], num_layers: int, config: Any) -> tuple[set[int], int | None]:
    """The sliding layers and window a file was saved with (metadata ``sliding_layers`` and
    ``sliding_window``), which must be ``config``'s; a file with sliding layers needs ``config``."""
    raw, window = meta.get("sliding_layers", ""), meta.get("sliding_window", "")
    num = r"(0|[1-9][0-9]{0,4})"
    if (raw == "") != (window == "") or raw and not (re.fullmatch(rf"{num}(,{num})*", raw)
                                                     and re.fullmatch(num, window) and int(window) > 0):
        raise ValueError(f"{path}: sliding_layers {raw[:40]!r} and sliding_window {window[:40]!r} must both be"
                         " absent, or be layer indices (comma-separated) and a positive window")
    layers = {int(i) for i in raw.split(",")} if raw else set()
    if any(i >= num_layers for i in layers) or len(layers) != len(raw.split(",") if raw else ()):
        raise ValueError(f"{path}: sliding_layers {raw[:40]!r} must name distinct layers below {num_layers}")
    if config is None:
        if layers:
            raise ValueError(f"{path}: the file holds sliding-window layers; load it with config=model.config,"
                             " from which the cache builds them")
        return layers, None
    from nqkv_core.cache.support import layer_types

    want = {i for i, t in enumerate(layer_types(config)) if t == "sliding_attention"}
    want_window = getattr(_hf.text_config(config), "sliding_window", None) if want else None
    if layers != want or (layers and int(window) != want_window):
        raise ValueError(f"{path}: saved with sliding-window layers {sorted(layers)} (window {window or None});"
                         f" the model has {sorted(want)} (window {want_window})")
    return layers, want_window


def scheme_json(scheme: KVScheme) -> str:
    """The scheme as a file's metadata names it."""
    fields = {f: (str(getattr(scheme, f)).removeprefix("torch.") if f == "scale_dtype" else getattr(scheme, f))
              for f in scheme.__dataclass_fields__}
    return json.dumps(fields, sort_keys=True)


def cache_meta(cache) -> dict[str, str]:
    first = cache.layers[0] if cache.layers else None
    meta = {
        "format": "nqkv-cache",
        "version": FORMAT_VERSION,
        "scheme": scheme_json(cache.scheme),
        "num_layers": str(len(cache.layers)),
        "dtype": str(getattr(first, "dtype", "")).removeprefix("torch."),
    }
    sliding = [i for i, layer in enumerate(cache.layers) if layer.is_sliding]
    if sliding:  # (a file of full layers only has neither entry)
        meta["sliding_layers"] = ",".join(map(str, sliding))
        meta["sliding_window"] = str(cache.layers[sliding[0]].sliding_window)
    return meta


def save(cache, path: str | Path, key: bytes | None = None) -> None:
    """Write the cache contents to a safetensors file (used parts only, with a checksum).

    Args:
        key: a secret; adds an HMAC-SHA256 of the contents that :func:`load` with the same key
            requires. Without it the file carries a plain SHA-256, which detects corruption but not
            tampering (anyone can recompute it).
    """
    from safetensors.torch import save_file

    tensors = {}
    for i, layer in enumerate(cache.layers):
        if layer._pending is not None:
            raise RuntimeError("cannot save an NQKVCache in the middle of a forward pass")
        for name, x in (sliding_layer_state if layer.is_sliding else layer_state)(layer).items():
            # clone: layers share the RoPE frequencies and rotations, and safetensors refuses shared storage
            shared = name in ("t_inv_freq", "t_k_order", "t_rot_k", "t_rot_v")
            tensors[f"layer{i}.{name}"] = x.clone() if shared else x.contiguous()
    meta = cache_meta(cache)
    if key is not None:
        meta["hmac_sha256"] = _digest(tensors, meta, key)
    meta["sha256"] = _digest(tensors, meta)  # over everything else, the HMAC included
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
    key: bytes | None = None,
) -> "Any":
    """Read a cache written by :func:`save`, checking everything in it first (module docstring).

    Args:
        key: the secret the file was saved with: its HMAC-SHA256 must then match. Without it only
            the plain SHA-256 is checked, which anyone who edits a file can recompute.

    Raises:
        ValueError: an unreadable, corrupted or inconsistent file (naming the layer and tensor),
            another scheme, another number of layers or kv heads or head_dim than ``config``, RoPE
            frequencies other than ``config``'s, or a wrong ``key``.
    """
    from safetensors import safe_open

    if crop_margin < 0:
        raise ValueError(f"crop_margin must be >= 0, got {crop_margin}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, tensors = _read_checked(path, f, scheme, config, max_cache_len, crop_margin)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        raise ValueError(f"{path}: not a readable safetensors NQKV cache ({type(e).__name__}: {e})") from e
    _check_digest(path, tensors, meta, key)
    cache = cls(scheme, config=config, num_layers=int(meta["num_layers"]), max_cache_len=max_cache_len,
                crop_margin=crop_margin, decode=decode)
    dtype = MODEL_DTYPES.get(meta.get("dtype", ""))
    for i, layer in enumerate(cache.layers):
        state = {k.split(".", 1)[1]: v.to(device) for k, v in tensors.items() if k.startswith(f"layer{i}.")}
        # checks the values; the layers share one RoPE table, so a layer's frequencies must equal
        # config's or, without config, those of the layers before
        (load_sliding_layer_state if layer.is_sliding else load_layer_state)(layer, state, dtype, f"{path}: layer {i}")
    return cache


def _read_checked(path, f, scheme: KVScheme, config: Any, max_cache_len: int | None,
                  crop_margin: int) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of an open file, whose metadata and header (every tensor's name,
    dtype and shape) are checked before any tensor data is read."""
    meta = f.metadata() or {}
    num_layers = _check_meta(path, meta, scheme, config)
    sliding, window = _sliding_layers(path, meta, num_layers, config)
    dtype = MODEL_DTYPES.get(meta.get("dtype", ""))
    found: dict[int, dict[str, Spec]] = {i: {} for i in range(num_layers)}
    for k in f.keys():
        m = _KEY.fullmatch(k)
        if m is None or int(m[1]) >= num_layers:
            raise ValueError(f"{path}: unexpected tensor {k!r} in a file of {num_layers} layers")
        s = f.get_slice(k)
        found[int(m[1])][m[2]] = (_FILE_DTYPES.get(s.get_dtype(), s.get_dtype()), tuple(s.get_shape()))
    batch = None
    for i in range(num_layers):
        where, s = f"{path}: layer {i}", scheme.for_layer(i)
        if found[i].get("length") != (torch.int64, ()):
            raise ValueError(f"{where}: length must be an int64 scalar, got {found[i].get('length')}")
        n = check_length(where, f.get_tensor(f"layer{i}.length"))
        if max_cache_len is not None and n > max_cache_len:
            raise ValueError(f"{where}: holds {n} tokens, more than max_cache_len={max_cache_len}")
        if "prefix_k" in found[i]:
            dims = check_period_spec(where, s, found[i], n, dtype, config)
        elif i in sliding:
            dims = check_sliding_layer_spec(where, s, found[i], n, dtype, window, crop_margin, config)
        else:
            dims = check_layer_spec(where, s, found[i], n, dtype, max(s.window, 1) - 1 + crop_margin, config)
        if dims is not None and batch is not None and dims[0] != batch:
            raise ValueError(f"{where}: batch {dims[0]}, the layers before have batch {batch}")
        batch = dims[0] if dims is not None else batch
    return meta, {k: f.get_tensor(k) for k in f.keys()}


def _check_meta(path, meta: dict[str, str], scheme: KVScheme, config: Any) -> int:
    """Check a file's metadata; returns its number of layers."""
    if meta.get("format") != "nqkv-cache" or meta.get("version") != FORMAT_VERSION:
        got = {k: str(meta.get(k))[:40] for k in ("format", "version")}  # a header may hold anything: cut it
        raise ValueError(f"{path}: not an NQKV cache file of format version {FORMAT_VERSION} ({got})")
    if meta.get("scheme") != scheme_json(scheme):
        raise ValueError(f"{path}: saved with scheme {str(meta.get('scheme'))[:2000]}, not {scheme_json(scheme)}")
    raw = meta.get("num_layers", "")
    if not re.fullmatch(r"0|[1-9][0-9]{0,4}", raw) or int(raw) > MAX_LAYERS:
        raise ValueError(f"{path}: num_layers must be an integer in [0, {MAX_LAYERS}], got {raw[:40]!r}")
    n = int(raw)
    if config is not None and n != _hf.num_layers(config):
        raise ValueError(f"{path}: {n} layers saved, the model has {_hf.num_layers(config)}")
    if scheme.layer_bits and n != len(scheme.layer_bits):
        raise ValueError(f"{path}: {n} layers saved, scheme {scheme.name!r} has widths for {len(scheme.layer_bits)}")
    if meta.get("dtype", "") not in ("", *MODEL_DTYPES):
        raise ValueError(f"{path}: dtype must be one of {sorted(MODEL_DTYPES)}, got {meta.get('dtype')[:40]!r}")
    return n


def _check_digest(path, tensors: dict[str, torch.Tensor], meta: dict[str, str], key: bytes | None) -> None:
    if key is not None:
        body = {k: v for k, v in meta.items() if k not in _DIGESTS}
        if not hmac.compare_digest(meta.get("hmac_sha256", "").encode(), _digest(tensors, body, key).encode()):
            raise ValueError(f"{path}: HMAC mismatch: the file was not saved with this key, or was modified")
    elif meta.get("sha256") != _digest(tensors, {k: v for k, v in meta.items() if k != "sha256"}):
        raise ValueError(f"{path}: checksum mismatch; the file is corrupted or was modified")


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str], key: bytes | None = None) -> str:
    """SHA-256 of the metadata and tensors (an HMAC-SHA256 with ``key``)."""
    h = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        x = tensors[name].contiguous()
        h.update(f"{name}:{x.dtype}:{tuple(x.shape)}".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()
