"""Quantizing a cache's leaving tokens into their body slots (Triton): one launch for K and V.

A decode step quantizes one token per layer and side, the one that leaves the full-precision
window. In torch that is some twenty small ops (absmax, the scale's round-up, the codes, packing,
the copies into the body), each a launch on a GPU. Here one program codes one row of K or V: the
block absmax, the scale rounded (up to fp16, or to the nearest E5M3 byte) exactly as
:func:`nqkv_core.quantize.quantize_blockwise` rounds it, the nearest codes against the encoding
codebook's midpoints, the packed bytes, written straight into the preallocated body at the slot.
Bitwise the same codes and scales as the torch encoder (its reference); a row with NaN or a scale
beyond fp16 is flagged for the caller, which words the error from the torch checks before anything
else of the step is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError  # noqa: F401  (the route catches it)
from torch import Tensor
from torch.library import wrap_triton

FP16_MAX = tl.constexpr(65504.0)  # the largest finite fp16


@triton.jit
def _pack(codes, DIM: tl.constexpr, LANE_BITS: tl.constexpr):
    """Codes ``(DIM,)`` of ``LANE_BITS`` bits packed little-end first: ``(DIM * LANE_BITS / 8,)`` bytes."""
    PER_BYTE: tl.constexpr = 8 // LANE_BITS
    lanes = tl.reshape(codes, (DIM // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * LANE_BITS
    return tl.sum(lanes << shifts[None, :], axis=1)  # disjoint bit fields: the sum is the OR


@triton.jit
def _quantize_row(x_ptr, codes_ptr, scales_ptr, th_ptr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                  BITS: tl.constexpr, N_THRESHOLDS: tl.constexpr):
    """Codes and scales (fp16, or E5M3 bytes) of one row of ``DIM`` into ``codes_ptr`` /
    ``scales_ptr``; 1 if it has NaN or a block's absmax beyond fp16, else 0."""
    offs = tl.arange(0, DIM)
    x = tl.load(x_ptr + offs).to(tl.float32)
    absmax = tl.max(tl.abs(tl.reshape(x, (DIM // BLOCK, BLOCK))), axis=1)
    bad = tl.max((x != x).to(tl.int32), axis=0) | tl.max((absmax > FP16_MAX).to(tl.int32), axis=0)
    if scales_ptr.dtype.element_ty == tl.uint8:
        # E5M3 (quantize._e5m3_bytes): the nearest fp16 (the cast rounds to nearest even), then the
        # nearest multiple of 128 of its bits, at most 0xF7
        half_bits = absmax.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        byte = tl.minimum((half_bits + 64) >> 7, 0xF7)
        s = (byte.to(tl.int16) << 7).to(tl.float16, bitcast=True).to(tl.float32)
        tl.store(scales_ptr + tl.arange(0, DIM // BLOCK), byte.to(tl.uint8))
    else:
        # absmax rounded up to a multiple of the fp16 spacing at its exponent (quantize._round_up):
        # frexp's exponent from the fp32 bits, clamped where fp16 subnormals share the smallest spacing
        e = tl.maximum(((absmax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126, -13) - 11
        spacing = ((e + 127) << 23).to(tl.float32, bitcast=True)
        inverse = ((127 - e) << 23).to(tl.float32, bitcast=True)  # both powers of two: exact products
        s = tl.ceil(absmax * inverse) * spacing
        tl.store(scales_ptr + tl.arange(0, DIM // BLOCK), s.to(tl.float16))
    s_el = tl.reshape(tl.broadcast_to(s[:, None], (DIM // BLOCK, BLOCK)), (DIM,))
    y = tl.math.div_rn(x, tl.where(s_el > 0, s_el, 1.0))  # a zero block stays zero
    c = tl.zeros([DIM], dtype=tl.int32)
    for t in tl.static_range(N_THRESHOLDS):  # the midpoints below y, as torch.bucketize counts them
        c += (y > tl.load(th_ptr + t)).to(tl.int32)
    if BITS == 4:
        tl.store(codes_ptr + tl.arange(0, DIM // 2), _pack(c, DIM, 4).to(tl.uint8))
    elif BITS == 2:
        tl.store(codes_ptr + tl.arange(0, DIM // 4), _pack(c, DIM, 2).to(tl.uint8))
    else:  # 3 bits: the low two bits in the 2-bit layout, then the high bit's plane
        tl.store(codes_ptr + tl.arange(0, DIM // 4), _pack(c & 3, DIM, 2).to(tl.uint8))
        tl.store(codes_ptr + DIM // 4 + tl.arange(0, DIM // 8), _pack(c >> 2, DIM, 1).to(tl.uint8))
    return bad


@triton.jit
def _store_rows_kernel(k_ptr, v_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, th_ptr, bad_ptr, slot,
                       heads, rows, x_sb, x_sh, x_sn, c_sh, c_sn, s_sh, s_sn,
                       DIM: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, N_THRESHOLDS: tl.constexpr):
    r, side = tl.program_id(0), tl.program_id(1)  # row (batch, head, token), and K or V
    bh, n = r // rows, r % rows
    b, h = bh // heads, bh % heads
    x_off = b * x_sb + h * x_sh + n * x_sn
    bh = bh.to(tl.int64)  # (a body's bytes may pass 2**31: batch x heads x capacity x row bytes)
    c_off = bh * c_sh + (slot + n) * c_sn  # (contiguous buffers: batch and head as one index)
    s_off = bh * s_sh + (slot + n) * s_sn
    if side == 0:
        bad = _quantize_row(k_ptr + x_off, kc_ptr + c_off, ks_ptr + s_off, th_ptr, DIM, BLOCK, BITS, N_THRESHOLDS)
    else:
        bad = _quantize_row(v_ptr + x_off, vc_ptr + c_off, vs_ptr + s_off, th_ptr, DIM, BLOCK, BITS, N_THRESHOLDS)
    tl.store(bad_ptr + r * 2 + side, bad)


def supports(x: Tensor, bits: int, block: int, scale_dtype: torch.dtype) -> bool:
    """Rows of a power-of-two ``head_dim`` from 16 to 256 in blocks of a power of two, 2/3/4-bit
    codes with fp16 or E5M3 scales (``tl.arange`` needs powers of two; 8-bit codes would unroll 255
    comparisons)."""
    d = x.shape[-1]
    return (bits in (2, 3, 4) and scale_dtype in (torch.float16, torch.uint8) and 16 <= d <= 256
            and d & (d - 1) == 0 and block & (block - 1) == 0 and d % block == 0 and x.stride(-1) == 1)


def store_rows(k: Tensor, v: Tensor, k_body: tuple[Tensor, Tensor], v_body: tuple[Tensor, Tensor], slot: int,
               thresholds: Tensor, bits: int, block: int) -> Tensor:
    """Quantize ``k`` and ``v`` ``(b, h, n, d)`` (same strides) into body slots ``[slot, slot + n)`` of
    ``(codes, scales)`` buffers ``(b, h, capacity, ...)`` (contiguous, K and V alike), nearest codes
    against the encoding midpoints ``thresholds``. Returns per-row flags ``(b * h * n, 2)``, nonzero for a
    row with NaN or an absmax beyond fp16 (its slot then holds garbage and the caller raises)."""
    b, h, n, d = k.shape
    bad = torch.empty(b * h * n, 2, dtype=torch.int32, device=k.device)
    if not bad.numel():
        return bad
    (kc, ks), (vc, vs) = k_body, v_body
    wrap_triton(_store_rows_kernel)[(b * h * n, 2)](
        k, v, kc, ks, vc, vs, thresholds, bad, slot, h, n, k.stride(0), k.stride(1), k.stride(2),
        kc.stride(1), kc.stride(2), ks.stride(1), ks.stride(2),
        DIM=d, BLOCK=block, BITS=bits, N_THRESHOLDS=thresholds.numel(),
    )
    return bad
