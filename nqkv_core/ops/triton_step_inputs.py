"""A one-token decode step's inputs in the storage basis (Triton): one launch per layer and step.

Before a cache layer attends, its step takes the query and the new token into the basis the body
is stored in: the channels in the key order, the key centre (at the token's position for a
RoPE-aware centre) taken off the new key, the key rotation applied to queries and key, the value
centre and rotation to the value, and the RoPE-centred key bias weights of the queries
(:func:`nqkv_core.transform.rope_bias_weights`). In torch that is some twenty small ops on a GPU;
here one program per (batch, KV head) loads the head's query rows and new key as the rows of one
``(ROWS, DIM)`` tile and rotates them with fp32 products, and the value with others. The torch
ops of ``nqkv_core.cache.step._folded_inputs`` are its reference (equal up to fp32 rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError  # noqa: F401  (the route catches it)
from torch import Tensor
from torch.library import wrap_triton

# centre kinds (the constexpr CENTRE)
NO_CENTRE, PLAIN_CENTRE, ROPE_CENTRE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# the rotations' input columns per product: a (CHUNK, DIM) fp32 slice of the matrix fits the
# registers (a whole (128, 128) one spills)
CHUNK = tl.constexpr(16)


@triton.jit
def _step_inputs_kernel(q_ptr, k_ptr, v_ptr, order_ptr, rot_k_ptr, rot_v_ptr, mu_k_ptr, mu_kh_ptr, mu_v_ptr, row_ptr,
                        q_out, w_out, k_out, v_out, scaling, heads, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, mu_sb,
                        GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, ORDER: tl.constexpr,
                        ROT_K: tl.constexpr, ROT_V: tl.constexpr, CENTRE: tl.constexpr, MU_V: tl.constexpr):
    pid = tl.program_id(0)
    b, h = pid // heads, pid % heads
    r = tl.arange(0, ROWS)
    c = tl.arange(0, DIM)
    is_q = r < GROUP
    q_rows = q_ptr + b * q_sb + (h * GROUP + r)[:, None] * q_sh
    k_ptr += b * k_sb + h * k_sh
    mu_off = b * mu_sb + h * DIM
    out_rows = (b * heads * GROUP + h * GROUP + r)[:, None] * DIM + c[None, :]
    if CENTRE == ROPE_CENTRE:  # the key bias weights, from the queries as they come
        _bias_weights(q_rows, order_ptr, mu_k_ptr + mu_off, w_out + out_rows, scaling, is_q, DIM, ORDER)
    # rows [the head's queries | the new key, centred], rotated
    if ROT_K:
        x = tl.zeros([ROWS, DIM], dtype=tl.float32)
        for k0 in tl.static_range(0, DIM, CHUNK):
            cols = k0 + tl.arange(0, CHUNK)
            x_cols = _key_rows(q_rows, k_ptr, order_ptr, mu_k_ptr + mu_off, mu_kh_ptr + mu_off, row_ptr, r, cols,
                               GROUP, DIM, ORDER, CENTRE)
            x += tl.dot(x_cols, tl.load(rot_k_ptr + cols[:, None] * DIM + c[None, :]), input_precision="ieee")
    else:
        x = _key_rows(q_rows, k_ptr, order_ptr, mu_k_ptr + mu_off, mu_kh_ptr + mu_off, row_ptr, r, c,
                      GROUP, DIM, ORDER, CENTRE)
    tl.store(q_out + out_rows, x.to(q_out.dtype.element_ty), mask=is_q[:, None])
    key_row = r[:, None] * 0 + pid * DIM + c[None, :]
    tl.store(k_out + key_row, x.to(k_out.dtype.element_ty), mask=(r == GROUP)[:, None])
    # the new value (in row 0 of a tile: a product's operand has at least 16 rows), centred, rotated
    v_ptr += b * v_sb + h * v_sh
    if ROT_V:
        y = tl.zeros([ROWS, DIM], dtype=tl.float32)
        for k0 in tl.static_range(0, DIM, CHUNK):
            cols = k0 + tl.arange(0, CHUNK)
            y_cols = _value_row(v_ptr, mu_v_ptr + mu_off, r, cols, MU_V)
            y += tl.dot(y_cols, tl.load(rot_v_ptr + cols[:, None] * DIM + c[None, :]), input_precision="ieee")
    else:
        y = _value_row(v_ptr, mu_v_ptr + mu_off, r, c, MU_V)
    tl.store(v_out + key_row, y.to(v_out.dtype.element_ty), mask=(r == 0)[:, None])


@triton.jit
def _key_rows(q_rows, k_ptr, order_ptr, mu_ptr, mu_half_ptr, row_ptr, r, cols, GROUP: tl.constexpr,
              DIM: tl.constexpr, ORDER: tl.constexpr, CENTRE: tl.constexpr):
    """Columns ``cols`` of the rows [queries | new key] in the key order, fp32, the key centred (at
    its position: the RoPE table's ``row``, ``[cos | sin]`` of each pair, for a RoPE-aware centre)."""
    src = tl.load(order_ptr + cols) if ORDER else cols
    q = tl.load(q_rows + src[None, :], mask=(r < GROUP)[:, None], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + src).to(tl.float32)
    if CENTRE == ROPE_CENTRE:
        half = cols % (DIM // 2)  # cos / sin of a pair repeat over the two halves of the row
        k -= tl.load(mu_ptr + cols) * tl.load(row_ptr + half) + tl.load(mu_half_ptr + cols) * tl.load(
            row_ptr + DIM // 2 + half)
    elif CENTRE == PLAIN_CENTRE:
        k -= tl.load(mu_ptr + cols)
    return tl.where((r == GROUP)[:, None], k[None, :], q)


@triton.jit
def _value_row(v_ptr, mu_ptr, r, cols, MU_V: tl.constexpr):
    """Columns ``cols`` of the new value, centred, in row 0 of a tile of zeros."""
    v = tl.load(v_ptr + cols).to(tl.float32)
    if MU_V:
        v -= tl.load(mu_ptr + cols)
    return tl.where((r == 0)[:, None], v[None, :], 0.0)


@triton.jit
def _bias_weights(q_rows, order_ptr, mu_ptr, w_rows, scaling, is_q, DIM: tl.constexpr, ORDER: tl.constexpr):
    """:func:`~nqkv_core.transform.rope_bias_weights` of the query rows: column ``c`` pairs with
    ``c +- DIM / 2`` (its partner ``p``)."""
    c = tl.arange(0, DIM)
    p = (c + DIM // 2) % DIM
    src = tl.load(order_ptr + c) if ORDER else c
    p_src = tl.load(order_ptr + p) if ORDER else p
    q = tl.load(q_rows + src[None, :], mask=is_q[:, None], other=0.0).to(tl.float32)
    q_p = tl.load(q_rows + p_src[None, :], mask=is_q[:, None], other=0.0).to(tl.float32)
    mu, mu_p = tl.load(mu_ptr + c)[None, :], tl.load(mu_ptr + p)[None, :]
    w = tl.where((c < DIM // 2)[None, :], q * mu + q_p * mu_p, q * mu_p - q_p * mu) * scaling
    tl.store(w_rows, w, mask=is_q[:, None])


def takes(query: Tensor, k_new: Tensor, v_new: Tensor, *centres: Tensor | None) -> bool:
    """One query token per row, a power-of-two ``head_dim`` from 16 to 128 (``tl.arange``; the
    rotation's ``(d, d)`` fp32 operand of a larger head would not fit the program), at most 63 query
    heads per KV head, rows contiguous along head_dim, and ``(1 or b, h, 1, d)`` contiguous centres
    of one batch size."""
    b, hq, t, d = query.shape
    h = k_new.shape[1]
    centres = [x for x in centres if x is not None]
    return (t == 1 and 16 <= d <= 128 and d & (d - 1) == 0 and hq % h == 0 and hq // h < 64
            and all(x.stride(-1) == 1 for x in (query, k_new, v_new)) and k_new.shape == v_new.shape
            and all(x.is_contiguous() and x.dtype == torch.float32 and x.shape[1:] == (h, 1, d)
                    and x.shape[0] in (1, b) and x.shape[0] == centres[0].shape[0] for x in centres))


def step_inputs(query: Tensor, k_new: Tensor, v_new: Tensor, order: Tensor | None, rot_k: Tensor | None,
                rot_v: Tensor | None, mu_k: Tensor | None, mu_k_half: Tensor | None, mu_v: Tensor | None,
                row: Tensor | None, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(q, w, k, v)``: queries ``(b, hq, 1, d)`` and new K/V ``(b, h, 1, d)`` in the storage basis and
    ``dtype``, and the key bias weights ``(b, hq, 1, d)`` fp32 (None without ``mu_k_half``).

    ``order``: the key channel order (int, ``(d,)``) or None; ``rot_k`` / ``rot_v``: ``(d, d)`` fp32 or
    None; ``mu_k`` / ``mu_k_half`` / ``mu_v``: ``(1 or b, h, 1, d)`` fp32 contiguous, ``mu_k_half`` (with
    the RoPE table's ``row`` ``(d,)`` ``[cos | sin]`` at the new token's position) for a RoPE-aware
    centre, ``mu_k`` alone for a plain one."""
    b, hq, _, d = query.shape
    h = k_new.shape[1]
    group = hq // h
    dev = query.device
    q_out = torch.empty(b, hq, 1, d, dtype=dtype, device=dev)
    k_out = torch.empty(b, h, 1, d, dtype=dtype, device=dev)
    v_out = torch.empty(b, h, 1, d, dtype=dtype, device=dev)
    centre = NO_CENTRE if mu_k is None else ROPE_CENTRE if mu_k_half is not None else PLAIN_CENTRE
    w = torch.empty(b, hq, 1, d, dtype=torch.float32, device=dev) if centre == ROPE_CENTRE else None
    mu = [x for x in (mu_k, mu_k_half, mu_v) if x is not None]
    mu_sb = 0 if not mu or mu[0].shape[0] == 1 else h * d  # (the centres share their batch size: :func:`takes`)
    dummy = q_out  # (a pointer for the arguments a constexpr switches off; never read)
    wrap_triton(_step_inputs_kernel)[(b * h,)](
        query, k_new, v_new, dummy if order is None else order, dummy if rot_k is None else rot_k,
        dummy if rot_v is None else rot_v, dummy if mu_k is None else mu_k,
        dummy if mu_k_half is None else mu_k_half, dummy if mu_v is None else mu_v, dummy if row is None else row,
        q_out, dummy if w is None else w, k_out, v_out, scaling, h, query.stride(0), query.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), mu_sb,
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group + 1)), DIM=d, ORDER=order is not None,
        ROT_K=rot_k is not None, ROT_V=rot_v is not None, CENTRE=centre, MU_V=mu_v is not None,
    )
    return q_out, w, k_out, v_out
