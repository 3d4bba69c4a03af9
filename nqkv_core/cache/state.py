"""One layer's contents as named tensors: what a layer saves, what a file must hold for it, and loading it back.

:func:`layer_state` / :func:`sliding_layer_state` give the tensors that define a layer; the
``check_*`` functions say, from a file's header and before anything is built, which names, dtypes
and shapes a scheme, a token count and a layer layout imply, and which values are acceptable;
``load_*`` fill a fresh layer. The file around them (metadata, digest) is :mod:`nqkv_core.cache.io`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from nqkv_core import _hf
from nqkv_core.cache import fitting
from nqkv_core.cache.fitting import fitted_on_queries
from nqkv_core.quantize import E5M3, E5M3_MAX_BYTE
from nqkv_core.scheme import FP_BITS, QUERY_METRIC_RANK, KVScheme, KVTransform, key_feedback, shared_rotation

# The transform's saved fields (the feedback matrix is derived from the stored metric on load).
TRANSFORM_FIELDS = tuple(f.name for f in dataclasses.fields(KVTransform) if f.name != "k_feedback")
# Bounds on the dims a file may claim for a layer, checked before anything is allocated.
MAX_HEAD_DIM = 1024
MAX_TOKEN_ELEMENTS = 2**24  # batch * kv heads * head_dim of one token of one side
MAX_PADDING = 2**20  # leading padding of a saved fit period's rows (bounds its token count)
# (dtype, shape) of a saved tensor
Spec = tuple[torch.dtype, tuple[int, ...]]


def layer_state(layer) -> dict[str, torch.Tensor]:
    """The tensors that define the cache contents (used parts of the body only; in the fit period,
    its exact tokens: :func:`period_state`)."""
    if not layer.is_initialized:
        return {"length": layer.length.clone()}
    if layer.prefix is not None and not layer.prefix.fitted:
        return period_state(layer)
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
    if layer.starts is not None:
        out["starts"] = layer.starts
    return out


def period_state(layer) -> dict[str, torch.Tensor]:
    """A layer in its fit period (:mod:`nqkv_core.cache.fitting`): its token count and exact tokens,
    ``prefix_k`` / ``prefix_v`` ``(b, hkv, n, d)`` and ``prefix_q`` ``(b, hq, n, d)`` (a transform fitted
    on queries), in the model's dtype, and the rows' leading padding. A layer whose every row was
    fitted at its last step saves its transform and buffers instead (the fit is then final)."""
    p = layer.prefix
    out = {"length": layer.length.clone(), "prefix_k": p.k, "prefix_v": p.v}
    if p.q is not None:
        out["prefix_q"] = p.q
    if layer.starts is not None:
        out["starts"] = layer.starts
    return out


def check_period_spec(where: str, scheme: KVScheme, found: dict[str, Spec], n: int, dtype: torch.dtype | None,
                      config: Any = None) -> tuple[int, int, int]:
    """Check the names, dtypes and shapes of a saved fit period (:func:`period_state`) holding ``n``
    tokens; returns ``(batch, heads, head_dim)``.

    Raises:
        ValueError: naming ``where``, the tensor, and what was expected.
    """
    shape = found["prefix_k"][1]
    if len(shape) != 4:
        raise ValueError(f"{where}: prefix_k must be (batch, kv heads, tokens, head_dim), got shape {shape}")
    b, h, _, d = shape
    _check_dims(where, scheme, b, h, d, dtype, config)
    if not 0 < n < scheme.fit_tokens + MAX_PADDING:
        raise ValueError(f"{where}: a fit period holds 1 to {scheme.fit_tokens} tokens of each row, got length={n}")
    spec: dict[str, Spec] = {"length": (torch.int64, ()), "prefix_k": (dtype, (b, h, n, d)),
                             "prefix_v": (dtype, (b, h, n, d))}
    if fitted_on_queries(scheme):
        q_shape = found.get("prefix_q", (None, ()))[1]
        hq = q_shape[1] if len(q_shape) == 4 else 0
        model_hq = getattr(config, "num_attention_heads", hq) if config is not None else hq
        if hq < h or hq % h or b * hq * d > MAX_TOKEN_ELEMENTS or hq != model_hq:
            raise ValueError(f"{where}: prefix_q must be (batch, query heads, tokens, head_dim) with the query heads"
                             f" a multiple of the {h} kv heads, got {found.get('prefix_q')}")
        spec["prefix_q"] = (dtype, (b, hq, n, d))
    if "starts" in found:
        spec["starts"] = (torch.int64, (b,))
    missing, extra = sorted(spec.keys() - found.keys()), sorted(found.keys() - spec.keys())
    if missing or extra:
        raise ValueError(f"{where}: a fit period's tensors: missing {missing}, unexpected {extra}")
    for name, want in spec.items():
        if found[name] != want:
            raise ValueError(f"{where}: {name} is {fmt_spec(found[name])}, expected {fmt_spec(want)}")
    return b, h, d


def load_period_state(layer, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str = "layer state") -> None:
    """Inverse of :func:`period_state` on a fresh layer of the same scheme.

    Raises:
        ValueError: ``state`` is not what :func:`check_period_spec` and :func:`check_layer_values`
            accept, or every row holds ``fit_tokens`` (a period that is over saves its transform).
    """
    n = check_length(where, state.get("length"))
    check_period_spec(where, layer.scheme, {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}, n, dtype)
    check_layer_values(where, state)
    starts = state.get("starts")
    own = n - (starts if starts is not None else torch.zeros((), dtype=torch.int64))
    if bool((own >= layer.scheme.fit_tokens).all()):
        raise ValueError(f"{where}: every row holds fit_tokens={layer.scheme.fit_tokens} tokens: a cache past its"
                         " fit period is saved with its transform, not as a fit period")
    layer.reset()
    fitting.restore(layer, state["prefix_k"].clone(), state["prefix_v"].clone(),
                    state["prefix_q"].clone() if "prefix_q" in state else None, n,
                    starts.clone() if starts is not None else None)


def layer_spec(scheme: KVScheme, batch: int, heads: int, head_dim: int, n: int, dtype: torch.dtype,
               n_ring: int, transform: bool = True, body_slots: int | None = None) -> dict[str, Spec]:
    """What :func:`layer_state` holds for a layer of ``scheme`` with ``n`` tokens: name -> (dtype, shape).

    Args:
        scheme: the layer's scheme (``scheme.for_layer(i)``).
        batch, heads, head_dim: the layer's K/V dims.
        n: tokens seen.
        dtype: the model's dtype (full-precision tokens of an untransformed scheme are kept in it).
        n_ring: full-precision ring slots (``max(window, 1) - 1 + crop_margin``).
        transform: whether the frozen transform is included (a layer has none before its first step).
        body_slots: body slots saved (a sliding layer's ring of codes); default: the tokens that
            left the window.
    """
    b, h, d = batch, heads, head_dim
    fp = scheme.exact_dtype(dtype)
    n_body = max(n - scheme.sinks - max(scheme.window, 1) + 1, 0) if body_slots is None else body_slots
    spec: dict[str, Spec] = {"length": (torch.int64, ())}
    for side in ("k", "v"):
        bits, block = getattr(scheme, f"{side}_bits"), getattr(scheme, f"{side}_block")
        if bits < FP_BITS:
            spec[f"{side}_body0"] = (torch.uint8, (b, h, n_body, d * bits // 8))
            spec[f"{side}_body1"] = (scheme.scale_dtype, (b, h, n_body, d // block))
        else:
            spec[f"{side}_body0"] = (fp, (b, h, n_body, d))
        spec[f"{side}_sink"] = (fp, (b, h, scheme.sinks, d))
        spec[f"{side}_ring"] = (fp, (b, h, n_ring, d))
    if transform:
        spec.update(transform_spec(scheme, b, h, d))
    return spec


def transform_spec(scheme: KVScheme, batch: int, heads: int, head_dim: int) -> dict[str, Spec]:
    """The saved fields of the transform :func:`~nqkv_core.scheme.fit_transform` fits for ``scheme``."""
    f32, vec, d = torch.float32, (batch, heads, 1, head_dim), head_dim
    s, spec = scheme, {}
    fields = {
        "mu_k": (s.k_centre, vec), "a_k": (s.k_equalize != "none", vec), "rot_k": (s.k_rotate, (d, d)),
        "mu_v": (s.v_centre, vec), "b_v": (s.v_equalize, vec), "rot_v": (s.v_rotate, (d, d)),
        "k_metric": (s.k_rounding == "query" and s.k_bits < FP_BITS,
                     (batch, heads, min(QUERY_METRIC_RANK, d - 1), d)),
        "k_metric_iso": (s.k_rounding == "query" and s.k_bits < FP_BITS, (batch, heads, 1, 1)),
        "inv_freq": (s.k_centre and s.k_centre_rope, (d // 2,)),
    }
    for name, (present, shape) in fields.items():
        if present:
            spec[f"t_{name}"] = (f32, shape)
    return spec


def check_layer_spec(where: str, scheme: KVScheme, found: dict[str, Spec], n: int, dtype: torch.dtype | None,
                     n_ring: int, config: Any = None, body_slots: int | None = None) -> tuple[int, int, int] | None:
    """Check the names, dtypes and shapes ``found`` of one layer's tensors against :func:`layer_spec`
    (``body_slots`` as there).

    Returns:
        ``(batch, heads, head_dim)``, or None for a layer that holds nothing yet.

    Raises:
        ValueError: naming ``where``, the tensor, and what was expected.
    """
    if "k_sink" not in found:
        if set(found) != {"length"} or n:
            raise ValueError(f"{where}: an empty layer holds only length=0, got {sorted(found)} and length={n}")
        return None
    shape = found["k_sink"][1]
    if len(shape) != 4:
        raise ValueError(f"{where}: k_sink must be (batch, kv heads, sinks, head_dim), got shape {shape}")
    b, h, _, d = shape
    _check_dims(where, scheme, b, h, d, dtype, config)
    transform = n > 0 or any(k.startswith("t_") for k in found)
    spec = layer_spec(scheme, b, h, d, n, dtype, n_ring, transform, body_slots)
    if transform and scheme.k_centre and scheme.k_centre_rope and "t_k_order" in found:
        spec["t_k_order"] = (torch.int64, (d,))  # a model whose RoPE pairs its channels in another order
    if "starts" in found:  # optional: only a left-padded batch has them
        spec["starts"] = (torch.int64, (b,))
    missing, extra = sorted(spec.keys() - found.keys()), sorted(found.keys() - spec.keys())
    if missing or extra:
        raise ValueError(f"{where}: tensors missing {missing}, unexpected {extra} for scheme {scheme.name!r}"
                         f" holding {n} tokens")
    for name, want in spec.items():
        if found[name] != want:
            hint = ""
            if name.endswith("_ring") and found[name][1][2:3] != want[1][2:3]:
                hint = (" (the ring keeps max(window, 1) - 1 + crop_margin tokens: load with the crop_margin"
                        " the cache was created with)")
            raise ValueError(f"{where}: {name} is {fmt_spec(found[name])}, expected {fmt_spec(want)}{hint}")
    return b, h, d


def _check_dims(where: str, scheme: KVScheme, b: int, h: int, d: int, dtype: torch.dtype | None,
                config: Any) -> None:
    if dtype is None:
        raise ValueError(f"{where}: the file holds K/V but its metadata names no dtype")
    if min(b, h, d) < 1 or d > MAX_HEAD_DIM or b * h * d > MAX_TOKEN_ELEMENTS:
        raise ValueError(
            f"{where}: batch {b}, {h} kv heads of dim {d}: expected positive sizes, head_dim <= {MAX_HEAD_DIM}"
            f" and batch * heads * head_dim <= {MAX_TOKEN_ELEMENTS}"
        )
    if config is not None and (h, d) != (_hf.kv_heads(config), _hf.head_dim(config)):
        raise ValueError(
            f"{where}: cache has {h} kv heads of dim {d}; the model has {_hf.kv_heads(config)} kv heads of dim"
            f" {_hf.head_dim(config)}"
        )
    for side in ("k", "v"):
        bits, block = getattr(scheme, f"{side}_bits"), getattr(scheme, f"{side}_block")
        if bits < FP_BITS and (d % block or d * bits % 8):
            raise ValueError(f"{where}: head_dim {d} does not fit {bits}-bit blocks of {block} ({side} side)")
    if scheme.k_centre and scheme.k_centre_rope and d % 2:
        raise ValueError(f"{where}: RoPE needs an even head_dim, got {d}")


def check_layer_values(where: str, state: dict[str, torch.Tensor], inv_freq: torch.Tensor | None = None,
                       order: torch.Tensor | None = None) -> None:
    """Check the values of one layer's tensors (shapes already checked by :func:`check_layer_spec`).

    Full-precision tokens, scales (E5M3 bytes at most 0xF7) and transform fields must be finite, equalisation positive,
    rotations orthogonal, RoPE frequencies non-negative (zero: channels that pass through) and
    the key channel order a permutation; with ``inv_freq`` given (the model's), frequencies equal
    to it and the order equal to ``order`` (None: the file holds none).

    Raises:
        ValueError: naming ``where`` and the tensor.
    """
    for name, x in state.items():
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{where}: {name} holds non-finite values")
        if name.endswith("_body1") and x.dtype == E5M3 and x.numel() and int(x.max()) > E5M3_MAX_BYTE:
            raise ValueError(f"{where}: {name} holds E5M3 scale bytes above {E5M3_MAX_BYTE:#x} (infinite or NaN)")
    for name in ("t_a_k", "t_b_v"):
        if name in state and not bool((state[name] > 0).all()):
            raise ValueError(f"{where}: {name} must be positive")
    if "t_inv_freq" in state and not bool((state["t_inv_freq"] >= 0).all()):
        raise ValueError(f"{where}: t_inv_freq must be >= 0")
    saved_order = state.get("t_k_order")
    if saved_order is not None and not torch.equal(saved_order.sort().values.cpu(), torch.arange(saved_order.numel())):
        raise ValueError(f"{where}: t_k_order must be a permutation of the head's channels")
    if "t_k_metric_iso" in state and not bool((state["t_k_metric_iso"] >= 0).all()):
        raise ValueError(f"{where}: t_k_metric_iso must be >= 0")
    if "starts" in state and not bool(((state["starts"] >= 0) & (state["starts"] <= state["length"])).all()):
        raise ValueError(f"{where}: starts (leading padding per row) must be in [0, length]")
    for name in ("t_rot_k", "t_rot_v"):
        if name in state:
            r = state[name].double()
            err = (r @ r.T - torch.eye(r.shape[0], dtype=torch.float64, device=r.device)).abs().max()
            if not err <= 1e-4:
                raise ValueError(f"{where}: {name} is not orthogonal (|R R^T - I| = {float(err):.3g})")
    if inv_freq is not None and "t_inv_freq" in state:
        if not torch.allclose(state["t_inv_freq"], inv_freq.to(state["t_inv_freq"]), rtol=1e-5, atol=0):
            raise ValueError(f"{where}: t_inv_freq differs from the model's RoPE frequencies")
        if (saved_order is None) != (order is None) or (
                saved_order is not None and not torch.equal(saved_order, order.to(saved_order))):
            raise ValueError(f"{where}: t_k_order differs from the channel order of the model's RoPE"
                             f" ({'none' if order is None else 'a permutation'} expected)")


def load_layer_state(layer, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str = "layer state") -> None:
    """Inverse of :func:`layer_state` on a fresh layer of the same scheme; ``dtype``: the model's.

    Raises:
        ValueError: ``state`` is not what :func:`layer_spec` and :func:`check_layer_values` accept.
    """
    if "prefix_k" in state:
        return load_period_state(layer, state, dtype, where)
    n = check_length(where, state.get("length"))
    found = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    empty = check_layer_spec(where, layer.scheme, found, n, dtype, layer.n_ring) is None
    if empty or (n == 0 and not any(k.startswith("t_") and x.dim() == 4 for k, x in state.items())):
        # No token, and no measured transform (a reset layer, or one holding only the fixed
        # rotation): nothing the next step would not build again, so the layer stays fresh. This
        # also allocates nothing for the dims a file may claim for tensors of no elements.
        layer.reset()
        return
    check_layer_values(where, state, layer.rope.inv_freq, layer.rope.order)
    layer.reset()
    k = state["k_sink"]
    empty = torch.zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=dtype, device=k.device)
    layer.lazy_initialization(empty, empty)
    layer._grow(n)
    n_body = layer._body_capacity(n)
    _load_buffers(layer, state, n_body)
    _load_transform(layer, state, n, where)


def _load_buffers(layer, state: dict[str, torch.Tensor], body_slots: int) -> None:
    """Copy the checked body (its first ``body_slots`` slots), sinks and ring of ``state`` into ``layer``."""
    for side in ("k", "v"):
        for i, x in enumerate(getattr(layer, f"{side}_body")):
            x[:, :, :body_slots].copy_(state[f"{side}_body{i}"])
        getattr(layer, f"{side}_sink")[:, :, : layer.n_sinks].copy_(state[f"{side}_sink"])
        getattr(layer, f"{side}_ring")[:, :, : layer.n_ring].copy_(state[f"{side}_ring"])


def _load_transform(layer, state: dict[str, torch.Tensor], n: int, where: str) -> None:
    """Give a filled layer the transform of ``state`` (values checked) and its token count ``n``."""
    if any(f"t_{f}" in state for f in TRANSFORM_FIELDS) or n > 0:
        layer.transform = KVTransform(**{f: state.get(f"t_{f}") for f in TRANSFORM_FIELDS})
        layer.transform.k_feedback = _feedback(where, layer.transform)
        for name, seed in (("rot_k", 0), ("rot_v", 1)):  # hold the one matrix all layers share, once
            x = getattr(layer.transform, name)
            if x is not None and torch.equal(x, shared := shared_rotation(x.shape[0], seed, x.device)):
                setattr(layer.transform, name, shared)
    if layer.transform is not None and layer.transform.inv_freq is not None:
        if layer.rope.inv_freq is None:
            layer.rope.inv_freq, layer.rope.order = layer.transform.inv_freq, layer.transform.k_order
        layer.rope.ensure(n, layer.device)
    if "starts" in state and bool(state["starts"].any()):
        layer.starts = state["starts"].to(layer.device)
    layer.length.fill_(n)
    layer._step_length = None


def _feedback(where: str, t: KVTransform) -> torch.Tensor | None:
    """The keys' feedback matrix of a loaded metric, which must be positive definite and finite."""
    try:
        f = key_feedback(t)
    except RuntimeError as e:  # torch.linalg.LinAlgError: the Cholesky factorisation failed
        raise ValueError(f"{where}: t_k_metric and t_k_metric_iso do not make a positive definite metric") from e
    if f is not None and not bool(torch.isfinite(f).all()):
        raise ValueError(f"{where}: t_k_metric and t_k_metric_iso do not make a finite feedback matrix")
    return f


# -- sliding-window layers ----------------------------------------------------------------------------


def sliding_layer_state(layer) -> dict[str, torch.Tensor]:
    """:func:`layer_state` of an :class:`~nqkv_core.cache.NQKVSlidingLayer`: its body is a ring of
    codes (the token at position ``r`` in slot ``(r - sinks) mod capacity``), saved whole, slot for
    slot, so that a loaded layer holds every code where the saved one did."""
    out = layer_state(layer)
    if layer.is_initialized and "prefix_k" not in out:
        for side in ("k", "v"):
            for i, x in enumerate(getattr(layer, f"{side}_body")):
                out[f"{side}_body{i}"] = x[:, :, : layer.capacity]
    return out


def check_sliding_layer_spec(where: str, scheme: KVScheme, found: dict[str, Spec], n: int, dtype: torch.dtype | None,
                             sliding_window: int, crop_margin: int, config: Any = None) -> tuple[int, int, int] | None:
    """:func:`check_layer_spec` for a sliding layer of ``sliding_window`` (as
    :class:`~nqkv_core.cache.NQKVSlidingLayer` lays it out): a ring of the exact tokens of its own
    window (``min(window, sliding_window) - 1 + crop_margin``), and a ring of codes whose size, from
    the header, must hold every quantized token the window reads (none if the exact window covers
    the sliding one).

    Raises:
        ValueError: naming ``where``, the tensor, and what was expected.
    """
    window = min(max(scheme.window, 1), sliding_window)
    body = found.get("k_body0", (None, ()))[1]
    slots = body[2] if len(body) == 4 else 0
    if sliding_window > max(scheme.window, 1):
        needed = min(max(n - scheme.sinks - window + 1, 0), sliding_window - window + crop_margin)
        if slots < needed:
            raise ValueError(f"{where}: k_body0 holds a ring of {slots} code slots; a sliding layer of window"
                             f" {sliding_window} and crop_margin {crop_margin} holding {n} tokens needs {needed}")
    elif slots:
        raise ValueError(f"{where}: k_body0 holds {slots} code slots; a sliding layer of window {sliding_window}"
                         f" within the exact window {scheme.window} stores none")
    return check_layer_spec(where, scheme, found, n, dtype, window - 1 + crop_margin, config, slots)


def load_sliding_layer_state(layer, state: dict[str, torch.Tensor], dtype: torch.dtype,
                             where: str = "layer state") -> None:
    """Inverse of :func:`sliding_layer_state` on a fresh sliding layer of the same scheme, window and
    crop margin; ``dtype``: the model's.

    Raises:
        ValueError: ``state`` is not what :func:`check_sliding_layer_spec` and
            :func:`check_layer_values` accept.
    """
    if "prefix_k" in state:
        return load_period_state(layer, state, dtype, where)
    n = check_length(where, state.get("length"))
    found = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    dims = check_sliding_layer_spec(where, layer.scheme, found, n, dtype, layer.sliding_window, layer.crop_margin)
    if dims is None or (n == 0 and not any(k.startswith("t_") and x.dim() == 4 for k, x in state.items())):
        layer.reset()  # nothing the next step would not build again (as load_layer_state)
        return
    check_layer_values(where, state, layer.rope.inv_freq, layer.rope.order)
    layer.reset()
    b, h, d = dims
    empty = torch.zeros(b, h, 0, d, dtype=dtype, device=state["k_sink"].device)
    layer.lazy_initialization(empty, empty)
    slots = state["k_body0"].shape[2]
    if slots != layer.capacity:
        layer._relayout(slots, 0)  # a ring of the saved size (the fresh one holds no token to move)
    _load_buffers(layer, state, slots)
    _load_transform(layer, state, n, where)


def check_length(where: str, x: torch.Tensor | None) -> int:
    if x is None or x.dtype != torch.int64 or x.shape != ():
        got = None if x is None else fmt_spec((x.dtype, tuple(x.shape)))
        raise ValueError(f"{where}: length must be an int64 scalar, got {got}")
    n = int(x)
    if n < 0:
        raise ValueError(f"{where}: length must be >= 0, got {n}")
    return n


def fmt_spec(spec: Spec) -> str:
    return f"{str(spec[0]).removeprefix('torch.')} {tuple(spec[1])}"
