"""``Packed``: one blockwise-quantized tensor (a K or a V) as the five things that describe it.

``codes``, ``absmax`` and ``codebook`` are the tensors of the storage contract (docs/design.md,
"Quantized tensors"); ``block`` and ``axis`` say how the scales are laid out. Everything that
passes a packed K or V around -- the quantizer, ``NQTensor``, the attention entry points, the
native kernels' wrapper, the cache -- passes one ``Packed``; it is flattened into plain tensors only
where a ``torch.ops.nqkv`` schema needs them (:meth:`Packed.op_args`).

The blocked axis has one spelling, counted from the end: ``-1`` blocks along the last (packed)
axis -- one token's head_dim for a ``(batch, heads, tokens, head_dim)`` K or V -- and ``-2`` along
the axis before it -- ``block`` tokens of one channel. Any int in ``[-ndim, ndim)`` is accepted at
construction and turned into that spelling there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nqkv_core.codebook import SUPPORTED_BITS, check_args

TOKEN_AXIS = -1  # blocks along head_dim, one token's row at a time
CHANNEL_AXIS = -2  # blocks of tokens, one channel at a time
SCHEME_AXES = {"token": TOKEN_AXIS, "channel": CHANNEL_AXIS}  # what KVScheme's k_axis / v_axis names mean


def codebook_size_bits(codebook: torch.Tensor) -> int:
    """Bits per code of ``codebook`` from its size alone (``2**bits`` levels; the levels are not read).

    Raises:
        TypeError: not a tensor.
        ValueError: not a 1-D tensor of 4, 8, 16 or 256 levels.
    """
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"a codebook must be a tensor, got {type(codebook).__name__}")
    n = int(codebook.numel())
    bits = n.bit_length() - 1
    if codebook.dim() != 1 or n != 1 << bits or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"a codebook must be 1-D with {[2**b for b in SUPPORTED_BITS]} levels, got shape {tuple(codebook.shape)}"
        )
    return bits


class _Fields(NamedTuple):
    codes: torch.Tensor
    absmax: torch.Tensor
    codebook: torch.Tensor
    block: int
    axis: int


class Packed(_Fields):
    """One packed tensor: ``(codes, absmax, codebook, block, axis)``, immutable.

    Fields, for a logical tensor of shape ``shape`` with ``bits``-bit codes:

    * ``codes``: uint8, ``shape`` with the last axis ``* bits / 8`` (packed along the last axis,
      :mod:`nqkv_core.packing`).
    * ``absmax``: fp16 / fp32 (fp8 outside the kernels), ``shape`` with ``axis`` divided by ``block``
      (rounded up for a partial last block of tokens).
    * ``codebook``: float32 ``(2**bits,)``, the decoding levels.
    * ``block``: elements per block; ``axis``: the blocked axis, negative (see the module docstring).

    Construction checks ``block``, ``axis`` and the codebook's size, and normalises ``axis``; the
    tensors' dtypes and shapes are the consumer's to check (each words its errors in its own terms).
    A ``Packed`` is a tuple, so ``Packed(*t)`` rebuilds one and ``*p`` unpacks it; ``axis`` defaults
    to ``-1``.

    Raises:
        TypeError: ``codes`` or ``codebook`` not a tensor, ``block`` or ``axis`` not an int.
        ValueError: a 0-d ``codes``, ``block < 1``, ``axis`` out of range, or a codebook whose size
            is not ``2**bits`` for supported ``bits``.
    """

    __slots__ = ()

    def __new__(cls, codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, block: int,
                axis: int = TOKEN_AXIS) -> "Packed":
        # (built per layer and step by the cache: the usual case is a few comparisons)
        ndim = codes.dim() if isinstance(codes, torch.Tensor) else 0
        if not (ndim and type(block) is int and type(axis) is int and block >= 1 and -ndim <= axis < ndim):
            block, axis = _checked_layout(codes, block, axis)
        if not isinstance(codebook, torch.Tensor) or int(codebook.numel()) not in _LEVELS or codebook.dim() != 1:
            codebook_size_bits(codebook)
        return super().__new__(cls, codes, absmax, codebook, block, axis - ndim if axis >= 0 else axis)

    @classmethod
    def _make(cls, iterable) -> "Packed":  # (what _replace builds with): checked as construction is
        return cls(*iterable)

    @classmethod
    def of(cls, value: "Packed | tuple") -> "Packed":
        """``value`` itself if it is a ``Packed``, else ``Packed(*value)`` (a plain 4- or 5-tuple)."""
        return value if isinstance(value, Packed) else cls(*value)

    @property
    def bits(self) -> int:
        """Bits per code, from the codebook's size."""
        return int(self.codebook.numel()).bit_length() - 1  # (int: a traced size is a SymInt)

    @property
    def shape(self) -> torch.Size:
        """The logical shape: ``codes.shape`` with the last axis unpacked."""
        c = self.codes.shape
        return torch.Size((*c[:-1], c[-1] * 8 // self.bits))

    @property
    def per_token(self) -> bool:
        """Whether blocks run along the last axis (one token's head_dim), ``axis == -1``."""
        return self.axis == TOKEN_AXIS

    def op_args(self) -> tuple:
        """The plain arguments of a ``torch.ops.nqkv`` schema: ``(codes, absmax, codebook, block,
        axis)`` with ``axis`` as the schema counts it, from the front (3 or 2 for a 4-D K or V)."""
        return self.codes, self.absmax, self.codebook, self.block, self.codes.dim() + self.axis

    def replace(self, codes: torch.Tensor, absmax: torch.Tensor) -> "Packed":
        """The same layout over other codes and scales (a slice of these, say)."""
        return self._replace(codes=codes, absmax=absmax)


_LEVELS = frozenset(1 << b for b in SUPPORTED_BITS)


def _checked_layout(codes: object, block: object, axis: object) -> tuple[int, int]:
    """``(block, axis)`` as ints (e.g. from numpy ints) if they are valid; else the error."""
    if not isinstance(codes, torch.Tensor) or codes.dim() == 0:
        kind = "a 0-d tensor" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise (ValueError if isinstance(codes, torch.Tensor) else TypeError)(
            f"packed codes must be a tensor with at least one axis, got {kind}"
        )
    check_args(block=block, axis=axis, ndim=codes.dim())
    return int(block), int(axis)
