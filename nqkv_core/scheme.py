"""KV-cache storage schemes, their presets and their plain-torch reference round trip.

A :class:`KVScheme` says how keys and values are stored: bits, codebook, block size and blocked axis
for each, an optional exact transform applied before quantizing (:mod:`nqkv_core.transform`), and
how many tokens stay in full precision (the first ``sinks`` tokens and, for each query, the last
``window`` positions). :func:`roundtrip` returns what a cache would give back (in the original
basis); :func:`nqkv_preset` and :func:`default_scheme` are the measured presets.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from nqkv_core import rope
from nqkv_core.codebook import get_codebook, signed_codebook
from nqkv_core.packed import SCHEME_AXES
from nqkv_core.quantize import E5M3, dequantize_blockwise, quantize_blockwise
from nqkv_core.rope import rotate_half  # noqa: F401  (re-exported: the cache imports it from here)
from nqkv_core.transform import (  # noqa: F401  (re-exported: the transform was part of this module)
    FP_BITS, QUERY_METRIC_RANK, QUERY_STATS_PER_TOKEN, KVTransform, apply_rope, fit_transform, hadamard, key_feedback,
    low_rank_metric, per_query_head, query_metric, rope_inv_freq, rope_layout, rotation, shared_rotation,
)

# "int": uniform asymmetric min-max (a scale and a zero per block); "signed": signed-scale levels
# (nqkv_core.codebook.signed_codebook). Both are evaluation-only: NQKVCache stores "nf" / "lloyd".
Quantizer = Literal["nf", "lloyd", "int", "signed"]
Axis = Literal["token", "channel"]  # blocks along head_dim of one token / along tokens of one channel
Equalize = Literal["none", "rms", "qk"]
Rounding = Literal["nearest", "query"]
PRESET_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class KVScheme:
    """How a KV cache stores keys and values. ``bits=16`` means that side is kept in full precision.

    Attributes:
        name: label used in result tables.
        k_bits, v_bits: code bits (2, 3, 4, 8; 16 = not quantized).
        k_quant, v_quant: ``"nf"`` / ``"lloyd"`` codebook with an absmax per block, ``"int"``
            (asymmetric min-max, the KIVI / uniform baselines) or ``"signed"`` (signed-scale levels,
            :func:`nqkv_core.codebook.signed_codebook`); the last two are evaluation-only.
        k_block, v_block: elements per block.
        k_axis, v_axis: ``"token"`` (blocks along head_dim, axis -1) or ``"channel"`` (blocks of
            ``block`` consecutive tokens of one channel, axis -2).
        k_centre, v_centre: subtract a frozen per-channel mean (measured on the stats tokens).
        k_equalize: per-channel key scaling ``a`` (cancelled by the queries): ``"rms"`` makes every
            centred channel unit-RMS, ``"qk"`` uses ``a = (E q^2 / E k^2) ** (1/4)`` which minimises
            the expected score error for a rotated uniform quantizer.
        v_equalize: ``True`` divides centred values by their per-channel RMS before the rotation.
        k_rotate, v_rotate: apply the fixed rotation of head_dim (:func:`rotation`).
        k_centre_rope: with ``k_centre``, measure the key mean *before* RoPE and subtract it rotated
            to each key's position, ``R(p) mu_pre`` (RoPE turns a constant pre-RoPE offset into a
            position-dependent one). Not shift-invariant: attention adds ``q . R(p) mu_pre`` to the
            score of the key at position ``p`` (``NQKVCache`` computes it from shared cos/sin tables).
        sinks: first tokens kept in full precision.
        window: for each query, keys/values fewer than ``window`` positions behind are exact.
        stats_tokens: tokens after the sinks on which ``mu`` / equalisation are measured. A cache
            keeps a sequence's tokens exact until it holds them (:attr:`fit_tokens`).
        scale_dtype: dtype of stored per-block scales (and of the zero-points of ``"int"``):
            fp16, fp32, or one byte, :data:`~nqkv_core.quantize.E5M3` (``torch.uint8``; absmax
            scales of ``"nf"`` / ``"lloyd"`` codes, not fitted ones).
        unbiased: decode ``"nf"`` / ``"lloyd"`` codes with the unbiased codebook (levels times
            :func:`nqkv_core.codebook.unbiased_gain`, so that decoded keys and values are not shrunk
            on average); codes and scales are unchanged.
        k_fit_scale, v_fit_scale: store that side's ``"nf"`` / ``"lloyd"`` blocks with fitted scales
            instead of their absmax (:func:`nqkv_core.quantize.quantize_blockwise` with
            ``fit_scale=True``: codes against the best of a few clipped scales, and a scale that
            makes each block unbiased), decoded with the plain levels (``unbiased`` then applies to
            the other side only: the fitted scale replaces its global gain).
        k_rounding: ``"nearest"`` codes each key element on its own; ``"query"`` codes keys by error
            feedback under the queries' second moments ``E[q q^T]`` (measured with the transform on
            the queries of up to ``2 * stats_tokens`` tokens after the sinks), so that the
            rounding error of a key falls where queries look least: score errors ``q . e`` shrink
            for the same bits (:func:`nqkv_core.quantize.feedback_matrix`). Excludes
            ``k_fit_scale``.
        layer_bits: optional code width of K and V for every layer (one entry per layer, from
            :func:`nqkv_core.lab.evaluate.calibrate_layer_bits`); a layer at another width than
            ``k_bits`` follows :func:`nqkv_preset`'s rules for that width (codebook, value centring,
            scale format; fp32 scales stay fp32), 16 keeps it exact. Empty: every layer is stored
            as the fields above say.
    """

    name: str
    k_bits: int = 4
    v_bits: int = 4
    k_quant: Quantizer = "nf"
    v_quant: Quantizer = "nf"
    k_block: int = 64
    v_block: int = 64
    k_axis: Axis = "token"
    v_axis: Axis = "token"
    k_centre: bool = False
    v_centre: bool = False
    k_equalize: Equalize = "none"
    v_equalize: bool = False
    k_rotate: bool = False
    v_rotate: bool = False
    k_centre_rope: bool = False
    sinks: int = 0
    window: int = 0
    stats_tokens: int = 64
    scale_dtype: torch.dtype = torch.float16
    layer_bits: tuple[int, ...] = ()
    unbiased: bool = False
    k_fit_scale: bool = False
    v_fit_scale: bool = False
    k_rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        if self.k_rounding not in ("nearest", "query"):
            raise ValueError(f"{self.name}: k_rounding must be 'nearest' or 'query', got {self.k_rounding!r}")
        if self.k_rounding == "query" and (self.k_fit_scale or self.k_axis != "token" or self.k_quant not in ("nf", "lloyd")):
            raise ValueError(
                f"{self.name}: k_rounding='query' codes 'nf' / 'lloyd' keys in per-token blocks with absmax"
                " scales (k_axis='token', no k_fit_scale)"
            )
        if self.scale_dtype == E5M3 and (self.k_fit_scale or self.v_fit_scale
                                         or {self.k_quant, self.v_quant} - {"nf", "lloyd"}):
            raise ValueError(
                f"{self.name}: E5M3 (uint8) scales store absmax scales of 'nf' / 'lloyd' codes;"
                " fitted scales and 'int' / 'signed' quantizers need scale_dtype=torch.float16 or float32"
            )
        if self.layer_bits:
            if self.k_bits != self.v_bits:
                raise ValueError(f"{self.name}: per-layer widths need equal K and V widths, got K{self.k_bits}V{self.v_bits}")
            bad = sorted({b for b in self.layer_bits if b not in (*PRESET_BITS, FP_BITS)})
            if bad:
                raise ValueError(f"{self.name}: layer widths must be among {PRESET_BITS} or {FP_BITS}, got {bad}")

    def replace(self, **changes) -> "KVScheme":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able fields (``scale_dtype`` as its name); :meth:`from_dict` reads them back."""
        d = dataclasses.asdict(self)
        d["scale_dtype"] = str(self.scale_dtype).removeprefix("torch.")
        d["layer_bits"] = list(self.layer_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KVScheme":
        """The scheme :meth:`to_dict` wrote (e.g. a calibrated one saved by ``nqkv calibrate``)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"not KVScheme fields: {sorted(unknown)}")
        fields = dict(d)
        if "scale_dtype" in fields:
            dtype = getattr(torch, str(fields["scale_dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown scale_dtype {fields['scale_dtype']!r}")
            fields["scale_dtype"] = dtype
        fields["layer_bits"] = tuple(fields.get("layer_bits", ()))
        return cls(**fields)

    def for_layer(self, layer: int) -> "KVScheme":
        """The scheme layer ``layer`` stores (itself unless ``layer_bits`` gives layers their own width)."""
        if not self.layer_bits:
            return self
        if not 0 <= layer < len(self.layer_bits):
            raise ValueError(
                f"scheme {self.name!r} has widths for {len(self.layer_bits)} layers; there is no layer {layer}"
            )
        bits = self.layer_bits[layer]
        fields = {} if bits == self.k_bits else _width_fields(bits, bits)
        if fields and self.scale_dtype == torch.float32:  # fp32 scales, chosen, stay in every layer
            fields["scale_dtype"] = torch.float32
        return self.replace(layer_bits=(), **fields)

    def fit_head_dim(self, head_dim: int) -> "KVScheme":
        """This scheme adapted to keys and values of ``head_dim`` channels.

        A per-token block (``axis="token"``) that does not divide ``head_dim`` becomes
        ``gcd(block, head_dim)``, and the name says so (e.g. ``"NQKV-4 [head_dim 96: blocks 64->32]"``);
        a scheme that fits is returned unchanged. The rotation needs no change
        (:func:`rotation` exists for every ``head_dim``).

        Raises:
            ValueError: ``head_dim < 1``, or a quantized width whose codes cannot fill whole bytes of
                a head_dim row (3-bit codes need ``head_dim % 8 == 0``, 2-bit ``% 4``, 4-bit
                ``% 2``): store that side (or those layers) at another width.
        """
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        widths = {self.k_bits, self.v_bits, *self.layer_bits} - {FP_BITS}
        bad = sorted(b for b in widths if head_dim * b % 8 or (b == 3 and head_dim % 8))
        if bad:
            raise ValueError(
                f"{self.name}: {bad}-bit codes do not fill whole bytes of a head_dim {head_dim} row"
                " (3-bit codes need head_dim % 8 == 0, 2-bit % 4, 4-bit % 2); use 8 bits or another width"
            )
        changes, notes = {}, []
        for side in ("k", "v"):
            block, axis = getattr(self, f"{side}_block"), getattr(self, f"{side}_axis")
            if axis == "token" and head_dim % block:
                changes[f"{side}_block"] = math.gcd(block, head_dim)
                notes.append(f"{side.upper()} blocks {block}->{changes[f'{side}_block']}")
        if not changes:
            return self
        if len(notes) == 2 and changes["k_block"] == changes["v_block"] and self.k_block == self.v_block:
            notes = [f"blocks {self.k_block}->{changes['k_block']}"]
        return self.replace(name=f"{self.name} [head_dim {head_dim}: {', '.join(notes)}]", **changes)

    @property
    def needs_stats(self) -> bool:
        return self.k_centre or self.v_centre or self.k_equalize != "none" or self.v_equalize

    @property
    def transformed(self) -> bool:
        """Whether a cache stores this scheme's tokens in a basis other than the model's."""
        return self.needs_stats or self.k_rotate or self.v_rotate

    def exact_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a cache keeps full-precision tokens in (sinks, the window, a 16-bit side) for a
        model of ``dtype``.

        Untransformed, the model's tokens as they come. Transformed, the storage basis comes out of
        the transform in fp32: an fp32 (or wider) model keeps that, so tokens are quantized from the
        numbers the fake-quantized reference uses; a 16-bit model keeps it in bf16, the 16 bits of
        its own cache with fp32's range (in fp16 a rotated coordinate could overflow: a rotation can
        raise one to ``sqrt(head_dim)`` times the largest input).
        """
        if not self.transformed:
            return dtype
        return torch.bfloat16 if dtype.itemsize <= 2 else torch.float32

    @property
    def fit_tokens(self) -> int:
        """A sequence's first tokens on which its transform is fitted: the sinks and ``stats_tokens``
        (:data:`~nqkv_core.transform.QUERY_STATS_PER_TOKEN` times as many queries for
        ``k_rounding="query"``); 0
        when nothing is fitted. A cache keeps a sequence's tokens exact until it holds that many
        (:mod:`nqkv_core.cache.fitting`)."""
        query_metric = self.k_rounding == "query" and self.k_bits < FP_BITS
        if not (self.needs_stats or query_metric):
            return 0
        stats = max(self.stats_tokens, 1) if self.needs_stats else 0
        return self.sinks + (QUERY_STATS_PER_TOKEN * max(self.stats_tokens, 1) if query_metric else stats)

    def _side_bits(self, bits: int, quant: Quantizer, block: int, n_vectors: float, context_len: int) -> float:
        if bits >= FP_BITS:
            return float(FP_BITS)
        n_fp = min(context_len, self.sinks + self.window)
        scale_bits = 8 * self.scale_dtype.itemsize * (2 if quant == "int" else 1)
        quantized = (context_len - n_fp) * (bits + scale_bits / block)
        # Per-channel vectors (centre, equalisation) are stored once per head: 16 bits per channel.
        return (quantized + n_fp * FP_BITS + n_vectors * FP_BITS) / context_len

    def bits_per_element(self, context_len: int) -> float:
        """Average storage bits per K/V element for a sequence of ``context_len`` tokens.

        Charges the codes, every per-block scale (and zero-point), the full-precision sink and window
        tokens, the per-channel centre/equalisation vectors and, for query-rounded keys, the
        metric's ``QUERY_METRIC_RANK`` vectors (the isotropic rest counted as one more). The rotation
        is a shared constant.
        """
        k_vec = int(self.k_centre) + int(self.k_equalize != "none")
        if self.k_rounding == "query":
            k_vec += QUERY_METRIC_RANK + 1
        v_vec = int(self.v_centre) + int(self.v_equalize)
        if self.layer_bits:
            return sum(self.for_layer(i).bits_per_element(context_len) for i in range(len(self.layer_bits))) / len(
                self.layer_bits
            )
        k = self._side_bits(self.k_bits, self.k_quant, self.k_block, k_vec, context_len)
        v = self._side_bits(self.v_bits, self.v_quant, self.v_block, v_vec, context_len)
        return (k + v) / 2


# -- quantizers -------------------------------------------------------------------------------


def _minmax_roundtrip(x: torch.Tensor, bits: int, block: int, axis: int, scale_dtype: torch.dtype) -> torch.Tensor:
    # Uniform asymmetric: scale = (max - min) / (2^b - 1), zero-point = min, both stored in scale_dtype.
    xb = x.float().movedim(axis, -1)
    shape = xb.shape
    xb = xb.reshape(*shape[:-1], -1, block)
    lo = xb.amin(dim=-1, keepdim=True).to(scale_dtype).float()
    scale = ((xb.amax(dim=-1, keepdim=True) - lo) / (2**bits - 1)).to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((xb - lo) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(shape).movedim(-1, axis)


def _signed_roundtrip(x: torch.Tensor, bits: int, block: int, axis: int, scale_dtype: torch.dtype,
                      unbiased: bool) -> torch.Tensor:
    # Scale = the block's largest-magnitude element with its sign (to scale_dtype; |x / s| is
    # clamped to 1 in case rounding made it a hair larger), codes against the plain signed levels.
    xb = x.float().movedim(axis, -1)
    shape = xb.shape
    xb = xb.reshape(*shape[:-1], -1, block)
    s = torch.gather(xb, -1, xb.abs().argmax(dim=-1, keepdim=True)).to(scale_dtype).float()
    y = (xb / torch.where(s != 0, s, torch.ones_like(s))).clamp(-1, 1)
    plain = signed_codebook(bits, block).to(x.device)
    codes = torch.bucketize(y, (plain[1:] + plain[:-1]) / 2)
    levels = signed_codebook(bits, block, unbiased).to(x.device) if unbiased else plain
    return (levels[codes] * s).reshape(shape).movedim(-1, axis)


def quantize_roundtrip(
    x: torch.Tensor, bits: int, quant: Quantizer, block: int, axis: Axis, scale_dtype: torch.dtype = torch.float16,
    unbiased: bool = False, fit_scale: bool = False, feedback: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` ``(..., tokens, head_dim)``; float32 result.

    ``"nf"`` / ``"lloyd"`` codes: ``unbiased`` decodes with the unbiased levels (unless
    ``fit_scale``, whose fitted scales are unbiased already); ``fit_scale`` and ``feedback`` as in
    :func:`nqkv_core.quantize.quantize_blockwise`. With
    ``axis="channel"`` only whole groups of ``block`` tokens are quantized; a trailing partial group
    is returned unchanged (a streaming cache keeps it in full precision until it fills).
    """
    if bits >= FP_BITS:
        return x.float()
    if axis not in SCHEME_AXES:
        raise ValueError(f"axis must be one of {tuple(SCHEME_AXES)}, got {axis!r}")
    dim = SCHEME_AXES[axis]
    n = x.shape[dim]
    if axis == "token" and n % block:
        # only token groups may be partial (they fill as tokens arrive); a head_dim block must fit
        raise ValueError(f"per-token blocks of {block} do not divide head_dim {n}")
    n_full = n - n % block
    if n_full == 0:
        return x.float()
    xq = x.narrow(dim, 0, n_full)
    if quant == "int":
        out = _minmax_roundtrip(xq, bits, block, dim, scale_dtype)
    elif quant == "signed":
        out = _signed_roundtrip(xq, bits, block, dim, scale_dtype, unbiased)
    else:
        cb = get_codebook(quant, bits, block, device=x.device)
        codes, absmax = quantize_blockwise(xq.float(), cb, block=block, axis=dim, scale_dtype=scale_dtype,
                                           fit_scale=fit_scale, feedback=feedback)
        if unbiased and not fit_scale:
            cb = get_codebook(quant, bits, block, device=x.device, unbiased=True)
        out = dequantize_blockwise(codes, absmax, cb, block=block, axis=dim)
    if n_full < n:
        out = torch.cat([out, x.narrow(dim, n_full, n - n_full).float()], dim=dim)
    return out


def roundtrip(
    scheme: KVScheme,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor | None = None,
    transform: KVTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache gives back for every token, as if all were quantized, in the original basis.

    Sinks and the recent window are *not* applied here (they depend on the query position; see
    :func:`nqkv_core.lab.evaluate.fakequant_attention`). With ``axis="channel"`` blocks start after the
    sinks, so the sink tokens never widen a group's range.

    Args:
        scheme: storage scheme.
        k, v: ``(batch, kv_heads, tokens, head_dim)`` post-RoPE keys and values.
        q: queries of the same tokens (only for ``k_equalize="qk"``).
        transform: a frozen transform; fitted on ``k``, ``v``, ``q`` if None.

    Returns:
        ``(k_hat, v_hat)``, float32, same shapes as ``k`` and ``v``. Centring is undone, so a
        centred scheme returns keys differing from ``k`` only by quantization error.
    """
    t = transform if transform is not None else fit_transform(scheme, k, v, q)
    s = min(scheme.sinks, k.shape[-2])

    def side(x, fwd, back, bits, quant, block, axis, fit, feedback=None):
        if bits >= FP_BITS:
            return x.float()
        y = fwd(x).to(scheme.exact_dtype(x.dtype)).float()  # the values a cache quantizes
        body = quantize_roundtrip(y[..., s:, :], bits, quant, block, axis, scheme.scale_dtype, scheme.unbiased,
                                  fit, feedback)
        return back(torch.cat([y[..., :s, :], body], dim=-2))

    k_hat = side(k, t.keys, t.keys_back, scheme.k_bits, scheme.k_quant, scheme.k_block, scheme.k_axis,
                 scheme.k_fit_scale, t.k_feedback)
    v_hat = side(v, t.values, t.values_back, scheme.v_bits, scheme.v_quant, scheme.v_block, scheme.v_axis,
                 scheme.v_fit_scale)
    return k_hat, v_hat


# -- presets ----------------------------------------------------------------------------------

FULL_PRECISION = KVScheme("fp", k_bits=16, v_bits=16)


def kivi(bits: int, group: int = 32, sinks: int = 4, window: int = 32) -> KVScheme:
    """KIVI-style baseline: keys per channel over token groups, values per token, asymmetric min-max."""
    return KVScheme(
        f"kivi-int{bits} g{group} S{sinks} W{window}",
        k_bits=bits, v_bits=bits, k_quant="int", v_quant="int", k_block=group, v_block=group,
        k_axis="channel", v_axis="token", sinks=sinks, window=window,
    )


def uniform(bits: int, block: int = 64, sinks: int = 4, window: int = 32) -> KVScheme:
    """Uniform asymmetric int per token (blocks along head_dim) for K and V."""
    return KVScheme(
        f"int{bits} per-token b{block} S{sinks} W{window}",
        k_bits=bits, v_bits=bits, k_quant="int", v_quant="int", k_block=block, v_block=block,
        sinks=sinks, window=window,
    )


def nqkv_preset(bits: int, sinks: int = 4, window: int = 32, rope_centre: bool = True,
                v_bits: int | None = None, block: int = 64) -> KVScheme:
    """The recommended NQKV scheme at ``bits`` bits (measurements in docs/quality.md).

    Per-token blocks of 64 along head_dim with an absmax each, one byte at 4 bits
    (:data:`~nqkv_core.quantize.E5M3`) and fp16 where a side fits its scales
    (:meth:`KVScheme.fit_head_dim` adapts the blocks to a head_dim they do not divide). Keys: minus a frozen pre-RoPE per-channel mean
    rotated to each key's position, ``R(p) mu`` (RoPE turns a constant offset into a
    position-dependent one), then the fixed random-sign Hadamard rotation (:func:`rotation`);
    attention adds the score offset ``q . R(p) mu`` back (``NQKVCache`` does, from cos/sin tables
    shared by all layers).
    Values: minus a frozen per-channel mean (4 and 3 bits), then the Hadamard rotation. Codebook:
    NF at 4 and 3 bits, the block-aware Lloyd-Max levels at 2 bits (NF2 loses by far), decoded with
    the unbiased levels (``unbiased=True``: nearest-level rounding shrinks keys and values on
    average, which flattens attention; most of all at 2 bits). Encoders: at 3 bits keys are coded
    by error feedback under the prompt queries' metric (``k_rounding="query"``); at 2 bits keys,
    and at 2 and 3 bits values, are stored with fitted scales (``k_fit_scale`` / ``v_fit_scale``,
    each block's own unbiased scale replacing the codebook's gain). At 4 bits neither changes the
    perplexity measurably, and both stay off.

    ``v_bits`` stores values at another width than keys (default: ``bits``), each side following
    the rules above for its own width. Keys carry most of the error, so one more bit for keys is
    the cheapest step between the widths: ``nqkv_preset(4, v_bits=3)`` ("NQKV-K4V3") and
    ``nqkv_preset(3, v_bits=2)`` ("NQKV-K3V2").

    ``rope_centre=False`` subtracts a plain post-RoPE key mean instead: softmax-invariant, so no
    score offset is needed (a little faster to decode), at a higher perplexity cost
    (docs/quality.md).

    ``block`` sets the block size of both sides (the scheme is then named e.g. "NQKV-3 b32"):
    blocks of 32 spend twice the scale bits for a lower error, e.g. at 3 bits +0.77% perplexity at
    3.99 bits per element against +1.19% at 3.75 with blocks of 64 (docs/quality.md).
    """
    v_bits = bits if v_bits is None else v_bits
    if bits not in PRESET_BITS or v_bits not in PRESET_BITS:
        raise ValueError(f"presets exist for {', '.join(map(str, PRESET_BITS))} bits, got K{bits} V{v_bits}")
    name = (f"NQKV-{bits}" if v_bits == bits else f"NQKV-K{bits}V{v_bits}") + ("" if block == 64 else f" b{block}")
    return KVScheme(
        name + ("" if rope_centre else " plain-centre"), k_centre=True, k_centre_rope=rope_centre,
        k_rotate=True, v_rotate=True, sinks=sinks, window=window, unbiased=True, k_block=block, v_block=block,
        **_width_fields(bits, v_bits),
    )


def default_scheme(bits: int = 4, head_dim: int = 64, sinks: int = 4, window: int | None = None,
                   config=None) -> KVScheme:
    """The measured NQKV preset (:func:`~nqkv_core.scheme.nqkv_preset`, RoPE-aware key centre and the
    rotation of :func:`rotation`) fitted to ``head_dim`` (:meth:`KVScheme.fit_head_dim`: blocks of
    ``gcd(head_dim, 64)``), with ``sinks`` full-precision sink tokens and a window of 32 tokens
    (64 at 2 bits). Named e.g. ``"NQKV-4 b32 S4 W32"``.

    ``config`` (the model's): for a model without RoPE (:func:`nqkv_core.rope.check_rope` gives
    None) the key centre is a plain mean (``k_centre_rope=False``, named ``"plain-centre"``); for a
    RoPE that the cache's RoPE-aware centre cannot serve (``check_rope`` raises, e.g. multimodal
    RoPE or GPT-J's ``rotary_dim``) too, with a warning that names the feature. Interleaved and
    partial rotary embeddings are RoPE-centred (:func:`~nqkv_core.transform.rope_layout`).

    Raises:
        ValueError: as :meth:`KVScheme.fit_head_dim` (e.g. 3 bits with ``head_dim % 8 != 0``) or
            :func:`nqkv_preset` (``bits`` without a preset).
    """
    if window is None:
        window = 32 if bits > 2 else 64
    rope_centre = True
    if config is not None:
        from nqkv_core.cache.support import layer_types  # each layer type may have its own RoPE

        try:
            rope_centre = all(rope.check_rope(config, layer_type=t) is not None for t in set(layer_types(config)))
        except NotImplementedError as e:
            warnings.warn(f"the default NQKV scheme centres keys with a plain mean for this model: {e}", stacklevel=2)
            rope_centre = False
    preset = nqkv_preset(bits, sinks=sinks, window=window, rope_centre=rope_centre)
    fitted = preset.fit_head_dim(head_dim)
    return fitted.replace(name=f"{preset.name} b{fitted.k_block} S{sinks} W{window}")


def _width_fields(k_bits: int, v_bits: int) -> dict:
    """The width-dependent fields of the presets: NF codes at 3+ bits, Lloyd-Max at 2, value centring
    except at 2 bits (16 = that side exact); keys query-rounded at 3 bits and fitted at 2, values
    fitted at 2 and 3 (docs/quality.md). The callers have checked the widths."""
    k_fit, v_fit = k_bits == 2, v_bits in (2, 3)
    return dict(k_bits=k_bits, v_bits=v_bits, k_quant="lloyd" if k_bits == 2 else "nf",
                v_quant="lloyd" if v_bits == 2 else "nf", v_centre=v_bits not in (2, FP_BITS),
                k_rounding="query" if k_bits == 3 else "nearest", k_fit_scale=k_fit, v_fit_scale=v_fit,
                scale_dtype=torch.float16 if k_fit or v_fit else E5M3)
