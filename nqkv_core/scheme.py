"""KV-cache storage schemes and their plain-torch reference round trip.

A :class:`KVScheme` says how keys and values are stored: bits, codebook, block size and blocked axis
for each, an optional exact transform applied before quantizing, and how many tokens stay in full
precision (the first ``sinks`` tokens and, for each query, the last ``window`` positions).

The transforms are chosen so that attention is unchanged *exactly* if nothing is quantized:

* keys: ``k' = ((k - mu_k) * a) @ H`` and queries ``q' = (q / a) @ H``. ``q . mu_k`` is the same
  for every key of a query row, so the softmax ignores it (``mu_k`` is never added back); ``a`` is a
  per-channel equalisation that cancels between ``q`` and ``k``; ``H`` is orthogonal.
* values: ``v' = ((v - mu_v) / b) @ H``; the attention output is ``(P @ v') @ H.T * b + mu_v``
  because each probability row sums to one.

``mu``, ``a`` and ``b`` are per (batch, kv head) channel vectors measured once on the first
``stats_tokens`` tokens after the sinks (the prompt, in a streaming cache) and then frozen; ``H`` is
a fixed random-sign (block) Hadamard matrix (:func:`rotation`). :func:`fit_transform` measures
them, :meth:`KVTransform.keys`, :meth:`~KVTransform.queries`, :meth:`~KVTransform.values` and
:meth:`~KVTransform.output` apply them, and :func:`roundtrip` returns what a cache would give back
(in the original basis).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from nqkv_core import rope
from nqkv_core.codebook import get_codebook, signed_codebook
from nqkv_core.quantize import dequantize_blockwise, feedback_matrix, quantize_blockwise
from nqkv_core.rope import rotate_half  # noqa: F401  (re-exported: the cache imports it from here)

# "int": uniform asymmetric min-max (a scale and a zero per block); "signed": signed-scale levels
# (nqkv_core.codebook.signed_codebook). Both are evaluation-only: NQKVCache stores "nf" / "lloyd".
Quantizer = Literal["nf", "lloyd", "int", "signed"]
Axis = Literal["token", "channel"]  # blocks along head_dim of one token / along tokens of one channel
Equalize = Literal["none", "rms", "qk"]
Rounding = Literal["nearest", "query"]
FP_BITS = 16
PRESET_BITS = (2, 3, 4, 8)
# Queries after the sinks whose second moments make the key metric of k_rounding="query", and the
# rank of the metric that is kept (its top eigen-directions plus their mean isotropic rest).
QUERY_STATS_TOKENS = 128
QUERY_METRIC_RANK = 4


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
        stats_tokens: tokens after the sinks on which ``mu`` / equalisation are measured.
        scale_dtype: dtype of stored per-block scales (and of the zero-points of ``"int"``).
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
            the queries of up to :data:`QUERY_STATS_TOKENS` tokens after the sinks), so that the
            rounding error of a key falls where queries look least: score errors ``q . e`` shrink
            for the same bits (:func:`nqkv_core.quantize.feedback_matrix`). Excludes
            ``k_fit_scale``.
        layer_bits: optional code width of K and V for every layer (one entry per layer, from
            :func:`nqkv_core.lab.evaluate.calibrate_layer_bits`); a layer at another width than
            ``k_bits`` follows :func:`nqkv_preset`'s rules for that width (codebook, value centring),
            16 keeps it exact. Empty: every layer is stored as the fields above say.
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

    def _side_bits(self, bits: int, quant: Quantizer, block: int, n_vectors: float, context_len: int) -> float:
        if bits >= FP_BITS:
            return float(FP_BITS)
        n_fp = min(context_len, self.sinks + self.window)
        scale_bits = torch.finfo(self.scale_dtype).bits * (2 if quant == "int" else 1)
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


# -- transform --------------------------------------------------------------------------------


def _sylvester(n: int) -> torch.Tensor:
    """The ``n x n`` (+-1) Sylvester Hadamard matrix (``n`` a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int, seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An ``n x n`` orthogonal random-sign Hadamard matrix ``diag(signs) @ H_n / sqrt(n)``.

    ``n`` must be a power of two (Sylvester construction); the signs come from a fixed seed so that
    every layer and every run uses the same matrix. :func:`rotation` covers every ``n``.

    Raises:
        ValueError: ``n`` is not a power of two.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard(n) needs a power of two, got {n}; rotation(n) covers every n")
    return rotation(n, seed, device, dtype)


@functools.lru_cache(maxsize=64)
def shared_rotation(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """:func:`rotation` in fp32, one tensor per ``(n, seed, device)`` that every layer's transform
    shares (a cache holds one matrix per side, not one per layer). Read-only by contract."""
    with torch.inference_mode(False):
        return rotation(n, seed, device)


def rotation(n: int, seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed ``n x n`` orthogonal rotation of head_dim ``n``: ``diag(signs) @ H``.

    ``H`` is block-diagonal: normalised Sylvester Hadamard blocks of the largest powers of two that
    sum to ``n`` (e.g. 96 = 64 + 32, 80 = 64 + 16), a single block (the plain random-sign
    Hadamard) when ``n`` is a power of two. Every block is a multiple of the presets' blocks of
    ``gcd(n, 64)`` channels and starts at one of their boundaries. A dense Hadamard of order 96 or
    80 (Paley) or a random orthogonal matrix do no better on blockwise NF codes
    (benchmarks/rotation_any_head_dim.py). The signs come from ``seed`` (a CPU generator), so every
    layer and every run gets the same matrix; it is built in float64 and orthogonal to ``dtype``
    rounding.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"a rotation needs n >= 1, got {n}")
    blocks, rest = [], n
    while rest:
        size = 1 << (rest.bit_length() - 1)
        blocks.append(_sylvester(size) / math.sqrt(size))
        rest -= size
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * torch.block_diag(*blocks)).to(device=device, dtype=dtype)


@dataclass
class KVTransform:
    """The frozen exact transform of one layer. Vectors are ``(batch, kv_heads, 1, head_dim)`` or None."""

    mu_k: torch.Tensor | None = None
    a_k: torch.Tensor | None = None
    rot_k: torch.Tensor | None = None
    mu_v: torch.Tensor | None = None
    b_v: torch.Tensor | None = None
    rot_v: torch.Tensor | None = None
    # k_rounding="query": the queries' metric ~ k_metric^T k_metric + k_metric_iso * I, with
    # k_metric (batch, kv_heads, QUERY_METRIC_RANK, d) and k_metric_iso (batch, kv_heads, 1, 1); the
    # keys' error-feedback matrix k_feedback (batch, kv_heads, d, d) is derived from them
    # (key_feedback), held for the coder, not saved.
    k_metric: torch.Tensor | None = None
    k_metric_iso: torch.Tensor | None = None
    k_feedback: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None  # set with a pre-RoPE mu_k: mu_k is then rotated per position

    def key_centre(self, n: int, start: int | torch.Tensor = 0) -> torch.Tensor | None:
        """The centre subtracted from keys at positions ``[start, start + n)``."""
        if self.mu_k is None or self.inv_freq is None:
            return self.mu_k
        # ``start`` may be a 0-d tensor (a cache's length), so that traced steps do not specialise on it.
        pos = torch.arange(n, device=self.mu_k.device) + start
        return apply_rope(self.mu_k, pos, self.inv_freq)

    def keys(self, k: torch.Tensor, start: int | torch.Tensor = 0, centre: bool = True) -> torch.Tensor:
        """Keys as stored before quantization: ``((k - mu_k) * a_k) @ rot_k`` (positions from ``start``).

        ``centre=False`` leaves ``mu_k`` in: ``(k * a_k) @ rot_k``, scored exactly by :meth:`queries`.
        """
        k = k.float()
        if self.mu_k is not None and centre:
            k = k - self.key_centre(k.shape[-2], start)
        if self.a_k is not None:
            k = k * self.a_k
        return k @ self.rot_k if self.rot_k is not None else k

    def keys_back(self, k: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Inverse of :meth:`keys` (adds the centre back; attention needs it only for a RoPE'd centre)."""
        if self.rot_k is not None:
            k = k @ self.rot_k.T
        if self.a_k is not None:
            k = k / self.a_k
        return k + self.key_centre(k.shape[-2], start) if self.mu_k is not None else k

    def queries(self, q: torch.Tensor, group: int = 1) -> torch.Tensor:
        """Queries to score against stored keys: ``(q / a_k) @ rot_k``; ``group`` = query heads per kv head."""
        q = q.float()
        if self.a_k is not None:
            q = q / per_query_head(self.a_k, group)
        return q @ self.rot_k if self.rot_k is not None else q

    def values(self, v: torch.Tensor) -> torch.Tensor:
        """Values as stored before quantization: ``((v - mu_v) / b_v) @ rot_v``."""
        v = v.float()
        if self.mu_v is not None:
            v = v - self.mu_v
        if self.b_v is not None:
            v = v / self.b_v
        return v @ self.rot_v if self.rot_v is not None else v

    def output(self, o: torch.Tensor, group: int = 1) -> torch.Tensor:
        """Attention output in the original basis from ``P @ values(v)`` (rows of P summing to one)."""
        if self.rot_v is not None:
            o = o @ self.rot_v.T
        if self.b_v is not None:
            o = o * per_query_head(self.b_v, group)
        return o + per_query_head(self.mu_v, group) if self.mu_v is not None else o

    def values_back(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`values`."""
        return self.output(v)


def per_query_head(x: torch.Tensor, group: int) -> torch.Tensor:
    """A per-KV-head tensor ``(b, h, ...)`` repeated for the ``group`` query heads of each: ``(b, h * group, ...)``.

    The same as ``x.repeat_interleave(group, dim=1)``, which costs ~40 us per call on CPU (it builds
    an index); a decode step does this for every layer.
    """
    if group == 1:
        return x
    b, h = x.shape[:2]
    return x.unsqueeze(2).expand(b, h, group, *x.shape[2:]).reshape(b, h * group, *x.shape[2:])


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` ``(..., T or 1, d)`` at positions ``pos`` ``(T,)`` with frequencies
    ``inv_freq`` (the first ``2 * len(inv_freq)`` channels; the rest pass through); ``inverse``
    undoes it. :func:`nqkv_core.rope.apply_rope` with ``RopeSpec(inv_freq)``."""
    return rope.apply_rope(x, pos, rope.RopeSpec(inv_freq), inverse)


def rope_inv_freq(config, head_dim: int, device=None, layer_type: str | None = None) -> torch.Tensor:
    """The model's RoPE inverse frequencies ``(rotary_dim / 2,)`` for the RoPE-aware key centre:
    ``nqkv_core.rope.check_rope(config, device, layer_type).inv_freq`` (any ``rope_type``
    transformers computes; ``layer_type`` picks a layer type's own RoPE where they differ).

    Raises:
        ValueError: the model has no RoPE, or rotates more than ``head_dim`` channels.
        NotImplementedError: as :func:`nqkv_core.rope.check_rope` (e.g. interleaved RoPE).
    """
    spec = rope.check_rope(config, device, layer_type)
    if spec is None:
        raise ValueError("the model has no RoPE: use a scheme with k_centre_rope=False (a plain key centre)")
    if spec.rotary_dim > head_dim:
        raise ValueError(f"the model's RoPE rotates {spec.rotary_dim} channels, more than head_dim {head_dim}")
    return spec.inv_freq


def _stats_slice(x: torch.Tensor, scheme: KVScheme) -> torch.Tensor:
    n = x.shape[-2]
    start = min(scheme.sinks, max(n - 1, 0))
    return x[..., start : start + max(scheme.stats_tokens, 1), :].float()


def fit_transform(
    scheme: KVScheme,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> KVTransform:
    """Measure the frozen transform of one layer on its first tokens.

    Args:
        scheme: the storage scheme.
        k, v: ``(batch, kv_heads, tokens, head_dim)`` post-RoPE keys and values of (at least) the
            prompt; only tokens ``[sinks, sinks + stats_tokens)`` are used.
        q: ``(batch, q_heads, tokens, head_dim)`` queries of the same tokens, needed for
            ``k_equalize="qk"`` and ``k_rounding="query"`` (which reads tokens
            ``[sinks, sinks + QUERY_STATS_TOKENS)``).
        inv_freq: the model's RoPE inverse frequencies ``(head_dim / 2,)``, for ``k_centre_rope``;
            ``k`` must then start at position 0.
    """
    t = KVTransform()
    d = k.shape[-1]
    ks, vs = _stats_slice(k, scheme), _stats_slice(v, scheme)
    if scheme.k_centre and scheme.k_centre_rope:
        if inv_freq is None:
            raise ValueError("k_centre_rope needs the model's RoPE inv_freq")
        start = min(scheme.sinks, max(k.shape[-2] - 1, 0))
        pos = torch.arange(start, start + ks.shape[-2], device=k.device)
        t.mu_k = apply_rope(ks, pos, inv_freq, inverse=True).mean(dim=-2, keepdim=True)
        t.inv_freq = inv_freq.float().to(k.device)
        kc = ks - apply_rope(t.mu_k, pos, t.inv_freq)
    elif scheme.k_centre:
        t.mu_k = ks.mean(dim=-2, keepdim=True)
    if not scheme.k_centre_rope:
        kc = ks - t.mu_k if t.mu_k is not None else ks
    k_ms = kc.pow(2).mean(dim=-2, keepdim=True).clamp_min(1e-12)
    if scheme.k_equalize == "rms":
        t.a_k = k_ms.rsqrt()
    elif scheme.k_equalize == "qk":
        if q is None:
            raise ValueError("k_equalize='qk' needs the queries of the stats tokens")
        qs = _stats_slice(q, scheme)
        group = q.shape[1] // k.shape[1]
        q_ms = qs.pow(2).mean(dim=-2, keepdim=True)
        q_ms = q_ms.view(q.shape[0], k.shape[1], group, 1, d).mean(dim=2).clamp_min(1e-12)
        a = (q_ms / k_ms).pow(0.25)
        t.a_k = a / a.mean(dim=-1, keepdim=True)  # only ratios matter; keep magnitudes near 1
    if scheme.v_centre:
        t.mu_v = vs.mean(dim=-2, keepdim=True)
    if scheme.v_equalize:
        vc = vs - t.mu_v if t.mu_v is not None else vs
        t.b_v = vc.pow(2).mean(dim=-2, keepdim=True).clamp_min(1e-12).sqrt()
    if scheme.k_rotate:
        t.rot_k = shared_rotation(d, 0, k.device)
    if scheme.v_rotate:
        t.rot_v = shared_rotation(d, 1, k.device)
    if scheme.k_rounding == "query" and scheme.k_bits < FP_BITS:
        if q is None:
            raise ValueError("k_rounding='query' needs the queries of the prompt (pass q)")
        t.k_metric, t.k_metric_iso = low_rank_metric(query_metric(t, q, k.shape[1], scheme.sinks))
        t.k_feedback = key_feedback(t)
    return t


def low_rank_metric(m: torch.Tensor, rank: int = QUERY_METRIC_RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, iso)`` with ``F^T F + iso * I`` the metric ``m (..., d, d)`` cut to its top ``rank``
    eigen-directions (rows of ``F``: ``sqrt(eigenvalue) * eigenvector``) plus the mean of the other
    eigenvalues on every direction: ``rank`` vectors to store instead of a ``d x d`` matrix."""
    ev, vec = torch.linalg.eigh(m.double())  # ascending
    rank = min(rank, m.shape[-1] - 1)
    f = (vec[..., -rank:] * ev[..., None, -rank:].clamp_min(0).sqrt()).transpose(-1, -2)
    iso = ev[..., :-rank].mean(-1).clamp_min(0)[..., None, None]
    return f.float(), iso.float()


def key_feedback(t: KVTransform) -> torch.Tensor | None:
    """The keys' error-feedback matrix of ``t``'s stored metric (None without one)."""
    if t.k_metric is None:
        return None
    d = t.k_metric.shape[-1]
    eye = torch.eye(d, device=t.k_metric.device)
    return feedback_matrix(t.k_metric.transpose(-1, -2) @ t.k_metric + t.k_metric_iso * eye)


def query_metric(t: KVTransform, q: torch.Tensor, kv_heads: int, sinks: int) -> torch.Tensor:
    """``E[q' q'^T]`` ``(batch, kv_heads, d, d)`` of the stored-basis queries ``q' = t.queries(q)`` of
    each kv head's query heads, over the tokens ``[sinks, sinks + QUERY_STATS_TOKENS)`` (fewer if the
    prompt is shorter; all of them if it has no token after the sinks). A key error ``e`` changes a
    score by ``q' . e``, whose mean square is ``e^T E[q' q'^T] e``."""
    b, hq, n, d = q.shape
    start = sinks if n > sinks else 0
    qs = t.queries(q[:, :, start:start + QUERY_STATS_TOKENS], hq // kv_heads)
    qs = qs.reshape(b, kv_heads, -1, d)  # a kv head's query heads are consecutive
    return qs.transpose(-1, -2) @ qs / qs.shape[-2]


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
    dim = -1 if axis == "token" else -2
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
        y = fwd(x)
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

    Per-token blocks of 64 along head_dim with an fp16 absmax each (:meth:`KVScheme.fit_head_dim`
    adapts them to a head_dim they do not divide). Keys: minus a frozen pre-RoPE per-channel mean
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
    RoPE that the cache's RoPE-aware centre cannot serve (``check_rope`` raises, e.g. interleaved
    or partial rotary) too, with a warning that names the feature.

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
    return dict(k_bits=k_bits, v_bits=v_bits, k_quant="lloyd" if k_bits == 2 else "nf",
                v_quant="lloyd" if v_bits == 2 else "nf", v_centre=v_bits not in (2, FP_BITS),
                k_rounding="query" if k_bits == 3 else "nearest", k_fit_scale=k_bits == 2,
                v_fit_scale=v_bits in (2, 3))
