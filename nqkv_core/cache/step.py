"""One attention step of a cache layer: transform the new tokens, attend, commit.

The decode strategy is picked once per cache (``NQKVCache(decode=...)``), never by globals:

* ``"reference"``: plain torch with the exact arithmetic of the fake-quantized scheme (fp32 SDPA
  over the dequantized body); what the tests compare every other strategy against.
* ``"ops"``: the general step (the transform applied to queries and keys) with attention through
  the ``torch.ops.nqkv`` ops, which read the packed codes in place (Triton on GPU, native on CPU).
* ``"folded"``: as ``"ops"``, but an eager one-token step folds the frozen transform into a few
  vector ops (:class:`StepMaps`), applied around the same attention op.
* ``"native"`` (``"auto"``): as ``"folded"``, and on CPU the whole folded step (transform,
  attention, commit) is one native call when the kernels can take it.

The strategies compute the same attention: the tests run each on the same inputs against the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from nqkv_core import native
from nqkv_core.cache import commit, compiled, fitting  # noqa: F401  (compiled: registers torch.ops.nqkv.cache_step)
from nqkv_core.cache.attend import Logits, attend, prompt_attention
from nqkv_core.cache.slots import (all_slots_valid, allowed_slots, padded_allowed_slots, slot_key_bias,
                                    slot_positions)
from nqkv_core.ops import fused_step
from nqkv_core.ops.attention import key_bias_args
from nqkv_core.quantize import decision_thresholds, fit_ratios, scale_range
from nqkv_core.scheme import per_query_head, rotate_half
from nqkv_core.transform import output_transform, rope_bias_weights

Decode = Literal["auto", "reference", "ops", "folded", "native"]
DECODE_STRATEGIES = ("auto", "reference", "ops", "folded", "native")


def check_decode(decode: str) -> str:
    """``decode`` if it names a strategy; ValueError otherwise."""
    if decode not in DECODE_STRATEGIES:
        raise ValueError(f"decode must be one of {', '.join(map(repr, DECODE_STRATEGIES))}, got {decode!r}")
    return decode


@dataclass
class StepMaps:
    """A layer's frozen transform prepared for eager one-token decode steps.

    The query is rotated by the transform's ``rot_k`` (one ``(d, d)`` matrix for all heads) and,
    for a RoPE-aware key centre, its bias weights are :func:`rope_bias_weights` of the raw query
    (in the transform's key order, ``KVTransform.key_order``, as are the new keys) and ``mu_q``
    (``mu_k`` per query head), elementwise: no matrix per query head and sequence to
    hold and read every step. ``mu_k`` / ``mu_k_half`` give the key centre at position ``p`` as
    ``mu_k * cos[p] + mu_k_half * sin[p]`` with row ``p`` of the layer's RoPE table, the same
    arithmetic as :meth:`~nqkv_core.transform.KVTransform.key_centre`; ``mu_v`` shifts values (and outputs, back). All
    contiguous fp32 (what the native step reads); ``refs`` are what they were built from (compared
    by identity).
    """

    refs: tuple
    mu_k: torch.Tensor | None
    mu_k_half: torch.Tensor | None
    mu_q: torch.Tensor | None
    mu_v: torch.Tensor | None

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.refs[4]


class StepMemo:
    """The last value of a per-step quantity that every layer of a cache computes alike.

    The layers of a cache hold the same tokens in the same slots, so e.g. the slot positions of an
    eager decode step are the same for all of them: the first layer computes them, the others reuse
    them (a step of a small model is dominated by such small per-layer ops).
    """

    def __init__(self):
        self._entries: dict[str, tuple[tuple, Any]] = {}

    def get(self, name: str, key: tuple, make: Callable[[], Any]) -> Any:
        """The value of ``name`` for ``key`` (a tuple of plain values): ``make()`` unless the last call
        for ``name`` had the same key."""
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            entry = self._entries[name] = (key, make())
        return entry[1]


# -- the step ---------------------------------------------------------------------------------------


def attention(layer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
              config: Any = None, logits: Logits | None = None) -> torch.Tensor:
    """Attend ``query`` ``(b, hq, T, d)`` to ``layer``'s cache plus its parked tokens, then commit them.

    ``config``: the model config (RoPE frequencies of a RoPE-centred scheme, if the cache has none).
    ``logits``: soft-capping and learned sinks, if the model has them; such steps attend through
    :func:`~nqkv_core.cache.attend.softmax_attention` over the dequantized body whatever the strategy.
    A step of the layer's fit period goes through :func:`nqkv_core.cache.fitting.attention`.
    Returns ``(b, T, hq, d)`` in the query dtype.
    """
    if layer._pending is None:
        raise RuntimeError("NQKVLayer.attention called without a preceding cache.update")
    k_new, v_new = layer._pending
    layer._pending = None
    if logits is not None and not logits.active:
        logits = None
    if torch.compiler.is_compiling() and logits is None and opaque_step(layer):
        # One node per layer in the graph: the eager step (one native call), not its ~180 torch ops.
        out = torch.ops.nqkv.cache_step(query, k_new, v_new, attention_mask, layer.length, layer.k_sink,
                                        scaling, layer.step_name)
        layer._advance(k_new.shape[2])  # in the graph, as the traced step counts, not inside the op
        return out
    if fitting.active(layer):
        return fitting.attention(layer, query, k_new, v_new, attention_mask, scaling, config, logits, _step)
    return _step(layer, query, k_new, v_new, attention_mask, scaling, config, logits)


def _step(layer, query: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, attention_mask: torch.Tensor | None,
          scaling: float, config: Any, logits: Logits | None) -> torch.Tensor:
    """:func:`attention` once the parked tokens are taken: transform, attend, commit."""
    group = query.shape[1] // layer.num_heads
    if layer.transform is None:
        layer.transform = layer._fit(k_new, v_new, query, config, attention_mask)
    n = None if torch.compiler.is_compiling() else layer._eager_length()
    maps = _maps(layer, group, scaling) if _folds(layer, n, query.shape[2]) else None
    if logits is not None:
        logits = _storage_logits(layer, logits, query, group, scaling)
    if (maps is not None and logits is None and layer.decode in ("auto", "native") and attention_mask is None
            and all_slots_valid(layer, n)):
        out = _native_step(layer, query, k_new, v_new, maps, n, scaling)
        if out is not None:
            return out.to(query.dtype).transpose(1, 2)
    if maps is not None:
        q, w, k_new, v_new = _folded_inputs(layer, query, k_new, v_new, maps, n, scaling)
        k_attend = None
    else:
        q, w, k_new, k_attend = _general_inputs(layer, query, k_new, group, n, attention_mask)
        v_new = layer.transform.values(v_new).to(layer.fp_dtype)
    if layer.starts is not None:
        k_new, v_new = commit.zero_padding(layer, k_new, v_new)
    # Several new tokens (a prompt, a chunk, assisted decoding's candidates): the tokens that leave
    # the window during them are quantized first, so that each query sees every key as a one-token
    # step at its position would (quantized once older than the window): results do not depend on
    # how a sequence is split into forward passes. A traced full layer writes the leaving token of a
    # one-token step first too (its body slot is masked for this step's query): a write before the
    # attention's read lets inductor write the preallocated body in place, where a write after the
    # read became a copy of the whole body on every step.
    T = query.shape[2]
    chunk = layer.stores_body and ((n is None and not layer.is_sliding)
                                   or (T > 1 and (n is None or layer._body_capacity(n + T - 1) > 0)))
    if chunk:
        commit.write_leaving(layer, k_new, v_new)
    output = _output_maps(layer)
    out = _attend_cache(layer, query, q, w, k_new, k_attend, v_new, attention_mask, scaling, n, logits, output)
    if output is None:
        out = _output(layer, out, group)
    layer._commit(k_new, v_new, leaving_written=chunk)
    return out.to(query.dtype).transpose(1, 2).contiguous()


def _storage_logits(layer, logits: Logits, query: torch.Tensor, group: int, scaling: float) -> Logits:
    """``logits`` for scores and values in the storage basis: the sinks' zero value transformed, and
    the row shift a plain key centre takes from the scores (a RoPE-aware one is the key bias)."""
    t = layer.transform
    sink_value = shift = None
    if logits.sinks is not None and t.mu_v is not None:
        # a sink takes probability without a value: zero in the original basis, centred in storage
        sink_value = t.values(query.new_zeros(query.shape[0], layer.num_heads, 1, query.shape[-1]))
    if t.mu_k is not None and t.inv_freq is None:
        shift = scaling * (query.float() * per_query_head(t.mu_k, group).float()).sum(-1, keepdim=True)
    return Logits(logits.softcap, logits.sinks, sink_value, shift)


def _folds(layer, n: int | None, T: int) -> bool:
    """Whether this step folds the transform (:class:`StepMaps`): eager one-token steps of the folding
    strategies, with no per-channel equalisation (which the maps do not carry)."""
    t = layer.transform
    return (layer.decode in ("auto", "folded", "native") and bool(n) and T == 1
            and layer.fp_dtype in (torch.float32, torch.bfloat16) and t.a_k is None and t.b_v is None)


def _folded_inputs(layer, query, k_new, v_new, maps: StepMaps, n: int, scaling: float):
    """Queries in the storage basis, their key-bias weights, and the new keys and values, from the
    folded maps: one kernel launch where it serves (a GPU), else the torch ops below (its reference)."""
    t, d = layer.transform, query.shape[-1]
    row = layer.rope.row(n) if maps.mu_k_half is not None else None
    fused = fused_step.step_inputs(query, k_new, v_new, t.k_order, t.rot_k, t.rot_v, maps.mu_k, maps.mu_k_half,
                                   maps.mu_v, row, scaling, layer.fp_dtype)
    if fused is not None:
        return fused
    query, k_new = t.key_order(query), t.key_order(k_new)  # the maps and the table pair channels in it
    q = query.float() @ t.rot_k if t.rot_k is not None else query.float()
    w = rope_bias_weights(query, maps.mu_q, scaling) if maps.mu_k_half is not None else None
    k_new = k_new.float()
    if maps.mu_k_half is not None:  # minus the RoPE'd centre at position n (key_centre's arithmetic)
        cos, sin = row[: d // 2].repeat(2), row[d // 2 :].repeat(2)
        k_new = k_new - (t.mu_k * cos + maps.mu_k_half * sin)
    elif t.mu_k is not None:
        k_new = k_new - t.mu_k
    k_new = k_new @ t.rot_k if t.rot_k is not None else k_new
    # in the exact tokens' dtype, as the general step's: a 16-bit model's bf16 queries take the
    # grouped decode kernel on a GPU (fp32 ones, its split-K kernel and a dense key bias)
    return q.to(layer.fp_dtype), w, k_new.to(layer.fp_dtype), t.values(v_new).to(layer.fp_dtype)


def _prompt_only(layer, n: int | None, T: int, attention_mask: torch.Tensor | None) -> bool:
    """Whether ``T`` new tokens on an empty cache attend only to each other, all exact: no query
    reads a key quantized (they fit sinks and window, or the layer stores no body)."""
    return (n == 0 and (layer._body_capacity(T - 1) == 0 or not layer.stores_body)
            and (attention_mask is None or attention_mask.shape[-1] >= T))


def _general_inputs(layer, query, k_new, group: int, n: int | None, attention_mask: torch.Tensor | None):
    """Queries and new keys through the transform's own methods (any step, any strategy)."""
    t = layer.transform
    q = t.queries(query, group).to(layer.fp_dtype)
    # With a RoPE-aware centre, the first tokens of an empty cache (a prompt) attend only to each
    # other, all exact: they are scored uncentred, which needs no (T, T) score offset.
    fresh = t.inv_freq is not None and _prompt_only(layer, n, query.shape[2], attention_mask)
    k_attend = t.keys(k_new, centre=False).to(layer.fp_dtype) if fresh else None
    k_new = t.keys(k_new, start=layer.length if n is None else n).to(layer.fp_dtype)
    return q, None, k_new, k_attend


def _attend_cache(layer, query, q, w, k_new, k_attend, v_new, attention_mask, scaling: float, n: int | None,
                  logits: Logits | None = None, output: tuple | None = None):
    """Attention of the storage-basis queries ``q`` over the layer's slots and the new tokens; with
    ``output`` (:func:`_output_maps`) taken back to the model's basis."""
    T = q.shape[2]
    if _prompt_only(layer, n, T, attention_mask):
        # A prompt on an empty cache that no query reads quantized (it fits sinks and window): it
        # attends to its own exact tokens only (a plain centre is a constant per query row, which
        # the softmax ignores).
        out = prompt_attention(q, k_new if k_attend is None else k_attend, v_new, attention_mask, scaling,
                               layer.sliding_window, logits)
        return out if output is None else output_transform(out, *output)
    if n is None and logits is None and not layer.is_sliding and layer.starts is None:
        # compiled: the tokens present only (a padded batch's rows mask their own body slots: below)
        return _attend_present(layer, query, q, w, k_new, v_new, attention_mask, scaling, output)
    p0 = layer.length
    # Other compiled steps read the whole preallocated body (masked) so that shapes never change; a
    # chunk reads the tokens it quantized before attending too.
    n_body = layer.capacity if n is None else min(layer._body_capacity(n + T - 1), layer.capacity)
    if n is None:
        positions, valid = slot_positions(layer, p0, n_body, T)
    else:  # the same for every layer of the step
        key = (n, n_body, T, layer.n_sinks, layer.n_ring, layer.window, layer.sliding_window, layer.capacity,
               layer.device)
        positions, valid = layer.step_memo.get("positions", key, lambda: slot_positions(layer, p0, n_body, T))
    if n is not None and T == 1 and attention_mask is None and all_slots_valid(layer, n) and logits is None:
        allowed = None  # one query that sees every stored slot: nothing to mask
    elif layer.starts is not None:
        allowed = padded_allowed_slots(layer, p0, positions, valid, T, attention_mask)
    else:
        allowed = allowed_slots(layer, p0, positions, valid, T, attention_mask)
    # RoPE-aware centre: the score offset q . R(p) mu, added inside attend
    key_bias = slot_key_bias(layer, query, positions, n, scaling, w) if layer.transform.inv_freq is not None else None
    if key_bias is not None and layer.starts is not None and logits is None:
        # per-row sink positions: the dense offsets as an additive mask (the (w, table, positions)
        # form of the native decode op has one position per slot for all rows)
        allowed, key_bias = key_bias.dense().masked_fill(~allowed, -math.inf), None
    k_fp = torch.cat([layer.k_sink[:, :, : layer.n_sinks], layer.k_ring[:, :, : layer.n_ring], k_new], dim=2)
    v_fp = torch.cat([layer.v_sink[:, :, : layer.n_sinks], layer.v_ring[:, :, : layer.n_ring], v_new], dim=2)
    return attend(
        q, tuple(x[:, :, :n_body] for x in layer.k_body), tuple(x[:, :, :n_body] for x in layer.v_body),
        layer.k_fmt, layer.v_fmt, k_fp, v_fp, allowed, scaling, key_bias, fused=layer.decode != "reference",
        logits=logits, output=output,
    )


def _attend_present(layer, query, q, w, k_new, v_new, attention_mask, scaling: float,
                    output: tuple | None) -> torch.Tensor:
    """:func:`_attend_cache` of a traced compiled step: ``nqkv::present_attention`` reads the body slots
    that hold tokens, their count a device tensor, so that the graph keeps the preallocated shapes
    while the attention's cost follows the tokens present (no ``(.., capacity)`` mask or positions).
    The tail's positions, mask and key bias are built here, over sinks, ring and new tokens only."""
    T, S, kf, vf = q.shape[2], layer.n_sinks, layer.k_fmt, layer.v_fmt
    p0 = layer.length
    # the tokens that have left the window once the step's leaving ones are written (before attending)
    n_body = (p0 + (T - S - layer.window)).clamp(0, layer.capacity)
    positions, valid = slot_positions(layer, p0, 0, T)  # [sinks | ring | new]
    allowed = allowed_slots(layer, p0, positions, valid, T, attention_mask)
    bias = (None, None, None, None)
    if layer.transform.inv_freq is not None:
        bias = key_bias_args(slot_key_bias(layer, query, positions, None, scaling, w).parts)
    k_fp = torch.cat([layer.k_sink[:, :, :S], layer.k_ring[:, :, : layer.n_ring], k_new], dim=2)
    v_fp = torch.cat([layer.v_sink[:, :, :S], layer.v_ring[:, :, : layer.n_ring], v_new], dim=2)
    return torch.ops.nqkv.present_attention(
        q, list(layer.k_body), list(layer.v_body), kf.codebook, kf.block, vf.codebook, vf.block, k_fp, v_fp,
        allowed, n_body, attention_mask, S, scaling, layer.decode != "reference", *bias,
        *(output or (None, None)),
    )


def _output_maps(layer) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """The value rotation and centre ``(rot_v, mu_v)`` that take the layer's attention output back to
    the model's basis inside the attention call (``attend``'s ``output``), or None where there is
    nothing to undo or the transform also scales values (``b_v``: :func:`_output` does it)."""
    t = layer.transform
    if t.b_v is not None or (t.rot_v is None and t.mu_v is None):
        return None
    return tuple(None if x is None else x.float() for x in (t.rot_v, t.mu_v))


def _output(layer, out: torch.Tensor, group: int) -> torch.Tensor:
    """The attention output back in the original basis (rotation undone, value scales and centre)."""
    t = layer.transform
    if t.rot_v is not None or t.b_v is not None or t.mu_v is not None:
        return t.output(out.float(), group)
    return out


def opaque_step(layer) -> bool:
    """Whether a compiled step runs ``layer`` as ``nqkv::cache_step`` (see :class:`NQKVCache`)."""
    if layer.transform is None and layer.prefix is None:  # the first step (a traced one fits the transform)
        return False
    return not layer.compiles_traced


# -- the folded step and its native twin ------------------------------------------------------------


def _maps(layer, group: int, scaling: float) -> StepMaps:
    """The :class:`StepMaps` of the layer's current transform (built on first use, then reused)."""
    t = layer.transform
    refs = (t.mu_k, t.rot_k, t.mu_v, t.inv_freq, group, scaling)
    m = layer._step_maps
    if m is not None and all(a is b for a, b in zip(m.refs[:4], refs[:4])) and m.refs[4:] == refs[4:]:
        return m
    rope = t.inv_freq is not None
    mu_k_half = rotate_half(t.mu_k) if rope else None
    mu_q = per_query_head(t.mu_k, group).float().contiguous() if rope else None

    def flat(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.float().contiguous()

    layer._step_maps = StepMaps(refs, flat(t.mu_k), flat(mu_k_half), mu_q, flat(t.mu_v))
    return layer._step_maps


def _native_step(layer, query: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, maps: StepMaps, n: int,
                 scaling: float) -> torch.Tensor | None:
    """The folded one-token step (transform, attention, commit) as one native call, when the
    native kernels can take it; None otherwise (the caller runs the torch ops).

    Same arithmetic as the folded torch step up to fp32 rounding (a code may differ at a level
    boundary, rarely); ``tests/test_cache.py`` compares the two.
    """
    S, R, W = layer.n_sinks, layer.n_ring, layer.window
    if R == 0 or layer.is_sliding or not (layer.k_fmt.quantized and layer.v_fmt.quantized):
        return None
    step = _native_decode_step(layer, maps)
    if not step.supported:
        return None
    t = layer.transform  # keys and queries in its key order, in which the maps and table pair channels
    q, k = t.key_order(query).float().contiguous(), t.key_order(k_new).float().contiguous()
    v = v_new.float().contiguous()
    if not native.decode_step_supported(q, k, v):  # (heads and head_dim are the layer's own)
        return None
    n_body = min(layer._body_capacity(n), layer.capacity)
    leaving = n - W + 1  # the token that leaves the window (W > 1: it is in the ring)
    out = step.run(
        q, k, v, S, R, n_body, leaving % R if leaving >= S else -1, leaving - S, n if n < S else -1,
        n % R if n >= S else -1, n, scaling,
    )
    layer._advance(1)
    return out


def _native_decode_step(layer, maps: StepMaps) -> native.DecodeStep:
    """The layer's prepared native step (:class:`~nqkv_core.native.DecodeStep`), rebuilt when an
    object it was built from was replaced (new maps or transform, a body that grew, a longer RoPE
    table); the check is a few identity tests, since it runs on every step."""
    t, kf, vf = layer.transform, layer.k_fmt, layer.v_fmt
    key = (maps, t, kf, vf, layer.k_sink, layer.v_sink, layer.k_ring, layer.v_ring, layer.k_body, layer.v_body,
           layer.rope.table)
    if layer._decode_step is None or any(a is not b for a, b in zip(key, layer._decode_step_key)):
        rope = layer.rope.table if maps.mu_k_half is not None else None
        layer._decode_step = native.DecodeStep(
            layer.num_heads * maps.group, t.rot_k, t.rot_v, maps.mu_k, maps.mu_k_half, maps.mu_v,
            (layer.k_sink, layer.v_sink), (layer.k_ring, layer.v_ring),
            kf.packed(layer.k_body), vf.packed(layer.v_body),
            (decision_thresholds(kf.encode_codebook), decision_thresholds(vf.encode_codebook)),
            scale_range(layer.scheme.scale_dtype), rope,
            (fit_ratios(layer.device), int(kf.fit_scale) | 2 * int(vf.fit_scale)),
            (kf.encode_codebook, t.k_feedback) if kf.feedback else None,
        )
        layer._decode_step_key = key
    return layer._decode_step
