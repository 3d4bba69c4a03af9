"""Blockwise absmax quantization with a codebook, on plain tensors.

A block is ``block`` consecutive elements along ``axis``: one token's head_dim for ``axis=-1``,
``block`` tokens of one channel for ``axis=-2`` on a ``(batch, heads, tokens, head_dim)`` tensor.
Each block stores its absolute maximum ``s`` (fp16, fp32, or one byte: :data:`E5M3`) and one code
per element, the index of the codebook level nearest to ``x / s``; codes are packed along the last
axis (:mod:`nqkv_core.packing`) whatever the blocked axis, so token rows stay contiguous.

Shapes, for ``x`` of shape ``(..., n_axis, ...)``:

* ``codes``: ``x.shape`` with the last axis ``* bits / 8``, uint8.
* ``absmax``: ``x.shape`` with the blocked axis ``/ block``, ``scale_dtype``.

Blocks along a contiguous last axis (fp32 / bf16 input or output) run through the native CPU
kernels of :mod:`nqkv_core.native` when they are built: one fused pass per row, bitwise the same
codes, scales and values as the torch ops below, which serve every other case and compiled graphs.

The stored scale is rounded *up* to fp16 / fp32 so that ``|x / s| <= 1`` always holds: every
element's error is then at most ``max_rounding_error(codebook) * s``. An :data:`E5M3` scale is the
nearest byte instead (a block's largest elements may pass it by up to 6.6% and take the outermost
level; a block whose absmax is below 2**-18 decodes to zeros). A block of zeros has ``s = 0`` and
decodes to exact zeros.
"""

from __future__ import annotations

import math

import torch

from nqkv_core import native
from nqkv_core.codebook import check_args, check_codebook, max_abs_level
from nqkv_core.packed import Packed
from nqkv_core.packing import codes_per_row_multiple, pack, unpack

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# ``E5M3`` scales are one byte: an unsigned float with fp16's 5 exponent bits and its top 3 mantissa
# bits (the fp16 bits 14..7, so a byte ``k`` decodes to the fp16 with bits ``k << 7``), rounded to
# nearest. Half the bytes of fp16 scales (0.125 bits per element at blocks of 64) at no measured
# cost: the nearest of steps of 6-12% loses no more than fp16 rounded up (docs/benchmarks.md).
E5M3 = torch.uint8
SCALE_DTYPES = (torch.float16, torch.float32, E5M3, torch.float8_e4m3fn)
# Scales the attention kernels and the cache read; fp8 (e4m3) scales are for evaluating schemes
# (fake quantization, NQTensor storage): half a bit per element less at blocks of 16, coarser steps.
KERNEL_SCALE_DTYPES = (torch.float16, torch.float32, E5M3)
# The largest stored E5M3 scale (byte 0xF7): fp16's largest exponent, mantissa 1.875. A block whose
# absmax lies between it and fp16's largest value (65504) keeps this scale, its largest elements
# coded at the outermost level (at most 6.6% beyond it).
E5M3_MAX, E5M3_MAX_BYTE = 61440.0, 0xF7  # (bytes above it decode to fp16 infinities and NaNs)
MIN_BLOCK = 8


def codebook_bits(codebook: torch.Tensor) -> int:
    """Bits per code of a codebook, checked (:func:`nqkv_core.codebook.check_codebook`)."""
    return check_codebook(codebook)


def bits_per_element(bits: int, block: int, scale_dtype: torch.dtype = torch.float16) -> float:
    """Storage cost per element: the code plus the block's share of its scale."""
    return bits + 8 * scale_dtype.itemsize / block


def scale_range(scale_dtype: torch.dtype) -> float:
    """The largest block absmax ``scale_dtype`` can code (fp16's largest value for ``E5M3``)."""
    return torch.finfo(torch.float16 if scale_dtype == E5M3 else scale_dtype).max


def scale_values(absmax: torch.Tensor) -> torch.Tensor:
    """Stored block scales as float32 values (``E5M3`` bytes decoded; others converted)."""
    if absmax.dtype == E5M3:
        return (absmax.to(torch.int16) << 7).view(torch.float16).float()
    return absmax.float()


def _e5m3_bytes(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 absmax (finite, at most fp16's largest) to the nearest ``E5M3`` byte: the nearest fp16
    (ties to even), then the nearest multiple of 128 of its bits (ties up), at most 0xF7. fp16 bit
    patterns grow with the value, so rounding the bits rounds the value, across exponents too."""
    bits = _round_nearest(absmax, torch.float16).to(torch.float16).view(torch.int16).to(torch.int32)
    return ((bits + 64) >> 7).clamp(max=E5M3_MAX_BYTE).to(torch.uint8)


def _coding_scale(absmax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The fp32 scale a block is coded against: its absmax rounded up to ``scale_dtype`` (so
    ``|x / s| <= 1``), or for ``E5M3`` to the nearest byte (its largest elements may then exceed
    the scale by up to 6.6% and take the outermost level). Exactly the value stored."""
    if scale_dtype == E5M3:
        return scale_values(_e5m3_bytes(absmax))
    return _round_up(absmax, scale_dtype)


def _stored(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales that ``scale_dtype`` represents exactly, in ``scale_dtype``."""
    if scale_dtype == E5M3:
        return (scale.to(torch.float16).view(torch.int16) >> 7).to(torch.uint8)
    return scale.to(scale_dtype)


def _check_input(x: torch.Tensor, codebook: torch.Tensor, block: int, axis: int, scale_dtype: torch.dtype) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"can only quantize floating-point tensors {FLOAT_DTYPES}, got {x.dtype}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor; it has no axis to block")
    check_args(block=block, axis=axis, ndim=x.dim(), min_block=0)
    bits = check_codebook(codebook)
    n = x.shape[axis]
    if block < MIN_BLOCK or n % block:
        raise ValueError(
            f"block must be >= {MIN_BLOCK} and divide the blocked axis (axis {axis}, size {n}); got {block}."
            f" Allowed blocks here: {[b for b in range(MIN_BLOCK, n + 1) if n % b == 0] or 'none'}"
        )
    m = codes_per_row_multiple(bits)
    if x.shape[-1] % m:
        raise ValueError(
            f"{bits}-bit codes are packed along the last axis, whose size must be a multiple of {m};"
            f" got shape {tuple(x.shape)}"
        )
    if codebook.device != x.device:
        raise ValueError(f"codebook is on {codebook.device} but the input is on {x.device}")
    return bits


def _check_finite(x: torch.Tensor, absmax: torch.Tensor) -> None:
    # NaN and Inf propagate into their block's absmax, so the (64x smaller) absmax is what is
    # checked; the input is searched only to word the error. Skipped inside a compiled graph,
    # where a data-dependent branch would break it.
    if torch.compiler.is_compiling() or bool(torch.isfinite(absmax).all()):
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):  # finite float64 input beyond the float32 range the blocks are coded in
        raise ValueError(
            f"input has values beyond the float32 range (largest magnitude {float(x.abs().max()):.4g});"
            " blocks are coded in float32, so scale the input down first"
        )
    first = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"input has {int(bad.sum())} non-finite value(s) (NaN or Inf); the first at index {first}."
        " Quantization cannot represent them; clean or clamp the input first."
    )


def _check_blocks(x: torch.Tensor, absmax: torch.Tensor, scale_dtype: torch.dtype) -> None:
    """:func:`_check_finite` and :func:`_check_scale_range` with one host read when all is well (on
    a GPU each read is a host-device sync; the cache quantizes a token per layer and step): NaN
    fails ``absmax <= max`` as an absmax beyond the range does, and Inf is beyond it."""
    if torch.compiler.is_compiling() or not absmax.numel() or absmax.is_meta:
        return
    if bool((absmax <= scale_range(scale_dtype)).all()):
        return
    _check_finite(x, absmax)
    _check_scale_range(absmax, scale_dtype)


_RANGE_NAMES = {E5M3: "E5M3 (uint8) scales' (fp16's)"}


def _check_scale_range(absmax: torch.Tensor, scale_dtype: torch.dtype) -> None:
    top = scale_range(scale_dtype)
    if not torch.compiler.is_compiling() and absmax.numel() and not absmax.is_meta and bool(absmax.max() > top):
        raise ValueError(
            f"a block's absmax {float(absmax.max()):.4g} exceeds the"
            f" {_RANGE_NAMES.get(scale_dtype, scale_dtype)} range;"
            " pass scale_dtype=torch.float32"
        )


def _check_feedback(x: torch.Tensor, axis: int, feedback: torch.Tensor, fit_scale: bool) -> None:
    d = x.shape[-1]
    if fit_scale:
        raise ValueError("feedback rounding keeps absmax scales; it cannot be combined with fit_scale=True")
    if axis != x.dim() - 1 or x.dim() < 2:
        raise ValueError(f"feedback rounding needs blocks along the last axis of (..., n, d) rows, got axis {axis}")
    if feedback.shape[-2:] != (d, d) or feedback.dim() > x.dim() or feedback.device != x.device:
        raise ValueError(
            f"feedback must be (..., {d}, {d}) matrices for rows of {d} on {x.device}, broadcastable to"
            f" {tuple(x.shape[:-2])}, got {tuple(feedback.shape)} on {feedback.device}"
        )
    torch.broadcast_shapes(feedback.shape[:-2], x.shape[:-2])


def _spacing(t: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The ``scale_dtype`` (fp16) spacing at each value's exponent, in fp32."""
    finfo = torch.finfo(scale_dtype)
    _, exponent = torch.frexp(t)
    mantissa_bits = int(-math.log2(finfo.eps))  # 10 for fp16
    min_exponent = int(math.log2(finfo.tiny)) + 1  # subnormals share the smallest normal spacing
    return torch.exp2((exponent.clamp(min=min_exponent) - 1 - mantissa_bits).float())


def _round_up(absmax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``absmax`` rounded up to ``scale_dtype`` (float32 in, float32 out, exactly representable);
    the range is the caller's to check (:func:`_check_blocks`)."""
    if scale_dtype == torch.float32:
        return absmax
    # Ceil to a multiple of the fp16 spacing at the value's exponent, all in exact fp32 arithmetic.
    # A cast would round to nearest (possibly down, so |x / s| > 1), and torch.compile may fuse a
    # cast round trip away; with this the fp32 scale used for coding equals the stored fp16 one.
    spacing = _spacing(absmax, scale_dtype)
    return torch.ceil(absmax / spacing) * spacing


def _round_nearest(t: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to the nearest ``scale_dtype`` value, ties to even (float32 in and out, exact,
    for the reason :func:`_round_up` gives); the range is the caller's to check."""
    if scale_dtype == torch.float32:
        return t
    spacing = _spacing(t, scale_dtype)
    return torch.round(t / spacing) * spacing


# Clipping ratios that fitted scales try (``fit_scale=True``): codes against ``r * absmax``.
FIT_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _fit_ratios(device: torch.device) -> torch.Tensor:
    return torch.tensor(FIT_RATIOS, dtype=torch.float32, device=device)


def _fitted_codes(xb: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, thresholds: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and fp32 scales of blocks ``xb (..., block)`` with fitted scales (see quantize_blockwise)."""
    ratios = _fit_ratios(xb.device)
    s = absmax.unsqueeze(-1).unsqueeze(-1) * ratios[:, None]  # (..., R, 1): fp32, as the native kernel
    y = xb.unsqueeze(-2) / torch.where(s > 0, s, 1.0)
    codes = torch.bucketize(y, thresholds)  # (..., R, block)
    x64, q64 = xb.double().unsqueeze(-2), codebook.double()[codes]
    xx, xq, qq = (x64 * x64).sum(-1), (x64 * q64).sum(-1), (q64 * q64).sum(-1)
    t = torch.where(xq > 0, xx / torch.where(xq > 0, xq, 1.0), 0.0)
    err = xx - 2.0 * t * xq + t * t * qq
    best = err.argmin(dim=-1, keepdim=True)  # the first of equal errors, as the native kernel
    codes = codes.gather(-2, best.unsqueeze(-1).expand(*best.shape, xb.shape[-1])).squeeze(-2)
    return codes, t.gather(-1, best).squeeze(-1).float()


def feedback_matrix(metric: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The error-feedback matrix of a row metric ``H`` ``(..., d, d)`` for ``quantize_blockwise``.

    ``U``, upper triangular with ``U^T U = (H + damp * mean(diag H) * I)^-1``: coding a row element
    by element and moving each rounding error onto the elements not yet coded along ``U`` minimises
    ``e^T H e`` greedily (the GPTQ / OBQ update) instead of ``|e|^2``. The damping keeps ``H``
    invertible when it was measured on few samples. float32.
    """
    h = metric.double()
    d = h.shape[-1]
    h = h + damp * h.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(d, dtype=h.dtype,
                                                                                        device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


@torch.library.custom_op("nqkv::feedback_codes", mutates_args=())
def feedback_codes(x: torch.Tensor, scale: torch.Tensor, feedback: torch.Tensor, thresholds: torch.Tensor,
                   codebook: torch.Tensor) -> torch.Tensor:
    """Unpacked uint8 codes of rows ``x (..., n, d)`` (fp32) with element scales ``scale`` (same
    shape), coded in order along the row with each rounding error fed forward along ``feedback
    (..., d, d)``, one matrix per leading index. A custom op: :func:`feedback_loop` serves every
    device, and :mod:`nqkv_core.ops.triton_quantize` registers a one-program-per-row CUDA kernel."""
    return feedback_loop(x, scale, feedback, thresholds, codebook)


def feedback_loop(x: torch.Tensor, scale: torch.Tensor, feedback: torch.Tensor, thresholds: torch.Tensor,
                  codebook: torch.Tensor) -> torch.Tensor:
    """The torch body of :func:`feedback_codes` (and the reference of its kernels)."""
    w = x.clone()
    u = feedback.unsqueeze(-3)  # (..., 1, d, d): one matrix for the n rows
    safe = torch.where(scale > 0, scale, 1.0)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for i in range(x.shape[-1]):
        c = torch.bucketize(w[..., i] / safe[..., i], thresholds)
        codes[..., i] = c.to(torch.uint8)
        err = (w[..., i] - codebook[c] * scale[..., i]) / u[..., i, i]
        w[..., i + 1:] -= err.unsqueeze(-1) * u[..., i, i + 1:]
    return codes


@feedback_codes.register_fake
def _(x, scale, feedback, thresholds, codebook):
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


def _midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """The fp32 midpoints between consecutive levels (a code is the number of them below ``x / s``).

    Remembered on the codebook tensor (by version), since the cache quantizes a token per layer and
    step; inside a traced graph they are computed.
    """
    if torch.compiler.is_compiling() or type(codebook) is not torch.Tensor:
        return (codebook[1:] + codebook[:-1]).float() / 2
    cached = codebook.__dict__.get("_nqkv_midpoints")
    if cached is None or cached[0] != codebook._version:
        cached = (codebook._version, (codebook[1:] + codebook[:-1]).float() / 2)
        codebook.__dict__["_nqkv_midpoints"] = cached
    return cached[1]


def quantize_blockwise(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block: int = 64,
    axis: int = -1,
    scale_dtype: torch.dtype = torch.float16,
    fit_scale: bool = False,
    feedback: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` in blocks of ``block`` elements along ``axis``.

    Args:
        x: floating-point tensor (fp32, fp16, bf16 or fp64), finite.
        codebook: ascending levels in ``[-1, 1]``, ``2**bits`` of them (see :mod:`nqkv_core.codebook`).
        block: elements per block (>= 8, dividing ``x.shape[axis]``).
        axis: the blocked axis.
        scale_dtype: dtype of the stored per-block absmax: fp16, fp32, or :data:`E5M3` (one byte).
        fit_scale: store a fitted scale instead of the absmax. For each clipping ratio ``r`` in
            :data:`FIT_RATIOS` the block is coded against ``r * absmax`` (elements beyond it take
            the outermost level), and the scale ``t = sum(x^2) / sum(x * level)`` makes the decoded
            block unbiased (``sum(x * xhat) = sum(x^2)``); the ratio whose codes give the smallest
            squared error with their ``t`` is kept, and ``t`` is rounded to the nearest
            ``scale_dtype`` value. Decode with the plain levels (the scale carries the gain). The
            error is then no longer bounded element by element, but a block's squared error is at
            most that of its absmax codes with their fitted ``t``.
        feedback: error-feedback rounding (blocks along the last axis, ``x`` of shape
            ``(..., n, d)``): ``(..., d, d)`` upper-triangular matrices from :func:`feedback_matrix`,
            one for the ``n`` rows of each leading index. Each row is coded element by element and
            each rounding error is moved onto the elements not yet coded, so that the row's error
            is small in the metric the matrix came from rather than element by element. Scales stay
            the absmax of the input's blocks (elements pushed beyond take the outermost level).
            Excludes ``fit_scale``.

    Returns:
        ``(codes, absmax)``: packed uint8 codes and per-block scales (shapes in the module docstring).

    Raises:
        TypeError: non-floating input.
        ValueError: NaN/Inf in the input, a bad block, axis, codebook or scale dtype, or an absmax
            beyond the fp16 range with ``scale_dtype=float16``.
    """
    bits = _check_input(x, codebook, block, axis, scale_dtype)
    axis = axis % x.dim()
    if feedback is not None:
        _check_feedback(x, axis, feedback, fit_scale)
    if fit_scale and scale_dtype == E5M3:  # (a fitted scale moved by up to 6% would undo the fit)
        raise ValueError("fit_scale=True stores fitted scales in float16 or float32, not E5M3 (uint8) bytes")
    thresholds = _midpoints(codebook)
    if axis == x.dim() - 1 and x.device.type == "cpu":  # (no conversion copy for other devices)
        xc = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).contiguous()
        if scale_dtype in KERNEL_SCALE_DTYPES and native.quantize_rows_supported(xc, bits, block):  # one fused pass
            fit = (codebook, _fit_ratios(x.device)) if fit_scale else None
            fb = None if feedback is None else (codebook, feedback.float().expand(*x.shape[:-2], *feedback.shape[-2:]))
            codes, absmax, bad = native.quantize_rows(xc, thresholds, bits, block, native.scale_format(scale_dtype),
                                                      scale_range(scale_dtype), fit, fb)
            if bad:  # NaN/Inf or a scale beyond fp16: the checks below word the error
                _check_finite(x, absmax)
                _check_scale_range(absmax, scale_dtype)
            return codes, _stored(absmax, scale_dtype)
    xb = x.float().movedim(axis, -1).contiguous()
    xb = xb.reshape(*xb.shape[:-1], xb.shape[-1] // block, block)
    absmax = xb.abs().amax(dim=-1)
    _check_blocks(x, absmax, scale_dtype)
    if fit_scale:
        codes, absmax = _fitted_codes(xb, absmax, codebook, thresholds)
        absmax = _round_nearest(absmax, scale_dtype)
        _check_scale_range(absmax, scale_dtype)
    elif feedback is not None:
        absmax = _coding_scale(absmax, scale_dtype)
        scale = absmax.unsqueeze(-1).expand(xb.shape).flatten(-2)
        codes = feedback_codes(xb.flatten(-2), scale.contiguous(), feedback.float(), thresholds, codebook.float())
        codes = codes.reshape(xb.shape)
    else:
        absmax = _coding_scale(absmax, scale_dtype)
        s = absmax.unsqueeze(-1)
        y = xb / torch.where(s > 0, s, 1.0)  # a zero block stays zero; its scale decodes it to zero
        codes = torch.bucketize(y, thresholds)
    codes = codes.to(torch.uint8).flatten(-2).movedim(-1, axis)
    return pack(codes, bits), _stored(absmax, scale_dtype).movedim(-1, axis)


def quantize_packed(
    x: torch.Tensor,
    codebook: torch.Tensor,
    block: int = 64,
    axis: int = -1,
    scale_dtype: torch.dtype = torch.float16,
    fit_scale: bool = False,
    feedback: torch.Tensor | None = None,
) -> Packed:
    """:func:`quantize_blockwise` with its result as one :class:`~nqkv_core.packed.Packed`
    (``codebook``, ``block`` and ``axis`` with the codes and scales). Same arguments and errors."""
    codes, absmax = quantize_blockwise(x, codebook, block, axis, scale_dtype, fit_scale, feedback)
    return Packed(codes, absmax, codebook, block, axis)


def dequantize_packed(packed: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`dequantize_blockwise` of one :class:`~nqkv_core.packed.Packed`. Same errors."""
    return dequantize_blockwise(packed.codes, packed.absmax, packed.codebook, packed.block, packed.axis, dtype)


def _byte_table(codebook: torch.Tensor, bits: int) -> torch.Tensor:
    # For 2/4/8 bits each byte holds whole codes: one gather per byte yields 8 // bits levels.
    byte = torch.arange(256, dtype=torch.uint8, device=codebook.device).unsqueeze(-1)
    return codebook.float()[unpack(byte, bits).long()]  # (256, 8 // bits)


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    codebook: torch.Tensor,
    block: int = 64,
    axis: int = -1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``codebook[code] * absmax`` in ``dtype``.

    Products beyond the finite range of ``dtype`` saturate to ``±torch.finfo(dtype).max``: an
    unbiased codebook's levels reach a little past ±1, so a block whose scale is near the top of the
    range (or a float32 scale decoded to float16) can decode beyond it. Finite codes and scales never
    give ``inf``. The products are computed in float32 (float64 for ``dtype=torch.float64``).

    Raises:
        TypeError: ``codes`` not uint8, ``dtype`` not floating, or a non-int ``block`` / ``axis``.
        ValueError: a bad codebook, ``block`` below 1, or ``codes`` and ``absmax`` shapes that do
            not match ``block`` and ``axis``.
    """
    bits = check_codebook(codebook)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype {FLOAT_DTYPES} to decode into, got {dtype}")
    if not (absmax.dtype.is_floating_point or absmax.dtype == E5M3):
        raise TypeError(f"absmax must be floating point or E5M3 (uint8) bytes, got {absmax.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one axis, got a 0-d tensor")
    check_args(block=block, axis=axis, ndim=codes.dim())
    axis = axis % codes.dim()
    shape = list(codes.shape)
    shape[-1] = shape[-1] * 8 // bits
    expected = list(shape)
    expected[axis] = shape[axis] // block if shape[axis] % block == 0 else -1
    if list(absmax.shape) != expected:
        raise ValueError(
            f"absmax shape {tuple(absmax.shape)} does not match codes {tuple(codes.shape)} with"
            f" {bits}-bit codes, block {block} along axis {axis} (expected {tuple(expected)})"
        )
    if axis == codes.dim() - 1 and native.dequantize_rows_supported(codes, absmax, codebook, bits, block, dtype):
        out = native.dequantize_rows(codes, absmax, codebook, bits, block, dtype)
        return out.clamp_(*_finite_range(dtype)) if _may_overflow(codebook, absmax.dtype, dtype) else out
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    if bits == 3:
        values = codebook.to(cdt)[unpack(codes, bits).long()]
    else:
        values = _byte_table(codebook, bits).to(cdt)[codes.long()].flatten(-2)
    blocked = shape[:axis] + [shape[axis] // block, block] + shape[axis + 1 :]
    out = values.view(blocked) * scale_values(absmax).to(cdt).unsqueeze(axis + 1)
    if _may_overflow(codebook, absmax.dtype, dtype):
        out = out.clamp_(*_finite_range(dtype))
    return out.view(shape).to(dtype)


_FINITE_MAX = {t: torch.finfo(t).max for t in (*FLOAT_DTYPES, *SCALE_DTYPES) if t != E5M3} | {E5M3: E5M3_MAX}


def _finite_range(dtype: torch.dtype) -> tuple[float, float]:
    return -_FINITE_MAX[dtype], _FINITE_MAX[dtype]


def _may_overflow(codebook: torch.Tensor, scale_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether a level times a ``scale_dtype`` scale can pass the finite range of ``dtype`` (or of
    float32, where the products are computed); assumed where the levels are not known (tracing)."""
    top = max_abs_level(codebook)
    limit = _FINITE_MAX[dtype] if dtype != torch.float64 else math.inf
    return top is None or top * _FINITE_MAX.get(scale_dtype, math.inf) > limit


def decision_thresholds(codebook: torch.Tensor) -> torch.Tensor:
    """The fp32 thresholds between consecutive levels of a sorted ``codebook`` (``2**bits - 1``): a
    value's code is the number of thresholds below ``x / scale`` (what every encoder compares with)."""
    return _midpoints(codebook)


def fit_ratios(device: torch.device | str = "cpu") -> torch.Tensor:
    """The clipping ratios ``r`` that fitted scales (``fit_scale=True``) try, codes against ``r * absmax``."""
    return _fit_ratios(device)
