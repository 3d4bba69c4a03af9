"""Grouped split decode over 4-bit K/V in blocks along head_dim (Triton): the CUDA decode path.

One program per (sequence x KV head, split): every query row of a KV head (``GROUP * Tq`` rows,
padded to ``BLOCK_R >= 16``) is a dimension of both ``tl.dot`` products, so a key tile is decoded
once for the whole group. The scores are computed transposed, (keys, rows) = decoded keys @ query
rows: the decoded tile is then the operand the tensor cores take from registers and the
loop-invariant query the one they read from shared memory, which takes fewer registers and register
moves than the other way round. The softmax runs over those key columns, and the value products are
transposed too, (block elements, rows) = decoded values^T @ probabilities, one warpgroup product per
block (see :func:`_hist_tile`). The number of splits is a launch parameter
fixed by the caller (:func:`default_splits`: from the SM count), not derived from the cache length:
each program reads the lengths (from a device tensor, or from scalar arguments that are not
specialised on) and computes its own key range, so neither a growing cache nor CUDA-graph replay
recompiles or reads anything back to the host. A split with no keys writes a log-sum-exp of ``-inf`` and the merge
kernel skips it.

Per split: the packed history in full tiles of ``BLOCK_N`` keys without masks, then one masked
partial tile, then the full-precision tail (sinks / window, a separate dense tensor) in its own
short loop. Codes are decoded in registers: on a GPU by byte permutes against the codebook held as
16-bit byte tables (``triton_decode._LUT16_ASM``), in lane order (a byte's low and high codes go
to an "even" and an "odd" tile; the query is split the same way, and a block's accumulator holds
its even, then its odd elements). Block scales are never applied per element: a K block's scale
multiplies its partial score row, a V block's scale multiplies the probability row fed to that
block's product (with two blocks per row, as at head_dim 128 in blocks of 64, each block has its own
products). Scores are kept in base 2 (``log2(e)`` folded into the query scale). A RoPE-centred
cache's key bias is computed in the loop from per-row weights, the RoPE table and each key's
position (:func:`_key_bias`), never as a dense tensor.

Layout of this file: jit helpers (decode a tile; one history tile; one tail tile) -> split kernel
-> merge kernel -> :func:`supports`, :func:`default_splits`, :func:`launch` (the two launches, with
optional device lengths, output and workspace for CUDA graphs) and the ``torch.library.triton_op``
:func:`grouped_decode` (``nqkv::grouped_decode``, what ``nqkv::attention`` calls).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from nqkv_core.ops.triton_decode import _LUT16_ASM, _LUT16_CONSTRAINTS, _byte_tables, _interpreting, _scale_values

MAX_ROWS = 64  # query rows per KV head (GROUP * Tq) the kernel takes in one program
# Launch configuration on a GPU: keys per history tile (for rows of one and of two scale blocks; one
# int: both; with a mask or a causal query, block_n_masked: a mask tile takes registers too), keys
# per tail tile, warps, pipeline stages, programs to aim for per SM (splits = that many programs
# over batch x KV heads), the most splits, and optionally ``maxnreg`` (a register cap for ptxas).
# ``fp32_queries``: whether fp32 queries (a transformed cache's storage basis) take this kernel too,
# with the query, the exact tail and the probabilities rounded to fp16 for the products (fp32
# accumulation), as a 16-bit model computes attention; otherwise they stay on the split-K kernel's
# fp32 products. Untimed: chosen from the compiled code (benchmarks/triton_sass.py: the fewest
# instructions per decoded element with no spills and at most 128 registers; 128-key tiles at two
# blocks per row take about 140, a cp.async double buffer (num_stages=2) more instructions and
# registers for the same tiles); benchmarks/gpu_decode_check.py times it against a few others.
GROUPED_CONFIG = dict(block_n=(128, 64), block_n_masked=64, block_t=16, num_warps=4, num_stages=1, programs_per_sm=4,
                      max_splits=128, fp32_queries=False)


# -- jit helpers ------------------------------------------------------------------------------------------


@triton.jit
def _levels(row_ptr, offs_t, t_ok, byte0, stride_t, cb_ptr, w0, w1, w2, w3, w4, w5, w6, w7,
            HALF: tl.constexpr, MASKED: tl.constexpr, LUT: tl.constexpr, DT: tl.constexpr):
    """Levels of the codes in bytes ``[byte0, byte0 + HALF)`` of tokens ``offs_t``: the even and the
    odd elements, (N, HALF) each, in ``DT``. ``LUT``: byte permutes against the tables ``w*``."""
    ptrs = row_ptr + offs_t[:, None] * stride_t + (byte0 + tl.arange(0, HALF))[None, :]
    if MASKED:
        byte = tl.load(ptrs, mask=t_ok[:, None], other=0)
    else:
        byte = tl.load(ptrs)
    if LUT:
        even, odd = tl.inline_asm_elementwise(
            _LUT16_ASM, _LUT16_CONSTRAINTS, [byte, w0, w1, w2, w3, w4, w5, w6, w7],
            dtype=(DT.value, DT.value), is_pure=True, pack=4)
    else:  # the interpreter (no PTX): a gather from the codebook
        code = byte.to(tl.int32)
        even = tl.load(cb_ptr + (code & 15)).to(DT)
        odd = tl.load(cb_ptr + (code >> 4)).to(DT)
    return even, odd


# ``$0 = $1 | (lanemask_eq & lanemask_lt)``: the value of ``$1`` (a lane's own bit is not below
# itself), which the assembler cannot prove uniform across a warp. The byte tables go through it so
# that they live in ordinary registers: as uniform values (a reduction's result) they sit in uniform
# registers, and every byte permute that takes one as its first operand copies it out first (an
# extra instruction per permute).
_OPAQUE_LANE = tl.constexpr("{ .reg .u32 e, l; mov.u32 e, %lanemask_eq; mov.u32 l, %lanemask_lt;"
                            " and.b32 e, e, l; or.b32 $0, $1, e; }")


@triton.jit
def _lane_tables(cb_ptr, DT: tl.constexpr, LUT: tl.constexpr):
    """:func:`triton_decode._byte_tables` held per thread (see :data:`_OPAQUE_LANE`); zeros (unused)
    without ``LUT``."""
    if LUT:
        w0, w1, w2, w3, w4, w5, w6, w7 = _byte_tables(cb_ptr, DT)
        return (_opaque(w0), _opaque(w1), _opaque(w2), _opaque(w3), _opaque(w4), _opaque(w5), _opaque(w6),
                _opaque(w7))
    return 0, 0, 0, 0, 0, 0, 0, 0


@triton.jit
def _opaque(w):
    return tl.inline_asm_elementwise(_OPAQUE_LANE, "=r,r", [w], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    if DT == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _scale(ptr, offs_t, t_ok, MASKED: tl.constexpr):
    if MASKED:
        return _scale_values(tl.load(ptr + offs_t, mask=t_ok, other=0))
    return _scale_values(tl.load(ptr + offs_t))


@triton.jit
def _mask_scores(s, r_ok, t_ok, key_pos, last_key, row_mask_ptr, stride_mk,
                 MASKED: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 KEYS_FIRST: tl.constexpr = False):
    """``s`` (rows, keys, base 2; ``KEYS_FIRST``: (keys, rows)) with -inf where a key is past the
    range, after the row's causal limit, or masked out; an additive mask is added (times log2(e))."""
    if KEYS_FIRST:
        t_ok2, pos2, rows_ok2 = t_ok[:, None], key_pos[:, None], r_ok[None, :]
        last2, mask_ptrs = last_key[None, :], tl.trans(row_mask_ptr) + pos2 * stride_mk
    else:
        t_ok2, pos2, rows_ok2 = t_ok[None, :], key_pos[None, :], r_ok[:, None]
        last2, mask_ptrs = last_key[:, None], row_mask_ptr + pos2 * stride_mk
    if MASKED:
        s = tl.where(t_ok2, s, float("-inf"))
    if IS_CAUSAL:
        s = tl.where(pos2 <= last2, s, float("-inf"))
    if MASK_KIND != 0:
        mv = tl.load(mask_ptrs, mask=rows_ok2 & t_ok2, other=0)
        if MASK_KIND == 1:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    return s


@triton.jit
def _softmax(s, m_i, l_i, GUARD: tl.constexpr):
    """One online-softmax step in base 2 over scores ``s`` (rows, keys): ``(p, alpha, m, l)``.
    ``GUARD``: a row may have no key yet (all -inf), whose max must not turn ``-inf - -inf`` into
    NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if GUARD:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _softmax_keys(s, m_i, l_i, GUARD: tl.constexpr, LW: tl.constexpr):
    """One online-softmax step in base 2 over scores ``s`` (keys, rows): ``(p, alpha, m, l)``, ``p``
    (keys, rows). ``GUARD`` as :func:`_softmax`. ``l_i`` is (``LW``, 8, rows): partial sums over key
    classes, whose total over the first two axes is each row's denominator.

    Why partial sums: the scores are a tensor-core product with the keys as its rows; on sm_90 with
    4 warps a thread holds keys ``64 t + 16 w + 8 j + r``, ``w`` its warp, ``r`` its lane's row in
    the fragment, ``t`` and ``j`` its own registers. Summing over ``t`` and ``j`` only adds within
    each thread: the loop exchanges nothing between threads or warps for the denominators, and the
    kernel sums the rest once after it. (Other layouts give the same sums, by other paths.)"""
    m_new = tl.maximum(m_i, tl.max(s, 0))
    if GUARD:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_new[None, :])
    alpha = tl.exp2(m_i - m_new)
    part = tl.reshape(p, (s.shape[0] // (16 * LW), LW, 2, 8, s.shape[1]))
    l_i = l_i * alpha[None, None, :] + tl.sum(tl.sum(part, 2), 0)
    return p, alpha, m_new, l_i


@triton.constexpr_function
def _partial_rows(block_n):
    """The first axis of :func:`_softmax_keys`' partial sums for ``block_n`` keys per tile."""
    return min(block_n // 16, 4)


@triton.jit
def _key_bias(s, w_row, r_ok, pos_ptr, offs_t, t_ok, tab_ptr, stride_tab, n_tab, HEAD_DIM: tl.constexpr,
              DT: tl.constexpr):
    """Scores ``s`` (keys, rows) plus the RoPE-centre key bias of keys ``offs_t`` (in base 2):
    ``w . [cos | sin](pos * theta)`` for each row's weights ``w`` (``HEAD_DIM``, fp32, the cos then
    the sin half) and each key's position.

    By angle addition, with ``p0`` the tile's first position and ``delta = pos - p0``, the bias is
    ``w' . table[delta]`` where ``w'`` rotates each (cos, sin) weight pair of ``w`` by ``p0 * theta``
    (one ``table[p0]`` row per tile, shared by every row): the table rows a tile reads are those of
    ``delta``, the same rows ``[0, BLOCK)`` for every tile of consecutive positions, which stay in
    the cache; any other positions (a ring, sinks) are still exact, by rows further out. Positions
    are clamped to the table's ``n_tab`` rows (never a read outside it)."""
    pos = tl.load(pos_ptr + offs_t, mask=t_ok, other=0).to(tl.int32)
    pos = tl.minimum(tl.maximum(pos, 0), n_tab - 1)
    p0 = tl.min(tl.where(t_ok, pos, 2147483647), 0)
    delta = tl.where(t_ok, pos - p0, 0)
    H2: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, H2)
    c = tl.load(tab_ptr + p0 * stride_tab + offs_h)[None, :] * 1.4426950408889634
    sn = tl.load(tab_ptr + p0 * stride_tab + H2 + offs_h)[None, :] * 1.4426950408889634
    a = tl.load(w_row + offs_h[None, :], mask=r_ok[:, None], other=0.0)
    b = tl.load(w_row + (H2 + offs_h)[None, :], mask=r_ok[:, None], other=0.0)
    rows = tab_ptr + delta[:, None] * stride_tab
    tc = tl.load(rows + offs_h[None, :])
    ts = tl.load(rows + (H2 + offs_h)[None, :])
    # On a GPU, tf32 products whatever the query's dtype: fp16's precision (bf16 would lose three
    # bits of the bias), and the fp32 table rows go to the tensor cores without a conversion
    if DT == tl.float32:
        s += _dot(tc, tl.trans(a * c + b * sn), DT)
        s += _dot(ts, tl.trans(b * c - a * sn), DT)
    else:
        s += tl.dot(tc, tl.trans(a * c + b * sn), input_precision="tf32")
        s += tl.dot(ts, tl.trans(b * c - a * sn), input_precision="tf32")
    return s


@triton.jit
def _hist_tile(acc0, acc1, m_i, l_i, qe0, qo0, qe1, qo1, start, stop, r_ok, last_key,
               kc, ka, kcb_ptr, vc, va, vcb_ptr, row_mask_ptr, stride_kct, stride_kat, stride_kad,
               stride_vct, stride_vat, stride_vad, stride_mk,
               k0, k1, k2, k3, k4, k5, k6, k7, v0, v1, v2, v3, v4, v5, v6, v7,
               w_row, pos_ptr, tab_ptr, stride_tab, n_tab,
               NB: tl.constexpr, HALF: tl.constexpr, MASKED: tl.constexpr, MASK_KIND: tl.constexpr,
               IS_CAUSAL: tl.constexpr, LUT: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """Keys ``[start, start + BLOCK_N)`` of the packed history (``MASKED``: only those below
    ``stop``): scores, one softmax step, the value products. Blocks of ``2 * HALF`` elements,
    ``NB`` (1 or 2) of them per row, each with its accumulator ``acc0`` / ``acc1`` (2 * HALF,
    rows) in :func:`_block_order`; ``l_i`` as :func:`_softmax_keys`; ``HAS_BIAS``: plus the key
    bias (:func:`_key_bias`)."""
    offs_t = start + tl.arange(0, BLOCK_N)
    t_ok = offs_t < stop
    # -- scores, (keys, rows): each block's partial product times its scale --
    ke, ko = _levels(kc, offs_t, t_ok, 0, stride_kct, kcb_ptr, k0, k1, k2, k3, k4, k5, k6, k7, HALF, MASKED, LUT, DT)
    s = _dot(ke, tl.trans(qe0), DT) + _dot(ko, tl.trans(qo0), DT)
    s = s * _scale(ka, offs_t * stride_kat, t_ok, MASKED)[:, None]
    if NB == 2:
        ke, ko = _levels(kc, offs_t, t_ok, HALF, stride_kct, kcb_ptr, k0, k1, k2, k3, k4, k5, k6, k7, HALF, MASKED,
                         LUT, DT)
        s1 = _dot(ke, tl.trans(qe1), DT) + _dot(ko, tl.trans(qo1), DT)
        s += s1 * _scale(ka, offs_t * stride_kat + stride_kad, t_ok, MASKED)[:, None]
    if HAS_BIAS:
        s = _key_bias(s, w_row, r_ok, pos_ptr, offs_t, t_ok, tab_ptr, stride_tab, n_tab, 2 * NB * HALF, DT)
    s = _mask_scores(s, r_ok, t_ok, offs_t, last_key, row_mask_ptr, stride_mk, MASKED, MASK_KIND, IS_CAUSAL, True)
    p, alpha, m_i, l_i = _softmax_keys(s, m_i, l_i, MASKED or MASK_KIND != 0 or IS_CAUSAL, _partial_rows(BLOCK_N))
    # -- values: each block's product takes the probabilities times its scale. Transposed, (block
    # elements, rows) = values^T @ p: the block's even and odd levels stacked (_block_order) make
    # the product's first dimension 64 or 128, so it runs as a warpgroup product (wgmma) that reads
    # p from shared memory and takes the decoded tile in registers exactly as its transposing loads
    # from shared memory leave it; (rows, elements) = p @ values runs as mma over 16 rows per warp,
    # whose operands take register moves after those loads --
    ve, vo = _levels(vc, offs_t, t_ok, 0, stride_vct, vcb_ptr, v0, v1, v2, v3, v4, v5, v6, v7, HALF, MASKED, LUT, DT)
    pw = (p * _scale(va, offs_t * stride_vat, t_ok, MASKED)[:, None]).to(DT)
    vf = tl.reshape(tl.permute(tl.join(ve, vo), (2, 1, 0)), (2 * HALF, BLOCK_N))
    acc0 = acc0 * alpha[None, :] + _dot(vf, pw, DT)
    if NB == 2:
        ve, vo = _levels(vc, offs_t, t_ok, HALF, stride_vct, vcb_ptr, v0, v1, v2, v3, v4, v5, v6, v7, HALF, MASKED,
                         LUT, DT)
        pw = (p * _scale(va, offs_t * stride_vat + stride_vad, t_ok, MASKED)[:, None]).to(DT)
        vf = tl.reshape(tl.permute(tl.join(ve, vo), (2, 1, 0)), (2 * HALF, BLOCK_N))
        acc1 = acc1 * alpha[None, :] + _dot(vf, pw, DT)
    return acc0, acc1, m_i, l_i


@triton.jit
def _dense_halves(ptr, offs_t, t_ok, stride_t, stride_d, first, HALF: tl.constexpr):
    """Even and odd elements of ``[first, first + 2 * HALF)`` of dense rows ``offs_t``: (N, HALF) each."""
    offs = first + tl.arange(0, 2 * HALF)
    x = tl.load(ptr + offs_t[:, None] * stride_t + offs[None, :] * stride_d, mask=t_ok[:, None], other=0.0)
    return tl.split(tl.reshape(x, (offs_t.shape[0], HALF, 2)))


@triton.jit
def _dense_block(ptr, offs_t, t_ok, stride_t, stride_d, first, HALF: tl.constexpr):
    """Elements ``[first, first + 2 * HALF)`` of dense rows ``offs_t`` as a value tile: (2 * HALF, N),
    in :func:`_block_order`."""
    offs = first + _block_order(HALF)
    return tl.load(ptr + offs_t[None, :] * stride_t + offs[:, None] * stride_d, mask=t_ok[None, :], other=0.0)


@triton.jit
def _block_order(HALF: tl.constexpr):
    """The element of a block at each row of a value tile or accumulator: the even elements, then
    the odd ones (the order in which the lookup yields them)."""
    m = tl.arange(0, 2 * HALF)
    return 2 * (m % HALF) + m // HALF


@triton.jit
def _tail_tile(acc0, acc1, m_i, l_i, qe0, qo0, qe1, qo1, start, stop, t_hist, r_ok, last_key,
               kt, vt, row_mask_ptr, stride_ktt, stride_ktd, stride_vtt, stride_vtd, stride_mk,
               w_row, pos_ptr, tab_ptr, stride_tab, n_tab,
               NB: tl.constexpr, HALF: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
               DT: tl.constexpr, BLOCK_T: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Tail tokens ``[start, start + BLOCK_T)`` below ``stop`` (key positions ``t_hist + i``): exact
    keys and values, split like the history (``NB`` pairs of halves, accumulators as
    :func:`_hist_tile`'s, ``l_i`` (rows,)); ``pos_ptr``: the tail's positions (with ``HAS_BIAS``)."""
    offs_t = start + tl.arange(0, BLOCK_T)
    t_ok = offs_t < stop
    ke, ko = _dense_halves(kt, offs_t, t_ok, stride_ktt, stride_ktd, 0, HALF)
    s = _dot(ke, tl.trans(qe0), DT) + _dot(ko, tl.trans(qo0), DT)
    if NB == 2:
        ke, ko = _dense_halves(kt, offs_t, t_ok, stride_ktt, stride_ktd, 2 * HALF, HALF)
        s += _dot(ke, tl.trans(qe1), DT) + _dot(ko, tl.trans(qo1), DT)
    if HAS_BIAS:
        s = _key_bias(s, w_row, r_ok, pos_ptr, offs_t, t_ok, tab_ptr, stride_tab, n_tab, 2 * NB * HALF, DT)
    s = tl.trans(s)  # (rows, keys)
    s = _mask_scores(s, r_ok, t_ok, t_hist + offs_t, last_key, row_mask_ptr, stride_mk, True, MASK_KIND, IS_CAUSAL)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, True)
    pwt = tl.trans(p.to(DT))
    acc0 = acc0 * alpha[None, :] + _dot(_dense_block(vt, offs_t, t_ok, stride_vtt, stride_vtd, 0, HALF), pwt, DT)
    if NB == 2:
        acc1 = acc1 * alpha[None, :] + _dot(
            _dense_block(vt, offs_t, t_ok, stride_vtt, stride_vtd, 2 * HALF, HALF), pwt, DT)
    return acc0, acc1, m_i, l_i


@triton.jit
def _query_halves(q_row, r_ok, stride_qd, first, scale, HALF: tl.constexpr, DT: tl.constexpr):
    offs = first + 2 * tl.arange(0, HALF)
    qe = tl.load(q_row + offs[None, :] * stride_qd, mask=r_ok[:, None], other=0.0).to(tl.float32) * scale
    qo = tl.load(q_row + (offs + 1)[None, :] * stride_qd, mask=r_ok[:, None], other=0.0).to(tl.float32) * scale
    return qe.to(DT), qo.to(DT)


@triton.jit
def _store_partial(po_ptr, plse_ptr, base, offs_r, r_ok, acc0, acc1, m_i, l_i,
                   NB: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A split's normalised output rows (natural element order) and their base-2 log-sum-exp
    (-inf for a row that saw no key)."""
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    po_col = po_ptr + (base + offs_r)[None, :] * HEAD_DIM
    offs_d = _block_order(HALF)[:, None]
    tl.store(po_col + offs_d, acc0 / l_safe[None, :], mask=r_ok[None, :])
    if NB == 2:
        tl.store(po_col + 2 * HALF + offs_d, acc1 / l_safe[None, :], mask=r_ok[None, :])
    tl.store(plse_ptr + base + offs_r, tl.where(has, m_i + tl.log2(l_safe), float("-inf")), mask=r_ok)


# -- kernels -------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T_HIST", "T_TAIL", "T_Q", "n_tab"])
def _grouped_split_kernel(
    q_ptr, kc_ptr, ka_ptr, kcb_ptr, vc_ptr, va_ptr, vcb_ptr, kt_ptr, vt_ptr, mask_ptr, len_ptr, po_ptr, plse_ptr,
    w_ptr, pos_ptr, tab_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd, stride_wb, stride_wh, stride_wt, stride_tab,
    stride_kcb, stride_kch, stride_kct, stride_kab, stride_kah, stride_kat, stride_kad,
    stride_vcb, stride_vch, stride_vct, stride_vab, stride_vah, stride_vat, stride_vad,
    stride_ktb, stride_kth, stride_ktt, stride_ktd, stride_vtb, stride_vth, stride_vtt, stride_vtd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    H_KV, T_Q, T_HIST, T_TAIL, n_tab, scale,
    GROUP: tl.constexpr, N_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, NB: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_LENS: tl.constexpr, HAS_TAIL: tl.constexpr, MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr, LUT: tl.constexpr, HAS_BIAS: tl.constexpr, HALF_DOTS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # the dots' operand dtype: the query's (16-bit on a GPU, fp32 in the interpreter), or fp16 for
    # fp32 queries with HALF_DOTS
    DT: tl.constexpr = tl.float16 if HALF_DOTS else q_ptr.dtype.element_ty
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # (a whole cache's offsets can pass 2**31)
    h = pid_bh % H_KV
    # -- lengths and this split's keys (positions [lo, hi) of history + tail) --
    if HAS_LENS:
        t_hist = tl.load(len_ptr + 2 * b)
        t_tail = tl.load(len_ptr + 2 * b + 1)
    else:
        t_hist = T_HIST
        t_tail = T_TAIL
    t_k = t_hist + t_tail
    per = tl.cdiv(tl.cdiv(t_k, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = pid_s * per
    hi = tl.minimum(lo + per, t_k)
    # -- query rows of this KV head: row = g * T_Q + i --
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < N_ROWS
    i_q = offs_r % T_Q
    last_key = t_k - T_Q + i_q
    q_row = q_ptr + b * stride_qb + (h * GROUP + offs_r // T_Q)[:, None] * stride_qh + i_q[:, None] * stride_qt
    row_mask_ptr = (mask_ptr + b * stride_mb + (h * GROUP + offs_r // T_Q)[:, None] * stride_mh
                    + i_q[:, None] * stride_mq)
    # the key bias weights of each row ((w_ptr, pos_ptr, tab_ptr): never read without HAS_BIAS)
    w_row = w_ptr + b * stride_wb + (h * GROUP + offs_r // T_Q)[:, None] * stride_wh + i_q[:, None] * stride_wt
    HALF: tl.constexpr = HEAD_DIM // (2 * NB)
    qs = scale * 1.4426950408889634
    qe0, qo0 = _query_halves(q_row, r_ok, stride_qd, 0, qs, HALF, DT)
    if NB == 2:
        qe1, qo1 = _query_halves(q_row, r_ok, stride_qd, 2 * HALF, qs, HALF, DT)
    else:
        qe1, qo1 = qe0, qo0  # (unused)
    k0, k1, k2, k3, k4, k5, k6, k7 = _lane_tables(kcb_ptr, DT, LUT)  # once per program
    v0, v1, v2, v3, v4, v5, v6, v7 = _lane_tables(vcb_ptr, DT, LUT)
    kc, ka = kc_ptr + b * stride_kcb + h * stride_kch, ka_ptr + b * stride_kab + h * stride_kah
    vc, va = vc_ptr + b * stride_vcb + h * stride_vch, va_ptr + b * stride_vab + h * stride_vah
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    # the softmax denominators: over the history partial sums (see _softmax_keys)
    l_i = tl.zeros([_partial_rows(BLOCK_N), 8, BLOCK_R], tl.float32)
    acc0 = tl.zeros([2 * HALF, BLOCK_R], tl.float32)
    acc1 = tl.zeros([2 * HALF, BLOCK_R], tl.float32)
    # -- packed history: full tiles unmasked, then the partial one --
    h_hi = tl.minimum(hi, t_hist)
    full = lo + tl.maximum(h_hi - lo, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, full, BLOCK_N):
        acc0, acc1, m_i, l_i = _hist_tile(
            acc0, acc1, m_i, l_i, qe0, qo0, qe1, qo1, start, h_hi, r_ok, last_key,
            kc, ka, kcb_ptr, vc, va, vcb_ptr, row_mask_ptr, stride_kct, stride_kat, stride_kad,
            stride_vct, stride_vat, stride_vad, stride_mk,
            k0, k1, k2, k3, k4, k5, k6, k7, v0, v1, v2, v3, v4, v5, v6, v7, w_row, pos_ptr, tab_ptr, stride_tab, n_tab,
            NB, HALF, False, MASK_KIND, IS_CAUSAL, LUT, DT, BLOCK_N, HAS_BIAS)
    if full < h_hi:
        acc0, acc1, m_i, l_i = _hist_tile(
            acc0, acc1, m_i, l_i, qe0, qo0, qe1, qo1, full, h_hi, r_ok, last_key,
            kc, ka, kcb_ptr, vc, va, vcb_ptr, row_mask_ptr, stride_kct, stride_kat, stride_kad,
            stride_vct, stride_vat, stride_vad, stride_mk,
            k0, k1, k2, k3, k4, k5, k6, k7, v0, v1, v2, v3, v4, v5, v6, v7, w_row, pos_ptr, tab_ptr, stride_tab, n_tab,
            NB, HALF, True, MASK_KIND, IS_CAUSAL, LUT, DT, BLOCK_N, HAS_BIAS)
    l_i = tl.sum(tl.sum(l_i, 1), 0)
    # -- full-precision tail: its own short loop --
    if HAS_TAIL:
        kt, vt = kt_ptr + b * stride_ktb + h * stride_kth, vt_ptr + b * stride_vtb + h * stride_vth
        for start in range(tl.maximum(lo, t_hist) - t_hist, hi - t_hist, BLOCK_T):
            acc0, acc1, m_i, l_i = _tail_tile(
                acc0, acc1, m_i, l_i, qe0, qo0, qe1, qo1, start, hi - t_hist, t_hist, r_ok,
                last_key, kt, vt, row_mask_ptr, stride_ktt, stride_ktd, stride_vtt, stride_vtd, stride_mk,
                w_row, pos_ptr + t_hist, tab_ptr, stride_tab, n_tab,
                NB, HALF, MASK_KIND, IS_CAUSAL, DT, BLOCK_T, HAS_BIAS)
    base = (pid_bh * NUM_SPLITS + pid_s) * N_ROWS
    _store_partial(po_ptr, plse_ptr, base, offs_r, r_ok, acc0, acc1, m_i, l_i, NB, HALF,
                   HEAD_DIM)


@triton.jit(do_not_specialize=["T_Q"])
def _grouped_merge_kernel(
    po_ptr, plse_ptr, o_ptr, rot_ptr, shift_ptr, stride_ob, stride_oh, stride_ot, stride_od, stride_sb, stride_sh,
    H_KV, T_Q, GROUP: tl.constexpr, N_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr, HAS_ROT: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """One program per (sequence x KV head, row): the splits' partial outputs weighted by their
    share of the row's softmax mass; splits without keys (lse -inf) are skipped, a row with no key
    at all gives zeros. With the output transform, the row is then taken back to the model's basis
    in fp32 before its one rounding to the output dtype: times ``rot^T`` (``(HEAD_DIM, HEAD_DIM)``,
    a cache's value rotation) and plus the KV head's ``shift`` row (its value centre)."""
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    idx = (pid_bh * NUM_SPLITS + offs_s) * N_ROWS + row
    lse = tl.load(plse_ptr + idx, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    used = lse > float("-inf")
    m = tl.max(lse, 0)
    w = tl.where(used, tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)), 0.0)
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, HEAD_DIM)
    parts = tl.load(po_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    b = pid_bh // H_KV
    kv_head = pid_bh % H_KV
    if HAS_ROT:  # out @ rot^T: element j is rot's row j times the row
        offs_j = tl.arange(0, HEAD_DIM)
        rot = tl.load(rot_ptr + offs_j[:, None] * HEAD_DIM + offs_d[None, :])
        out = tl.sum(rot * out[None, :], 1)
    if HAS_SHIFT:
        out += tl.load(shift_ptr + b * stride_sb + kv_head * stride_sh + offs_d)
    head = kv_head * GROUP + row // T_Q
    o_ptrs = o_ptr + b * stride_ob + head * stride_oh + (row % T_Q) * stride_ot + offs_d * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))


# -- launcher ------------------------------------------------------------------------------------------


def supports(q: Tensor, k: tuple, v: tuple) -> bool:
    """Whether the grouped kernel takes these arguments (``k`` / ``v``: codes, absmax, codebook,
    block, axis): 4-bit K and V in the same blocks along head_dim, one or two blocks per row of a
    power-of-two head_dim, each block at least 32 elements (its halves feed ``tl.dot``), V's head_dim
    equal to K's, at most :data:`MAX_ROWS` query rows per KV head; on a GPU fp16/bf16 queries (the
    byte tables hold 16-bit levels; fp32 queries take ``triton_decode``), and fp32 ones too where
    :data:`GROUPED_CONFIG` has ``fp32_queries`` (computed with fp16 operands, see there)."""
    d = q.shape[-1]
    blocks = (k[3], v[3])
    return (k[2].numel() == v[2].numel() == 16 and k[4] == v[4] == 3 and blocks[0] == blocks[1]
            and v[0].shape[-1] * 2 == d and d & (d - 1) == 0 and d // blocks[0] in (1, 2) and blocks[0] >= 32
            and q.shape[2] * (q.shape[1] // k[0].shape[1]) <= MAX_ROWS
            and (_interpreting() or q.dtype in (torch.float16, torch.bfloat16)
                 or (q.dtype == torch.float32 and bool(GROUPED_CONFIG.get("fp32_queries")))))


_SM_COUNT: dict = {}


def _block_n(nb: int, masked: bool) -> int:
    """Keys per history tile for rows of ``nb`` scale blocks, with or without a mask (or a causal
    query) (:data:`GROUPED_CONFIG`; an int ``block_n`` set there applies to all)."""
    block_n = GROUPED_CONFIG["block_n"]
    if isinstance(block_n, int):
        return block_n
    return (GROUPED_CONFIG.get("block_n_masked") or block_n[nb - 1]) if masked else block_n[nb - 1]


def default_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): ``programs_per_sm`` programs per SM over ``batch * kv_heads``
    (at least 1, at most ``max_splits``); 4 in the interpreter (so that small tests merge several)."""
    if _interpreting() or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    cfg = GROUPED_CONFIG
    return max(1, min(cfg["max_splits"], triton.cdiv(cfg["programs_per_sm"] * _SM_COUNT[index], batch * kv_heads)))


def launch(q, k_codes, k_absmax, k_codebook, k_block, v_codes, v_absmax, v_codebook, k_tail, v_tail, attn_mask,
           scale: float, is_causal: bool, lengths: Optional[Tensor] = None, num_splits: Optional[int] = None,
           out: Optional[Tensor] = None, workspace: Optional[tuple] = None,
           key_bias: Optional[tuple] = None, out_transform: Optional[tuple] = None) -> Tensor:
    """Run the split and the merge kernel (two launches); arguments as ``nqkv::attention`` with blocks
    along head_dim (checked there and by :func:`supports`), plus:

    Args:
        lengths: optional int32 (B, 2) device tensor, the valid history and tail tokens of each
            sequence (at most the tensors' token counts); by default all of them. Read by the
            kernel, never by the host: a CUDA graph captured once stays valid as they change.
            With ``attn_mask`` its key column ``T_hist + i`` is tail token ``i``.
        num_splits: key splits per (sequence, KV head); default :func:`default_splits`.
        out: optional (B, Hq, Tq, D) output in q's dtype, written in place.
        workspace: optional ``(partial, lse)`` fp32 tensors of at least ``B*Hkv*splits*G*Tq*D`` and
            ``B*Hkv*splits*G*Tq`` elements.
        key_bias: optional ``(w, table, positions)``, a RoPE-centred cache's key bias (checked by
            :func:`check_key_bias`): key ``j`` (history, then tail; with ``lengths``, column
            ``T_hist + i`` is tail token ``i``) scores ``w[b, h, i] . table[positions[j]]`` more,
            computed in the kernel from the rows of ``table`` (``[cos | sin]`` of the RoPE angles,
            :class:`nqkv_core.cache.format.RopeTable`); positions are clamped to the table.
        out_transform: optional ``(rot, shift)`` (checked by :func:`check_out_transform`), each
            fp32 or None: the output is returned as ``out @ rot.T + shift``, ``rot`` ``(D, D)`` and
            ``shift`` ``(B or 1, Hkv, 1, D)`` (a KV head's row for each of its query heads), applied
            by the merge kernel in fp32: a cache's value rotation and centre, undone without a
            launch or a rounding of their own.

    Returns:
        ``out`` (B, Hq, Tq, D).
    """
    b, hq, tq, d = q.shape
    hkv, th = k_codes.shape[1], k_codes.shape[2]
    tt = 0 if k_tail is None else k_tail.shape[2]
    n_rows = (hq // hkv) * tq
    splits = num_splits or default_splits(b, hkv, q.device)
    # the kernel's dot dtype is the query's: 16-bit on a GPU; fp32 in the interpreter (it has no bf16)
    qw = q.float() if _interpreting() else q
    work = qw.dtype
    k_codes = k_codes if k_codes.stride(-1) == 1 else k_codes.contiguous()
    v_codes = v_codes if v_codes.stride(-1) == 1 else v_codes.contiguous()
    kt, vt = (qw, qw) if k_tail is None else (k_tail.to(work), v_tail.to(work))  # (q: never read)
    mask_kind, mask = 0, qw
    if attn_mask is not None:
        mask_kind = 1 if attn_mask.dtype == torch.bool else 2
        mask = attn_mask.expand(b, hq, tq, th + tt)
        mask = mask.view(torch.uint8) if mask_kind == 1 else (mask.float() if _interpreting() else mask)
    mask_strides = mask.stride() if attn_mask is not None else (0, 0, 0, 0)
    tail_strides = (*kt.stride(), *vt.stride()) if k_tail is not None else (0,) * 8
    if workspace is None:
        po = torch.empty((b * hkv * splits * n_rows * d,), device=q.device, dtype=torch.float32)
        plse = torch.empty((b * hkv * splits * n_rows,), device=q.device, dtype=torch.float32)
    else:
        po, plse = workspace
    res = out if out is not None and out.dtype == qw.dtype else None
    res = torch.empty((b, hq, tq, d), device=q.device, dtype=qw.dtype) if res is None else res
    if key_bias is None:
        w, table, positions = qw, qw, qw  # (never read)
    else:
        w, table, positions = key_bias
        table = table if table.stride(-1) == 1 else table.contiguous()
    launch_cfg = {} if _interpreting() else dict(num_warps=GROUPED_CONFIG["num_warps"],
                                                 num_stages=GROUPED_CONFIG["num_stages"])
    if not _interpreting() and GROUPED_CONFIG.get("maxnreg"):
        launch_cfg["maxnreg"] = GROUPED_CONFIG["maxnreg"]
    wrap_triton(_grouped_split_kernel)[(b * hkv, splits)](
        qw, k_codes, k_absmax, k_codebook, v_codes, v_absmax, v_codebook, kt, vt, mask,
        qw if lengths is None else lengths, po, plse, w, positions, table,
        *qw.stride(), *w.stride()[:3], table.stride(0),
        *k_codes.stride()[:3], *k_absmax.stride(), *v_codes.stride()[:3], *v_absmax.stride(),
        *tail_strides, *mask_strides,
        hkv, tq, th, tt, table.shape[0], scale,
        GROUP=hq // hkv, N_ROWS=n_rows, HEAD_DIM=d, NB=d // k_block, NUM_SPLITS=splits,
        HAS_LENS=lengths is not None, HAS_TAIL=tt > 0, MASK_KIND=mask_kind, IS_CAUSAL=is_causal and tq > 1,
        LUT=not _interpreting(), HAS_BIAS=key_bias is not None, HALF_DOTS=work == torch.float32 and not _interpreting(),
        BLOCK_R=max(16, triton.next_power_of_2(n_rows)),
        BLOCK_N=_block_n(d // k_block, mask_kind != 0 or (is_causal and tq > 1)),
        BLOCK_T=GROUPED_CONFIG["block_t"], **launch_cfg,
    )
    rot, shift = (None, None) if out_transform is None else (x if x is None else x.contiguous() for x in out_transform)
    shift_strides = (0, 0) if shift is None else (shift.stride(0) if shift.shape[0] > 1 else 0, shift.stride(1))
    wrap_triton(_grouped_merge_kernel)[(b * hkv, n_rows)](
        po, plse, res, po if rot is None else rot, po if shift is None else shift, *res.stride(),
        *shift_strides, hkv, tq,
        GROUP=hq // hkv, N_ROWS=n_rows, HEAD_DIM=d, NUM_SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
        HAS_ROT=rot is not None, HAS_SHIFT=shift is not None,
    )
    if res.dtype != q.dtype:  # (the interpreter's fp32 stand-in)
        res = res.to(q.dtype) if out is None else out.copy_(res)
    return res


@triton_op("nqkv::grouped_decode", mutates_args=())
def grouped_decode(
    q: Tensor,
    k_codes: Tensor, k_absmax: Tensor, k_codebook: Tensor, k_block: int, k_axis: int,
    v_codes: Tensor, v_absmax: Tensor, v_codebook: Tensor, v_block: int, v_axis: int,
    k_tail: Optional[Tensor], v_tail: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: float, is_causal: bool, bias_w: Optional[Tensor] = None, bias_table: Optional[Tensor] = None,
    bias_pos: Optional[Tensor] = None, out_rot: Optional[Tensor] = None, out_shift: Optional[Tensor] = None,
) -> Tensor:
    """Grouped split decode; arguments and semantics as ``nqkv::attention`` (checked there), for the
    layouts :func:`supports` accepts, plus an optional key bias ``(bias_w, bias_table, bias_pos)``
    computed in the kernel (see :func:`launch`, checked by :func:`check_key_bias`) and an optional
    output transform ``out @ out_rot.T + out_shift`` applied by the merge kernel (``out_transform``
    of :func:`launch`, checked by :func:`check_out_transform`)."""
    key_bias = None
    if bias_w is not None or bias_table is not None or bias_pos is not None:
        key_bias = (bias_w, bias_table, bias_pos)
        check_key_bias(q, key_bias, k_codes.shape[2] + (0 if k_tail is None else k_tail.shape[2]))
    out_transform = None
    if out_rot is not None or out_shift is not None:
        out_transform = (out_rot, out_shift)
        check_out_transform(q, k_codes.shape[1], out_transform)
    return launch(q, k_codes, k_absmax, k_codebook, k_block, v_codes, v_absmax, v_codebook, k_tail, v_tail,
                  attn_mask, scale, is_causal, key_bias=key_bias, out_transform=out_transform)


def check_out_transform(q: Tensor, kv_heads: int, out_transform: tuple) -> None:
    """Check an output transform ``(rot, shift)`` for :func:`launch` (either may be None).

    Raises:
        ValueError / TypeError: ``rot`` is not fp32 ``(D, D)``, ``shift`` not fp32
            ``(B or 1, kv_heads, 1, D)``, or one is on another device than ``q``.
    """
    b, d = q.shape[0], q.shape[-1]
    rot, shift = out_transform
    for t, name in ((rot, "out_rot"), (shift, "out_shift")):
        if t is None:
            continue
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if rot is not None and tuple(rot.shape) != (d, d):
        raise ValueError(f"out_rot must be ({d}, {d}), got {tuple(rot.shape)}")
    if shift is not None and (shift.dim() != 4 or shift.shape[0] not in (1, b) or tuple(shift.shape[1:]) != (kv_heads, 1, d)):
        raise ValueError(f"out_shift must be ({b} or 1, {kv_heads}, 1, {d}), got {tuple(shift.shape)}")


def check_key_bias(q: Tensor, key_bias: tuple, n_keys: int) -> None:
    """Check a key bias ``(w, table, positions)`` for :func:`launch` (shapes, dtypes, devices; the
    position values are not read).

    Raises:
        ValueError / TypeError: ``w`` is not fp32 ``q.shape``, ``table`` not fp32 ``(P, D)`` with
            ``P >= 1``, ``positions`` not an integer ``(n_keys,)`` vector, or one is on another device.
    """
    w, table, positions = key_bias
    if any(t is None for t in key_bias):
        raise ValueError("bias_w, bias_table and bias_pos must be given together")
    for t, name in ((w, "bias_w"), (table, "bias_table"), (positions, "bias_pos")):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if w.dtype != torch.float32 or table.dtype != torch.float32:
        raise TypeError(f"bias_w and bias_table must be float32, got {w.dtype} and {table.dtype}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"bias_pos must be int32 or int64, got {positions.dtype}")
    if tuple(w.shape) != tuple(q.shape):
        raise ValueError(f"bias_w must have q's shape {tuple(q.shape)}, got {tuple(w.shape)}")
    if table.dim() != 2 or table.shape[1] != q.shape[-1] or table.shape[0] < 1:
        raise ValueError(f"bias_table must be (positions, {q.shape[-1]}), got {tuple(table.shape)}")
    if tuple(positions.shape) != (n_keys,):
        raise ValueError(f"bias_pos must be ({n_keys},): one position per key (history, then tail),"
                         f" got {tuple(positions.shape)}")
