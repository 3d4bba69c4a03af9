"""The opaque ops of compiled steps: ``torch.ops.nqkv.cache_step`` and ``present_attention``.

On CPU a ``torch.compile``'d decode step runs each layer's cache step as ``cache_step``, whose body
is the eager step (one native call per layer), instead of tracing its ~180 torch ops into the graph.
A traced step (``compiled_step="traced"``, the one CUDA graphs capture) attends through
``present_attention``, which reads only the body slots that hold tokens: the count is a device
tensor, so the graph's shapes stay those of the preallocated cache while the attention's cost
follows the tokens present. On CPU the op reads the count and slices the body to it. On a GPU
reading it would be a sync, which capture forbids: a one-token step hands the count to the grouped
decode kernel, which computes each split's key range from device lengths, so that it still decodes
only the tokens present; calls the kernel does not take (several query tokens, a 16-bit side,
another layout) read the whole body with its empty slots masked.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

from nqkv_core._hf import bool_mask
from nqkv_core.cache.attend import attend
from nqkv_core.cache.format import KeyBias, SideFormat
from nqkv_core.ops.attention import grouped_takes_key_bias, key_bias_table
from nqkv_core.ops.cpu import dense_key_bias, table_rows
from nqkv_core.scheme import FP_BITS
from nqkv_core.transform import CompactRope

# The layers ``nqkv::cache_step`` runs, by ``NQKVLayer.step_name`` (an op's arguments are tensors and
# plain values; the layer's transform, buffers and prepared native step stay out of the graph).
STEP_LAYERS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
STEP_NAMES = itertools.count()


def allows_whole_cache(mask: torch.Tensor | None, n: int) -> bool:
    """Whether a one-token step's ``mask`` lets its query see every position ``0..n`` (its own is ``n``):
    then it masks nothing the cache holds, and the step may run as if it had no mask."""
    if mask is None:
        return True
    if mask.shape[-2] != 1 or mask.shape[-1] <= n:
        return False
    row = mask[..., -1, : n + 1]
    return bool(bool_mask(row).all())


@torch.library.custom_op("nqkv::cache_step", mutates_args=())
def cache_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
               length: torch.Tensor, k_sink: torch.Tensor, scaling: float, layer: str) -> torch.Tensor:
    """One layer's step of a compiled graph on CPU, run as the eager step: store the new ``key`` /
    ``value`` ``(b, hkv, T, d)`` and attend ``query`` ``(b, hq, T, d)`` to the cache; ``(b, T, hq, d)``.

    ``layer`` names the :class:`NQKVLayer` (``step_name``); ``length`` is its token count before the
    step, ``k_sink``, one of its buffers, proves that the graph was traced for this layer. The op
    writes the layer's sink, ring and body buffers, which nothing else in a graph reads (so it
    declares no mutation), but not ``length``: the graph advances that itself, after the op, as a
    traced step does (an op that mutated ``length`` let inductor recompute the model's positions
    from the advanced count). A one-token step whose mask hides nothing (no padding) runs the
    native step, as eager decoding does.
    """
    target = STEP_LAYERS.get(layer)
    if target is None or not target.is_initialized or target.k_sink.data_ptr() != k_sink.data_ptr():
        raise RuntimeError(
            f"nqkv::cache_step: {layer!r} is not the NQKV cache layer this graph was compiled for (a cache"
            " replaced without recompiling?); call torch._dynamo.reset() or compile the step again"
        )
    own = target.length
    target.length = length.clone()  # the eager step counts on its own copy
    try:
        target.update(key, value)
        if query.shape[2] == 1 and allows_whole_cache(attention_mask, target._eager_length()):
            attention_mask = None
        return target.attention(query, attention_mask, scaling).contiguous()
    finally:
        target.length = own
        target._pending = target._step_length = None


@cache_step.register_fake
def _(query, key, value, attention_mask, length, k_sink, scaling, layer):
    b, hq, T, d = query.shape
    return query.new_empty(b, T, hq, d)


def reads_length(body_len: torch.Tensor) -> bool:
    """Whether :func:`present_attention` reads the body length to the host and slices the body to it:
    on CPU, where that read costs nothing; on a GPU it would be a sync (which CUDA graph capture
    forbids), so there the body is read whole and its empty slots masked by the device length."""
    return body_len.device.type == "cpu"


def reads_with_kernel(body_len: torch.Tensor) -> bool:
    """Whether :func:`present_attention` hands a one-token step that the grouped Triton decode kernel
    takes to that kernel, the body length left on the device (:func:`_kernel_attention`): wherever it
    does not read the length to the host. Tests patch it to run the kernel in Triton's interpreter on
    CPU tensors, or to keep the whole-body masked path."""
    return not reads_length(body_len)


def _kernel_attention(query: torch.Tensor, k: tuple, v: tuple, k_tail: torch.Tensor, v_tail: torch.Tensor,
                      tail_allowed: torch.Tensor, body_len: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      body_start: int, scale: float, bias: tuple, out_transform: tuple) -> torch.Tensor:
    """:func:`present_attention` of one query token through the grouped decode kernel, which reads the
    valid history and tail counts from a device tensor: it decodes the ``body_len`` slots that hold
    tokens, not the whole preallocated body, and reads nothing back to the host (CUDA graphs).

    The kernel puts tail token ``i`` at key ``body_len + i``. Without a model mask, the tail's allowed
    tokens (a ring may hold masked ones) are moved to its front and counted, so the kernel runs
    unmasked; with one, a boolean mask over ``[slots | tail]`` gives body slot ``j`` the model's column
    ``body_start + j`` and key ``body_len + i`` tail token ``i``'s. The key bias's positions are laid
    out the same way (body slot ``j`` at ``body_start + j``, then ``bias_pos``).
    """
    from nqkv_core.ops import triton_decode_grouped as grouped  # (imports Triton: only where it runs)

    b, dev = query.shape[0], query.device
    slots, M = k[0].shape[2], k_tail.shape[2]
    body_len = body_len.reshape(()).clamp(0, slots)
    bias_w, bias_table, bias_pos = bias
    mask = None
    if attention_mask is None and tail_allowed.shape[0] == 1:
        order, n_tail = _allowed_first(tail_allowed.reshape(M))
        k_tail, v_tail = k_tail.index_select(2, order), v_tail.index_select(2, order)
        bias_pos = None if bias_pos is None else bias_pos.index_select(0, order)
    else:
        n_tail = torch.full((), M, dtype=torch.int64, device=dev)
        c = torch.arange(slots + M, device=dev)
        tail = tail_allowed[..., -1:, :].index_select(-1, (c - body_len).clamp(0, M - 1))
        body = torch.ones((), dtype=torch.bool, device=dev)
        if attention_mask is not None:
            model = bool_mask(attention_mask)[:, :, -1:, :]
            body = model.index_select(-1, (c + body_start).clamp(max=model.shape[-1] - 1))
        mask = torch.where(c < body_len, body, tail)
    lengths = torch.stack([body_len, n_tail]).to(torch.int32).expand(b, 2).contiguous()
    key_bias = None
    if bias_w is not None:
        rows = table_rows(bias_table)
        c = torch.arange(slots + M, device=dev)
        tail_pos = bias_pos.index_select(0, (c - body_len).clamp(0, M - 1))
        positions = torch.where(c < body_len, c + body_start, tail_pos).clamp(0, rows.shape[0] - 1)
        key_bias = (bias_w, rows, positions)
        grouped.check_key_bias(query, key_bias, slots + M)
    if any(x is not None for x in out_transform):
        grouped.check_out_transform(query, k[0].shape[1], out_transform)
    else:
        out_transform = None
    return grouped.launch(query, *k[:4], *v[:3], k_tail.to(query.dtype), v_tail.to(query.dtype), mask, scale, False,
                          lengths=lengths, key_bias=key_bias, out_transform=out_transform)


def _allowed_first(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of a boolean vector ``allowed`` ``(M,)``, its True ones first (each group in order),
    and how many are True; device ops only (no sort, no read back)."""
    ok = allowed.long()
    n = ok.sum()
    dest = torch.where(allowed, ok.cumsum(0) - 1, n + (1 - ok).cumsum(0) - 1)
    order = torch.empty_like(dest).scatter_(0, dest, torch.arange(allowed.shape[0], device=allowed.device))
    return order, n


def _kernel_args(query: torch.Tensor, k_body: list[torch.Tensor], v_body: list[torch.Tensor],
                 k_codebook: Optional[torch.Tensor], k_block: int, v_codebook: Optional[torch.Tensor], v_block: int,
                 body_len: torch.Tensor, fused: bool) -> Optional[tuple[tuple, tuple]]:
    """The grouped kernel's K and V arguments ``(codes, absmax, codebook, block, axis)`` if
    :func:`_kernel_attention` serves this call: one query token, packed sides of a layout the kernel
    takes, where :func:`reads_with_kernel`; None otherwise (the whole-body masked path)."""
    if not fused or query.shape[2] != 1 or k_codebook is None or v_codebook is None:
        return None
    if not reads_with_kernel(body_len):
        return None
    k = _side_format(k_codebook, k_block).packed(tuple(k_body)).op_args()
    v = _side_format(v_codebook, v_block).packed(tuple(v_body)).op_args()
    return (k, v) if grouped_takes_key_bias(query, k, v) else None


def _side_format(codebook: Optional[torch.Tensor], block: int) -> SideFormat:
    if codebook is None:
        return SideFormat(FP_BITS, 1, None, None)
    return SideFormat(codebook.numel().bit_length() - 1, block, codebook, codebook)


@torch.library.custom_op("nqkv::present_attention", mutates_args=())
def present_attention(
    query: torch.Tensor, k_body: list[torch.Tensor], v_body: list[torch.Tensor], k_codebook: Optional[torch.Tensor],
    k_block: int, v_codebook: Optional[torch.Tensor], v_block: int, k_tail: torch.Tensor, v_tail: torch.Tensor,
    tail_allowed: torch.Tensor, body_len: torch.Tensor, attention_mask: Optional[torch.Tensor], body_start: int,
    scale: float, fused: bool, bias_w: Optional[torch.Tensor] = None, bias_table: Optional[torch.Tensor] = None,
    bias_pos: Optional[torch.Tensor] = None, bias_offsets: Optional[torch.Tensor] = None,
    out_rot: Optional[torch.Tensor] = None, out_shift: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of a traced step over the body slots that hold tokens and the exact tail:
    :func:`~nqkv_core.cache.attend.attend` over ``[body[:body_len] | tail]``.

    Where the length cannot be read to the host (a GPU), a one-token step with packed sides of a
    layout the grouped decode kernel takes runs that kernel with ``body_len`` as a device length
    (:func:`_kernel_attention`): its cost follows the tokens present, not the preallocation. Other
    calls there read the whole body, the slots from ``body_len`` on masked.

    Args:
        query: ``(b, hq, T, d)`` in the storage basis.
        k_body, v_body: a layer's whole body buffers (``[codes, absmax]``, or ``[values]`` for a
            16-bit side), ``(b, hkv, slots, ...)``; slots from ``body_len`` on are never attended.
        k_codebook, v_codebook, k_block, v_block: their formats (codebook None: a 16-bit side).
        k_tail, v_tail: ``(b, hkv, M, d)`` exact tokens after the body (sinks, ring, new tokens).
        tail_allowed: boolean ``(b or 1, 1, T, M)`` mask of the tail.
        body_len: int64 scalar tensor, the slots that hold tokens once the step's leaving tokens are
            written. Query ``t`` reads body slot ``j`` if ``j < body_len - T + 1 + t`` (the slots
            written for later queries of the step are not yet quantized for it).
        attention_mask: None, or the model's ``(b, 1, >= T, L)`` mask over absolute positions, of
            which body slot ``j`` is column ``body_start + j``.
        body_start: the position of body slot 0 (the sink count).
        scale: softmax scale; fused: read the codes with the ``torch.ops.nqkv`` ops (False: the
            reference arithmetic, SDPA over the dequantized body).
        bias_w, bias_table, bias_pos, bias_offsets: the RoPE-centred key bias
            (:class:`~nqkv_core.cache.format.KeyBias` parts as ``ops.attention.key_bias_args`` gives
            them: ``bias_table`` the RoPE table's rows ``(P, d)``, or with ``bias_offsets`` the starts
            of a table held compactly) with ``bias_pos`` the tail's positions; body slot ``j`` is at
            ``body_start + j``. The kernel path computes it by angle addition, so the table must
            hold RoPE angles (:class:`~nqkv_core.cache.format.RopeTable`), as a cache's does.
        out_rot, out_shift: the value rotation and centre that take the output back to the model's
            basis (``attend``'s ``output``; the grouped kernel applies them in its merge), or None.

    Returns:
        ``(b, hq, T, dv)`` in ``query.dtype``.
    """
    bias_table = key_bias_table(bias_table, bias_offsets)
    kernel = _kernel_args(query, k_body, v_body, k_codebook, k_block, v_codebook, v_block, body_len, fused)
    if kernel is not None and k_tail.shape[2]:  # (a step's tail holds its own token at least)
        bias = (bias_w, bias_table, bias_pos)
        out = _kernel_attention(query, *kernel, k_tail, v_tail, tail_allowed, body_len, attention_mask, body_start,
                                scale, bias, (out_rot, out_shift))
        return out.contiguous()
    T, dev = query.shape[2], query.device
    if reads_length(body_len):
        n = int(body_len)
        k_body, v_body = [x[:, :, :n] for x in k_body], [x[:, :, :n] for x in v_body]
    j = torch.arange(k_body[0].shape[2], device=dev)
    body = (j < body_len - (T - 1) + torch.arange(T, device=dev)[:, None])[None, None]
    if attention_mask is not None:
        mask = bool_mask(attention_mask)
        cols = (j + body_start).clamp(max=mask.shape[-1] - 1)
        body = mask[:, :, -T:, :].index_select(-1, cols) & body
    b = max(body.shape[0], tail_allowed.shape[0])
    allowed = torch.cat([body.expand(b, -1, -1, -1), tail_allowed.expand(b, -1, -1, -1)], dim=-1)
    key_bias = None
    if bias_w is not None:
        compact = isinstance(bias_table, CompactRope)
        P = bias_table.positions if compact else bias_table.shape[0]
        positions = torch.cat([j + body_start, bias_pos]).clamp(max=P - 1)
        table = bias_table
        if reads_length(body_len):  # only the rows up to the last position read
            last = int(positions.max())
            table = bias_table.head(last // 16 + 1) if compact else bias_table[: last + 1]

        def dense() -> torch.Tensor:
            return dense_key_bias(bias_w, table, positions)

        key_bias = KeyBias((bias_w, table, positions), dense)
    out = attend(query, tuple(k_body), tuple(v_body), _side_format(k_codebook, k_block),
                 _side_format(v_codebook, v_block), k_tail, v_tail, allowed, scale, key_bias, fused=fused,
                 output=None if out_rot is None and out_shift is None else (out_rot, out_shift))
    return out.contiguous()  # the strides the fake kernel promises the compiled graph


@present_attention.register_fake
def _(query, k_body, v_body, k_codebook, k_block, v_codebook, v_block, k_tail, v_tail, tail_allowed, body_len,
      attention_mask, body_start, scale, fused, bias_w=None, bias_table=None, bias_pos=None, bias_offsets=None,
      out_rot=None, out_shift=None):
    b, hq, T, _ = query.shape
    return query.new_empty(b, hq, T, v_tail.shape[-1])
