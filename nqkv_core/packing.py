"""Bit packing of codes along the last axis.

Codes are packed along the last axis only, so a row (one token's head_dim) is a contiguous run of
bytes and tensors can be sliced and concatenated along every other axis without unpacking.

Layouts for a row of ``D`` codes (``D * bits`` must fill whole bytes):

* 8 bits: one code per byte.
* 4 bits: code ``d`` in byte ``d // 2`` at bit ``4 * (d % 2)`` (even codes in the low nibble).
* 2 bits: code ``d`` in byte ``d // 4`` at bit ``2 * (d % 4)``.
* 3 bits: two planes, eight codes in three bytes. Bytes ``[0, D/4)`` hold the low two bits of every
  code in the 2-bit layout; bytes ``[D/4, 3D/8)`` hold the high bit, code ``d`` in byte
  ``D/4 + d // 8`` at bit ``d % 8``. A kernel unpacks with two shifts and masks, never straddling a
  byte boundary.
"""

from __future__ import annotations

import torch

from nqkv_core.codebook import check_args


def codes_per_row_multiple(bits: int) -> int:
    """The row length (last-axis size) must be a multiple of this to pack ``bits``-bit codes."""
    return {8: 1, 4: 2, 2: 4, 3: 8}[bits]


def packed_row_bytes(row: int, bits: int) -> int:
    """Bytes taken by ``row`` packed codes of ``bits`` bits."""
    return row * bits // 8


def _check(last: int, bits: int) -> None:
    check_args(bits=bits)
    m = codes_per_row_multiple(bits)
    if last % m:
        raise ValueError(
            f"{bits}-bit codes are packed along the last axis, whose size must be a multiple of {m};"
            f" got {last}"
        )


def _pack_lanes(codes: torch.Tensor, lane_bits: int) -> torch.Tensor:
    # codes (..., D) uint8 with values < 2**lane_bits -> (..., D * lane_bits / 8) uint8
    per_byte = 8 // lane_bits
    lanes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = lanes[..., 0].clone()
    for i in range(1, per_byte):
        packed |= lanes[..., i] << (lane_bits * i)
    return packed


def _unpack_lanes(packed: torch.Tensor, lane_bits: int) -> torch.Tensor:
    per_byte = 8 // lane_bits
    mask = (1 << lane_bits) - 1
    shifts = torch.arange(0, 8, lane_bits, dtype=torch.uint8, device=packed.device)
    lanes = (packed.unsqueeze(-1) >> shifts) & mask
    return lanes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8`` codes (values ``< 2**bits``) along the last axis into ``uint8`` bytes.

    Raises:
        TypeError: ``bits`` is not an int.
        ValueError: ``bits`` not 2, 3, 4 or 8, or a last axis that does not fill whole bytes.
    """
    _check(codes.shape[-1], bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if bits == 3:
        return torch.cat([_pack_lanes(codes & 3, 2), _pack_lanes(codes >> 2, 1)], dim=-1)
    return _pack_lanes(codes, bits)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8`` codes, last axis ``packed.shape[-1] * 8 // bits``.

    Raises:
        TypeError: ``packed`` not uint8 or ``bits`` not an int.
        ValueError: ``bits`` not 2, 3, 4 or 8, or 3-bit rows that are not whole 3-byte groups.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    check_args(bits=bits)
    if bits == 8:
        return packed
    if bits == 3:
        nbytes = packed.shape[-1]
        if nbytes % 3:
            raise ValueError(f"3-bit rows take a multiple of 3 bytes, got {nbytes}")
        low, high = packed.split([nbytes // 3 * 2, nbytes // 3], dim=-1)
        return _unpack_lanes(low, 2) | (_unpack_lanes(high, 1) << 2)
    return _unpack_lanes(packed, bits)
