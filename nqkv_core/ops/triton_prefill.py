"""Flash-attention prefill over packed K/V (Triton), with its plain-torch reference.

One program per KV head x block of ``BLOCK_M`` query rows (the ``G * Tq`` queries of a KV head,
row = ``g * Tq + i``), looping over all keys it may see -- the causal bound stops the loop early --
with the tile decoding and online softmax of :func:`nqkv_core.ops.triton_decode._attend_range`.
Registered as ``nqkv::flash_prefill`` with ``torch.library.triton_op``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from nqkv_core.ops.triton_decode import BLOCK_N, _attend_range, _interpreting, kernel_args
from nqkv_core.ops.triton_decode import reference as _decode_reference

BLOCK_M = 64


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, ka_ptr, kcb_ptr, vc_ptr, va_ptr, vcb_ptr, kt_ptr, vt_ptr, mask_ptr, o_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kcb, stride_kch, stride_kct, stride_kab, stride_kah, stride_kat, stride_kad,
    stride_vcb, stride_vch, stride_vct, stride_vab, stride_vah, stride_vat, stride_vad,
    stride_ktb, stride_kth, stride_ktt, stride_ktd, stride_vtb, stride_vth, stride_vtt, stride_vtd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ob, stride_oh, stride_ot, stride_od,
    H_KV, T_Q, T_HIST, T_K, N_ROWS, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    K_BITS: tl.constexpr, K_AXIS: tl.constexpr, K_QBLOCK: tl.constexpr,
    V_BITS: tl.constexpr, V_AXIS: tl.constexpr, V_QBLOCK: tl.constexpr,
    HAS_TAIL: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # (a whole cache's offsets can pass 2**31)
    h = pid_bh % H_KV
    # -- query rows --
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < N_ROWS
    i_q = offs_r % T_Q
    head = h * GROUP + offs_r // T_Q
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + b * stride_qb + head[:, None] * stride_qh + i_q[:, None] * stride_qt + offs_d[None, :] * stride_qd
    # (cast after the product: traced by inductor, a Python float argument is fp64)
    q = (tl.load(q_ptrs, mask=r_ok[:, None], other=0.0).to(tl.float32) * scale).to(tl.float32)
    last_key = T_K - T_Q + i_q
    stop = T_K
    if IS_CAUSAL:
        stop = tl.minimum(stop, T_K - T_Q + tl.max(tl.where(r_ok, i_q, 0), 0) + 1)
    # -- all keys this block may see --
    acc, m_i, l_i = _attend_range(
        q, r_ok, last_key, head, i_q,
        kc_ptr + b * stride_kcb + h * stride_kch, ka_ptr + b * stride_kab + h * stride_kah, kcb_ptr,
        vc_ptr + b * stride_vcb + h * stride_vch, va_ptr + b * stride_vab + h * stride_vah, vcb_ptr,
        kt_ptr + b * stride_ktb + h * stride_kth, vt_ptr + b * stride_vtb + h * stride_vth, mask_ptr + b * stride_mb,
        stride_kct, stride_kat, stride_kad, stride_vct, stride_vat, stride_vad,
        stride_ktt, stride_ktd, stride_vtt, stride_vtd, stride_mh, stride_mq, stride_mk,
        0, stop, T_HIST,
        HEAD_DIM, HEAD_DIM_V, K_BITS, K_AXIS, K_QBLOCK, V_BITS, V_AXIS, V_QBLOCK,
        HAS_TAIL, MASK_KIND, IS_CAUSAL, FP32_DOT, BLOCK_M, BLOCK_N,
    )
    # -- normalise and store (rows that see nothing give zeros) --
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    offs_dv = tl.arange(0, HEAD_DIM_V)
    o_ptrs = o_ptr + b * stride_ob + head[:, None] * stride_oh + i_q[:, None] * stride_ot + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=r_ok[:, None])


@triton_op("nqkv::flash_prefill", mutates_args=())
def flash_prefill(
    q: Tensor,
    k_codes: Tensor, k_absmax: Tensor, k_codebook: Tensor, k_block: int, k_axis: int,
    v_codes: Tensor, v_absmax: Tensor, v_codebook: Tensor, v_block: int, v_axis: int,
    k_tail: Optional[Tensor], v_tail: Optional[Tensor], attn_mask: Optional[Tensor],
    scale: float, is_causal: bool,
) -> Tensor:
    """Prefill attention; arguments and semantics as ``nqkv::attention`` (checked there)."""
    tensors, strides, meta, (b, hq, tq, d, hkv, th, tt, dv) = kernel_args(
        q, k_codes, k_absmax, k_codebook, k_block, k_axis, v_codes, v_absmax, v_codebook,
        v_block, v_axis, k_tail, v_tail, attn_mask)
    n_rows = (hq // hkv) * tq
    block_m = 16 if _interpreting() else BLOCK_M
    out = torch.empty((b, hq, tq, dv), device=q.device, dtype=tensors[0].dtype)
    grid = (b * hkv, triton.cdiv(n_rows, block_m))
    wrap_triton(_prefill_kernel)[grid](
        *tensors, out, *strides, *out.stride(), hkv, tq, th, th + tt, n_rows, scale,
        **meta, IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
    )
    return out.to(q.dtype)


def reference(*args, **kwargs) -> Tensor:
    """Plain torch reference: dequantize, concatenate the tail, fp32 SDPA (bottom-right causal)."""
    return _decode_reference(*args, **kwargs)
