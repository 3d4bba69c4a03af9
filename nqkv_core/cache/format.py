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
from nqkv_core.ops.cpu import key_bias_scores, tile_rows
from nqkv_core.packed import Packed
from nqkv_core.quantize import KERNEL_SCALE_DTYPES, dequantize_packed
from nqkv_core.scheme import FP_BITS, KVScheme


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
    tiles ``(P / 16, d, 16)``, ``positions`` ``(slots,)`` in ``[0, P)``, what the native decode kernel
    takes; ``dense()`` materialises the ``(b, hq, T, slots)`` offsets for every other path.
    """

    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    dense: Callable[[], torch.Tensor]


# A growing buffer (a body, the RoPE table) grows in steps of this many tokens: at most that many
# slots stand empty, and a step copies the buffer once every GROWTH_STEP tokens, a small fraction of
# what the decode steps in between read (each reads the whole body).
GROWTH_STEP = 64


def grown(needed: int) -> int:
    """The slots a growing buffer allocates to hold ``needed``: the next multiple of :data:`GROWTH_STEP`."""
    return needed + (-needed % GROWTH_STEP)


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
            f"NQKVCache stores float16 or float32 scales; scale_dtype={scheme.scale_dtype} is evaluation-only"
        )
    fit = getattr(scheme, f"{side}_fit_scale")
    plain = get_codebook(quant, bits, block, device=device)
    decode = get_codebook(quant, bits, block, device=device, unbiased=scheme.unbiased and not fit)
    return SideFormat(bits, block, decode, plain, fit, side == "k" and scheme.k_rounding == "query")


class RopeTable:
    """RoPE angles per position, shared by all layers of a cache (for RoPE-aware key centring).

    The table's row ``p`` is ``[cos | sin]`` of the ``d / 2`` angles ``p * inv_freq`` (computed like
    :func:`~nqkv_core.scheme.apply_rope`). It is held once (``table``), in the layout its device's
    decode kernel reads: on a CPU the native step's tiles of sixteen positions ``(positions / 16, d,
    16)``, tile ``t`` holding positions ``16 t .. 16 t + 15`` of element ``i`` at ``[t, i, :]``, so
    that the key bias of sixteen consecutive positions is one vector per element; elsewhere rows
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
        self.table: torch.Tensor | None = None

    @property
    def tiled(self) -> bool:
        """Whether the table is held in tiles of sixteen positions (on a CPU) rather than rows."""
        return self.table is not None and self.table.dim() == 3

    @property
    def positions(self) -> int:
        """Positions the table covers (0 before the first :meth:`ensure`)."""
        return 0 if self.table is None else self.table.shape[0] * (16 if self.tiled else 1)

    def ensure(self, n: int, device: torch.device) -> None:
        """Make the table cover positions ``[0, n)`` on ``device`` (eager only: it may allocate)."""
        if self.inv_freq is None:
            raise ValueError("RoPE-aware key centring needs the model's RoPE frequencies (pass config=)")
        t, device = self.table, torch.device(device)
        if t is not None and self.positions >= n and t.device == device:
            return
        rows = max(grown(n), self.max_len or 0)
        rows += -rows % 16
        kept = self.positions if t is not None and t.device == device else 0
        inv_freq = self.inv_freq.float().to(device)
        ang = torch.arange(kept, rows, device=device).float()[:, None] * inv_freq[None, :]
        new = torch.cat([ang.cos(), ang.sin()], dim=-1)
        if device.type == "cpu":
            new = new.view((rows - kept) // 16, 16, new.shape[1]).transpose(1, 2)
        self.table = torch.cat([t, new]) if kept else new.contiguous()

    def row(self, p: int) -> torch.Tensor:
        """Row ``p``, ``(d,)`` (a view of the table)."""
        return self.table[p // 16, :, p % 16] if self.tiled else self.table[p]

    def head(self, n: int) -> torch.Tensor:
        """The part of the table that covers positions ``[0, n)`` (whole tiles; a view)."""
        return self.table[: -(-n // 16)] if self.tiled else self.table[:n]

    def scores(self, w: torch.Tensor, n: int) -> torch.Tensor:
        """``w @ rows(n).T``, ``(..., n)`` fp32, read from the table in place (the dense key bias)."""
        return key_bias_scores(w, self.head(n))[..., :n]

    def rows(self, n: int | None = None) -> torch.Tensor:
        """Rows ``[0, n)`` (all by default), ``(n, d)``: the table itself, or a copy of its tiles."""
        n = self.positions if n is None else n
        return tile_rows(self.head(n))[:n]


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share one)."""
    seen: dict[int, int] = {}
    for x in tensors:
        st = x.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
