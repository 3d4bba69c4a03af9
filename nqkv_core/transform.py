"""The exact transform a scheme applies to K/V before quantizing, and its fit.

The transforms are chosen so that attention is unchanged *exactly* if nothing is quantized:

* keys: ``k' = ((k - mu_k) * a) @ H`` and queries ``q' = (q / a) @ H``. ``q . mu_k`` is the same
  for every key of a query row, so the softmax ignores it (``mu_k`` is never added back); ``a`` is a
  per-channel equalisation that cancels between ``q`` and ``k``; ``H`` is orthogonal. With a
  RoPE-aware centre the centre is measured before RoPE and rotated to each key's position, and
  attention adds ``q . R(p) mu_k`` back. A RoPE that is not rotate-half over the whole head
  (interleaved pairs, a partial rotary embedding) is served in a fixed channel order ``k_order``
  in which it is (:func:`rope_layout`): keys and queries are taken in that order first, which
  changes no score.
* values: ``v' = ((v - mu_v) / b) @ H``; the attention output is ``(P @ v') @ H.T * b + mu_v``
  because each probability row sums to one.

``mu``, ``a`` and ``b`` are per (batch, kv head) channel vectors measured once on the first
``stats_tokens`` tokens after the sinks (the prompt, in a streaming cache; a left-padded row's own
tokens, :func:`fit_transform_rows`) and then frozen; ``H`` is
a fixed random-sign (block) Hadamard matrix (:func:`rotation`). :func:`fit_transform` measures
them, :meth:`KVTransform.keys`, :meth:`~KVTransform.queries`, :meth:`~KVTransform.values` and
:meth:`~KVTransform.output` apply them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from nqkv_core import rope
from nqkv_core.quantize import feedback_matrix

if TYPE_CHECKING:  # (scheme.py imports this module)
    from nqkv_core.scheme import KVScheme

FP_BITS = 16  # a side stored with 16 bits is kept in full precision
# Queries after the sinks whose second moments make the key metric of k_rounding="query", per
# statistics token (queries are noisier estimates than keys), and the rank of the metric that is
# kept (its top eigen-directions plus their mean isotropic rest).
QUERY_STATS_PER_TOKEN = 2
QUERY_METRIC_RANK = 4


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
    # with a RoPE-aware centre of a model whose RoPE is not rotate-half over the whole head: the
    # (head_dim,) int64 channel order in which it is (rope_layout); keys and queries are taken in
    # it (x[..., k_order]) before anything else, so mu_k, a_k and inv_freq's pairs are in it
    k_order: torch.Tensor | None = None

    def key_order(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., head_dim)`` (keys or queries) with its channels in the key order ``k_order``
        (``x`` itself without one)."""
        return x if self.k_order is None else x.index_select(-1, self.k_order)

    def key_centre(self, n: int, start: int | torch.Tensor = 0) -> torch.Tensor | None:
        """The centre subtracted from keys at positions ``[start, start + n)``."""
        if self.mu_k is None or self.inv_freq is None:
            return self.mu_k
        # ``start`` may be a 0-d tensor (a cache's length), so that traced steps do not specialise on it.
        pos = torch.arange(n, device=self.mu_k.device) + start
        return turn_by_rows(self.mu_k, centre_rows(pos, self.inv_freq))

    def keys(self, k: torch.Tensor, start: int | torch.Tensor = 0, centre: bool = True) -> torch.Tensor:
        """Keys as stored before quantization: ``((k - mu_k) * a_k) @ rot_k`` (positions from ``start``;
        channels first in the key order, :meth:`key_order`).

        ``centre=False`` leaves ``mu_k`` in: ``(k * a_k) @ rot_k``, scored exactly by :meth:`queries`.
        """
        k = self.key_order(k.float())
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
        k = k + self.key_centre(k.shape[-2], start) if self.mu_k is not None else k
        return k if self.k_order is None else k.index_select(-1, torch.argsort(self.k_order))

    def queries(self, q: torch.Tensor, group: int = 1) -> torch.Tensor:
        """Queries to score against stored keys: ``(q / a_k) @ rot_k`` (channels first in the key
        order, :meth:`key_order`); ``group`` = query heads per kv head."""
        q = self.key_order(q.float())
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


def output_transform(out: torch.Tensor, rot: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``out @ rot.T + shift`` in fp32, in ``out``'s dtype: ``out`` ``(B, Hq, Tq, D)``, ``rot`` ``(D, D)``,
    ``shift`` ``(B or 1, Hkv, 1, D)`` (a KV head's row for each of its query heads); either may be
    None. :meth:`KVTransform.output` without value scales, as the grouped decode kernel's merge
    applies it (``out_transform``)."""
    o = out.float()
    if rot is not None:
        o = o @ rot.float().T
    if shift is not None:
        o = o + per_query_head(shift.float(), o.shape[1] // shift.shape[1])
    return o.to(out.dtype)


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


# -- the RoPE rows of the key centre and bias ---------------------------------------------------------------
#
# A RoPE-aware centre is subtracted from each key at its position and added back to its score as a
# bias; the two cancel only if they turn the centre by the same numbers. Both take them from
# centre_rows: the [cos | sin] angles of the position's tile start 16 * (p // 16) and of its offset
# p % 16, added (compose_angle_rows). That is what lets a CPU cache hold its table compactly
# (CompactRope: one row per sixteen positions and one tile of offsets) and get the same numbers.


def angle_rows(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``[cos | sin]`` of the angles ``pos * inv_freq`` (fp32, as the model's RoPE computes them):
    ``(T, 2 F)`` for ``pos`` ``(T,)`` and ``inv_freq`` ``(F,)``."""
    ang = pos.float()[:, None] * inv_freq.float().to(pos.device)[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def compose_angle_rows(start: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``[cos | sin]`` of the sums of the angles of two ``[cos | sin]`` rows (broadcast), by angle
    addition in fp32 (the native kernels' ``compact_row`` does the same)."""
    h = start.shape[-1] // 2
    ca, sa, cb, sb = start[..., :h], start[..., h:], offset[..., :h], offset[..., h:]
    return torch.cat([ca * cb - sa * sb, sa * cb + ca * sb], dim=-1)


def centre_rows(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The ``[cos | sin]`` rows ``(T, 2 F)`` that turn a RoPE-aware key centre to positions ``pos``
    ``(T,)`` (int): the angles of ``16 * (pos // 16)`` and of ``pos % 16``, added."""
    pos = pos.long()
    return compose_angle_rows(angle_rows(pos // 16 * 16, inv_freq), angle_rows(pos % 16, inv_freq))


def turn_by_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., 1 or T, d)`` turned by ``[cos | sin]`` rows ``(T, 2 F)``, rotate-half pairs over the
    first ``2 F`` channels (the rest pass through): ``x * cos + rotate_half(x) * sin`` per position,
    :func:`apply_rope`'s arithmetic with these rows."""
    f = rows.shape[-1] // 2
    rd = 2 * f
    cos, sin = rows[:, :f].repeat(1, 2).to(x.dtype), rows[:, f:].repeat(1, 2).to(x.dtype)
    xr, rest = x[..., :rd], x[..., rd:]
    out = xr * cos + rope.rotate_half(xr) * sin
    if not rest.shape[-1]:
        return out
    return torch.cat([out, rest.expand(*out.shape[:-1], rest.shape[-1])], dim=-1)


class CompactRope(NamedTuple):
    """The RoPE rows of positions ``[0, 16 * len(starts))`` held compactly: ``starts`` ``(P / 16, d)``,
    row ``t`` the angles of position ``16 t``, and ``offsets`` ``(d, 16)``, column ``l`` those of
    position ``l``; row ``p`` is :func:`compose_angle_rows` of ``starts[p // 16]`` and offset ``p % 16``,
    which equals :func:`centre_rows` of ``p``. A CPU cache's RoPE table
    (:class:`~nqkv_core.cache.format.RopeTable`), 17 rows per 256 positions instead of 256."""

    starts: torch.Tensor
    offsets: torch.Tensor

    @staticmethod
    def of(tiles: int, inv_freq: torch.Tensor, first: int = 0, device=None) -> "CompactRope":
        """The table of tiles ``[first, tiles)`` (its starts; the offsets are those of any table)."""
        t = torch.arange(first, tiles, device=device)
        return CompactRope(angle_rows(16 * t, inv_freq), angle_rows(torch.arange(16, device=device), inv_freq).T.contiguous())

    @property
    def positions(self) -> int:
        return 16 * self.starts.shape[0]

    def rows(self, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``(T, d)`` of positions ``pos`` (all :attr:`positions` by default)."""
        pos = torch.arange(self.positions, device=self.starts.device) if pos is None else pos.long()
        return compose_angle_rows(self.starts.index_select(0, pos // 16), self.offsets.T.index_select(0, pos % 16))

    def head(self, tiles: int) -> "CompactRope":
        """The table of its first ``tiles`` tiles (views)."""
        return CompactRope(self.starts[:tiles], self.offsets)


def rope_layout(config, head_dim: int, device=None, layer_type: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's RoPE as the RoPE-aware key centre takes it: rotate-half pairs over the whole head.

    Returns:
        ``(inv_freq, k_order)``: ``inv_freq`` ``(head_dim / 2,)`` the frequency of the pair of
        channels ``(i, i + head_dim / 2)`` once the channels are taken in the order ``k_order``
        (``x[..., k_order]``, :func:`nqkv_core.rope.rotate_half_order`), zero for a pair that
        passes through unrotated; ``k_order`` ``(head_dim,)`` int64, or None where the model's RoPE
        is rotate-half over the whole head already (then ``inv_freq`` is
        ``nqkv_core.rope.check_rope(config, device, layer_type).inv_freq``). Interleaved pairs
        (Cohere, GLM) and partial rotary embeddings (GPT-NeoX, Phi-2, StableLM) get an order.
        ``layer_type`` picks a layer type's own RoPE where they differ (any ``rope_type``
        transformers computes).

    Raises:
        ValueError: the model has no RoPE, or rotates more than ``head_dim`` channels.
        NotImplementedError: as :func:`nqkv_core.rope.check_rope` (e.g. multimodal RoPE).
    """
    spec = rope.check_rope(config, device, layer_type)
    if spec is None:
        raise ValueError("the model has no RoPE: use a scheme with k_centre_rope=False (a plain key centre)")
    if spec.rotary_dim > head_dim:
        raise ValueError(f"the model's RoPE rotates {spec.rotary_dim} channels, more than head_dim {head_dim}")
    if spec.rotary_dim == head_dim and not spec.interleaved:
        return spec.inv_freq, None
    order, inv_freq = rope.rotate_half_order(spec, head_dim)
    return inv_freq.to(device), order.to(device)


def rope_inv_freq(config, head_dim: int, device=None, layer_type: str | None = None) -> torch.Tensor:
    """The inverse frequencies of :func:`rope_layout` ``(head_dim / 2,)``: the model's own
    (``check_rope(...).inv_freq``) for a RoPE that is rotate-half over the whole head, else those of
    the channel order ``rope_layout`` gives, which must go with them (``fit_transform``'s ``k_order``).

    Raises:
        As :func:`rope_layout`.
    """
    return rope_layout(config, head_dim, device, layer_type)[0]


def _stats_slice(x: torch.Tensor, scheme: KVScheme) -> torch.Tensor:
    n = x.shape[-2]
    start = min(scheme.sinks, max(n - 1, 0))
    return x[..., start : start + max(scheme.stats_tokens, 1), :].float()


def rope_bias_weights(query: torch.Tensor, mu: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows ``w`` with ``w . table[p] = scale * q . R(p) mu`` for every position ``p``: ``(b, hq, T, d)`` fp32.

    With rotate-half RoPE, ``q . R(p) mu = cos(p) . (q * mu) + sin(p) . (q * rotate_half(mu))`` and
    ``cos(p)``/``sin(p)`` repeat one half twice, so the halves are summed first and the bias of all
    positions is one ``(T, d) @ (d, P)`` product per head against ``table = [cos | sin]`` (``(P, d)``,
    :class:`~nqkv_core.cache.format.RopeTable`); the decode kernels take ``w`` and the table instead.

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


def fit_transform(
    scheme: KVScheme,
    k: torch.Tensor,
    v: torch.Tensor,
    q: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    k_order: torch.Tensor | None = None,
) -> KVTransform:
    """Measure the frozen transform of one layer on its first tokens.

    Args:
        scheme: the storage scheme.
        k, v: ``(batch, kv_heads, tokens, head_dim)`` post-RoPE keys and values of (at least) the
            prompt; only tokens ``[sinks, sinks + stats_tokens)`` are used.
        q: ``(batch, q_heads, tokens, head_dim)`` queries of the same tokens, needed for
            ``k_equalize="qk"`` and ``k_rounding="query"`` (which reads tokens
            ``[sinks, sinks + QUERY_STATS_PER_TOKEN * stats_tokens)``).
        inv_freq: the model's RoPE inverse frequencies ``(head_dim / 2,)``, for ``k_centre_rope``;
            ``k`` must then start at position 0.
        k_order: with ``inv_freq``, the key channel order they pair (:func:`rope_layout`); None:
            the keys' own. Ignored without ``k_centre_rope``.
    """
    t = KVTransform()
    d = k.shape[-1]
    if scheme.k_centre and scheme.k_centre_rope and k_order is not None:
        t.k_order = k_order.to(k.device)
    ks, vs = t.key_order(_stats_slice(k, scheme)), _stats_slice(v, scheme)
    if scheme.k_centre and scheme.k_centre_rope:
        if inv_freq is None:
            raise ValueError("k_centre_rope needs the model's RoPE inv_freq")
        start = min(scheme.sinks, max(k.shape[-2] - 1, 0))
        pos = torch.arange(start, start + ks.shape[-2], device=k.device)
        t.mu_k = apply_rope(ks, pos, inv_freq, inverse=True).mean(dim=-2, keepdim=True)
        t.inv_freq = inv_freq.float().to(k.device)
        kc = ks - turn_by_rows(t.mu_k, centre_rows(pos, t.inv_freq))  # as key_centre turns it
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
        qs = t.key_order(_stats_slice(q, scheme))
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
        tokens = QUERY_STATS_PER_TOKEN * max(scheme.stats_tokens, 1)
        t.k_metric, t.k_metric_iso = low_rank_metric(query_metric(t, q, k.shape[1], scheme.sinks, tokens))
        t.k_feedback = key_feedback(t)
    return t


# The transform's fields measured per (batch row, kv head); the others are shared by all rows.
ROW_FIELDS = ("mu_k", "a_k", "mu_v", "b_v", "k_metric", "k_metric_iso", "k_feedback")


def fit_transform_rows(
    scheme: KVScheme,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: list[int],
    q: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    k_order: torch.Tensor | None = None,
) -> KVTransform:
    """:func:`fit_transform` of a left-padded batch: each row on its own tokens, as that row alone.

    Row ``r`` holds ``starts[r]`` padding slots before its first token, which the model gave
    position 0: it is fitted on ``k[r, :, starts[r]:]`` (and ``v``, ``q``), whose statistics tokens
    are then ``[starts[r] + sinks, ...)``. A RoPE-aware key centre is stored rotated back by the
    row's start, ``R(-starts[r]) mu``, so that the centre at storage slot ``p``,
    ``R(p) R(-s) mu = R(p - s) mu``, is the row's own at its position ``p - s``: every slot-indexed
    use of the centre (:meth:`KVTransform.key_centre`, the key bias) stays as it is.

    Args:
        starts: ``(batch,)`` leading padding slots per row, each below the token count.
        (the others as :func:`fit_transform`)
    """
    rows_of: dict[int, list[int]] = {}
    for r, s in enumerate(starts):
        rows_of.setdefault(int(s), []).append(r)
    out: KVTransform | None = None
    for s, rows in rows_of.items():
        idx = torch.tensor(rows, device=k.device)
        part = fit_transform(scheme, k[idx, :, s:], v[idx, :, s:], q[idx, :, s:] if q is not None else None,
                             inv_freq, k_order)
        if part.inv_freq is not None and s:
            part.mu_k = apply_rope(part.mu_k, torch.tensor([s], device=k.device), part.inv_freq, inverse=True)
        if out is None:
            out = dataclasses.replace(part)
            for f in ROW_FIELDS:
                x = getattr(part, f)
                if x is not None:
                    setattr(out, f, x.new_empty(len(starts), *x.shape[1:]))
        for f in ROW_FIELDS:
            x = getattr(part, f)
            if x is not None:
                getattr(out, f).index_copy_(0, idx, x)
    return out


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


def query_metric(t: KVTransform, q: torch.Tensor, kv_heads: int, sinks: int, tokens: int) -> torch.Tensor:
    """``E[q' q'^T]`` ``(batch, kv_heads, d, d)`` of the stored-basis queries ``q' = t.queries(q)`` of
    each kv head's query heads, over the tokens ``[sinks, sinks + tokens)`` (fewer if the
    prompt is shorter; all of them if it has no token after the sinks). A key error ``e`` changes a
    score by ``q' . e``, whose mean square is ``e^T E[q' q'^T] e``."""
    b, hq, n, d = q.shape
    start = sinks if n > sinks else 0
    qs = t.queries(q[:, :, start:start + tokens], hq // kv_heads)
    qs = qs.reshape(b, kv_heads, -1, d)  # a kv head's query heads are consecutive
    return qs.transpose(-1, -2) @ qs / qs.shape[-2]
