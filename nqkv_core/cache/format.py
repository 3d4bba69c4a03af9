"""How a cache layer stores each side: the body format, the RoPE table, the RoPE-centred key bias.

A side (K or V) of the body is either packed codes with one scale per block along head_dim
(:class:`SideFormat` with ``bits < 16``) or plain full-precision values. A RoPE-centred key store
keeps keys minus their centre rotated to the key's position; attention adds ``q . R(p) mu`` back
as a per-key score offset (:class:`KeyBias`), computed from one cos/sin table per cache
(:class:`RopeTable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nqkv_core.codebook import get_codebook
from nqkv_core.ops.cpu import key_bias_scores, table_rows
from nqkv_core.packed import Packed
from nqkv_core.quantize import KERNEL_SCALE_DTYPES, dequantize_packed
from nqkv_core.scheme import FP_BITS, KVScheme
from nqkv_core.transform import CompactRope, centre_rows


@dataclass(frozen=True)
class SideFormat:
    """How one of K/V is stored in the body: ``bits`` (16 = plain full precision), codebooks, block.

    ``codebook`` decodes; ``encode_codebook`` chooses the codes (the same levels, unless the scheme
    decodes with the unbiased codebook, :mod:`nqkv_core.codebook`); ``fit_scale``: blocks are
    stored with fitted scales (``quantize_blockwise(..., fit_scale=True)``); ``feedback``: coded by
    error feedback along the transform's ``k_feedback`` (keys with ``k_rounding="query"``).
    """

    bits: int
    block: int
    codebook: torch.Tensor | None  # None for bits=16
    encode_codebook: torch.Tensor | None
    fit_scale: bool = False
    feedback: bool = False

    @property
    def quantized(self) -> bool:
        return self.bits < FP_BITS

    def packed(self, data: tuple[torch.Tensor, torch.Tensor]) -> Packed:
        """A quantized side's stored ``(codes, absmax)`` with this format's decoding codebook and block."""
        return Packed(data[0], data[1], self.codebook, self.block)


def joint_format(kf: SideFormat, vf: SideFormat) -> bool:
    """Whether keys and values are quantized alike (one quantize call can encode both sides)."""
    return (kf.quantized and vf.quantized and (kf.bits, kf.block) == (vf.bits, vf.block)
            and torch.equal(kf.codebook, vf.codebook) and torch.equal(kf.encode_codebook, vf.encode_codebook)
            and kf.fit_scale == vf.fit_scale and not kf.feedback)


def check_head_dim(fmt: SideFormat, head_dim: int) -> None:
    """ValueError, naming the fix, if ``head_dim`` does not split into ``fmt``'s blocks and code bytes."""
    if fmt.quantized and (head_dim % fmt.block or head_dim * fmt.bits % 8):
        raise ValueError(
            f"head_dim {head_dim} does not fit {fmt.bits}-bit blocks of {fmt.block}: the block must divide"
            f" head_dim (and 3-bit codes need head_dim % 8 == 0); scheme.fit_head_dim({head_dim}) adapts the"
            " blocks (NQKVCache(scheme, config=...) and enable do)"
        )


def read_body(data: tuple[torch.Tensor, ...], fmt: SideFormat, dtype: torch.dtype) -> torch.Tensor:
    if not fmt.quantized:
        return data[0].to(dtype)
    return dequantize_packed(fmt.packed(data), dtype)


@dataclass
class KeyBias:
    """A per-key score offset ``w[b, h, i] . table[positions[j]]`` (the RoPE-centred cache's).

    ``parts = (w, table, positions)``: ``w`` ``(b, hq, T, d)``, ``table`` the :class:`RopeTable`'s
    table (rows ``(P, d)``, or held compactly on a CPU), ``positions`` ``(slots,)`` in ``[0, P)``, what
    the native decode kernel takes; ``dense()`` materialises the ``(b, hq, T, slots)`` offsets for every other path.
    """

    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    dense: Callable[[], torch.Tensor]


# A growing buffer (a body, the RoPE table) grows in steps of about 1/128 of what it holds, a power
# of two from MIN_GROWTH_STEP to GROWTH_STEP tokens: at short contexts, where the exact tokens
# already weigh on the bytes, at most 15 slots stand empty; at long ones a step copies the buffer
# once every 64 tokens, a small fraction of what the decode steps in between read (each reads the
# whole body).
MIN_GROWTH_STEP, GROWTH_STEP = 16, 64


def growth_step(needed: int) -> int:
    """The step a growing buffer that must hold ``needed`` slots grows by."""
    return min(GROWTH_STEP, max(MIN_GROWTH_STEP, (1 << max(needed.bit_length() - 1, 0)) // 128))


def grown(needed: int) -> int:
    """The slots a growing buffer allocates to hold ``needed``: the next multiple of its
    :func:`growth_step`."""
    return needed + (-needed % growth_step(needed))


def side_format(scheme: KVScheme, side: str, device: torch.device | str = "cpu") -> SideFormat:
    """The body format of ``side`` (``"k"`` or ``"v"``) of ``scheme``.

    Raises:
        NotImplementedError: for schemes the cache cannot store (uniform ``"int"`` quantizer, blocks
            of tokens per channel); they remain available as fake quantization in
            :mod:`nqkv_core.lab.evaluate`.
    """
    bits, quant, block, axis = (getattr(scheme, f"{side}_{f}") for f in ("bits", "quant", "block", "axis"))
    if bits >= FP_BITS:
        return SideFormat(FP_BITS, 1, None, None)
    if quant not in ("nf", "lloyd"):
        raise NotImplementedError(
            f"NQKVCache stores codebook schemes ('nf', 'lloyd'); {side}_quant={quant!r} is evaluation-only"
        )
    if axis != "token":
        raise NotImplementedError(
            f"NQKVCache stores blocks along head_dim ({side}_axis='token'); {side}_axis={axis!r} is"
            " evaluation-only"
        )
    if scheme.scale_dtype not in KERNEL_SCALE_DTYPES:
        raise NotImplementedError(
            f"NQKVCache stores float16, float32 or E5M3 (uint8) scales; scale_dtype={scheme.scale_dtype} is"
            " evaluation-only"
        )
    fit = getattr(scheme, f"{side}_fit_scale")
    plain = get_codebook(quant, bits, block, device=device)
    decode = get_codebook(quant, bits, block, device=device, unbiased=scheme.unbiased and not fit)
    return SideFormat(bits, block, decode, plain, fit, side == "k" and scheme.k_rounding == "query")


class RopeTable:
    """RoPE angles per position, shared by all layers of a cache (for RoPE-aware key centring).

    Row ``p`` is ``[cos | sin]`` of the ``d / 2`` angles of position ``p``, as
    :func:`~nqkv_core.transform.centre_rows` computes them for the keys' centre (the angles of the
    tile start ``16 * (p // 16)`` and of the offset ``p % 16``, added), so that the key bias undoes the
    centring exactly. It is held once (``table``), in the layout its device's decode kernel reads: on a
    CPU compactly, a :class:`~nqkv_core.transform.CompactRope` (one row per sixteen positions and one
    tile of offsets, which the native step turns the bias weights by, tile by tile); elsewhere rows
    ``(positions, d)``, which the GPU decode kernel reads in place. :meth:`row`, :meth:`head`,
    :meth:`scores` and :meth:`rows` read either. It grows in steps of :data:`GROWTH_STEP` positions
    as the sequence grows (or is allocated once for ``max_cache_len``).

    ``order``: the key channel order in which ``inv_freq`` pairs channels ``(i, i + d / 2)``
    (:func:`~nqkv_core.transform.rope_layout`; None: the keys' own), which the layers' transforms
    take keys and queries in (``KVTransform.k_order``).
    """

    def __init__(self, inv_freq: torch.Tensor | None = None, max_len: int | None = None,
                 order: torch.Tensor | None = None):
        self.inv_freq = inv_freq
        self.max_len = max_len
        self.order = order
        self.table: torch.Tensor | CompactRope | None = None

    @staticmethod
    def compact_on(device: torch.device) -> bool:
        """Whether a table on ``device`` is held compactly: on a CPU, whose native kernels read it so."""
        return device.type == "cpu"

    @property
    def compact(self) -> bool:
        """Whether the table is held compactly (on a CPU) rather than as rows."""
        return isinstance(self.table, CompactRope)

    @property
    def positions(self) -> int:
        """Positions the table covers (0 before the first :meth:`ensure`)."""
        if self.table is None:
            return 0
        return self.table.positions if self.compact else self.table.shape[0]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the table (none before the first :meth:`ensure`)."""
        return [] if self.table is None else list(self.table) if self.compact else [self.table]

    @property
    def device(self) -> torch.device | None:
        """The table's device (None before the first :meth:`ensure`)."""
        return None if self.table is None else self.tensors[0].device

    def ensure(self, n: int, device: torch.device) -> None:
        """Make the table cover positions ``[0, n)`` on ``device`` (eager only: it may allocate)."""
        if self.inv_freq is None:
            raise ValueError("RoPE-aware key centring needs the model's RoPE frequencies (pass config=)")
        device = torch.device(device)
        if self.table is not None and self.positions >= n and self.device == device:
            return
        rows = max(grown(n), self.max_len or 0)
        rows += -rows % 16
        kept = self.positions if self.table is not None and self.device == device else 0
        if self.compact_on(device):
            new = CompactRope.of(rows // 16, self.inv_freq, kept // 16, device)
            self.table = CompactRope(torch.cat([self.table.starts, new.starts]), new.offsets) if kept else new
        else:
            new = centre_rows(torch.arange(kept, rows, device=device), self.inv_freq)
            self.table = torch.cat([self.table, new]) if kept else new

    def row(self, p: int) -> torch.Tensor:
        """Row ``p``, ``(d,)``."""
        if self.compact:
            return self.table.rows(torch.tensor([p], device=self.device))[0]
        return self.table[p]

    def head(self, n: int) -> torch.Tensor | CompactRope:
        """The part of the table that covers positions ``[0, n)`` (whole tiles when compact; views)."""
        return self.table.head(-(-n // 16)) if self.compact else self.table[:n]

    def scores(self, w: torch.Tensor, n: int) -> torch.Tensor:
        """``w @ rows(n).T``, ``(..., n)`` fp32, from the table as held (the dense key bias)."""
        return key_bias_scores(w, self.head(n))[..., :n]

    def rows(self, n: int | None = None) -> torch.Tensor:
        """Rows ``[0, n)`` (all by default), ``(n, d)``: the table itself, or composed from it."""
        n = self.positions if n is None else n
        return table_rows(self.head(n))[:n]


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share one)."""
    seen: dict[int, int] = {}
    for x in tensors:
        st = x.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
