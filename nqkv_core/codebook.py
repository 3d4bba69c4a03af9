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

Codebooks are built once per ``(kind, bits, block)`` in float64 outside any traced graph and then
cached per device and dtype, so quantizing never rebuilds them.
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


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


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
        ValueError: if ``bits`` is not one of 2, 3, 4 or 8.
    """
    _check_bits(bits)
    return torch.tensor(_nf_levels(bits), dtype=torch.float32)


def lloyd_max_codebook(bits: int, block: int) -> torch.Tensor:
    """Levels minimising E[(x - s*q(x/s))^2], s = absmax, for i.i.d. N(0,1) blocks of ``block``.

    Symmetric about zero (no exact zero level when the count is even; all-zero blocks still decode
    to zeros because their scale is zero). Computed once per ``(bits, block)`` with a fixed seed.

    Raises:
        ValueError: if ``bits`` is not one of 2, 3, 4 or 8, or ``block`` is below 2.
    """
    _check_bits(bits)
    if block < 2:
        raise ValueError(f"block must be at least 2, got {block}")
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
    _check_bits(bits)
    if block < 2:
        raise ValueError(f"block must be at least 2, got {block}")
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
    if block < 2:
        raise ValueError(f"block must be at least 2, got {block}")
    return _gain(tuple(float(v) for v in codebook.double().cpu()), block)


# A plain dict rather than lru_cache: torch.compile looks through lru_cache wrappers and would trace
# the scipy construction; a dict lookup of an already-built codebook traces to a constant.
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
    caller. Build codebooks eagerly before compiling code that asks for them.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (kind, bits, block if kind == "lloyd" or unbiased else 0, device, dtype, unbiased)
    codebook = _CODEBOOK_CACHE.get(key)
    if codebook is None:
        if kind == "nf":
            levels = nf_codebook(bits)
        elif kind == "lloyd":
            levels = lloyd_max_codebook(bits, block)
        else:
            raise ValueError(f"codebook kind must be 'nf' or 'lloyd', got {kind!r}")
        if unbiased:
            levels = (levels.double() * unbiased_gain(levels, block)).float()
        codebook = _CODEBOOK_CACHE[key] = levels.to(device=device, dtype=dtype)
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
