"""Error-feedback coding of rows (Triton): the CUDA kernel of ``nqkv::feedback_codes``.

The cache codes query-rounded keys (``KVScheme.k_rounding="query"``) one token per layer and
step; the op's torch body (:func:`nqkv_core.quantize.feedback_codes`, the reference) is a loop of
``head_dim`` small steps, each a few launches on a GPU. Here one program codes one row: the row,
its element scales and its feedback matrix's rows stay on chip, and the elements are coded in
order, each rounding error moved onto the elements after it. Importing this module registers
:func:`launch` as the op's CUDA kernel; :func:`nqkv_core.quantize.feedback_loop` is its reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nqkv_core.quantize import feedback_loop


@triton.jit
def _feedback_codes_kernel(x_ptr, scale_ptr, u_ptr, th_ptr, cb_ptr, codes_ptr, rows_per_matrix,
                           DIM: tl.constexpr, N_THRESHOLDS: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.arange(0, DIM)
    w = tl.load(x_ptr + r * DIM + offs)
    s = tl.load(scale_ptr + r * DIM + offs)
    u_rows = u_ptr + (r // rows_per_matrix) * DIM * DIM
    codes = tl.zeros([DIM], dtype=tl.int32)
    for i in range(DIM):  # sequential: element i is coded after the errors of 0..i-1 reached it
        here = offs == i
        w_i = tl.sum(tl.where(here, w, 0.0), axis=0)
        s_i = tl.sum(tl.where(here, s, 0.0), axis=0)
        y = w_i / tl.where(s_i > 0, s_i, 1.0)
        c = 0
        for t in tl.static_range(N_THRESHOLDS):  # the number of midpoints below y, as bucketize
            c += (y > tl.load(th_ptr + t)).to(tl.int32)
        codes = tl.where(here, c, codes)
        u_row = tl.load(u_rows + i * DIM + offs)
        u_ii = tl.sum(tl.where(here, u_row, 0.0), axis=0)
        err = (w_i - tl.load(cb_ptr + c) * s_i) / u_ii
        w = tl.where(offs > i, w - err * u_row, w)
    tl.store(codes_ptr + r * DIM + offs, codes.to(tl.uint8))


def supports(x: Tensor) -> bool:
    """Rows of a power-of-two length from 16 to 256 (``tl.arange`` needs a power of two)."""
    d = x.shape[-1]
    return 16 <= d <= 256 and d & (d - 1) == 0


def launch(x: Tensor, scale: Tensor, feedback: Tensor, thresholds: Tensor, codebook: Tensor) -> Tensor:
    """The kernel on ``nqkv::feedback_codes``'s arguments (any device Triton runs on, e.g. CPU
    tensors under ``TRITON_INTERPRET=1``); rows it does not support go to the torch body."""
    if not supports(x):
        return feedback_loop(x, scale, feedback, thresholds, codebook)
    d, n = x.shape[-1], x.shape[-2]
    rows = x.numel() // d
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if rows:
        u = feedback.float().expand(*x.shape[:-2], d, d).contiguous()
        _feedback_codes_kernel[(rows,)](
            x.float().contiguous(), scale.float().contiguous(), u, thresholds.float().contiguous(),
            codebook.float().contiguous(), codes, n, DIM=d, N_THRESHOLDS=thresholds.numel(),
        )
    return codes


torch.library.register_kernel("nqkv::feedback_codes", "cuda", launch)
