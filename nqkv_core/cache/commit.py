"""Storing a layer's new tokens: sinks, the full-precision ring, and the quantized body.

A token is quantized once, when it leaves the window (the ring); eager one-token steps write at
known slots, traced steps with ``index_copy_`` at tensor positions (a "trash" slot takes writes
that must not land), so a compiled step has static shapes.
"""

from __future__ import annotations

import torch

from nqkv_core.cache.format import SideFormat
from nqkv_core.ops.fused_step import store_quantized
from nqkv_core.quantize import quantize_blockwise


def encode(layer, x: torch.Tensor, fmt: SideFormat) -> tuple[torch.Tensor, ...]:
    """``x`` in the body format ``fmt``: ``(codes, scales)``, or ``(values,)`` for a 16-bit side."""
    if fmt.quantized:
        return quantize_blockwise(x, fmt.encode_codebook, fmt.block, axis=-1, scale_dtype=layer.scheme.scale_dtype,
                                  fit_scale=fmt.fit_scale,
                                  feedback=layer.transform.k_feedback if fmt.feedback else None)
    return (x.to(layer.fp_dtype),)


def write_bodies(layer, index: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store K/V tokens ``(b, h, n, d)`` in the body at slots ``index`` (a tensor, or the first slot).

    When K and V share a quantized format they are quantized in one call (blocks are independent,
    so the codes are the same): a single token costs about as much to quantize as a thousand. On a
    GPU, eager writes at a known slot are one kernel launch (:func:`~nqkv_core.ops.fused_step.store_quantized`).
    """
    fmt = layer.k_fmt
    if (layer._joint_format and isinstance(index, int) and not fmt.fit_scale
            and store_quantized(k, v, layer.k_body, layer.v_body, index, fmt.encode_codebook, fmt.block)):
        return  # one launch on a GPU
    if layer._joint_format:
        codes, absmax = encode(layer, torch.cat([k, v]), fmt)
        b = k.shape[0]
        parts = ((codes[:b], absmax[:b]), (codes[b:], absmax[b:]))
    else:
        parts = (encode(layer, k, layer.k_fmt), encode(layer, v, layer.v_fmt))
    for body, part in zip((layer.k_body, layer.v_body), parts):
        for buf, x in zip(body, part):
            if isinstance(index, int):
                buf[:, :, index : index + x.shape[2]].copy_(x)
            else:
                buf.index_copy_(2, index, x)


def _commit_one(layer, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """:func:`commit` of one token outside tracing: plain slice copies at known positions."""
    S, R, W = layer.n_sinks, layer.n_ring, layer.window
    n = layer._eager_length()
    leaving = n - W + 1  # the token that leaves the window (the new one itself when W == 1)
    if leaving >= S and layer.stores_body:
        if W > 1:
            slot = leaving % R
            write_bodies(layer, layer.body_slot(leaving), layer.k_ring[:, :, slot : slot + 1],
                         layer.v_ring[:, :, slot : slot + 1])
        else:
            write_bodies(layer, layer.body_slot(leaving), k_new, v_new)
    if n < S:
        layer.k_sink[:, :, n : n + 1].copy_(k_new)
        layer.v_sink[:, :, n : n + 1].copy_(v_new)
    elif R:
        layer.k_ring[:, :, n % R : n % R + 1].copy_(k_new)
        layer.v_ring[:, :, n % R : n % R + 1].copy_(v_new)
    layer._advance(1)


def commit(layer, k_new: torch.Tensor, v_new: torch.Tensor, leaving_written: bool = False) -> None:
    """Store the ``T`` new tokens: quantize the ``T`` tokens that leave the window (unless
    :func:`write_leaving` did already), then keep the new ones exact in the sinks and the ring."""
    if k_new.shape[2] == 1 and not torch.compiler.is_compiling() and not leaving_written:
        _commit_one(layer, k_new, v_new)
    else:
        if not leaving_written:
            write_leaving(layer, k_new, v_new)
        _store_exact(layer, k_new, v_new)
    if layer.starts is not None:
        _store_row_sinks(layer, k_new, v_new)


def _store_row_sinks(layer, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """The sinks of a left-padded batch, after :func:`commit` counted the ``T`` new tokens: row
    ``r``'s sink slot ``i`` takes its token at position ``starts[r] + i``. Written over what the
    shared step stored at slot ``p`` for position ``p < S``, which for a padded row is either its
    own token ``starts[r] + p`` (also among the new ones then) or a later one, masked until it arrives."""
    S = layer.n_sinks
    if not S:
        return
    b, h, T, d = k_new.shape
    slot = (layer.length - T + torch.arange(T, device=layer.device))[None, :] - layer.starts[:, None]  # (b, T)
    slot = torch.where((slot >= 0) & (slot < S), slot, S)  # others to the trash slot
    index = slot[:, None, :, None].expand(b, h, T, d)
    layer.k_sink.scatter_(2, index, k_new.to(layer.k_sink.dtype))
    layer.v_sink.scatter_(2, index, v_new.to(layer.v_sink.dtype))


def zero_padding(layer, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The new tokens of a left-padded batch with its rows' padding slots zeroed: no row reads them,
    and a row's transform, fitted on its own tokens, may take padding beyond the scales' range."""
    pad = layer.length + torch.arange(k_new.shape[2], device=layer.device) < layer.starts[:, None]  # (b, T)
    pad = pad[:, None, :, None]
    return k_new.masked_fill(pad, 0), v_new.masked_fill(pad, 0)


def write_leaving(layer, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Quantize into the body the ``T`` tokens that leave the window as the ``T`` new ones arrive
    (positions ``p0 - W + 1 + j``): the first ``min(T, W - 1)`` from the ring, the rest from the new ones.
    Nothing, in a layer without a body (a sliding layer whose window is all exact)."""
    if not layer.stores_body:
        return
    T, dev = k_new.shape[2], layer.device
    S, R, W = layer.n_sinks, layer.n_ring, layer.window
    leaving = layer.length - W + 1 + torch.arange(T, device=dev)
    from_ring = min(T, W - 1)
    if from_ring:
        slots = torch.remainder(leaving[:from_ring], max(R, 1))
        k_out = torch.cat([layer.k_ring.index_select(2, slots), k_new[:, :, : T - from_ring]], dim=2)
        v_out = torch.cat([layer.v_ring.index_select(2, slots), v_new[:, :, : T - from_ring]], dim=2)
    else:
        k_out, v_out = k_new, v_new
    index = torch.where(leaving >= S, layer.body_slot(leaving), layer.capacity)  # not yet in the body: trash slot
    write_bodies(layer, index, k_out, v_out)


def _store_exact(layer, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """Keep the ``T`` new tokens in full precision: sinks below ``S``, the ring above, then count them."""
    T, dev = k_new.shape[2], layer.device
    S, R = layer.n_sinks, layer.n_ring
    pos = layer.length + torch.arange(T, device=dev)
    n = min(T, S)
    if n:
        sink_index = torch.where(pos[:n] < S, pos[:n], S)
        layer.k_sink.index_copy_(2, sink_index, k_new[:, :, :n])
        layer.v_sink.index_copy_(2, sink_index, v_new[:, :, :n])
    n = min(T, R)
    if n:
        last = pos[T - n :]
        ring_index = torch.where(last >= S, torch.remainder(last, R), R)
        layer.k_ring.index_copy_(2, ring_index, k_new[:, :, T - n :])
        layer.v_ring.index_copy_(2, ring_index, v_new[:, :, T - n :])
    layer._advance(T)
