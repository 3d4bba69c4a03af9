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
import torch.nn.functional as F

from nqkv_core.codebook import get_codebook
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

    ``parts = (w, table, positions)``: ``w`` ``(b, hq, T, d)``, ``table`` ``(P, d)``, ``positions``
    ``(slots,)`` in ``[0, P)``, what the native decode kernel takes; ``dense()`` materialises the
    ``(b, hq, T, slots)`` offsets for every other path.
    """

    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    dense: Callable[[], torch.Tensor]


def fp_dtype(scheme: KVScheme, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a layer's full-precision tokens (sinks, ring, a 16-bit body) for a model of ``dtype``.

    A transformed scheme's storage basis comes out of the transform in fp32; keeping the exact tokens
    in fp32 there means a token is quantized from the same numbers a fake-quantized reference uses.
    """
    return torch.float32 if scheme.needs_stats or scheme.k_rotate or scheme.v_rotate else dtype


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

    ``table`` is ``(positions, d)``: ``[cos | sin]`` of the ``d / 2`` angles ``p * inv_freq`` of each
    position ``p`` (computed like :func:`~nqkv_core.scheme.apply_rope`), grown by doubling as the
    sequence grows (or allocated once for ``max_cache_len``). ``tiles`` holds the same numbers in
    tiles of sixteen positions, ``(positions / 16, d, 16)``, for the native decode step (512 bytes
    per position for head_dim 64 together, once per cache).

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
        self.tiles: torch.Tensor | None = None

    def ensure(self, n: int, device: torch.device) -> None:
        """Make the table cover positions ``[0, n)`` on ``device`` (eager only: it may allocate)."""
        if self.inv_freq is None:
            raise ValueError("RoPE-aware key centring needs the model's RoPE frequencies (pass config=)")
        t = self.table
        if t is not None and t.shape[0] >= n and t.device == torch.device(device):
            return
        rows = max(n, 2 * t.shape[0] if t is not None else 64, self.max_len or 0)
        inv_freq = self.inv_freq.float().to(device)
        ang = torch.arange(rows, device=device).float()[:, None] * inv_freq[None, :]
        self.table = torch.cat([ang.cos(), ang.sin()], dim=-1)
        # (P / 16, d, 16): tiles of sixteen positions, from which the native decode step computes the
        # key bias of sixteen consecutive positions per vector
        pad = -rows % 16
        self.tiles = F.pad(self.table, (0, 0, 0, pad)).view(-1, 16, self.table.shape[1]).transpose(1, 2).contiguous()


def rope_bias_weights(query: torch.Tensor, mu: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows ``w`` with ``w . table[p] = scale * q . R(p) mu`` for every position ``p``: ``(b, hq, T, d)`` fp32.

    With rotate-half RoPE, ``q . R(p) mu = cos(p) . (q * mu) + sin(p) . (q * rotate_half(mu))`` and
    ``cos(p)``/``sin(p)`` repeat one half twice, so the halves are summed first and the bias of all
    positions is one ``(T, d) @ (d, P)`` product per head against ``table = [cos | sin]`` (``(P, d)``,
    :class:`RopeTable`); the native decode kernel takes ``w`` and the table rows instead.

    Args:
        query: ``(b, hq, T, d)`` post-RoPE queries in the original basis.
        mu: ``(b, hq, 1, d)`` pre-RoPE key centre of each query head's kv head.
    """
    q = query.float()
    h = q.shape[-1] // 2
    q_lo, q_hi, mu_lo, mu_hi = q[..., :h], q[..., h:], mu[..., :h], mu[..., h:]
    cos_part = q_lo * mu_lo + q_hi * mu_hi
    sin_part = q_hi * mu_lo - q_lo * mu_hi
    return torch.cat([cos_part, sin_part], dim=-1).mul_(scale)


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once (views share one)."""
    seen: dict[int, int] = {}
    for x in tensors:
        st = x.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
