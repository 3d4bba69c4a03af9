"""Normal-quantile codebooks.

A codebook is a sorted float32 tensor of ``2**bits`` levels in ``[-1, 1]`` (an unbiased one, below,
reaches a little beyond). An element ``x`` of a block with absolute maximum ``s`` is stored as the
index of the level nearest to ``x / s`` and decoded as ``level * s``.

Two kinds:

* ``"nf"`` -- the normal-float levels of QLoRA / bitsandbytes: quantiles of N(0, 1) with an exact
  zero, scaled to ``[-1, 1]``. For 4 bits they are bitsandbytes' NF4 table.
* ``"lloyd"`` -- the levels that minimise the expected squared error of ``x / absmax(block)`` for
  i.i.d. Gaussian blocks of a given size (Lloyd-Max on that distribution). NF levels are quantiles
  of N(0, 1), but what is coded is ``x / absmax``, whose spread shrinks as blocks grow (the absmax of
  64 Gaussian samples is about 2.4 sigma); these levels account for that.

Unbiased decoding (``get_codebook(..., unbiased=True)``): a quantizer that rounds to the nearest
level shrinks what it decodes on average -- for Gaussian blocks ``E[x * xhat] = slope * E[x^2]``
with a slope below one in blocks of 16 or more (0.99 for NF3 in blocks of 64, 0.88 for 2-bit
Lloyd-Max). Attention adds up hundreds of decoded keys and values, so a shrink that is the same
for every token does not average out the way rounding noise does: it flattens the softmax and
scales the output. The unbiased
codebook decodes with the levels divided by that slope (:func:`unbiased_gain`); codes are still
chosen against the plain levels, so the codes and scales are the same and only the decoded values
change.

Codebooks are built once per ``(kind, bits, block)`` in float64 and then cached per device and dtype,
so quantizing never rebuilds them. ``torch.compile`` does not trace the construction: the levels are
an ``assume_constant_result`` function, called eagerly while tracing, and the graph holds them as a
constant. User codebooks are checked where they enter (:func:`check_codebook`).
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch

CodebookKind = Literal["nf", "lloyd"]
SUPPORTED_BITS = (2, 3, 4, 8)
_LLOYD_SAMPLES = 1 << 21  # Gaussian samples behind a Lloyd-Max codebook (fixed seed).
_LLOYD_ITERS = 200


CODEBOOK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_int(v: object) -> bool:
    return type(v) is int or (isinstance(v, (int, np.integer, torch.SymInt)) and not isinstance(v, bool))


def _not_int(name: str, v: object) -> TypeError:
    return TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")


def check_args(*, bits: object = None, block: object = None, axis: object = None, ndim: int | None = None,
               min_block: int = 1) -> None:
    """Check the integer layout arguments of a public entry point; ``None`` skips one.

    Args:
        bits: must be one of :data:`SUPPORTED_BITS`.
        block: must be an int of at least ``min_block``.
        axis: must be an int in ``[-ndim, ndim)`` (the range is checked when ``ndim`` is given).

    Raises:
        TypeError: an argument that is not an int (floats and bools included).
        ValueError: an int out of its range.
    """
    if bits is not None:
        if not _is_int(bits):
            raise _not_int("bits", bits)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if block is not None:
        if not _is_int(block):
            raise _not_int("block", block)
        if block < min_block:
            raise ValueError(f"block must be at least {min_block}, got {block}")
    if axis is not None:
        if not _is_int(axis):
            raise _not_int("axis", axis)
        if ndim is not None and not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} is out of range for a {ndim}-d tensor")


def _levels_known(codebook: torch.Tensor) -> bool:
    """Whether the levels can be read: not while tracing (fake or compiled) nor on the meta device."""
    return not (torch.compiler.is_compiling() or type(codebook) is not torch.Tensor or codebook.is_meta)


# Remembered on a codebook tensor whose levels were checked: (version, bits, largest |level|).
_CHECKED = "_nqkv_codebook_checked"


def _checked(codebook: object) -> tuple | None:
    """What :func:`check_codebook` remembered of this unchanged tensor, if anything (eager only)."""
    if torch.compiler.is_compiling() or type(codebook) is not torch.Tensor or codebook.is_inference():
        return None
    cached = codebook.__dict__.get(_CHECKED)
    return cached if cached is not None and cached[0] == codebook._version else None


def check_codebook(codebook: object, bits: int | None = None, levels: bool = True) -> int:
    """Check a codebook tensor and return its bits per code.

    A codebook is a 1-D floating tensor (fp32 preferred) of ``2**bits`` finite, ascending levels for
    ``bits`` in :data:`SUPPORTED_BITS`. The levels are read once per tensor (remembered with its
    version counter, so an in-place change is checked again; a tensor checked before costs a
    lookup), and not at all while tracing (``torch.compile``, fake tensors) or on the meta device,
    where they are not known.

    Args:
        codebook: the levels.
        bits: if given, the bits the caller expects.
        levels: whether to check the levels too (``False``: shape and dtype only).

    Raises:
        TypeError: ``codebook`` is not a tensor.
        ValueError: a wrong dtype, shape or size (or one that disagrees with ``bits``), a NaN or
            infinite level, or levels not in ascending order.
    """
    cached = _checked(codebook)
    if cached is not None and (bits is None or bits == cached[1]):
        return cached[1]
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a tensor or a codebook kind, got {type(codebook).__name__}")
    if codebook.dtype not in CODEBOOK_DTYPES:
        raise ValueError(f"codebook must be a floating tensor {CODEBOOK_DTYPES}, got {codebook.dtype}")
    n = codebook.numel()
    found = n.bit_length() - 1
    if codebook.dim() != 1 or n != 2**found or found not in SUPPORTED_BITS:
        allowed = [2**b for b in SUPPORTED_BITS]
        raise ValueError(f"codebook must be 1-D with {allowed} levels, got shape {tuple(codebook.shape)}")
    if bits is not None and found != bits:
        raise ValueError(f"codebook has {n} levels but bits={bits}")
    if levels and _levels_known(codebook):
        _check_levels(codebook, found)
    return found


def _check_levels(codebook: torch.Tensor, bits: int) -> None:
    levels = codebook.detach().double().cpu()
    if not bool(torch.isfinite(levels).all()):
        raise ValueError(f"codebook has non-finite levels (NaN or Inf): {levels.tolist()}")
    if bool((levels[1:] < levels[:-1]).any()):
        raise ValueError("codebook levels must be in ascending order; pass torch.sort(codebook).values")
    if not codebook.is_inference():
        codebook.__dict__[_CHECKED] = (codebook._version, bits, float(levels.abs().max()))


def max_abs_level(codebook: torch.Tensor) -> float | None:
    """The largest ``|level|`` of ``codebook`` (checked as :func:`check_codebook` does), or ``None``
    where the levels are not known (tracing, meta device)."""
    cached = _checked(codebook)
    if cached is not None:
        return cached[2]
    if not _levels_known(codebook):
        return None
    check_codebook(codebook)
    cached = _checked(codebook)
    return float(codebook.detach().abs().max()) if cached is None else cached[2]  # (inference tensors)


@functools.lru_cache(maxsize=None)
def _nf_levels(bits: int) -> tuple[float, ...]:
    # QLoRA eq. 4 as bitsandbytes' create_normal_map builds it: 2**(bits-1) positive quantiles and
    # 2**(bits-1) - 1 negative ones, each half from its own linspace so that zero is exact.
    # The offset halves the gap between the two halves' outermost quantiles (0.9677083 for 4 bits).
    from scipy.stats import norm  # here, not at module level: scipy.stats takes ~0.5 s to import

    n_pos = 2 ** (bits - 1)
    n_neg = n_pos - 1
    offset = 1.0 - 0.5 * (1.0 / (2 * 2**bits) + 1.0 / (2 * (2**bits - 1)))
    pos = norm.ppf(np.linspace(offset, 0.5, n_pos + 1)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, n_neg + 1)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    levels = levels / np.abs(levels).max()
    return tuple(float(v) for v in levels)


def _gaussian_blocks(block: int, n: int, seed: int, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(y, s)``: ``y = x / s`` with ``s = absmax(block)`` for i.i.d. N(0,1) blocks, per element.

    ``signed``: ``s`` is the block's largest-magnitude element with its sign (so its ``y`` is 1).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((max(n // block, 1), block))
    s = np.abs(x).max(axis=1, keepdims=True)
    if signed:
        s = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    return (x / s).ravel(), np.broadcast_to(s, x.shape).ravel()


def _weighted_lloyd(y: np.ndarray, w: np.ndarray, levels: np.ndarray, pin_top: bool = False) -> np.ndarray:
    """Weighted Lloyd-Max iterations over samples ``y`` (weights ``w``) from ``levels``; ascending.

    ``pin_top`` keeps the top level where it is (its cell's samples still decode to it).
    """
    order = np.argsort(y, kind="stable")
    y, w = y[order], w[order]
    wsum = np.concatenate([[0.0], np.cumsum(w)])
    wysum = np.concatenate([[0.0], np.cumsum(w * y)])
    for _ in range(_LLOYD_ITERS):
        edges = np.searchsorted(y, (levels[1:] + levels[:-1]) / 2)
        lo = np.concatenate([[0], edges])
        hi = np.concatenate([edges, [len(y)]])
        mass = wsum[hi] - wsum[lo]
        centroids = (wysum[hi] - wysum[lo]) / np.maximum(mass, 1e-300)
        new = np.where(mass > 0, centroids, levels)
        if pin_top:
            new[-1] = levels[-1]
        if np.allclose(new, levels, rtol=0, atol=1e-9):
            break
        levels = new
    return np.sort(levels)


@functools.lru_cache(maxsize=None)
def _lloyd_levels(bits: int, block: int) -> tuple[float, ...]:
    # The error that matters is in the data's units: (x - s*q(y))^2 = s^2 (y - q(y))^2, so each
    # normalised sample is weighted by its block's s^2 (weighted Lloyd iterations, symmetrised).
    y, s = _gaussian_blocks(block, _LLOYD_SAMPLES, seed=0)
    y, w = np.concatenate([y, -y]), np.concatenate([s, s]) ** 2
    levels = _weighted_lloyd(y, w, np.asarray(_nf_levels(bits)) * 0.9)  # NF is a good start
    levels = np.clip((levels - levels[::-1]) / 2, -1.0, 1.0)  # exactly symmetric, as the data are
    return tuple(float(v) for v in levels)


def nf_codebook(bits: int) -> torch.Tensor:
    """The normal-float (NF) levels for ``bits`` bits, float32, ascending, in ``[-1, 1]``.

    Zero is exact and ``-1`` and ``1`` are levels. For ``bits=4`` this is bitsandbytes' NF4 table.

    Raises:
        TypeError: ``bits`` is not an int.
        ValueError: if ``bits`` is not one of 2, 3, 4 or 8.
    """
    check_args(bits=bits)
    return torch.tensor(_nf_levels(bits), dtype=torch.float32)


def lloyd_max_codebook(bits: int, block: int) -> torch.Tensor:
    """Levels minimising E[(x - s*q(x/s))^2], s = absmax, for i.i.d. N(0,1) blocks of ``block``.

    Symmetric about zero (no exact zero level when the count is even; all-zero blocks still decode
    to zeros because their scale is zero). Computed once per ``(bits, block)`` with a fixed seed.

    Raises:
        TypeError: ``bits`` or ``block`` is not an int.
        ValueError: if ``bits`` is not one of 2, 3, 4 or 8, or ``block`` is below 2.
    """
    check_args(bits=bits, block=block, min_block=2)
    return torch.tensor(_lloyd_levels(bits, block), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _signed_levels(bits: int, block: int) -> tuple[float, ...]:
    # As _lloyd_levels, on the elements other than each block's largest, which a signed scale puts
    # exactly on the pinned top level 1.
    y, s = _gaussian_blocks(block, _LLOYD_SAMPLES, seed=0, signed=True)
    rest = y < 1
    y, w = np.concatenate([y[rest], -y[rest]]), np.concatenate([s[rest], s[rest]]) ** 2
    free = np.quantile(y, (np.arange(2**bits - 1) + 0.5) / (2**bits - 1))
    return tuple(float(v) for v in _weighted_lloyd(y, w, np.append(free, 1.0), pin_top=True))


def signed_codebook(bits: int, block: int, unbiased: bool = False) -> torch.Tensor:
    """Levels for blocks scaled by their largest-magnitude element *with its sign* (evaluation only).

    That element always lands on the top level, 1, so no level is spent on -1: the other
    ``2**bits - 1`` levels are Lloyd-Max for the rest of an i.i.d. Gaussian block. Coding needs the
    signed scale, which :func:`nqkv_core.quantize.quantize_blockwise` and the kernels' cache path
    do not produce; :func:`nqkv_core.scheme.quantize_roundtrip` evaluates it (``quant="signed"``).
    ``unbiased`` multiplies the levels by their gain on such blocks (:func:`unbiased_gain`).
    """
    check_args(bits=bits, block=block, min_block=2)
    levels = torch.tensor(_signed_levels(bits, block), dtype=torch.float64)
    if unbiased:
        levels = levels * _gain(tuple(levels.tolist()), block, signed=True)
    return levels.float()


@functools.lru_cache(maxsize=None)
def _gain(levels: tuple[float, ...], block: int, signed: bool = False) -> float:
    y, s = _gaussian_blocks(block, 1 << 21, seed=2, signed=signed)  # not the seed Lloyd fits on
    lv = np.asarray(levels)
    x_hat = lv[np.searchsorted((lv[1:] + lv[:-1]) / 2, y)]
    x = y * s
    return float(np.dot(x, x) / np.dot(x, x_hat * s))


def unbiased_gain(codebook: torch.Tensor, block: int) -> float:
    """``1 / slope`` of ``codebook`` on i.i.d. N(0,1) blocks of ``block``: ``E[x^2] / E[x * xhat]``.

    Decoding with the levels times this gain makes the decoded blocks unbiased in dot products
    (``E[x * gain * xhat] = E[x^2]``). Above one for blocks of 16 or more (1.011 for NF3, 1.134 for
    2-bit Lloyd-Max in blocks of 64); NF2, whose outer levels overshoot, gets 0.998 in blocks of 8.
    Estimated once per ``(levels, block)`` on 2**21 samples with a fixed seed.
    """
    check_codebook(codebook)
    check_args(block=block, min_block=2)
    return _gain(tuple(float(v) for v in codebook.double().cpu()), block)


def _constant_result(fn):
    """``torch._dynamo.assume_constant_result`` without importing the compiler stack on import: that
    decorator only sets this flag, which makes dynamo call ``fn`` eagerly and keep its result as a
    constant (``tests/test_tensor.py`` compiles through it, ``tests/test_imports.py`` checks imports)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def _codebook_levels(kind: str, bits: int, block: int, unbiased: bool) -> tuple[float, ...]:
    """The float32 levels of a codebook kind as Python floats. A constant to ``torch.compile``:
    it calls this eagerly (numpy, scipy, lru caches) instead of tracing it."""
    if kind == "nf":
        levels = nf_codebook(bits)
    else:
        levels = lloyd_max_codebook(bits, block)
    if unbiased:
        levels = (levels.double() * unbiased_gain(levels, block)).float()
    return tuple(levels.tolist())


# Built codebooks by (kind, bits, block, device, dtype, unbiased); a dict lookup of an already-built
# codebook traces to a constant.
_CODEBOOK_CACHE: dict[tuple, torch.Tensor] = {}


def get_codebook(
    kind: CodebookKind,
    bits: int,
    block: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    unbiased: bool = False,
) -> torch.Tensor:
    """Cached codebook tensor for ``(kind, bits, block, device, dtype, unbiased)``.

    ``block`` matters for ``kind="lloyd"`` and for ``unbiased``. ``unbiased=True`` gives the
    decoding levels of the unbiased codebook (the plain levels times :func:`unbiased_gain`; the top
    level is then a little above 1): quantize with the plain codebook (``unbiased=False``) and
    decode with this one. Do not modify the returned tensor in place: it is shared by every
    caller. Inside ``torch.compile`` the levels are a constant of the graph (computed eagerly
    while tracing) and the tensor is built by the graph, not cached.

    Raises:
        TypeError: ``bits`` or ``block`` is not an int.
        ValueError: an unknown ``kind``, ``bits`` not supported, ``block`` below 2.
    """
    check_args(bits=bits, block=block, min_block=2)
    if kind not in ("nf", "lloyd"):
        raise ValueError(f"codebook kind must be 'nf' or 'lloyd', got {kind!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (kind, bits, block if kind == "lloyd" or unbiased else 0, device, dtype, unbiased)
    codebook = _CODEBOOK_CACHE.get(key)
    if codebook is None:
        levels = torch.tensor(_codebook_levels(kind, bits, key[2], unbiased), dtype=torch.float32)
        codebook = levels.to(device=device, dtype=dtype)
        if not torch.compiler.is_compiling():
            _CODEBOOK_CACHE[key] = codebook
    return codebook


def max_rounding_error(codebook: torch.Tensor) -> float:
    """Largest distance from a point of ``[-1, 1]`` to its nearest level (in units of the absmax).

    Half the largest gap between neighbouring levels, or the distance from an outermost level to
    ``±1`` if that is larger. Times a block's absmax, this bounds every element's error.
    """
    levels = codebook.double().cpu()
    half_gaps = (levels[1:] - levels[:-1]) / 2
    return float(max(half_gaps.max().item(), 1 - levels[-1].item(), levels[0].item() + 1))


def expected_mse(codebook: torch.Tensor, block: int, n: int = 1 << 20) -> float:
    """Expected squared error per element of N(0,1) data quantized with ``codebook`` in blocks.

    Estimated on ``n`` samples with a fixed seed (relative error of order 1/sqrt(n)); the unit is
    the variance of the data, so the result is also the normalised MSE.
    """
    y, s = _gaussian_blocks(block, n, seed=1)  # a different seed from the one Lloyd fits on
    levels = codebook.double().cpu().numpy()
    idx = np.searchsorted((levels[1:] + levels[:-1]) / 2, y)
    return float(np.mean(((y - levels[idx]) * s) ** 2))
