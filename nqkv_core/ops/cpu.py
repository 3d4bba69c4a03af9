"""Attention over packed K/V in plain torch: the CPU path of ``nqkv::attention``.

Flash-attention in chunks of tokens: a chunk of codes is decoded, multiplied with the queries,
folded into a running (max, sum, output) online softmax in fp32, and dropped, so no dequantized
copy of the cache ever exists; only one chunk (about a megabyte) is live at a time.

Eager CPU (the fast path):

* A chunk is decoded with one ``index_select`` per chunk: two bytes of 4-bit codes (or one byte
  of 2-bit codes, or 12 bits of 3-bit codes) index a table of four bfloat16 codebook levels held
  as one int64, so a lookup yields four elements. Tables are built once per codebook.
* The block scales are not applied to the decoded chunk (that would be one more pass over it):
  they are folded into the small operands. Per-token blocks (``axis == -1``): each query row is
  split into one row per block of head_dim, the matmul gives per-block partial scores, and
  ``sum_b absmax[t, b] * partial[b, t]`` is a tiny reduction; for V the probabilities are scaled
  per block before the matmul. Per-channel blocks (``axis == -2``): the queries are scaled per
  token block, and V partial outputs per token block are scaled afterwards. With many query rows
  (prefill) the decoded chunk is scaled instead, which is cheaper there.
* For fp16 / bf16 queries products are bfloat16 with fp32 accumulation; scores, softmax and the
  output accumulator are fp32 (the same split as torch's bf16 SDPA). Compared with fp32 attention
  over the dequantized cache the output differs by about 1e-3 relative -- far below the 4-bit
  quantization error. fp32 queries get fp32 throughout (:func:`compute_dtype`): the levels are
  decoded with the plain gather below instead of the bf16 tables, so the result is that of fp32
  SDPA over the dequantized cache up to summation order.

Decode (at most ``DECODE_MAX_ROWS`` query rows per KV head, blocks along head_dim):
:func:`attention_decode` computes every score of a row (``rows * Tk`` fp32 per KV head, small next
to the cache), takes one exact ``torch.softmax`` over ``[history | tail]`` and then the values,
with the same chunked lookups and scale folding but no online-softmax bookkeeping. At one token per
step most of the cost of the general loop was per-op overhead, not arithmetic. Matmuls over the
history are bf16 (about twice as fast as fp32 from a few hundred tokens on; below that a bf16 call
has a fixed cost of ~15 us); the tail, whose tokens are few, is multiplied in fp32.

Under ``torch.compile`` the same chunk loop runs with a plain fp32 dequantization (shifts, masks,
a codebook gather and the scales), which Inductor fuses and lowers to C++.

Sequence semantics (shared by every path of the op): keys are the quantized history followed by
the optional full-precision tail, ``Tk = T_hist + T_tail``; the ``Tq`` queries are the LAST ``Tq``
positions, so query ``i`` may attend to key ``j`` under ``is_causal`` iff ``j <= Tk - Tq + i``.
Rows that can attend to nothing (masked out entirely) return zeros, as torch's SDPA does.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from nqkv_core import native
from nqkv_core.packed import Packed
from nqkv_core.packing import unpack
from nqkv_core.quantize import scale_values
from nqkv_core.transform import CompactRope

COMPUTE_DTYPE = torch.bfloat16
CHUNK_ELEMS = 1 << 20  # decoded elements per chunk over all heads (2 MiB of bf16)
SCORE_ELEMS = 1 << 22  # fp32 scores per (query block x key chunk) over all heads
FOLD_MAX_ROWS = 32  # query rows per KV head up to which scales are folded into small operands

DECODE_MAX_ROWS = 16  # query rows per KV head (Tq * group) up to which the decode path is taken
# Decode pads its last chunk of history to a multiple of this many tokens. A bf16 matmul of a shape
# not seen before builds a new oneDNN kernel (about a millisecond); a cache that grows by one token
# per step would otherwise pay that on every step and layer.
DECODE_PAD_TOKENS = 64

_TABLES: dict[tuple, tuple[Tensor, int, int]] = {}


def compute_dtype(q: Tensor) -> torch.dtype:
    """The dtype of the matmul operands for queries ``q``: ``COMPUTE_DTYPE`` (bf16) for fp16 / bf16
    queries, fp32 for fp32 ones (rounding fp32 queries and levels to bf16 costs about 1e-2 absolute
    error over a prompt, which fp32 callers did not ask for)."""
    return torch.float32 if q.dtype == torch.float32 else COMPUTE_DTYPE
_ONEHOT: dict[tuple, Tensor] = {}


# -- decoding -------------------------------------------------------------------------------------


def _levels_per_index(bits: int, index_bits: int) -> Tensor:
    """Codes held by each value of an ``index_bits``-bit index, (2**index_bits, n) int64."""
    idx = torch.arange(2**index_bits, dtype=torch.int64)
    if bits == 3:  # index = low-plane byte | high nibble << 8: four codes
        r = torch.arange(4)
        low = (idx[:, None] & 255) >> (2 * r) & 3
        high = (idx[:, None] >> 8) >> r & 1
        return low | high << 2
    n = index_bits // bits
    return (idx[:, None] >> (bits * torch.arange(n))) & (2**bits - 1)


def _decode_table(codebook: Tensor, bits: int, wide: bool) -> tuple[Tensor, int, int]:
    """``(table, index_bits, values_per_index)``: levels packed as one integer per index value.

    ``wide`` uses two-byte indices for 4- and 8-bit codes (four resp. two levels per lookup).
    """
    index_bits = {2: 8, 3: 12, 4: 16 if wide else 8, 8: 16 if wide else 8}[bits]
    fake = torch._subclasses.fake_tensor.is_fake(codebook)
    # The tables are also remembered on the codebook tensor itself (by bits, width and version), so a
    # call does not read the levels back with ``tolist`` to find them; they die with the codebook.
    mine = None if fake else codebook.__dict__.setdefault("_nqkv_tables", {})
    fast_key = (bits, index_bits, codebook._version)
    if mine is not None and fast_key in mine:
        return mine[fast_key]
    key = None if fake else (bits, index_bits, codebook.device, tuple(codebook.tolist()))
    cached = _TABLES.get(key) if key is not None else None
    if cached is not None:
        mine[fast_key] = cached
        return cached
    codes = _levels_per_index(bits, index_bits).to(codebook.device)
    per = codes.shape[1]
    carrier = {1: torch.int16, 2: torch.int32, 4: torch.int64}[per]
    table = codebook.float()[codes].to(COMPUTE_DTYPE).contiguous().view(carrier).view(-1)
    out = (table, index_bits, per)
    if key is not None:
        _TABLES[key] = mine[fast_key] = out
    return out


def _decode_lut(
    codes: Tensor, codebook: Tensor, bits: int, dim: int, buf: Optional[list] = None, n_out: int = 0
) -> Tensor:
    """Packed codes (R, n, bytes) -> codebook levels (R, max(n, n_out), dim) in bfloat16, unscaled.

    ``buf`` (a one-item list) keeps the index and output buffers between chunks: fresh multi-MB
    allocations cost a page fault per 4 KiB on every chunk. Rows past ``n`` (up to ``n_out``) hold
    finite levels (of index 0), so a matmul over them with zero weights adds nothing.
    """
    r, n, nbytes = codes.shape
    wide = bits in (4, 8) and nbytes % 2 == 0
    table, index_bits, per = _decode_table(codebook, bits, wide)
    n_out = max(n, n_out)
    lookups = r * n_out * (dim // per)
    if buf is None or buf[0] is None or buf[0][0].numel() < lookups:
        bufs = (torch.empty(lookups, dtype=torch.int32, device=codes.device), table.new_empty(lookups))
        if buf is not None:
            buf[0] = bufs
    else:
        bufs = buf[0]
    all_idx, out = bufs[0][:lookups], bufs[1][:lookups]
    idx = all_idx.view(r, n_out, dim // per)
    if n_out > n:
        idx[:, n:].zero_()
        idx = idx[:, :n]
    if bits == 3:
        low, high = codes.split([dim // 4, dim // 8], dim=-1)
        idx.copy_(torch.stack([high & 15, high >> 4], dim=-1).view(r, n, dim // 4))
        idx.bitwise_left_shift_(8).add_(low)
    elif index_bits == 16:
        idx.copy_(codes.view(torch.uint16))
    else:
        idx.copy_(codes)
    torch.index_select(table, 0, all_idx, out=out)
    return out.view(COMPUTE_DTYPE).view(r, n_out, dim)


def _decode_plain(codes: Tensor, codebook: Tensor, bits: int, dim: int) -> Tensor:
    """Packed codes -> fp32 codebook levels (unscaled), with ops Inductor fuses into one loop."""
    return codebook.float()[unpack(codes, bits).long()]


# -- one source of keys/values ----------------------------------------------------------------------


class _Source:
    """One packed K or V history, viewed as (B*H, T, ...) with what decoding a chunk needs."""

    def __init__(self, p: Packed, decode: Callable):
        codes, absmax = p.codes, p.absmax
        bh = codes.shape[0] * codes.shape[1]
        if codes.stride(-1) != 1 or codes.stride(-2) % 2:
            codes = codes.contiguous()  # rows must be contiguous runs of bytes for the lookups
        self.codes = codes.reshape(bh, codes.shape[2], codes.shape[3])
        self.buf: list = [None]
        self.codebook, self.block, self.per_token, self.dim = p.codebook, p.block, p.per_token, p.shape[-1]
        self.bits = p.bits
        self.decode = decode
        a = scale_values(absmax).reshape(bh, absmax.shape[2], absmax.shape[3])
        # per token: (BH, nb, T) so a chunk of tokens is a contiguous slice; per channel: (BH, T/block, D)
        self.absmax = a.transpose(1, 2).contiguous() if self.per_token else a
        self.nb = self.dim // self.block if self.per_token else 1

    def levels(self, c0: int, c1: int) -> Tensor:
        if self.decode is _decode_lut:
            return _decode_lut(self.codes[:, c0:c1], self.codebook, self.bits, self.dim, self.buf)
        return self.decode(self.codes[:, c0:c1], self.codebook, self.bits, self.dim)

    def scales(self, c0: int, c1: int) -> Tensor:
        """Per-element scales of tokens [c0, c1): (BH, n, dim) fp32 (for the scaled mode)."""
        if self.per_token:
            return self.absmax[:, :, c0:c1].transpose(1, 2).repeat_interleave(self.block, dim=2)
        b0 = c0 // self.block
        s = self.absmax[:, b0 : -(-c1 // self.block)].repeat_interleave(self.block, dim=1)
        return s[:, c0 - b0 * self.block : c1 - b0 * self.block]


def _pad_tokens(x: Tensor, n: int, dim: int) -> Tensor:
    pad = -x.shape[dim] % n
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _scores_folded(qrows: Tensor, qbd: Tensor, k: _Source, c0: int, c1: int) -> Tensor:
    """Query rows against history tokens [c0, c1) with the scales folded in.

    Per-token blocks: the unscaled per-block partial scores (BH, R*nb, n) in the compute dtype (the
    caller applies ``absmax`` for a whole key block at once). Per-channel blocks: fp32 scores (BH, R, n).
    """
    lv = k.levels(c0, c1)  # (BH, n, D) unscaled
    bh, n, d = lv.shape
    r = qrows.shape[1]
    if k.per_token:
        return torch.bmm(qbd, lv.transpose(1, 2))
    # per-channel: scale the queries per token block, one small matmul per block
    blk, b0 = k.block, c0 // k.block
    nt = -(-n // blk)
    qs = (qrows[:, None] * k.absmax[:, b0 : b0 + nt, None, :]).to(lv.dtype)  # (BH, nt, R, D)
    lvb = _pad_tokens(lv, blk, 1).view(bh * nt, blk, d)
    s = torch.bmm(qs.reshape(bh * nt, r, d), lvb.transpose(1, 2)).view(bh, nt, r, blk)
    return s.permute(0, 2, 1, 3).reshape(bh, r, nt * blk)[:, :, :n].float()


def _pv_folded(p: Tensor, w: Optional[Tensor], v: _Source, c0: int, c1: int) -> Tensor:
    """Unnormalised output of probabilities over history tokens [c0, c1).

    Per-token blocks: ``w`` are the probabilities already scaled per block, (BH, R*nb, n) in the
    compute dtype; returns the per-block products (BH, R*nb, Dv) (the caller keeps the diagonal
    blocks). Per-channel blocks: uses ``p`` (BH, R, n) and returns fp32 (BH, R, Dv).
    """
    lv = v.levels(c0, c1)
    if v.per_token:
        return torch.bmm(w, lv)
    bh, n, dv = lv.shape
    r = p.shape[1]
    blk, b0 = v.block, c0 // v.block
    nt = -(-n // blk)
    pb = _pad_tokens(p.to(lv.dtype), blk, 2).view(bh, r, nt, blk).transpose(1, 2).reshape(bh * nt, r, blk)
    o = torch.bmm(pb, _pad_tokens(lv, blk, 1).view(bh * nt, blk, dv)).view(bh, nt, r, dv)
    return (o.float() * v.absmax[:, b0 : b0 + nt, None, :]).sum(1)


# -- decode: few query rows -----------------------------------------------------------------------


def decode_fits(q: Tensor, k: Packed | tuple, v: Packed | tuple, k_tail: Optional[Tensor]) -> bool:
    """Whether :func:`attention_decode` serves this call: blocks along head_dim for K and V, at most
    ``DECODE_MAX_ROWS`` query rows per KV head, and all scores of a row fit ``SCORE_ELEMS``."""
    k, v = Packed.of(k), Packed.of(v)
    b, hq, tq, _ = q.shape
    codes = k.codes
    rows = tq * (hq // codes.shape[1])
    tk = codes.shape[2] + (0 if k_tail is None else k_tail.shape[2])
    return k.per_token and v.per_token and rows <= DECODE_MAX_ROWS and b * hq * tq * tk <= SCORE_ELEMS


def _block_rows(x: Tensor, block: int) -> Tensor:
    """Rows (BH, R, D) -> (BH, R * nb, D): row ``r * nb + i`` keeps only block ``i`` of row ``r``."""
    bh, r, d = x.shape
    nb = d // block
    if nb == 1:
        return x
    fake = torch._subclasses.fake_tensor.is_fake(x)  # tracing: a cached real tensor cannot mix in
    key = (d, block, x.device, x.dtype)
    onehot = None if fake else _ONEHOT.get(key)
    if onehot is None:
        blocks = torch.arange(d, device=x.device) // block
        onehot = (blocks == torch.arange(nb, device=x.device)[:, None]).to(x.dtype)
        if not fake:
            _ONEHOT[key] = onehot
    return (x[:, :, None, :] * onehot).reshape(bh, r * nb, d)


def table_rows(table: Tensor | CompactRope) -> Tensor:
    """A key-bias table as rows ``(P, D)``: ``table`` itself, or the rows composed from a table held
    compactly (:class:`~nqkv_core.transform.CompactRope`, a CPU cache's RoPE table)."""
    return table.rows() if isinstance(table, CompactRope) else table


def key_bias_scores(w: Tensor, table: Tensor | CompactRope) -> Tensor:
    """``w @ rows.T`` in fp32, ``(..., P)``: the key bias of every position of a table of rows ``(P, D)``,
    or of one held compactly, read as held (``w`` turned by each tile's start and multiplied with
    the offsets, as the native kernel does: ``P / 16`` small products rather than the rows)."""
    w = w.float()
    if not isinstance(table, CompactRope):
        return w @ table.float().T
    h = w.shape[-1] // 2
    w2 = w.reshape(-1, w.shape[-1])[None]  # (1, rows, D)
    c, s = table.starts[:, None, :h], table.starts[:, None, h:]  # (P / 16, 1, D / 2)
    a, b = w2[..., :h], w2[..., h:]
    turned = torch.cat([a * c + b * s, b * c - a * s], dim=-1)  # (P / 16, rows, D)
    out = turned @ table.offsets  # (P / 16, rows, 16)
    return out.transpose(0, 1).reshape(*w.shape[:-1], -1)


def dense_key_bias(w: Tensor, table: Tensor | CompactRope, positions: Tensor) -> Tensor:
    """The key bias ``(w, table, positions)`` of :func:`attention_decode` (``table`` rows or compact) as
    additive scores ``(B, Hq, Tq, Tk)`` fp32."""
    return key_bias_scores(w, table).index_select(-1, positions)


def with_key_bias(attn_mask: Optional[Tensor], bias: Tensor) -> Tensor:
    """``attn_mask`` (None, boolean or additive) and an additive score offset ``bias`` as one additive mask."""
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, -math.inf)
    return bias + attn_mask


def attention_decode(
    q: Tensor,
    k: Packed | tuple,
    v: Packed | tuple,
    k_tail: Optional[Tensor],
    v_tail: Optional[Tensor],
    attn_mask: Optional[Tensor],
    scale: float,
    is_causal: bool,
    key_bias: Optional[tuple[Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """:func:`attention_chunked` for few query rows (decode), with as few ops as possible.

    ``k`` / ``v``: :class:`~nqkv_core.packed.Packed` (or its plain tuple) with blocks along head_dim.
    ``key_bias = (w, table, positions)`` adds ``w[b, hq, i] . table[positions[j]]`` to the score of
    query ``i`` and key ``j`` (``w`` (B, Hq, Tq, D), ``table`` (P, D) rows or the same rows held
    compactly (:class:`~nqkv_core.transform.CompactRope`), ``positions`` (Tk,) in ``[0, P)``): the
    RoPE-centred cache's score offset.

    With the native CPU kernels built (:mod:`nqkv_core.native`) the whole call is one native
    function (fp32 throughout, codes decoded in registers, the key bias added in its reduction);
    without them the plain-torch path below runs, which materialises the key bias as an additive
    mask.

    The query rows of all heads sharing a KV head are folded into one matrix (``R = group * Tq`` rows),
    so K and V are read once per KV head. Every score of a row is kept (``R * Tk`` fp32 per KV head,
    far less than the cache for ``R <= DECODE_MAX_ROWS``), so the softmax is one exact ``torch.softmax``
    over ``[history | tail]`` instead of an online merge. History tokens are still decoded in chunks
    (one chunk is live at a time, so it stays in cache between the decode and its matmul); block scales
    are folded into the small operands as described in the module docstring.
    """
    k, v = Packed.of(k), Packed.of(v)
    if native.attention_decode_supported(q, k, v, k_tail, v_tail, attn_mask):
        return native.attention_decode(q, k, v, k_tail, v_tail, attn_mask, scale, is_causal, key_bias)
    if key_bias is not None:
        attn_mask = with_key_bias(attn_mask, dense_key_bias(*key_bias))
    if compute_dtype(q) != COMPUTE_DTYPE:  # the bf16 tables below are for fp16 / bf16 queries
        return attention_chunked(q, k, v, k_tail, v_tail, attn_mask, scale, is_causal)
    b, hq, tq, d = q.shape
    hkv, th = k.codes.shape[1], k.codes.shape[2]
    g, bh, dv = hq // hkv, b * hkv, v.shape[-1]
    qf = (q.float() * scale).reshape(bh, g * tq, d)  # rows of a KV head: (group, Tq) in order
    spans, th_pad = _decode_spans(bh, max(d, dv), th)
    parts = _decode_scores(qf, k, spans) if th else []
    if k_tail is not None and k_tail.shape[2]:
        parts.append(torch.bmm(qf, k_tail.reshape(bh, -1, d).float().transpose(1, 2)))
    if not parts:  # no keys at all: every row attends to nothing
        return q.new_zeros(b, hq, tq, dv)
    s = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    p = _decode_softmax(s, attn_mask, is_causal, hkv, tq)
    o = _decode_values(p, v, spans, th_pad) if th else None
    if v_tail is not None and v_tail.shape[2]:
        ot = torch.bmm(p[:, :, th:], v_tail.reshape(bh, -1, dv).float())
        o = ot if o is None else o.add_(ot)
    return o.view(b, hq, tq, dv).to(q.dtype)


def _decode_spans(bh: int, dim: int, th: int) -> tuple[list[tuple[int, int, int]], int]:
    """The chunks ``(c0, c1, n_pad)`` of ``th`` history tokens, ``n_pad`` the width of each chunk's
    matmul (padded so that shapes repeat as the cache grows), and the padded history length."""
    chunk = _chunk_size(bh, dim, 64)
    th_pad = -(-th // DECODE_PAD_TOKENS) * DECODE_PAD_TOKENS
    return [(c0, min(th, c0 + chunk), min(chunk, th_pad - c0)) for c0 in range(0, th, chunk)], th_pad


def _decode_operands(p: Packed, bh: int) -> tuple[Tensor, Tensor]:
    """Codes ``(BH, T, bytes)`` with contiguous rows for the lookups, and the scales as fp32
    ``(BH, 1, nb, T)``: one small copy (multiplying by strided fp16 scales per chunk instead is
    several times slower)."""
    codes, th = p.codes, p.codes.shape[2]
    if codes.stride(-1) != 1 or codes.stride(-2) % 2:
        codes = codes.contiguous()
    nb = p.shape[-1] // p.block
    absmax = scale_values(p.absmax.reshape(bh, th, nb).transpose(1, 2)).contiguous()[:, None]
    return codes.reshape(bh, th, -1), absmax


def _decode_scores(qf: Tensor, k: Packed, spans: list) -> list[Tensor]:
    """fp32 scores ``(BH, R, c1 - c0)`` of the query rows ``qf`` (BH, R, D) against each chunk of history keys."""
    bh, r, d = qf.shape
    codes, absmax = _decode_operands(k, bh)
    nb, buf, parts = d // k.block, [None], []
    qk = _block_rows(qf.to(COMPUTE_DTYPE), k.block)  # (BH, R * nb, D)
    for c0, c1, n_pad in spans:
        lv = _decode_lut(codes[:, c0:c1], k.codebook, k.bits, d, buf, n_pad)
        part = torch.bmm(qk, lv.transpose(1, 2))[..., : c1 - c0].view(bh, r, nb, c1 - c0)  # unscaled
        if nb == 1:
            parts.append((part * absmax[..., c0:c1]).reshape(bh, r, c1 - c0))  # fp32 scores
        else:  # sum over blocks of partial score times absmax
            parts.append(part.float().mul_(absmax[..., c0:c1]).sum(2))
    return parts


def _decode_softmax(s: Tensor, attn_mask: Optional[Tensor], is_causal: bool, hkv: int, tq: int) -> Tensor:
    """Probabilities of the scores ``s`` (BH, R, Tk) under the mask and causality; rows that can
    attend to nothing get zeros."""
    bh, r, tk = s.shape
    b, g = bh // hkv, r // tq
    masked = False
    if attn_mask is not None:
        m = attn_mask[(None,) * (4 - attn_mask.dim())]
        m = m.unsqueeze(2) if m.shape[1] == 1 else m.reshape(m.shape[0], hkv, g, m.shape[2], m.shape[3])
        s5 = s.view(b, hkv, g, tq, tk)
        s5 = torch.where(m, s5, -math.inf) if m.dtype == torch.bool else s5 + m
        s, masked = s5.reshape(bh, r, tk), True
    if is_causal and tq > 1:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril(tk - tq)
        s = torch.where(allowed, s.view(bh, g, tq, tk), -math.inf).view(bh, r, tk)
        masked = True
    p = torch.softmax(s, dim=-1)
    if masked:  # rows that can attend to nothing are NaN after the softmax; SDPA gives zeros
        p = p.masked_fill_((s == -math.inf).all(-1, keepdim=True), 0.0)
    return p


def _decode_values(p: Tensor, v: Packed, spans: list, th_pad: int) -> Tensor:
    """fp32 output ``(BH, R, Dv)`` of the probabilities ``p`` (BH, R, Tk) over the history values."""
    bh, r, _ = p.shape
    th, dv = v.codes.shape[2], v.shape[-1]
    codes, absmax = _decode_operands(v, bh)
    nb, buf, o = dv // v.block, [None], None
    # probabilities scaled per V block: (BH, R * nb, T_hist), in the compute dtype
    w = torch.empty(bh, r, nb, th_pad, dtype=COMPUTE_DTYPE, device=p.device)
    w[..., th:].zero_()  # padding: zero weights
    torch.mul(p[:, :, None, :th], absmax, out=w[..., :th])  # fp32 product, stored bf16
    w = w.view(bh, r * nb, th_pad)
    for c0, c1, n_pad in spans:
        oc = torch.bmm(w[:, :, c0 : c0 + n_pad], _decode_lut(codes[:, c0:c1], v.codebook, v.bits, dv, buf, n_pad))
        o = oc.float() if o is None else o.add_(oc)
    if nb > 1:  # keep block i of the row scaled for block i
        o = o.view(bh, r, nb, nb, v.block).diagonal(dim1=2, dim2=3).transpose(2, 3).reshape(bh, r, dv)
    return o


# -- the chunk loop ------------------------------------------------------------------------------


def _chunk_size(bh: int, dim: int, align: int) -> int:
    c = max(64, min(4096, CHUNK_ELEMS // max(bh * dim, 1)))
    return max(align, c // align * align)


def attention_chunked(
    q: Tensor,
    k: Packed | tuple,
    v: Packed | tuple,
    k_tail: Optional[Tensor],
    v_tail: Optional[Tensor],
    attn_mask: Optional[Tensor],
    scale: float,
    is_causal: bool,
    plain: bool = False,
) -> Tensor:
    """Attention of ``q`` (B, Hq, Tq, D) over packed history ``k``/``v`` plus an optional fp tail.

    ``k`` and ``v`` are :class:`~nqkv_core.packed.Packed` (or their plain tuples), already checked.
    ``plain=True`` takes the compile-friendly fp32 route (no lookup tables, scaled mode only).
    Products are in :func:`compute_dtype` (fp32 for fp32 queries, without lookup tables).
    Returns (B, Hq, Tq, Dv) in ``q.dtype``.

    Loop structure: query blocks x key blocks x chunks. Within a key block the scores of all its
    chunks are gathered first and the softmax statistics are updated once per key block (for decode
    the whole cache is usually one key block: a two-pass softmax over tiny score rows); key blocks
    are merged with the online-softmax rescaling.
    """
    k, v = Packed.of(k), Packed.of(v)
    b, hq, tq, d = q.shape
    hkv, dv = k.codes.shape[1], v.shape[-1]
    c = _Loop(q, k, v, k_tail, v_tail, attn_mask, is_causal, plain)
    qf = (q.float() * scale).reshape(b, hkv, c.g, tq, d)
    out = q.new_empty(b, hkv, c.g, tq, dv)
    for i0 in range(0, tq, c.qb_len):
        i1 = min(tq, i0 + c.qb_len)
        res = _query_block(c, qf[:, :, :, i0:i1].reshape(c.bh, c.g * (i1 - i0), d), i0, i1)
        out[:, :, :, i0:i1] = res.view(b, hkv, c.g, i1 - i0, dv).to(q.dtype)
    return out.view(b, hq, tq, dv)


class _Loop:
    """What every query block of one :func:`attention_chunked` call shares."""

    def __init__(self, q: Tensor, k: Packed, v: Packed, k_tail: Optional[Tensor], v_tail: Optional[Tensor],
                 attn_mask: Optional[Tensor], is_causal: bool, plain: bool):
        b, hq, self.tq, d = q.shape
        hkv, self.th = k.codes.shape[1], k.codes.shape[2]
        self.dv = dv = v.shape[-1]
        self.g, self.bh = hq // hkv, b * hkv
        tt = 0 if k_tail is None else k_tail.shape[2]
        self.tk, self.is_causal, self.dev = self.th + tt, is_causal, q.device
        self.cdt = torch.float32 if plain else compute_dtype(q)
        decode: Callable = _decode_lut if self.cdt == COMPUTE_DTYPE else _decode_plain
        self.kp, self.vp = _Source(k, decode), _Source(v, decode)
        channel_blocks = [s.block for s in (self.kp, self.vp) if not s.per_token]
        self.chunk = _chunk_size(self.bh, max(d, dv), math.lcm(*channel_blocks) if channel_blocks else 64)
        self.qb_len = max(1, min(self.tq, SCORE_ELEMS // (self.bh * self.g * self.chunk)))
        self.fold = not plain and self.g * self.qb_len <= FOLD_MAX_ROWS
        self.mask = None
        if attn_mask is not None:
            self.mask = attn_mask.expand(b, hq, self.tq, self.tk).reshape(b, hkv, self.g, self.tq, self.tk)
        self.kt = None if k_tail is None else k_tail.reshape(self.bh, tt, d)
        self.vt = None if v_tail is None else v_tail.reshape(self.bh, tt, dv)


def _query_block(c: _Loop, qrows: Tensor, i0: int, i1: int) -> Tensor:
    """Normalised output (BH, R, Dv) fp32 of the query rows ``qrows`` (BH, R, D) of queries [i0, i1)."""
    bh, r, d = qrows.shape
    kp, vp, dev = c.kp, c.vp, c.dev
    nbk = kp.nb if c.fold and kp.per_token else 1
    nbv = vp.nb if c.fold and vp.per_token else 1
    qc = qrows.to(c.cdt)
    qbd = qc
    if nbk > 1:
        onehot = torch.arange(d, device=dev) // kp.block == torch.arange(nbk, device=dev)[:, None]
        qbd = (qrows[:, :, None, :] * onehot).to(c.cdt).reshape(bh, r * nbk, d)
    m = torch.full((bh, r, 1), -math.inf, device=dev)
    den = torch.zeros(bh, r, 1, device=dev)
    acc = torch.zeros(bh, r, c.dv, device=dev)
    # last key each query row may see (bottom-right causal alignment)
    last = c.tk - c.tq + torch.arange(i0, i1, device=dev).repeat(c.g).view(1, r, 1)
    end = c.tk if not c.is_causal else max(0, min(c.tk, c.tk - c.tq + i1))
    block_len = max(c.chunk, SCORE_ELEMS // (bh * r * max(nbk, nbv)) // c.chunk * c.chunk)
    th = c.th  # key blocks never straddle the history/tail boundary
    blocks = [(k0, min(th, end, k0 + block_len)) for k0 in range(0, min(th, end), block_len)]
    blocks += [(k0, min(end, k0 + block_len)) for k0 in range(th, end, block_len)]
    for k0, k1 in blocks:
        chunks = [(c0, min(k1, c0 + c.chunk)) for c0 in range(k0, k1, c.chunk)]
        s = _block_scores(c, qrows, qc, qbd, nbk, k0, k1, chunks)
        if c.mask is not None:
            mc = c.mask[..., i0:i1, k0:k1].reshape(bh, r, k1 - k0)
            s = s.masked_fill(~mc, -math.inf) if mc.dtype == torch.bool else s + mc.float()
        if c.is_causal and k1 - 1 > c.tk - c.tq + i0:
            s = s.masked_fill(torch.arange(k0, k1, device=dev).view(1, 1, -1) > last, -math.inf)
        # -- softmax statistics, merged across key blocks --
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
        p = torch.exp(s - m_safe)
        alpha = torch.exp(m - m_safe)
        den = den * alpha + p.sum(-1, keepdim=True)
        m = m_new
        acc = acc * alpha + _block_values(c, p, nbv, k0, k1, chunks)
    return acc / den.masked_fill(den == 0, 1.0)


def _block_scores(c: _Loop, qrows: Tensor, qc: Tensor, qbd: Tensor, nbk: int, k0: int, k1: int,
                  chunks: list) -> Tensor:
    """fp32 scores (BH, R, k1 - k0) of the query rows against keys [k0, k1) (history or tail)."""
    kp, cdt = c.kp, c.cdt
    bh, r, _ = qrows.shape
    if k0 >= c.th:
        return torch.bmm(qc, c.kt[:, k0 - c.th : k1 - c.th].to(cdt).transpose(1, 2)).float()
    if c.fold and kp.per_token:
        part = torch.cat([_scores_folded(qrows, qbd, kp, c0, c1) for c0, c1 in chunks], dim=2)
        part = part.view(bh, r, nbk, k1 - k0)
        if nbk > 1:
            return (part * kp.absmax[:, None, :, k0:k1]).sum(2)
        return part[:, :, 0] * kp.absmax[:, :, k0:k1]
    if c.fold:
        return torch.cat([_scores_folded(qrows, qbd, kp, c0, c1) for c0, c1 in chunks], dim=2)
    return torch.cat(
        [torch.bmm(qc, (kp.levels(c0, c1) * kp.scales(c0, c1)).to(cdt).transpose(1, 2)) for c0, c1 in chunks],
        dim=2).float()


def _block_values(c: _Loop, p: Tensor, nbv: int, k0: int, k1: int, chunks: list) -> Tensor:
    """Unnormalised fp32 output (BH, R, Dv) of the weights ``p`` (BH, R, k1 - k0) over values [k0, k1)."""
    vp, cdt = c.vp, c.cdt
    bh, r, _ = p.shape
    if k0 >= c.th:
        return torch.bmm(p.to(cdt), c.vt[:, k0 - c.th : k1 - c.th].to(cdt)).float()
    if c.fold and vp.per_token:
        w = (p[:, :, None, :] * vp.absmax[:, None, :, k0:k1]).to(cdt).view(bh, r * nbv, k1 - k0)
        o = sum(_pv_folded(p, w[:, :, c0 - k0 : c1 - k0], vp, c0, c1).float() for c0, c1 in chunks)
        blk = c.dv // nbv
        return o.view(bh, r, nbv, nbv, blk).diagonal(dim1=2, dim2=3).transpose(2, 3).reshape(bh, r, c.dv)
    if c.fold:
        return sum(_pv_folded(p[:, :, c0 - k0 : c1 - k0], None, vp, c0, c1) for c0, c1 in chunks)
    return sum(
        torch.bmm(p[:, :, c0 - k0 : c1 - k0].to(cdt), (vp.levels(c0, c1) * vp.scales(c0, c1)).to(cdt)).float()
        for c0, c1 in chunks)
