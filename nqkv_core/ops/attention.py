"""``nqkv::attention``: attention of full-precision queries over a quantized KV cache.

The op takes plain tensors -- codes, absmax and codebook of K and of V, with their block layout --
so it can be traced, exported and checked with ``torch.library.opcheck``. Python callers pass K and
V as :class:`~nqkv_core.packed.Packed` to :func:`packed_attention`, which picks the kernel without
the dispatcher where nothing traces the call and goes through the op otherwise; ``NQTensor`` keys
and values reach it through ``F.scaled_dot_product_attention`` (registered below).

Semantics of :func:`attention`:

* Keys/values are the quantized history (``T_hist`` tokens) followed by an optional full-precision
  tail (``T_tail`` tokens: the recent window or sink tokens a cache keeps exact), ``Tk = T_hist +
  T_tail``. Nothing is concatenated: both sources are read in place.
* The ``Tq`` queries are the LAST ``Tq`` of the ``Tk`` positions (prefill: ``Tq == Tk``; decode:
  ``Tq`` small). ``is_causal`` lets query ``i`` attend to key ``j`` iff ``j <= Tk - Tq + i``
  (bottom-right alignment, what a cache needs; for ``Tq == Tk`` it is the usual lower triangle).
* ``attn_mask``: bool (True = attend) or additive float, broadcastable to ``(B, Hq, Tq, Tk)``; it
  may be combined with ``is_causal`` (both apply). Rows that can attend to nothing give zeros.
* GQA: ``Hq`` must be a multiple of ``Hkv``; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
* ``scale`` defaults to ``1 / sqrt(D)``. The result has ``q``'s dtype, shape ``(B, Hq, Tq, Dv)``.

Where it runs: Triton kernels when the tensors are on CUDA (or ``TRITON_INTERPRET=1`` outside
``torch.compile``), otherwise the chunked torch path of :mod:`nqkv_core.ops.cpu`. The op is a
``triton_op``, so ``torch.compile`` traces into this body and sees the kernels (or lowers the torch
path with Inductor).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nqkv_core.ops import cpu
from nqkv_core.packed import CHANNEL_AXIS, TOKEN_AXIS, Packed
from nqkv_core.quantize import KERNEL_SCALE_DTYPES
from nqkv_core.tensor import NQTensor, implements_torch_function
from nqkv_core.transform import CompactRope, output_transform

Q_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- checks -----------------------------------------------------------------------------------------


def _check_packed(name: str, q: Tensor, p: Packed, dim: Optional[int]) -> int:
    """Check one packed K or V; returns its logical last-axis size."""
    codes, absmax, codebook, block = p.codes, p.absmax, p.codebook, p.block
    if codes.dtype != torch.uint8:
        raise TypeError(f"{name}_codes must be uint8, got {codes.dtype}")
    if absmax.dtype not in KERNEL_SCALE_DTYPES:
        raise TypeError(f"{name}_absmax must be float16, float32 or E5M3 bytes (uint8), got {absmax.dtype}")
    if codebook.dtype != torch.float32:
        raise TypeError(f"{name}_codebook must be float32, got {codebook.dtype}")
    for t, what in ((codes, "codes"), (absmax, "absmax"), (codebook, "codebook")):
        if t.device != q.device:
            raise ValueError(f"{name}_{what} is on {t.device} but q is on {q.device}")
    if codes.dim() != 4:
        raise ValueError(f"{name}_codes must be (B, H_kv, T, D*bits/8), got shape {tuple(codes.shape)}")
    if p.axis not in (TOKEN_AXIS, CHANNEL_AXIS):
        raise NotImplementedError(
            f"{name}_axis={p.axis + 4}: only blocks along head_dim (-1, or 3 counted from the front) or"
            " along tokens (-2, or 2) are supported"
        )
    bits = p.bits
    b, h, t, nbytes = codes.shape
    if (nbytes * 8) % bits:
        raise ValueError(f"{name}_codes last axis {nbytes} bytes does not hold whole {bits}-bit codes")
    d = nbytes * 8 // bits
    if dim is not None and d != dim:
        raise ValueError(f"{name}_codes hold head_dim {d} ({bits}-bit) but q has head_dim {dim}")
    if bits == 3 and d % 8:
        raise ValueError(f"3-bit codes need head_dim a multiple of 8, got {d}")
    if p.per_token and d % block:
        raise ValueError(f"{name}_block={block} must divide head_dim {d} for blocks along head_dim")
    expected = (b, h, t, d // block) if p.per_token else (b, h, -(-t // block), d)
    if tuple(absmax.shape) != expected:
        raise ValueError(
            f"{name}_absmax has shape {tuple(absmax.shape)}; {name}_codes {tuple(codes.shape)} with"
            f" {bits}-bit codes in blocks of {block} along axis {p.axis} need {expected}"
        )
    return d


def _check(q: Tensor, k: Packed, v: Packed, k_tail: Optional[Tensor], v_tail: Optional[Tensor],
           attn_mask: Optional[Tensor]) -> None:
    if q.dtype not in Q_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H_q, T_q, D), got shape {tuple(q.shape)}")
    d = _check_packed("k", q, k, q.shape[3])
    dv = _check_packed("v", q, v, None)
    b, hq, tq, _ = q.shape
    kb, hkv, th, _ = k.codes.shape
    if tuple(v.codes.shape[:3]) != (kb, hkv, th):
        raise ValueError(f"k_codes {tuple(k.codes.shape)} and v_codes {tuple(v.codes.shape)} disagree on (B, H_kv, T)")
    if kb != b:
        raise ValueError(f"q has batch {b} but the cache has batch {kb}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if (k_tail is None) != (v_tail is None):
        raise ValueError("k_tail and v_tail must be given together")
    tt = 0
    if k_tail is not None:
        for t, name, dim in ((k_tail, "k_tail", d), (v_tail, "v_tail", dv)):
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
            if t.dim() != 4 or tuple(t.shape[:2]) != (b, hkv) or t.shape[3] != dim:
                raise ValueError(f"{name} must be ({b}, {hkv}, T_tail, {dim}), got {tuple(t.shape)}")
        if k_tail.shape[2] != v_tail.shape[2]:
            raise ValueError(f"k_tail has {k_tail.shape[2]} tokens but v_tail has {v_tail.shape[2]}")
        tt = k_tail.shape[2]
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, hq, tq, th + tt))
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H_q, T_q, T_k)"
                f" = {(b, hq, tq, th + tt)}"
            ) from None


def _use_triton(q: Tensor) -> bool:
    if q.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and not torch.compiler.is_compiling()


# Set once an import of the kernels failed: a failed import is not remembered by Python (it searches
# the path, or runs the module's code up to the failure, again on every call).
_NO_TRITON = _NO_GROUPED = False


def _triton_kernels():
    """The kernel modules, imported on first use (after any TRITON_INTERPRET setting): the split-K
    decode, the prefill and the grouped decode kernel (None where this Triton lacks what it uses;
    the split-K kernel then decodes everything); None without triton."""
    global _NO_TRITON, _NO_GROUPED
    if _NO_TRITON:
        return None
    try:
        from nqkv_core.ops import triton_decode, triton_prefill
    except ImportError:
        _NO_TRITON = True
        return None
    if _NO_GROUPED:
        return triton_decode, triton_prefill, None
    try:
        from nqkv_core.ops import triton_decode_grouped
    except (ImportError, AttributeError):
        _NO_GROUPED = True
        triton_decode_grouped = None
    return triton_decode, triton_prefill, triton_decode_grouped


def grouped_takes_key_bias(q: Tensor, k: tuple, v: tuple) -> bool:
    """Whether ``nqkv::grouped_decode`` serves a call with a key bias (``bias_w, bias_table,
    bias_pos``, computed in its kernel): what :func:`attention_eager` would run is the grouped decode
    kernel (``k`` / ``v``: codes, absmax, codebook, block, axis)."""
    kernels = _triton_kernels() if _use_triton(q) else None
    if kernels is None or kernels[2] is None:
        return False
    return kernels[0].supports(q, k, v) and kernels[2].supports(q, k, v)


# -- the op ---------------------------------------------------------------------------------------------


def _tracing(q: Tensor) -> bool:
    """Whether this call is being traced (torch.compile, or make_fx with fake/functional tensors)."""
    return torch.compiler.is_compiling() or type(q) is not Tensor or torch._subclasses.fake_tensor.is_fake(q)


def _attend(q: Tensor, k: Packed, v: Packed, k_tail: Optional[Tensor], v_tail: Optional[Tensor],
            attn_mask: Optional[Tensor], scale: float, is_causal: bool) -> Tensor:
    """The kernel for the device and shape, on checked arguments: Triton (grouped decode, split-K
    decode or prefill), the CPU decode path (one native call where built) or the CPU chunk loop."""
    kernels = _triton_kernels() if _use_triton(q) else None
    if kernels is not None:
        triton_decode, triton_prefill, grouped = kernels
        ka, va = k.op_args(), v.op_args()
        if triton_decode.supports(q, ka, va):
            if grouped is not None and grouped.supports(q, ka, va):  # the presets' 4-bit layout
                return grouped.grouped_decode(q, *ka, *va, k_tail, v_tail, attn_mask, scale, is_causal)
            if q.shape[2] * (q.shape[1] // k.codes.shape[1]) <= triton_decode.MAX_ROWS:
                return triton_decode.flash_decode(q, *ka, *va, k_tail, v_tail, attn_mask, scale, is_causal)
            return triton_prefill.flash_prefill(q, *ka, *va, k_tail, v_tail, attn_mask, scale, is_causal)
    if cpu.decode_fits(q, k, v, k_tail):
        if _tracing(q):  # an opaque call: see attention_cpu_decode
            return torch.ops.nqkv.attention_cpu_decode(q, *k.op_args(), *v.op_args(), k_tail, v_tail, attn_mask,
                                                       scale, is_causal)
        return cpu.attention_decode(q, k, v, k_tail, v_tail, attn_mask, scale, is_causal)
    plain = torch.compiler.is_compiling()
    return cpu.attention_chunked(q, k, v, k_tail, v_tail, attn_mask, scale, is_causal, plain=plain)


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def attention_eager(
    q: Tensor,
    k_codes: Tensor,
    k_absmax: Tensor,
    k_codebook: Tensor,
    k_block: int,
    k_axis: int,
    v_codes: Tensor,
    v_absmax: Tensor,
    v_codebook: Tensor,
    v_block: int,
    v_axis: int,
    k_tail: Optional[Tensor] = None,
    v_tail: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
) -> Tensor:
    """The body of ``nqkv::attention``: :func:`packed_attention` with K and V as plain arguments.

    Args:
        q: (B, Hq, Tq, D) float32/float16/bfloat16.
        k_codes, v_codes: uint8 (B, Hkv, T_hist, D*bits/8), codes packed along head_dim.
        k_absmax, v_absmax: fp16 / fp32 scales or E5M3 bytes (uint8), (B, Hkv, T_hist, D/block) for
            blocks along head_dim (axis 3, or -1) or (B, Hkv, ceil(T_hist/block), D) for blocks of
            tokens (axis 2, or -2).
        k_codebook, v_codebook: float32 (2**bits,) levels; bits 2, 3, 4 or 8.
        k_block, v_block, k_axis, v_axis: the block layout of each (:class:`~nqkv_core.packed.Packed`).
        k_tail, v_tail: optional (B, Hkv, T_tail, D / Dv) floating tensors after the history.
        attn_mask: optional bool or additive mask broadcastable to (B, Hq, Tq, T_hist + T_tail).
        scale: softmax scale, default ``1/sqrt(D)``.
        is_causal: causal masking with the queries at the last Tq positions.

    Returns:
        (B, Hq, Tq, Dv) in ``q.dtype``.

    Raises:
        TypeError / ValueError: wrong dtypes, devices or shapes.
        NotImplementedError: an unsupported ``k_axis``/``v_axis``.
    """
    k = Packed(k_codes, k_absmax, k_codebook, k_block, k_axis)
    v = Packed(v_codes, v_absmax, v_codebook, v_block, v_axis)
    _check(q, k, v, k_tail, v_tail, attn_mask)
    return _attend(q, k, v, k_tail, v_tail, attn_mask, _default_scale(q, scale), is_causal)


def packed_attention(
    q: Tensor,
    k: Packed,
    v: Packed,
    k_tail: Optional[Tensor] = None,
    v_tail: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    key_bias: Optional[tuple[Tensor, Tensor, Tensor]] = None,
    dense_bias: Optional[Callable[[], Tensor]] = None,
    out_transform: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
) -> Tensor:
    """Attention of ``q`` over packed K/V plus an optional full-precision tail: the Python entry point.

    Semantics and arguments as ``nqkv::attention`` (module docstring, :func:`attention_eager`), with
    ``k`` and ``v`` as :class:`~nqkv_core.packed.Packed`. The kernel is picked by device and shape
    (Triton on CUDA, the native or torch decode path or the chunk loop on CPU). An eager call that
    autograd has nothing to record for runs it directly; a traced one, or one with inputs that
    require grad, goes through the registered op.

    ``key_bias = (w, table, positions)`` adds ``w[b, hq, i] . table[positions[j]]`` to the score of
    query ``i`` and key ``j`` (``w`` (B, Hq, Tq, D), ``table`` (P, D) or the same rows held
    compactly, :class:`~nqkv_core.transform.CompactRope` (a CPU cache's RoPE table); ``positions``
    (Tk,) in ``[0, P)``). The CPU decode path and the grouped Triton decode kernel add it in their
    reduction; elsewhere it becomes an additive mask, ``dense_bias()`` if given (the same
    ``(B, Hq, Tq, Tk)`` offsets, computed as the caller knows best), else ``(w @ rows.T)[..., positions]``.

    ``out_transform = (rot, shift)`` returns ``out @ rot.T + shift`` instead (``rot`` ``(Dv, Dv)``,
    ``shift`` ``(B or 1, Hkv, 1, Dv)``, fp32, either may be None; :func:`~nqkv_core.transform.output_transform`):
    a cache's value rotation and centre, which the grouped Triton decode kernel applies in its
    merge, so that a decode step's output comes back in the model's basis from the kernel's
    launches alone.

    Raises:
        TypeError / ValueError: wrong dtypes, devices or shapes (a bad ``key_bias`` position on the
            native path included).
        NotImplementedError: blocks along an axis other than -1 and -2.
    """
    k, v = Packed.of(k), Packed.of(v)
    if out_transform is not None and any(x is not None for x in out_transform):
        if k.codes.shape[2] and grouped_takes_key_bias(q, k.op_args(), v.op_args()):
            w, table, positions = (None, None, None) if key_bias is None else key_bias
            table = None if table is None else cpu.table_rows(table)
            return torch.ops.nqkv.grouped_decode(q, *k.op_args(), *v.op_args(), k_tail, v_tail, attn_mask,
                                                 _default_scale(q, scale), is_causal, w, table, positions,
                                                 *out_transform)
        out = packed_attention(q, k, v, k_tail, v_tail, attn_mask, scale, is_causal, key_bias, dense_bias)
        return output_transform(out, *out_transform)
    if key_bias is not None:
        if q.device.type == "cpu" and k.codes.shape[2] and cpu.decode_fits(q, k, v, k_tail):
            if torch.compiler.is_compiling():
                return torch.ops.nqkv.attention_cpu_decode(q, *k.op_args(), *v.op_args(), k_tail, v_tail, attn_mask,
                                                           _default_scale(q, scale), is_causal,
                                                           *key_bias_args(key_bias))
            if skips_dispatcher(q, k_tail, v_tail):
                return cpu.attention_decode(q, k, v, k_tail, v_tail, attn_mask, _default_scale(q, scale), is_causal,
                                            key_bias)
        if k.codes.shape[2] and grouped_takes_key_bias(q, k.op_args(), v.op_args()):
            # the CUDA grouped decode kernel (or Triton's interpreter) computes the offsets itself,
            # from the table's rows (a cache's table is rows on a GPU; a compact one, on a CPU, is expanded)
            w, table, positions = key_bias
            return torch.ops.nqkv.grouped_decode(q, *k.op_args(), *v.op_args(), k_tail, v_tail, attn_mask,
                                                 _default_scale(q, scale), is_causal, w, cpu.table_rows(table),
                                                 positions)
        bias = dense_bias() if dense_bias is not None else cpu.dense_key_bias(*key_bias)
        attn_mask = cpu.with_key_bias(attn_mask, bias)
    if skips_dispatcher(q, k.absmax, v.absmax, k_tail, v_tail, attn_mask):
        _check(q, k, v, k_tail, v_tail, attn_mask)
        return _attend(q, k, v, k_tail, v_tail, attn_mask, _default_scale(q, scale), is_causal)
    return torch.ops.nqkv.attention(q, *k.op_args(), *v.op_args(), k_tail, v_tail, attn_mask, scale, is_causal)


@contextlib.contextmanager
def _no_kernel_scan():
    import torch._library.triton as lib

    scan = getattr(lib, "get_inner_triton_kernels", None)
    if scan is not None:
        lib.get_inner_triton_kernels = lambda fn: []
    try:
        yield
    finally:
        if scan is not None:
            lib.get_inner_triton_kernels = scan


# The op, registered from the same function. Eager callers go through ``packed_attention``, which
# calls the body directly where :func:`skips_dispatcher` allows: same result, without the
# dispatcher's ~0.1 ms per call.
# triton_op scans the body's source for Triton kernels as it registers, which imports triton and
# torch._inductor (about a second); this body launches none itself (its kernels are the nested
# nqkv::flash_decode / flash_prefill ops), so the scan, where torch has one, finds none and is skipped.
with _no_kernel_scan():
    attention = torch.library.triton_op("nqkv::attention", mutates_args=())(attention_eager)


def key_bias_args(key_bias: tuple) -> tuple:
    """A key bias ``(w, table, positions)`` as an op's tensor arguments ``(bias_w, bias_table, bias_pos,
    bias_offsets)``: a table held compactly (:class:`~nqkv_core.transform.CompactRope`) as its starts
    and offsets, rows with no offsets."""
    w, table, positions = key_bias
    if isinstance(table, CompactRope):
        return w, table.starts, positions, table.offsets
    return w, table, positions, None


def key_bias_table(table: Optional[Tensor], offsets: Optional[Tensor]) -> Optional[Tensor | CompactRope]:
    """The table of an op's ``(bias_table, bias_offsets)`` arguments (:func:`key_bias_args`)."""
    return table if offsets is None or table is None else CompactRope(table, offsets)


@torch.library.custom_op("nqkv::attention_cpu_decode", mutates_args=())
def attention_cpu_decode(
    q: Tensor, k_codes: Tensor, k_absmax: Tensor, k_codebook: Tensor, k_block: int, k_axis: int,
    v_codes: Tensor, v_absmax: Tensor, v_codebook: Tensor, v_block: int, v_axis: int,
    k_tail: Optional[Tensor], v_tail: Optional[Tensor], attn_mask: Optional[Tensor], scale: float,
    is_causal: bool, bias_w: Optional[Tensor] = None, bias_table: Optional[Tensor] = None,
    bias_pos: Optional[Tensor] = None, bias_offsets: Optional[Tensor] = None,
) -> Tensor:
    """The CPU decode path (:func:`nqkv_core.ops.cpu.attention_decode`) as an op opaque to compilers.

    Traced CPU graphs call this for decode-sized queries instead of tracing the chunk loop: the eager
    path is one native call (:mod:`nqkv_core.native`), and without it Inductor would lower the
    decoding to fp32 loops with a codebook gather per element (``benchmarks/bench_compiled_decode.py``).
    Tracing and eager calls then compute the same thing.
    Arguments as :func:`attention_eager`, already checked, plus an optional key bias
    ``(bias_w, bias_table, bias_pos)`` (see :func:`nqkv_core.ops.cpu.attention_decode`); with
    ``bias_offsets``, ``bias_table`` holds the starts of a table held compactly
    (:class:`~nqkv_core.transform.CompactRope`, :func:`key_bias_args`).
    """
    k = Packed(k_codes, k_absmax, k_codebook, k_block, k_axis)
    v = Packed(v_codes, v_absmax, v_codebook, v_block, v_axis)
    key_bias = None if bias_w is None else (bias_w, key_bias_table(bias_table, bias_offsets), bias_pos)
    return cpu.attention_decode(q, k, v, k_tail, v_tail, attn_mask, scale, is_causal, key_bias)


@attention_cpu_decode.register_fake
def _(q, k_codes, k_absmax, k_codebook, k_block, k_axis, v_codes, v_absmax, v_codebook, v_block, v_axis,
      k_tail, v_tail, attn_mask, scale, is_causal, bias_w=None, bias_table=None, bias_pos=None,
      bias_offsets=None):
    dv = Packed(v_codes, v_absmax, v_codebook, v_block, v_axis).shape[-1]
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], dv)


def skips_dispatcher(*tensors: Optional[Tensor]) -> bool:
    """Whether a call with these tensor arguments may use ``attention_eager`` instead of the op:
    nothing traces it, and autograd has nothing to record (the op has no derivative, so going
    around it must not make attention silently differentiable)."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


# -- F.scaled_dot_product_attention with NQTensor keys/values ---------------------------------------------


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


@implements_torch_function([F.scaled_dot_product_attention])
def _scaled_dot_product_attention(func, types, args, kwargs):
    """``F.scaled_dot_product_attention`` with NQTensor ``key`` and ``value``, same semantics as torch's
    on the dequantized tensors (``is_causal`` with ``Tq != Tk`` is torch's top-left triangle)."""
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_args(*args, **kwargs)
    if isinstance(query, NQTensor):
        raise NotImplementedError("scaled_dot_product_attention: query must be a plain tensor, not an NQTensor")
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, NQTensor):
            raise NotImplementedError(
                f"scaled_dot_product_attention: {name} is a plain tensor while the other of key/value is"
                " an NQTensor; quantize both (or dequantize() both)"
            )
    if isinstance(attn_mask, NQTensor):
        raise NotImplementedError("scaled_dot_product_attention: attn_mask cannot be an NQTensor")
    if dropout_p:
        raise NotImplementedError(f"scaled_dot_product_attention over NQTensors: dropout_p={dropout_p} (only 0)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise NotImplementedError(
            "scaled_dot_product_attention over NQTensors needs 4-D (B, H, T, D) query, key and value; got"
            f" {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"query has {query.shape[1]} heads but key/value have {key.shape[1]}: pass enable_gqa=True"
        )
    tq, tk = query.shape[2], key.shape[2]
    if is_causal and tq != tk:
        top_left = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril()
        if attn_mask is None:
            attn_mask = top_left
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & top_left
        else:
            attn_mask = attn_mask.masked_fill(~top_left, -math.inf)
        is_causal = False
    return packed_attention(query, key.packed, value.packed, None, None, attn_mask, scale, is_causal)
