"""Split-K flash-decoding over packed K/V (Triton), with its plain-torch reference.

Layout of this file: shared ``@triton.jit`` helpers (decode a tile of packed codes; attend a range of
keys with online softmax) -> the split kernel (one program per KV head x key split x block of query
rows; writes a partial output and its log-sum-exp) -> the merge kernel (combines the splits) ->
the launcher, registered as ``nqkv::flash_decode`` with ``torch.library.triton_op`` ->
:func:`reference`.

Query rows: the ``G * Tq`` queries that share one KV head (``G = Hq / Hkv``) are the rows of one
tile, padded to ``BLOCK_R >= 16`` so both products are ``tl.dot`` (GPUs need every dot dimension
>= 16). Codes are decoded in registers: byte loads, shifts and masks, a gather from the codebook,
times the block's absmax. Scores, softmax and accumulators are fp32.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

MAX_ROWS = 64  # query rows per KV head (G * Tq) up to which the split-K decode kernel is used
BLOCK_N = 64  # keys per tile in the interpreter and the prefill kernel

# Launch configuration of the split kernel on a GPU: keys per tile, warps and pipeline stages per
# program, the number of programs to aim for (each KV head's keys are split so that batch x heads x
# splits reaches it), the fewest keys per split, and whether 4-bit caches in blocks along head_dim
# take the lane-order path (nibble_lanes, :func:`_attend_range_nibbles`), and whether that path decodes
# codes by byte permutes against tables in registers (register_lut, :data:`_LUT16_ASM`) instead of
# gathers from the codebook in memory. The first five are the best of the H200 sweep in
# benchmarks/gpu_check.sh (docs/benchmarks.md, "GPU"), measured before the lane-order path existed;
# the sweep times both paths. register_lut stays off until a GPU run has checked and timed it (the
# sweep and the CUDA tests run it both ways).
DECODE_CONFIG = dict(block_n=64, num_warps=2, num_stages=2, programs=264, min_split=128, nibble_lanes=True,
                     register_lut=False)


# -- shared jit helpers ------------------------------------------------------------------------------


@triton.jit
def _scale_values(raw):
    """Stored block scales as fp32: E5M3 bytes (uint8, :data:`nqkv_core.quantize.E5M3`) are the bits
    14..7 of an fp16; fp16 / fp32 scales are converted."""
    if raw.dtype == tl.uint8:
        return (raw.to(tl.int16) << 7).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return raw.to(tl.float32)


@triton.jit
def _load_packed(codes_ptr, absmax_ptr, cb_ptr, offs_t, t_ok, offs_d, stride_ct, stride_at, stride_ad,
                 BITS: tl.constexpr, AXIS: tl.constexpr, QBLOCK: tl.constexpr, DIM: tl.constexpr,
                 N: tl.constexpr):
    """fp32 tile (N, DIM) of codebook[code] * absmax; pointers already at (batch, head)."""
    row = codes_ptr + offs_t[:, None] * stride_ct
    m = t_ok[:, None]
    # -- codes --
    if AXIS == 3:
        # Each byte is loaded once (a row's bytes are contiguous: wide, coalesced loads) and split in
        # registers. tl.join stacks on a new last axis, so the code of element e of a byte must end up
        # at flat index e of the joined axes: the outermost join takes e's lowest bit.
        if BITS == 4:
            byte = tl.load(row + tl.arange(0, DIM // 2)[None, :], mask=m, other=0).to(tl.int32)
            code = tl.reshape(tl.join(byte & 15, byte >> 4), (N, DIM))
        elif BITS == 2:
            byte = tl.load(row + tl.arange(0, DIM // 4)[None, :], mask=m, other=0).to(tl.int32)
            code = tl.reshape(tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6)),
                              (N, DIM))
        elif BITS == 3:  # two planes: 2-bit low parts (DIM / 4 bytes), then the high bits (DIM / 8 bytes)
            lo = tl.load(row + tl.arange(0, DIM // 4)[None, :], mask=m, other=0).to(tl.int32)
            hi = tl.load(row + (DIM // 4 + tl.arange(0, DIM // 8))[None, :], mask=m, other=0).to(tl.int32)
            low2 = tl.reshape(tl.join(tl.join(lo & 3, (lo >> 4) & 3), tl.join((lo >> 2) & 3, lo >> 6)), (N, DIM))
            even = tl.join(tl.join(hi & 1, (hi >> 4) & 1), tl.join((hi >> 2) & 1, (hi >> 6) & 1))
            odd = tl.join(tl.join((hi >> 1) & 1, (hi >> 5) & 1), tl.join((hi >> 3) & 1, (hi >> 7) & 1))
            code = low2 | (tl.reshape(tl.join(even, odd), (N, DIM)) << 2)
        else:
            code = tl.load(row + tl.arange(0, DIM)[None, :], mask=m, other=0).to(tl.int32)
    elif BITS == 4:  # blocks along tokens (rarely used): a byte load per element
        byte = tl.load(row + (offs_d // 2)[None, :], mask=m, other=0).to(tl.int32)
        code = (byte >> ((offs_d % 2) * 4)[None, :]) & 15
    elif BITS == 2:
        byte = tl.load(row + (offs_d // 4)[None, :], mask=m, other=0).to(tl.int32)
        code = (byte >> ((offs_d % 4) * 2)[None, :]) & 3
    elif BITS == 3:
        lo = tl.load(row + (offs_d // 4)[None, :], mask=m, other=0).to(tl.int32)
        hi = tl.load(row + (DIM // 4 + offs_d // 8)[None, :], mask=m, other=0).to(tl.int32)
        code = ((lo >> ((offs_d % 4) * 2)[None, :]) & 3) | (((hi >> (offs_d % 8)[None, :]) & 1) << 2)
    else:
        code = tl.load(row + offs_d[None, :], mask=m, other=0).to(tl.int32)
    level = tl.load(cb_ptr + code)
    # -- scales --
    if AXIS == 3:
        if QBLOCK == DIM:  # one scale per token
            scale = _scale_values(tl.load(absmax_ptr + offs_t * stride_at, mask=t_ok, other=0))[:, None]
        else:  # DIM // QBLOCK scales per token, each repeated over its block
            s = _scale_values(tl.load(absmax_ptr + offs_t[:, None] * stride_at
                                      + tl.arange(0, DIM // QBLOCK)[None, :] * stride_ad, mask=m, other=0))
            scale = tl.reshape(tl.broadcast_to(s[:, :, None], (N, DIM // QBLOCK, QBLOCK)), (N, DIM))
    else:
        s_ptr = absmax_ptr + (offs_t // QBLOCK)[:, None] * stride_at + offs_d[None, :] * stride_ad
        scale = _scale_values(tl.load(s_ptr, mask=m, other=0))
    return level * scale


@triton.jit
def _masked(s, r_ok, t_ok, offs_t, last_key, head, i_q, mask_ptr, stride_mh, stride_mq, stride_mk,
            MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Scores ``s`` (rows, keys) with -inf where a row may not attend (padding, causal, the mask)."""
    valid = r_ok[:, None] & t_ok[None, :]
    if IS_CAUSAL:
        valid = valid & (offs_t[None, :] <= last_key[:, None])
    if MASK_KIND != 0:
        m_ptrs = mask_ptr + head[:, None] * stride_mh + i_q[:, None] * stride_mq + offs_t[None, :] * stride_mk
        mv = tl.load(m_ptrs, mask=valid, other=0)
        if MASK_KIND == 1:
            valid = valid & (mv != 0)
        else:
            s = s + mv.to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _softmax_step(s, m_i, l_i):
    """Online softmax over one tile: ``(p, alpha, m, l)``, ``alpha`` rescaling what came before."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_range(
    q, r_ok, last_key, head, i_q,
    kc_ptr, ka_ptr, kcb_ptr, vc_ptr, va_ptr, vcb_ptr, kt_ptr, vt_ptr, mask_ptr,
    stride_kct, stride_kat, stride_kad, stride_vct, stride_vat, stride_vad,
    stride_ktt, stride_ktd, stride_vtt, stride_vtd,
    stride_mh, stride_mq, stride_mk,
    start, stop, T_HIST,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_QBLOCK: tl.constexpr,
    V_BITS: tl.constexpr, V_AXIS: tl.constexpr, V_QBLOCK: tl.constexpr,
    HAS_TAIL: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax of the rows of ``q`` (pre-scaled fp32) over keys [start, stop).

    Returns ``(acc, m, l)``: unnormalised fp32 output, running max and running sum per row.
    Keys below ``T_HIST`` come from the packed history, the rest from the fp tail.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_V], tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        offs_t = start_n + tl.arange(0, BLOCK_N)
        t_ok = offs_t < stop
        hist = t_ok & (offs_t < T_HIST)
        # -- load K --
        k = _load_packed(kc_ptr, ka_ptr, kcb_ptr, offs_t, hist, offs_d, stride_kct, stride_kat, stride_kad,
                         K_BITS, K_AXIS, K_QBLOCK, HEAD_DIM, BLOCK_N)
        if HAS_TAIL:
            tail = t_ok & (offs_t >= T_HIST)
            kt = tl.load(kt_ptr + (offs_t - T_HIST)[:, None] * stride_ktt + offs_d[None, :] * stride_ktd,
                         mask=tail[:, None], other=0.0)
            k = tl.where(hist[:, None], k, kt.to(tl.float32))
        # -- compute qk --
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q.to(kt_ptr.dtype.element_ty), tl.trans(k).to(kt_ptr.dtype.element_ty))
        s = _masked(s, r_ok, t_ok, offs_t, last_key, head, i_q, mask_ptr, stride_mh, stride_mq, stride_mk,
                    MASK_KIND, IS_CAUSAL)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        # -- load V, accumulate --
        v = _load_packed(vc_ptr, va_ptr, vcb_ptr, offs_t, hist, offs_dv, stride_vct, stride_vat, stride_vad,
                         V_BITS, V_AXIS, V_QBLOCK, HEAD_DIM_V, BLOCK_N)
        if HAS_TAIL:
            vt = tl.load(vt_ptr + (offs_t - T_HIST)[:, None] * stride_vtt + offs_dv[None, :] * stride_vtd,
                         mask=tail[:, None], other=0.0)
            v = tl.where(hist[:, None], v, vt.to(tl.float32))
        if FP32_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt_ptr.dtype.element_ty), v.to(vt_ptr.dtype.element_ty))
        acc = acc * alpha[:, None] + pv
    return acc, m_i, l_i


# A 16-entry lookup in registers: per 32-bit word of packed bytes (8 codes), byte permutes (PTX
# ``prmt``) pick each code's level from two tables of 16 bytes, the low and the high bytes of the
# 16-bit levels, held as eight 32-bit words (lo0..lo3, hi0..hi3; entry j is byte j % 4 of word j // 4).
# A prmt selects from 8 bytes by the low 3 bits of a 4-bit selector (bit 3 would replicate a sign),
# so each table is read as its two halves and bit 3 of the code picks between them (a third prmt).
# 22 instructions for 8 codes, against a gather from memory per code. Operands: $0-$1 the even
# elements' levels (two 16-bit values per register), $2-$3 the odd ones', $4 four packed bytes, then
# the eight table words, four registers each (pack=4 repeats a 32-bit operand per element):
# $5, $9, ..., $33.
def _lut16_word_half(even: str, odd: str) -> str:
    """PTX for four codes (selectors ``s``, half-selects ``h``): their levels into ``even`` / ``odd``."""
    return f"""prmt.b32 a, $5, $9, s;
prmt.b32 b, $13, $17, s;
prmt.b32 lo, a, b, h;
prmt.b32 a, $21, $25, s;
prmt.b32 b, $29, $33, s;
prmt.b32 hi, a, b, h;
prmt.b32 {even}, lo, hi, 0x6240;
prmt.b32 {odd}, lo, hi, 0x7351;
"""


_LUT16_ASM = tl.constexpr("""{
.reg .b32 s, h, a, b, lo, hi;
and.b32 s, $4, 0x77777777;
and.b32 h, $4, 0x88888888;
shr.u32 h, h, 1;
or.b32 h, h, 0x32103210;
""" + _lut16_word_half("$0", "$2") + """shr.u32 s, s, 16;
shr.u32 h, h, 16;
""" + _lut16_word_half("$1", "$3") + "}")
_LUT16_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 32)


@triton.jit
def _byte_tables(cb_ptr, DT: tl.constexpr):
    """The 16 levels of a 4-bit codebook rounded to ``DT`` (16-bit), as the eight words of
    ``_LUT16_ASM``: lo0..lo3 (low bytes), hi0..hi3 (high bytes). Byte fields are disjoint, so the
    sums are ORs."""
    idx = tl.arange(0, 16)
    bits = tl.load(cb_ptr + idx).to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    shift = (idx % 4) * 8
    lo = (bits & 0xFF) << shift
    hi = (bits >> 8) << shift
    word = idx // 4
    return (tl.sum(tl.where(word == 0, lo, 0), 0), tl.sum(tl.where(word == 1, lo, 0), 0),
            tl.sum(tl.where(word == 2, lo, 0), 0), tl.sum(tl.where(word == 3, lo, 0), 0),
            tl.sum(tl.where(word == 0, hi, 0), 0), tl.sum(tl.where(word == 1, hi, 0), 0),
            tl.sum(tl.where(word == 2, hi, 0), 0), tl.sum(tl.where(word == 3, hi, 0), 0))


@triton.jit
def _nibble_levels(codes_ptr, absmax_ptr, cb_ptr, tail_ptr, offs_t, hist, tail, t_tail, offs_h, stride_ct,
                   stride_at, stride_ad, stride_tt, stride_td, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3,
                   HAS_TAIL: tl.constexpr, LUT: tl.constexpr, QBLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                   N: tl.constexpr):
    """4-bit codes in blocks along head_dim, in lane order: the levels of the even and of the odd
    elements of each row, (N, D/2) each, and a scale per token (N,). With one block per row
    (``QBLOCK == HEAD_DIM``) the scale is the block's absmax, for the caller to apply to whole
    rows; with several, the levels come out multiplied by their block's absmax (lane j of either
    half is element 2j or 2j + 1, in block 2j // QBLOCK: runs of QBLOCK / 2 lanes share a scale)
    and the scale is 1. Tail tokens (``tail``, index ``t_tail`` in the fp tail) give their exact
    values with scale 1. With ``LUT`` the levels come from the byte tables ``lo*`` / ``hi*`` in
    registers (:func:`_byte_tables`; 16-bit levels, of the tail's dtype), otherwise from fp32
    codebook gathers."""
    byte = tl.load(codes_ptr + offs_t[:, None] * stride_ct + offs_h[None, :], mask=hist[:, None], other=0)
    if LUT:
        even, odd = tl.inline_asm_elementwise(
            _LUT16_ASM, _LUT16_CONSTRAINTS, [byte, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3],
            dtype=(tail_ptr.dtype.element_ty, tail_ptr.dtype.element_ty), is_pure=True, pack=4)
    else:
        byte = byte.to(tl.int32)
        even = tl.load(cb_ptr + (byte & 15))
        odd = tl.load(cb_ptr + (byte >> 4))
    if QBLOCK == HEAD_DIM:
        scale = _scale_values(tl.load(absmax_ptr + offs_t * stride_at, mask=hist, other=0))
    else:
        per_lane = tl.load(absmax_ptr + offs_t[:, None] * stride_at
                           + tl.arange(0, HEAD_DIM // QBLOCK)[None, :] * stride_ad, mask=hist[:, None], other=0)
        if per_lane.dtype == tl.uint8:
            per_lane = _scale_values(per_lane)
        per_lane = tl.reshape(tl.broadcast_to(per_lane[:, :, None], (N, HEAD_DIM // QBLOCK, QBLOCK // 2)),
                              (N, HEAD_DIM // 2))
        # In 16 bits (the register lookup's levels) the product is rounded where the general path
        # rounds an fp32 product once; in bf16 the scale is rounded too, a relative error of at
        # most 2^-9 against the 4-bit code's own (up to half a level spacing: several percent of
        # the block's absmax). Multiplying in fp32 instead costs a quarter more instructions in the
        # key loop (triton_sass.py).
        even = even * per_lane.to(even.dtype)
        odd = odd * per_lane.to(odd.dtype)
        scale = tl.full((N,), 1.0, tl.float32)
    if HAS_TAIL:
        row = tail_ptr + t_tail[:, None] * stride_tt
        te = tl.load(row + (2 * offs_h)[None, :] * stride_td, mask=tail[:, None], other=0.0)
        to = tl.load(row + (2 * offs_h + 1)[None, :] * stride_td, mask=tail[:, None], other=0.0)
        if not LUT:
            te, to = te.to(tl.float32), to.to(tl.float32)
        even = tl.where(hist[:, None], even, te)
        odd = tl.where(hist[:, None], odd, to)
        scale = tl.where(hist, scale, 1.0)
    return even, odd, scale


@triton.jit
def _attend_range_nibbles(
    q_even, q_odd, r_ok, last_key, head, i_q,
    kc_ptr, ka_ptr, kcb_ptr, vc_ptr, va_ptr, vcb_ptr, kt_ptr, vt_ptr, mask_ptr,
    stride_kct, stride_kat, stride_kad, stride_vct, stride_vat, stride_vad,
    stride_ktt, stride_ktd, stride_vtt, stride_vtd,
    stride_mh, stride_mq, stride_mk,
    start, stop, T_HIST,
    HEAD_DIM: tl.constexpr, K_QBLOCK: tl.constexpr, V_QBLOCK: tl.constexpr, HAS_TAIL: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, LUT: tl.constexpr,
):
    """:func:`_attend_range` for 4-bit K and V in blocks along head_dim (the presets' layout), in
    lane order: a packed byte's two codes stay in two tiles, even and odd elements (the query is
    split the same way, so q . k = q_even . k_even + q_odd . k_odd, and the output comes out as its
    even and odd elements). With one block per row each token's scale multiplies its score and its
    softmax weight instead of every decoded level; with smaller blocks the levels are scaled
    (:func:`_nibble_levels`). With ``LUT`` (16-bit dots on a GPU) codes are decoded by byte
    permutes against tables in registers (:func:`_byte_tables`). Returns ``(acc_even, acc_odd, m, l)``.
    """
    offs_h = tl.arange(0, HEAD_DIM // 2)
    if LUT:  # once per program: the codebooks as byte tables of the dot dtype
        k0, k1, k2, k3, k4, k5, k6, k7 = _byte_tables(kcb_ptr, kt_ptr.dtype.element_ty)
        v0, v1, v2, v3, v4, v5, v6, v7 = _byte_tables(vcb_ptr, vt_ptr.dtype.element_ty)
    else:
        k0, k1, k2, k3, k4, k5, k6, k7 = 0, 0, 0, 0, 0, 0, 0, 0  # (unused)
        v0, v1, v2, v3, v4, v5, v6, v7 = 0, 0, 0, 0, 0, 0, 0, 0
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc_e = tl.zeros([BLOCK_R, HEAD_DIM // 2], tl.float32)
    acc_o = tl.zeros([BLOCK_R, HEAD_DIM // 2], tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        offs_t = start_n + tl.arange(0, BLOCK_N)
        t_ok = offs_t < stop
        hist = t_ok & (offs_t < T_HIST)
        tail = t_ok & (offs_t >= T_HIST)
        k_e, k_o, k_s = _nibble_levels(kc_ptr, ka_ptr, kcb_ptr, kt_ptr, offs_t, hist, tail, offs_t - T_HIST, offs_h,
                                       stride_kct, stride_kat, stride_kad, stride_ktt, stride_ktd,
                                       k0, k1, k2, k3, k4, k5, k6, k7, HAS_TAIL, LUT, K_QBLOCK, HEAD_DIM, BLOCK_N)
        if FP32_DOT:
            s = tl.dot(q_even, tl.trans(k_e), input_precision="ieee")
            s += tl.dot(q_odd, tl.trans(k_o), input_precision="ieee")
        else:
            dt = kt_ptr.dtype.element_ty
            s = tl.dot(q_even.to(dt), tl.trans(k_e).to(dt))
            s += tl.dot(q_odd.to(dt), tl.trans(k_o).to(dt))
        s = _masked(s * k_s[None, :], r_ok, t_ok, offs_t, last_key, head, i_q, mask_ptr, stride_mh, stride_mq,
                    stride_mk, MASK_KIND, IS_CAUSAL)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        v_e, v_o, v_s = _nibble_levels(vc_ptr, va_ptr, vcb_ptr, vt_ptr, offs_t, hist, tail, offs_t - T_HIST, offs_h,
                                       stride_vct, stride_vat, stride_vad, stride_vtt, stride_vtd,
                                       v0, v1, v2, v3, v4, v5, v6, v7, HAS_TAIL, LUT, V_QBLOCK, HEAD_DIM, BLOCK_N)
        pw = p * v_s[None, :]
        if FP32_DOT:
            acc_e = acc_e * alpha[:, None] + tl.dot(pw, v_e, input_precision="ieee")
            acc_o = acc_o * alpha[:, None] + tl.dot(pw, v_o, input_precision="ieee")
        else:
            dt = vt_ptr.dtype.element_ty
            acc_e = acc_e * alpha[:, None] + tl.dot(pw.to(dt), v_e.to(dt))
            acc_o = acc_o * alpha[:, None] + tl.dot(pw.to(dt), v_o.to(dt))
    return acc_e, acc_o, m_i, l_i


# -- kernels -------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, ka_ptr, kcb_ptr, vc_ptr, va_ptr, vcb_ptr, kt_ptr, vt_ptr, mask_ptr, po_ptr, plse_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kcb, stride_kch, stride_kct, stride_kab, stride_kah, stride_kat, stride_kad,
    stride_vcb, stride_vch, stride_vct, stride_vab, stride_vah, stride_vat, stride_vad,
    stride_ktb, stride_kth, stride_ktt, stride_ktd, stride_vtb, stride_vth, stride_vtt, stride_vtd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    H_KV, T_Q, T_HIST, T_K, N_ROWS, SPLIT_LEN, NUM_SPLITS, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_QBLOCK: tl.constexpr,
    V_BITS: tl.constexpr, V_AXIS: tl.constexpr, V_QBLOCK: tl.constexpr,
    HAS_TAIL: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, NIBBLES: tl.constexpr, LUT: tl.constexpr,
):
    # (NUM_SPLITS is a run-time argument: it changes with the cache length, a constexpr would recompile)
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = (pid_bh // H_KV).to(tl.int64)  # (a whole cache's offsets can pass 2**31)
    h = pid_bh % H_KV
    # -- query rows of this KV head: row = g * T_Q + i --
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < N_ROWS
    i_q = offs_r % T_Q
    head = h * GROUP + offs_r // T_Q
    q_row = q_ptr + b * stride_qb + head[:, None] * stride_qh + i_q[:, None] * stride_qt
    last_key = T_K - T_Q + i_q
    # -- this split's keys --
    start = pid_s * SPLIT_LEN
    stop = tl.minimum(T_K, start + SPLIT_LEN)
    if IS_CAUSAL:
        stop = tl.minimum(stop, T_K - T_Q + tl.max(tl.where(r_ok, i_q, 0), 0) + 1)
    kc, ka = kc_ptr + b * stride_kcb + h * stride_kch, ka_ptr + b * stride_kab + h * stride_kah
    vc, va = vc_ptr + b * stride_vcb + h * stride_vch, va_ptr + b * stride_vab + h * stride_vah
    kt, vt = kt_ptr + b * stride_ktb + h * stride_kth, vt_ptr + b * stride_vtb + h * stride_vth
    base = (pid_bh * NUM_SPLITS + pid_s) * N_ROWS
    # (the scaled query is cast after the product: traced by inductor, a Python float argument is fp64)
    if NIBBLES:
        offs_h = tl.arange(0, HEAD_DIM // 2)
        q_even = (tl.load(q_row + (2 * offs_h)[None, :] * stride_qd, mask=r_ok[:, None], other=0.0).to(tl.float32)
                  * scale).to(tl.float32)
        q_odd = (tl.load(q_row + (2 * offs_h + 1)[None, :] * stride_qd, mask=r_ok[:, None], other=0.0).to(tl.float32)
                 * scale).to(tl.float32)
        acc_e, acc_o, m_i, l_i = _attend_range_nibbles(
            q_even, q_odd, r_ok, last_key, head, i_q, kc, ka, kcb_ptr, vc, va, vcb_ptr, kt, vt, mask_ptr + b * stride_mb,
            stride_kct, stride_kat, stride_kad, stride_vct, stride_vat, stride_vad,
            stride_ktt, stride_ktd, stride_vtt, stride_vtd, stride_mh, stride_mq, stride_mk, start, stop, T_HIST,
            HEAD_DIM, K_QBLOCK, V_QBLOCK, HAS_TAIL, MASK_KIND, IS_CAUSAL, FP32_DOT, BLOCK_R, BLOCK_N, LUT,
        )
        norm = tl.where(l_i > 0, l_i, 1.0)[:, None]
        po_row = po_ptr + (base + offs_r)[:, None] * HEAD_DIM_V
        tl.store(po_row + (2 * offs_h)[None, :], acc_e / norm, mask=r_ok[:, None])
        tl.store(po_row + (2 * offs_h + 1)[None, :], acc_o / norm, mask=r_ok[:, None])
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        q = (tl.load(q_row + offs_d[None, :] * stride_qd, mask=r_ok[:, None], other=0.0).to(tl.float32)
             * scale).to(tl.float32)
        acc, m_i, l_i = _attend_range(
            q, r_ok, last_key, head, i_q, kc, ka, kcb_ptr, vc, va, vcb_ptr, kt, vt, mask_ptr + b * stride_mb,
            stride_kct, stride_kat, stride_kad, stride_vct, stride_vat, stride_vad,
            stride_ktt, stride_ktd, stride_vtt, stride_vtd, stride_mh, stride_mq, stride_mk,
            start, stop, T_HIST,
            HEAD_DIM, HEAD_DIM_V, K_BITS, K_AXIS, K_QBLOCK, V_BITS, V_AXIS, V_QBLOCK,
            HAS_TAIL, MASK_KIND, IS_CAUSAL, FP32_DOT, BLOCK_R, BLOCK_N,
        )
        offs_dv = tl.arange(0, HEAD_DIM_V)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(po_ptr + (base + offs_r)[:, None] * HEAD_DIM_V + offs_dv[None, :], out, mask=r_ok[:, None])
    # -- the partial output's log-sum-exp --
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(plse_ptr + base + offs_r, lse, mask=r_ok)


@triton.jit
def _decode_merge_kernel(
    po_ptr, plse_ptr, o_ptr,
    stride_ob, stride_oh, stride_ot, stride_od,
    H_KV, T_Q, N_ROWS, NUM_SPLITS,
    GROUP: tl.constexpr, HEAD_DIM_V: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < NUM_SPLITS
    idx = (pid_bh * NUM_SPLITS + offs_s) * N_ROWS + row
    lse = tl.load(plse_ptr + idx, mask=s_ok, other=float("-inf"))
    # -- weights of the splits --
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, 0)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    parts = tl.load(po_ptr + idx[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    head = h * GROUP + row // T_Q
    i_q = row % T_Q
    o_ptrs = o_ptr + b * stride_ob + head * stride_oh + i_q * stride_ot + offs_dv * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))


# -- launcher --------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(q: Tensor, k: tuple, v: tuple) -> bool:
    """Whether the kernels take these shapes: power-of-two head dims from 16 to 256."""
    d = q.shape[-1]
    dv = v[0].shape[-1] * 8 // int(math.log2(v[2].numel()))
    return all(x >= 16 and x <= 256 and x & (x - 1) == 0 for x in (d, dv))


def kernel_args(q, k_codes, k_absmax, k_codebook, k_block, k_axis, v_codes, v_absmax, v_codebook,
                v_block, v_axis, k_tail, v_tail, attn_mask):
    """Tensors, strides and meta-parameters shared by the decode and prefill launchers."""
    b, hq, tq, d = q.shape
    hkv, th = k_codes.shape[1], k_codes.shape[2]
    vbits = int(math.log2(v_codebook.numel()))
    dv = v_codes.shape[3] * 8 // vbits
    tt = 0 if k_tail is None else k_tail.shape[2]
    # the kernels step through a row's bytes with stride 1
    k_codes = k_codes if k_codes.stride(-1) == 1 else k_codes.contiguous()
    v_codes = v_codes if v_codes.stride(-1) == 1 else v_codes.contiguous()
    interp = _interpreting()
    work = torch.float32 if (interp or q.dtype == torch.float32) else q.dtype
    if k_tail is None:  # dummies, never read; their dtype sets the dot dtype
        k_tail = v_tail = q.new_empty((1, 1, 1, 1), dtype=work)
    else:
        k_tail, v_tail = k_tail.to(work), v_tail.to(work)
    mask_kind = 0
    if attn_mask is None:
        mask = q.new_zeros((1, 1, 1, 1), dtype=torch.uint8)
    else:
        mask_kind = 1 if attn_mask.dtype == torch.bool else 2
        mask = attn_mask.expand(b, hq, tq, th + tt)
        mask = mask.view(torch.uint8) if mask_kind == 1 else mask.to(torch.float32)
    qw = q.to(work) if interp and q.dtype == torch.bfloat16 else q
    tensors = (qw, k_codes, k_absmax, k_codebook, v_codes, v_absmax, v_codebook, k_tail, v_tail, mask)
    strides = (*qw.stride(), *k_codes.stride()[:3], *k_absmax.stride(), *v_codes.stride()[:3],
               *v_absmax.stride(), *k_tail.stride(), *v_tail.stride(), *mask.stride())
    meta = dict(
        GROUP=hq // hkv, HEAD_DIM=d, HEAD_DIM_V=dv,
        K_BITS=int(math.log2(k_codebook.numel())), K_AXIS=k_axis, K_QBLOCK=k_block,
        V_BITS=vbits, V_AXIS=v_axis, V_QBLOCK=v_block,
        HAS_TAIL=tt > 0, MASK_KIND=mask_kind, FP32_DOT=work == torch.float32,
    )
    return tensors, strides, meta, (b, hq, tq, d, hkv, th, tt, dv)


def nibble_lanes(meta: dict, cfg: dict) -> bool:
    """Whether the split kernel takes the lane-order path (:func:`_attend_range_nibbles`): 4-bit K and
    V in blocks along head_dim of at least 2 elements (a byte's two codes share a block),
    head_dim >= 32 (each half feeds a dot); ``cfg["nibble_lanes"]`` switches it off, to compare
    the two."""
    d = meta["HEAD_DIM"]
    return (cfg.get("nibble_lanes", True) and meta["K_BITS"] == meta["V_BITS"] == 4
            and meta["K_AXIS"] == meta["V_AXIS"] == 3 and meta["K_QBLOCK"] >= 2 and meta["V_QBLOCK"] >= 2
            and meta["HEAD_DIM_V"] == d and d >= 32)


def register_lut(meta: dict, cfg: dict) -> bool:
    """Whether the lane-order path decodes codes with :data:`_LUT16_ASM` (``cfg["register_lut"]``):
    PTX, so only compiled for a GPU, and only with 16-bit dots (the tables hold 16-bit levels)."""
    return (cfg.get("register_lut", False) and nibble_lanes(meta, cfg) and not meta["FP32_DOT"]
            and not _interpreting())


@triton_op("nqkv::flash_decode", mutates_args=())
def flash_decode(
    q: Tensor,
    k_codes: Tensor, k_absmax: Tensor, k_codebook: Tensor, k_block: int, k_axis: int,
    v_codes: Tensor, v_absmax: Tensor, v_codebook: Tensor, v_block: int, v_axis: int,
    k_tail: Optional[Tensor], v_tail: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: float, is_causal: bool,
) -> Tensor:
    """Split-K decode attention; arguments and semantics as ``nqkv::attention`` (checked there)."""
    tensors, strides, meta, (b, hq, tq, d, hkv, th, tt, dv) = kernel_args(
        q, k_codes, k_absmax, k_codebook, k_block, k_axis, v_codes, v_absmax, v_codebook,
        v_block, v_axis, k_tail, v_tail, attn_mask)
    tk = th + tt
    n_rows = (hq // hkv) * tq
    block_r = max(16, triton.next_power_of_2(n_rows))
    # -- splits: enough programs to fill the GPU, each at least a few tiles long --
    # (the interpreter uses short splits so that small test shapes exercise the merge)
    cfg = DECODE_CONFIG
    if _interpreting():
        block_n, target, min_len, launch = BLOCK_N, 3, BLOCK_N, {}
    else:
        block_n, target, min_len = cfg["block_n"], max(1, cfg["programs"] // (b * hkv)), cfg["min_split"]
        launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    split_len = max(min_len, triton.cdiv(triton.cdiv(max(tk, 1), target), block_n) * block_n)
    num_splits = max(1, triton.cdiv(tk, split_len))
    po = torch.empty((b * hkv, num_splits, n_rows, dv), device=q.device, dtype=torch.float32)
    plse = torch.empty((b * hkv, num_splits, n_rows), device=q.device, dtype=torch.float32)
    grid = (b * hkv, num_splits, triton.cdiv(n_rows, block_r))
    lanes = nibble_lanes(meta, cfg)
    wrap_triton(_decode_split_kernel)[grid](
        *tensors, po, plse, *strides, hkv, tq, th, tk, n_rows, split_len, num_splits, scale,
        **meta, IS_CAUSAL=is_causal, BLOCK_R=block_r, BLOCK_N=block_n, NIBBLES=lanes, LUT=register_lut(meta, cfg),
        **launch,
    )
    out = torch.empty((b, hq, tq, dv), device=q.device, dtype=tensors[0].dtype)
    wrap_triton(_decode_merge_kernel)[(b * hkv, n_rows)](
        po, plse, out, *out.stride(), hkv, tq, n_rows, num_splits,
        GROUP=hq // hkv, HEAD_DIM_V=dv, SPLITS_P2=triton.next_power_of_2(num_splits),
    )
    return out.to(q.dtype)


# -- reference --------------------------------------------------------------------------------------------


def reference(q, k_codes, k_absmax, k_codebook, k_block, k_axis, v_codes, v_absmax, v_codebook, v_block,
              v_axis, k_tail=None, v_tail=None, attn_mask=None, scale=None, is_causal=False) -> Tensor:
    """Plain torch: dequantize everything, concatenate the tail, fp32 SDPA (bottom-right causal)."""
    from nqkv_core.quantize import dequantize_blockwise

    def deq(codes, absmax, codebook, block, axis):
        if axis == 2 and codes.shape[2] % block:  # a partial last block of tokens
            pad = block - codes.shape[2] % block
            codes = torch.cat([codes, codes.new_zeros(*codes.shape[:2], pad, codes.shape[3])], 2)
            return dequantize_blockwise(codes, absmax, codebook, block, axis)[:, :, :-pad]
        return dequantize_blockwise(codes, absmax, codebook, block, axis)

    k = deq(k_codes, k_absmax, k_codebook, k_block, k_axis)
    v = deq(v_codes, v_absmax, v_codebook, v_block, v_axis)
    if k_tail is not None:
        k, v = torch.cat([k, k_tail.float()], 2), torch.cat([v, v_tail.float()], 2)
    tq, tk = q.shape[2], k.shape[2]
    mask = attn_mask
    if is_causal:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.float().masked_fill(~causal, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.to(q.dtype)
