"""``NQKVCache``: a transformers ``Cache`` that stores keys and values quantized, append-only.

Per layer and per ``(batch, kv head)``, in the storage basis of the scheme (after its exact transform,
see :mod:`nqkv_core.scheme`), positions are split three ways::

    [0, S)                 sinks: full precision, never quantized
    [S, n - W)             body: quantized once, when the token leaves the window; never re-quantized
    [n - W, n)             window: full precision (the query's own token is the W-th)

with ``n`` the number of tokens seen, ``S = scheme.sinks`` and ``W = max(scheme.window, 1)``. The
window is a ring buffer of ``W - 1 + crop_margin`` slots; the body is a preallocated code and scale
buffer (grown by doubling in the dynamic mode, fixed with ``max_cache_len``). Every write is an
``index_copy_`` at tensor positions and every read is masked, so a decode step with a fixed
``max_cache_len`` has static shapes, allocates no cache storage, and traces with
``torch.compile(fullgraph=True)``.

A step is split between the two hooks transformers gives a cache:

* ``Cache.update`` (called by the model after RoPE) only parks the new K/V on the layer and returns
  a handle instead of tensors, so attention that is not NQKV fails loudly instead of silently
  attending to a partial cache.
* the registered attention function (``attn_implementation="nqkv"``) fits the scheme's transform
  on the first call (it needs the queries), attends to ``[body | sinks | window | new]`` with the new
  tokens exact, and then commits the new tokens (quantizing those that leave the window).

All attention goes through :func:`attend`; it is the one place that reads the quantized body.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F

import nqkv_core.ops  # noqa: F401  (registers torch.ops.nqkv.attention)
from nqkv_core.ops import cpu as cpu_ops
from nqkv_core.ops.attention import attention_eager, skips_dispatcher
from nqkv_core.codebook import get_codebook
from nqkv_core import native
from nqkv_core.quantize import KERNEL_SCALE_DTYPES, _fit_ratios, _midpoints, dequantize_blockwise, quantize_blockwise
from nqkv_core.scheme import (FP_BITS, KVScheme, KVTransform, default_scheme, fit_transform, key_feedback,
                              per_query_head, rope_inv_freq, rotate_half)

try:  # transformers is an optional dependency of the package; the cache needs it.
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("nqkv_core.cache needs transformers>=4.57: pip install 'nqkv[eval]'") from e

ATTN_NAME = "nqkv"
# Attend through the fused op (torch.ops.nqkv.attention). False: fp32 SDPA over the dequantized body, a
# reference path that makes the cache bit-comparable with fake quantization (used by the tests).
FUSED = True
# Fold the frozen transform of an eager one-token step into a few matmuls (_StepMaps). False: the
# general path of any step (the tests compare the two).
FOLD_STEPS = True
FORMAT_VERSION = "1"
# How a compiled step runs a layer (``NQKVCache(compiled_step=...)``).
CompiledStep = Literal["auto", "op", "traced"]
_ENABLE_HINT = (
    "pass attn_implementation='nqkv' when loading the model, or call nqkv_core.enable(model)"
)


# The transform's saved fields (the feedback matrix is derived from the stored metric on load).
TRANSFORM_FIELDS = tuple(f.name for f in dataclasses.fields(KVTransform) if f.name != "k_feedback")


def _version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# -- attention over the stored layout --------------------------------------------------------------


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


def _read_body(data: tuple[torch.Tensor, ...], fmt: SideFormat, dtype: torch.dtype) -> torch.Tensor:
    if not fmt.quantized:
        return data[0].to(dtype)
    codes, absmax = data
    return dequantize_blockwise(codes, absmax, fmt.codebook, fmt.block, axis=-1, dtype=dtype)


@dataclass
class KeyBias:
    """A per-key score offset ``w[b, h, i] . table[positions[j]]`` (the RoPE-centred cache's).

    ``parts = (w, table, positions)``: ``w`` ``(b, hq, T, d)``, ``table`` ``(P, d)``, ``positions``
    ``(slots,)`` in ``[0, P)``, what the native decode kernel takes; ``dense()`` materialises the
    ``(b, hq, T, slots)`` offsets for every other path.
    """

    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    dense: Callable[[], torch.Tensor]


def attend(
    query: torch.Tensor,
    k_body: tuple[torch.Tensor, ...],
    v_body: tuple[torch.Tensor, ...],
    k_fmt: SideFormat,
    v_fmt: SideFormat,
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    key_bias: KeyBias | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over a quantized body followed by full-precision keys/values.

    Args:
        query: ``(b, hq, T, d)`` in the storage basis.
        k_body, v_body: ``(codes, absmax)`` of ``N`` body tokens, ``(b, hkv, N, ...)`` (or a
            one-tuple with a plain ``(b, hkv, N, d)`` tensor for a 16-bit side).
        k_fmt, v_fmt: their storage formats.
        k_fp, v_fp: ``(b, hkv, M, d)`` full-precision keys/values (sinks, window, new tokens).
        mask: boolean ``(b or 1, 1, T, N + M)``, True = attend, or an additive float mask
            broadcastable to ``(b, hq, T, N + M)`` (``-inf`` = masked); every row attends to at least
            one key. None: every query attends to every key.
        scale: softmax scale.
        key_bias: a score offset added to every key's score (a RoPE-centred cache's), or None.

    Returns:
        ``(b, hq, T, d)`` in ``query.dtype``.
    """
    if key_bias is not None:
        k = (*k_body, k_fmt.codebook, k_fmt.block, 3)
        v = (*v_body, v_fmt.codebook, v_fmt.block, 3)
        if (
            FUSED and k_fmt.quantized and v_fmt.quantized and k_body[0].shape[2]
            and query.device.type == "cpu" and cpu_ops.decode_fits(query, k, v, k_fp)
        ):  # the CPU decode path takes the offset as (w, table, positions): no (b, hq, T, slots) tensor
            if torch.compiler.is_compiling():
                return torch.ops.nqkv.attention_cpu_decode(query, *k, *v, k_fp, v_fp, mask, scale, False,
                                                           *key_bias.parts)
            if skips_dispatcher(query, k_fp, v_fp):
                return cpu_ops.attention_decode(query, k, v, k_fp, v_fp, mask, scale, False, key_bias.parts)
        bias = key_bias.dense()
        mask = bias if mask is None else bias.masked_fill(~mask, -math.inf)
    if k_body[0].shape[2] == 0:
        # Nothing quantized yet (a prompt on an empty cache): torch's own fused SDPA over the exact
        # tokens; the op's chunked path would only add its bookkeeping.
        return sdpa(query, k_fp.to(query.dtype), v_fp.to(query.dtype), attn_mask=mask, scale=scale)
    if FUSED and k_fmt.quantized and v_fmt.quantized:
        # The fused op reads the packed codes in place (chunked decode on CPU, Triton on GPU); eager
        # calls skip the dispatcher, which costs about as much as the attention of a short cache.
        op = attention_eager if skips_dispatcher(query, k_fp, v_fp) else torch.ops.nqkv.attention
        return op(
            query, *k_body, k_fmt.codebook, k_fmt.block, 3, *v_body, v_fmt.codebook, v_fmt.block, 3,
            k_fp.to(query.dtype), v_fp.to(query.dtype), mask, scale, False,
        )
    # A 16-bit side (or the reference path): SDPA over the dequantized body and the exact tokens.
    k = torch.cat([_read_body(k_body, k_fmt, query.dtype), k_fp.to(query.dtype)], dim=2)
    v = torch.cat([_read_body(v_body, v_fmt, query.dtype), v_fp.to(query.dtype)], dim=2)
    return sdpa(query, k, v, attn_mask=mask, scale=scale)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with fewer key/value heads than query heads (GQA).

    In fp32 on CUDA the key/value heads are repeated rather than passing ``enable_gqa``: with it an
    fp32 prompt went to the math backend (torch 2.11, H200: 23 GB peak for one 16k-token sequence,
    the whole score matrix), while the memory-efficient backend takes fp32 with repeated heads.
    """
    group = query.shape[1] // key.shape[1]
    if query.is_cuda and query.dtype == torch.float32 and group > 1:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(query, key, value, **kwargs)
    return F.scaled_dot_product_attention(query, key, value, enable_gqa=True, **kwargs)


def prompt_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention of ``T`` new tokens over themselves (a prompt on an empty cache).

    ``attention_mask``: None or transformers' ``(b, 1, T, >= T)`` mask (bool, or additive) whose
    first ``T`` columns are these tokens. Without padding it is the plain causal mask, and torch's
    SDPA runs with ``is_causal=True`` instead: its fused CPU kernel then skips the masked half
    (prefill figures in docs/benchmarks.md, "Compiled decode").
    """
    T = query.shape[2]
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, -T:, :T]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        # rows of padding queries see nothing; give them every token (finite, discarded outputs)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        if bool((mask == torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()).all()):
            mask = None
    return sdpa(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask, is_causal=mask is None, scale=scale)


# -- one layer --------------------------------------------------------------------------------------


class _Handle:
    """What ``update`` returns in place of K/V tensors: the layer, for the NQKV attention function."""

    __slots__ = ("layer",)

    def __init__(self, layer: "NQKVLayer"):
        self.layer = layer

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol lookups (copy, pickle) fall back to the defaults
            raise AttributeError(name)
        raise TypeError(
            f"an NQKVCache layer holds quantized K/V that only the 'nqkv' attention function can read"
            f" (something asked for .{name}); {_ENABLE_HINT}"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # an attention function other than 'nqkv' handed the handle to a torch op as if it were K/V
        raise TypeError(
            f"an NQKVCache layer holds quantized K/V that only the 'nqkv' attention function can read"
            f" ({getattr(func, '__name__', func)} got it as a tensor); {_ENABLE_HINT}"
        )

    def __repr__(self) -> str:
        return f"<NQKV layer handle: {self.layer!r}>"


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
    """

    def __init__(self, inv_freq: torch.Tensor | None = None, max_len: int | None = None):
        self.inv_freq = inv_freq
        self.max_len = max_len
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


@dataclass
class _StepMaps:
    """A layer's frozen transform prepared for eager one-token decode steps.

    The query is rotated by the transform's ``rot_k`` (one ``(d, d)`` matrix for all heads) and,
    for a RoPE-aware key centre, its bias weights are :func:`rope_bias_weights` of the raw query
    and ``mu_q`` (``mu_k`` per query head), elementwise: no matrix per query head and sequence to
    hold and read every step. ``mu_k`` / ``mu_k_half`` give the key centre at position ``p`` as
    ``mu_k * cos[p] + mu_k_half * sin[p]``, the same arithmetic as
    :func:`~nqkv_core.scheme.apply_rope`; ``mu_v`` and ``out_shift`` (``mu_v`` per query head)
    shift values and outputs. All contiguous fp32 (what the native step reads); ``refs`` are what
    they were built from (compared by identity).
    """

    refs: tuple
    mu_k: torch.Tensor | None
    mu_k_half: torch.Tensor | None
    mu_q: torch.Tensor | None
    mu_v: torch.Tensor | None
    out_shift: torch.Tensor | None

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


class NQKVLayer(CacheLayerMixin):
    """The quantized K/V cache of one attention layer (layout in the module docstring).

    Buffers, for batch ``b``, ``h`` kv heads, head_dim ``d``, body capacity ``C`` and ring size ``R``
    (one extra "trash" slot in each, where writes that must not land go):

    * ``k_body`` / ``v_body``: ``(codes uint8 (b, h, C+1, d*bits/8), absmax (b, h, C+1, d/block))``,
      or ``(values (b, h, C+1, d),)`` for a 16-bit side.
    * ``k_sink`` / ``v_sink``: ``(b, h, S+1, d)``; ``k_ring`` / ``v_ring``: ``(b, h, R+1, d)``.
    * ``length``: int64 scalar tensor, tokens seen (a tensor so compiled steps do not recompile).
    * ``transform``: the frozen :class:`~nqkv_core.scheme.KVTransform` (None before the first step).

    With a RoPE-aware key centre (``k_centre_rope``) the keys are stored minus ``R(p) mu`` at their
    position ``p`` and attention adds ``q . R(p) mu`` to each score as an additive mask, from the
    cos/sin table ``rope`` shared by the layers of a cache.
    """

    is_sliding = False
    is_croppable = True
    supports_early_init = True

    def __init__(self, scheme: KVScheme, max_cache_len: int | None = None, crop_margin: int = 0,
                 rope: RopeTable | None = None, step_memo: StepMemo | None = None,
                 compiled_step: CompiledStep = "auto"):
        super().__init__()
        if max_cache_len is not None and max_cache_len < 1:
            raise ValueError(f"max_cache_len must be positive or None, got {max_cache_len}")
        if compiled_step not in ("auto", "op", "traced"):
            raise ValueError(f"compiled_step must be 'auto', 'op' or 'traced', got {compiled_step!r}")
        self.compiled_step = compiled_step
        if crop_margin < 0:
            raise ValueError(f"crop_margin must be >= 0, got {crop_margin}")
        side_format(scheme, "k"), side_format(scheme, "v")  # fail at construction, not mid-generate
        self.scheme = scheme
        self._max_len = max_cache_len
        self.crop_margin = crop_margin
        self.n_sinks = scheme.sinks
        self.window = max(scheme.window, 1)  # the current token is always attended exactly
        self.n_ring = self.window - 1 + crop_margin
        self.length = torch.tensor(0, dtype=torch.long)
        self.transform: KVTransform | None = None
        self.rope_centred = scheme.k_centre and scheme.k_centre_rope
        self.rope = rope if rope is not None else RopeTable(max_len=max_cache_len)
        self.step_memo = step_memo if step_memo is not None else StepMemo()
        self._step_maps: _StepMaps | None = None
        self._decode_step: native.DecodeStep | None = None
        self._decode_step_key: tuple = ()  # what _decode_step was built from (compared by identity)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # ``length`` as a Python int, read once by an eager step's update and used by its attention
        # and commit (on a GPU every read of the device tensor is a host-device sync); None outside
        # such a step. Never carried across steps: a compiled step advances ``length`` unseen.
        self._step_length: int | None = None
        self.handle = _Handle(self)
        self._register_step()

    def _register_step(self) -> None:
        """Give the layer the name by which ``nqkv::cache_step`` finds it (:func:`cache_step`)."""
        self.step_name = f"layer{next(_STEP_NAMES)}"
        _STEP_LAYERS[self.step_name] = self

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickle) is a layer of its own: its compiled steps must reach its buffers.
        self.__dict__.update(state)
        self._register_step()

    @property
    def max_cache_len(self) -> int | None:  # type: ignore[override]
        """Preallocated length (None: grows). A property because some transformers versions
        define a read-only one on the base class."""
        return self._max_len

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return self.max_cache_len is not None

    def __repr__(self) -> str:
        return (
            f"NQKVLayer(scheme={self.scheme.name!r}, length={int(self.length)},"
            f" max_cache_len={self.max_cache_len})"
        )

    # -- storage ----------------------------------------------------------------------------------

    def _body_capacity(self, n_tokens: int) -> int:
        return max(n_tokens - self.n_sinks - self.window + 1, 0)

    def _new_body(self, fmt: SideFormat, capacity: int) -> tuple[torch.Tensor, ...]:
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        if not fmt.quantized:
            return (torch.zeros(b, h, capacity + 1, d, dtype=self.fp_dtype, device=self.device),)
        return (
            torch.zeros(b, h, capacity + 1, d * fmt.bits // 8, dtype=torch.uint8, device=self.device),
            torch.zeros(b, h, capacity + 1, d // fmt.block, dtype=self.scheme.scale_dtype, device=self.device),
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate every buffer from the first K/V's batch, heads, head_dim, dtype and device."""
        if key_states.shape != value_states.shape:
            raise NotImplementedError(
                f"NQKVCache needs keys and values of one shape, got {tuple(key_states.shape)} and"
                f" {tuple(value_states.shape)}"
            )
        if self.compiled_step == "op" and key_states.device.type != "cpu":
            raise ValueError(
                f"compiled_step='op' runs the eager CPU step inside compiled graphs; on {key_states.device.type}"
                " use 'traced' (or 'auto'), whose graphs CUDA graphs can capture"
            )
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        s = self.scheme
        needs_basis = s.needs_stats or s.k_rotate or s.v_rotate
        # The storage basis comes out of the transform in fp32; keeping the exact tokens in fp32 there
        # means a token is quantized from the same numbers a fake-quantized reference uses.
        self.fp_dtype = torch.float32 if needs_basis else self.dtype
        self.k_fmt = side_format(s, "k", self.device)
        self.v_fmt = side_format(s, "v", self.device)
        kf, vf = self.k_fmt, self.v_fmt
        self._joint_format = (kf.quantized and vf.quantized and (kf.bits, kf.block) == (vf.bits, vf.block)
                              and torch.equal(kf.codebook, vf.codebook)
                              and torch.equal(kf.encode_codebook, vf.encode_codebook)
                              and kf.fit_scale == vf.fit_scale and not kf.feedback)
        for fmt in (self.k_fmt, self.v_fmt):
            if fmt.quantized and (self.head_dim % fmt.block or self.head_dim * fmt.bits % 8):
                raise ValueError(
                    f"head_dim {self.head_dim} does not fit {fmt.bits}-bit blocks of {fmt.block}: the block"
                    f" must divide head_dim (and 3-bit codes need head_dim % 8 == 0)"
                )
        capacity = self._body_capacity(self.max_cache_len or 64)
        self.k_body = self._new_body(self.k_fmt, capacity)
        self.v_body = self._new_body(self.v_fmt, capacity)
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        fp = dict(dtype=self.fp_dtype, device=self.device)
        self.k_sink, self.v_sink = torch.zeros(b, h, self.n_sinks + 1, d, **fp), torch.zeros(b, h, self.n_sinks + 1, d, **fp)
        self.k_ring, self.v_ring = torch.zeros(b, h, self.n_ring + 1, d, **fp), torch.zeros(b, h, self.n_ring + 1, d, **fp)
        self.length = self.length.to(self.device)
        if self.max_cache_len is not None and not torch.compiler.is_compiling():
            # Preallocated buffers never move: telling dynamo so lets a compiled step mutate them in
            # place under CUDA graphs (mode="reduce-overhead"), which skip graphs that mutate other inputs.
            for buf in (*self.k_body, *self.v_body, self.k_sink, self.v_sink, self.k_ring, self.v_ring, self.length):
                torch._dynamo.mark_static_address(buf)
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        """Body slots (tokens that can be quantized before the buffers are full or grow)."""
        return self.k_body[0].shape[2] - 1 if self.is_initialized else 0

    def _grow(self, n_tokens: int) -> None:
        if self.max_cache_len is not None and n_tokens > self.max_cache_len:
            raise ValueError(
                f"NQKVCache is preallocated for max_cache_len={self.max_cache_len} tokens, but this step"
                f" would hold {n_tokens}. Create the cache with a larger max_cache_len (prompt plus"
                " max_new_tokens), or with max_cache_len=None to let it grow."
            )
        needed = self._body_capacity(n_tokens)
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        n = self.capacity
        for name, fmt in (("k_body", self.k_fmt), ("v_body", self.v_fmt)):
            old, new = getattr(self, name), self._new_body(fmt, capacity)
            for o, t in zip(old, new):
                t[:, :, :n].copy_(o[:, :, :n])
            setattr(self, name, new)

    # -- the step ---------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Park the new K/V for the attention call that follows; returns ``(handle, handle)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch_size or key_states.shape[1] != self.num_heads:
            raise ValueError(
                f"NQKVCache was filled with batch {self.batch_size} and {self.num_heads} kv heads, got"
                f" keys of shape {tuple(key_states.shape)}; call cache.reset() to start a new batch"
            )
        if not torch.compiler.is_compiling():
            n = self._step_length = int(self.length)
            self._grow(n + key_states.shape[2])
            if self.rope_centred and self.rope.inv_freq is not None:
                self.rope.ensure(n + key_states.shape[2], self.device)
        self._pending = (key_states, value_states)
        return self.handle, self.handle

    def _slot_positions(self, p0: torch.Tensor, n_body: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the stored slots ``[body n_body | sinks S | ring R]`` before this step, and validity."""
        dev = self.device
        body = torch.arange(n_body, device=dev) + self.n_sinks
        sinks = torch.arange(self.n_sinks, device=dev)
        slots = torch.arange(self.n_ring, device=dev)
        ring = p0 - 1 - torch.remainder(p0 - 1 - slots, max(self.n_ring, 1))
        valid = torch.cat([
            body < p0 - self.window + 1,  # quantized so far: [S, p0 - W + 1)
            sinks < p0,
            (ring >= self.n_sinks) & (ring > p0 - self.window),  # the W - 1 tokens before p0 (no margin)
        ])
        return torch.cat([body, sinks, ring]), valid

    def _fit(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None, config: Any = None) -> KVTransform:
        """Fit the frozen transform on the first tokens (with the RoPE frequencies for ``k_centre_rope``)."""
        inv_freq = None
        if self.rope_centred:
            if self.rope.inv_freq is None:
                if config is None:
                    raise ValueError(
                        "a RoPE-centred NQKV scheme needs the model's RoPE frequencies: create the cache"
                        " with config=model.config"
                    )
                self.rope.inv_freq = rope_inv_freq(config, k.shape[-1])
            inv_freq = self.rope.inv_freq.to(k.device)
            self.rope.ensure(int(self.length) + k.shape[2], self.device)
        return fit_transform(self.scheme, k, v, q, inv_freq)

    def _key_bias(self, query: torch.Tensor, positions: torch.Tensor, n: int | None, scaling: float,
                  w: torch.Tensor | None = None) -> KeyBias:
        """``scaling * q . R(p) mu`` of every query row for the slots at ``positions`` (``(b, hq, T, slots)``).

        ``w``: the query rows' bias weights if already computed (:class:`_StepMaps`).
        Densely, the bias is computed for positions ``[0, P)`` in order and cut into the slot order
        ``[body | sinks | ring | new]``: body and sinks are contiguous runs of positions, so only the
        ring and the new tokens are gathered (gathering a table row per slot costs as much as the bias).
        """
        b, hq, T, d = query.shape
        S = self.n_sinks
        n_body = positions.shape[0] - S - self.n_ring - T
        table, slot_positions = self._bias_table(positions, n, n_body, T)
        if w is None:
            w = rope_bias_weights(query, per_query_head(self.transform.mu_k, hq // self.num_heads), scaling)

        def dense() -> torch.Tensor:
            bias = w @ table.T
            tail = slot_positions[n_body + S :]  # ring and new tokens
            return torch.cat([bias[..., S : S + n_body], bias[..., :S], bias.index_select(-1, tail)], dim=-1)

        return KeyBias((w, table, slot_positions), dense)

    def _bias_table(self, positions: torch.Tensor, n: int | None, n_body: int, T: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE table rows ``[0, P)`` a step's key bias reads, and the slot positions clamped into them."""
        if n is None:  # compiled: static shapes; the table was sized for max_cache_len eagerly
            P = self.rope.table.shape[0]
            return self.rope.table, positions.clamp(0, P - 1)  # unused ring slots (masked) hold positions < 0
        P = max(self.n_sinks + n_body, n + T)
        self.rope.ensure(P, self.device)
        key = (n, n_body, T, P, self.n_sinks, self.n_ring, self.window, self.device)  # what positions depend on
        return self.rope.table[:P], self.step_memo.get("clamped positions", key, lambda: positions.clamp(0, P - 1))

    def attention(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, config: Any = None
    ) -> torch.Tensor:
        """Attend ``query`` ``(b, hq, T, d)`` to the cache plus the parked tokens, then commit them.

        ``config``: the model config (RoPE frequencies of a RoPE-centred scheme, if the cache has none).
        Returns ``(b, T, hq, d)`` in the query dtype.
        """
        if self._pending is None:
            raise RuntimeError("NQKVLayer.attention called without a preceding cache.update")
        k_new, v_new = self._pending
        self._pending = None
        if torch.compiler.is_compiling() and self._opaque_step():
            # One node per layer in the graph: the eager step (one native call), not its ~180 torch ops.
            out = torch.ops.nqkv.cache_step(query, k_new, v_new, attention_mask, self.length, self.k_sink,
                                            scaling, self.step_name)
            self._advance(k_new.shape[2])  # in the graph, as the traced step counts, not inside the op
            return out
        b, hq, T, d = query.shape
        group = hq // self.num_heads
        if self.transform is None:
            self.transform = self._fit(k_new, v_new, query, config)
        t = self.transform
        p0 = self.length
        n = None if torch.compiler.is_compiling() else self._eager_length()
        # An eager one-token step folds the transform into a few matmuls (_StepMaps); the reference
        # path (FUSED = False) keeps the exact arithmetic of the fake-quantized reference.
        fold = FUSED and FOLD_STEPS and n and T == 1 and self.fp_dtype == torch.float32 and t.a_k is None and t.b_v is None
        maps = self._maps(group, scaling) if fold else None
        if maps is not None and attention_mask is None and self._all_slots_valid(n):
            out = self._native_step(query, k_new, v_new, maps, n, scaling)
            if out is not None:
                return out.to(query.dtype).transpose(1, 2)
        w = None
        if maps is not None:
            q = query.float() @ t.rot_k if t.rot_k is not None else query.float()
            w = rope_bias_weights(query, maps.mu_q, scaling) if maps.mu_k_half is not None else None
            k_new = k_new.float()
            if maps.mu_k_half is not None:  # minus the RoPE'd centre at position n (apply_rope's arithmetic)
                row = self.rope.table[n]
                cos, sin = row[: d // 2].repeat(2), row[d // 2 :].repeat(2)
                k_new = k_new - (t.mu_k * cos + maps.mu_k_half * sin)
            elif t.mu_k is not None:
                k_new = k_new - t.mu_k
            k_new = k_new @ t.rot_k if t.rot_k is not None else k_new
            k_attend = None
        else:
            q = t.queries(query, group).to(self.fp_dtype)
            # With a RoPE-aware centre, the first tokens of an empty cache (a prompt) attend only to each
            # other, all exact: they are scored uncentred, which needs no (T, T) score offset.
            fresh = n == 0 and t.inv_freq is not None
            k_attend = t.keys(k_new, centre=False).to(self.fp_dtype) if fresh else None
            k_new = t.keys(k_new, start=p0 if n is None else n).to(self.fp_dtype)
        v_new = t.values(v_new).to(self.fp_dtype)

        if n == 0 and (attention_mask is None or attention_mask.shape[-1] >= T):
            # A prompt on an empty cache: sinks and ring hold nothing yet, so it attends to its own
            # exact tokens only (a plain centre is a constant per query row, which the softmax ignores).
            out = prompt_attention(q, k_new if k_attend is None else k_attend, v_new, attention_mask, scaling)
        else:
            # Compiled steps read the whole preallocated body (masked) so that shapes never change.
            n_body = self.capacity if n is None else min(self._body_capacity(n), self.capacity)
            if n is None:
                positions, valid = self._positions(p0, n_body, T)
            else:  # the same for every layer of the step
                key = (n, n_body, T, self.n_sinks, self.n_ring, self.window, self.device)
                positions, valid = self.step_memo.get("positions", key, lambda: self._positions(p0, n_body, T))
            if n is not None and T == 1 and attention_mask is None and self._all_slots_valid(n):
                allowed = None  # one query that sees every stored slot: nothing to mask
            else:
                allowed = self._allowed(p0, positions, valid, T, attention_mask)
            # RoPE-aware centre: the score offset q . R(p) mu, added inside attend
            key_bias = self._key_bias(query, positions, n, scaling, w) if t.inv_freq is not None else None
            k_fp = torch.cat([self.k_sink[:, :, : self.n_sinks], self.k_ring[:, :, : self.n_ring], k_new], dim=2)
            v_fp = torch.cat([self.v_sink[:, :, : self.n_sinks], self.v_ring[:, :, : self.n_ring], v_new], dim=2)
            out = attend(
                q, tuple(x[:, :, :n_body] for x in self.k_body), tuple(x[:, :, :n_body] for x in self.v_body),
                self.k_fmt, self.v_fmt, k_fp, v_fp, allowed, scaling, key_bias,
            )
        if maps is not None:
            out = out.float() @ t.rot_v.T if t.rot_v is not None else out.float()
            out = out + maps.out_shift if maps.out_shift is not None else out
        elif t.rot_v is not None or t.b_v is not None or t.mu_v is not None:
            out = t.output(out.float(), group)
        self._commit(k_new, v_new)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    def _opaque_step(self) -> bool:
        """Whether a compiled step runs this layer as ``nqkv::cache_step`` (see :class:`NQKVCache`)."""
        if self.transform is None:  # the first step fits the transform: traced
            return False
        return self.compiled_step == "op" or (self.compiled_step == "auto" and self.device.type == "cpu")

    def _native_step(self, query: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, maps: _StepMaps, n: int,
                     scaling: float) -> torch.Tensor | None:
        """The folded one-token step (transform, attention, commit) as one native call, when the
        native kernels can take it; None otherwise (the caller runs the torch ops).

        Same arithmetic as the torch ops of :meth:`attention` up to fp32 rounding (a code may
        differ at a level boundary, rarely); ``tests/test_cache.py`` compares the two.
        """
        S, R, W = self.n_sinks, self.n_ring, self.window
        kf, vf = self.k_fmt, self.v_fmt
        if R == 0 or not (kf.quantized and vf.quantized):
            return None
        step = self._native_decode_step(maps)
        if not step.supported:
            return None
        q, k, v = query.float().contiguous(), k_new.float().contiguous(), v_new.float().contiguous()
        if not native.decode_step_supported(q, k, v):  # (heads and head_dim are the layer's own)
            return None
        n_body = min(self._body_capacity(n), self.capacity)
        leaving = n - W + 1  # the token that leaves the window (W > 1: it is in the ring)
        out = step.run(
            q, k, v, S, R, n_body, leaving % R if leaving >= S else -1, leaving - S, n if n < S else -1,
            n % R if n >= S else -1, n, scaling,
        )
        self._advance(1)
        return out

    def _native_decode_step(self, maps: _StepMaps) -> native.DecodeStep:
        """The layer's prepared native step (:class:`~nqkv_core.native.DecodeStep`), rebuilt when an
        object it was built from was replaced (new maps or transform, a body that grew, a longer RoPE
        table); the check is a few identity tests, since it runs on every step."""
        t, kf, vf = self.transform, self.k_fmt, self.v_fmt
        key = (maps, t, kf, vf, self.k_sink, self.v_sink, self.k_ring, self.v_ring, self.k_body, self.v_body,
               self.rope.table)
        if self._decode_step is None or any(a is not b for a, b in zip(key, self._decode_step_key)):
            rope = (self.rope.table, self.rope.tiles) if maps.mu_k_half is not None else None
            self._decode_step = native.DecodeStep(
                self.num_heads * maps.group, t.rot_k, t.rot_v, maps.mu_k, maps.mu_k_half, maps.mu_v,
                (self.k_sink, self.v_sink),
                (self.k_ring, self.v_ring), (*self.k_body, kf.codebook, kf.block), (*self.v_body, vf.codebook, vf.block),
                (_midpoints(kf.encode_codebook), _midpoints(vf.encode_codebook)),
                torch.finfo(self.scheme.scale_dtype).max, rope,
                (_fit_ratios(self.device), int(kf.fit_scale) | 2 * int(vf.fit_scale)),
                (kf.encode_codebook, t.k_feedback) if kf.feedback else None,
            )
            self._decode_step_key = key
        return self._decode_step

    def _maps(self, group: int, scaling: float) -> _StepMaps:
        """The :class:`_StepMaps` of the current transform (built on first use, then reused)."""
        t = self.transform
        refs = (t.mu_k, t.rot_k, t.mu_v, t.inv_freq, group, scaling)
        m = self._step_maps
        if m is not None and all(a is b for a, b in zip(m.refs[:4], refs[:4])) and m.refs[4:] == refs[4:]:
            return m
        rope = t.inv_freq is not None
        mu_k_half = rotate_half(t.mu_k) if rope else None
        mu_q = per_query_head(t.mu_k, group).float().contiguous() if rope else None
        out_shift = per_query_head(t.mu_v, group).float().contiguous() if t.mu_v is not None else None

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.float().contiguous()

        self._step_maps = _StepMaps(refs, flat(t.mu_k), flat(mu_k_half), mu_q, flat(t.mu_v), out_shift)
        return self._step_maps

    def _all_slots_valid(self, n: int) -> bool:
        """Whether every slot ``[body | sinks | ring]`` read at ``n`` tokens holds a token to attend to:
        true once sinks and ring are full, unless the ring keeps a crop margin (older, masked tokens)."""
        return self.n_ring == self.window - 1 and n >= self.n_sinks + self.n_ring

    def _positions(self, p0: torch.Tensor, n_body: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity of the stored slots followed by the ``T`` new tokens."""
        positions, valid = self._slot_positions(p0, n_body)
        positions = torch.cat([positions, p0 + torch.arange(T, device=self.device)])
        valid = torch.cat([valid, torch.ones(T, dtype=torch.bool, device=self.device)])
        return positions, valid

    def _allowed(
        self, p0: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, T: int,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The boolean mask ``(b or 1, 1, T, slots + T)`` of the ``T`` new queries over the stored slots
        and the new tokens (``positions``, ``valid``: from :meth:`_positions`)."""
        q_pos = p0 + torch.arange(T, device=self.device)
        if attention_mask is None:
            allowed = positions[None, :] <= q_pos[:, None]
            allowed = allowed[None, None]
        else:
            if attention_mask.dtype != torch.bool:  # an additive float mask
                attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
            cols = positions.clamp(0, attention_mask.shape[-1] - 1)
            allowed = attention_mask[:, :, -T:, :].index_select(-1, cols)
        allowed = allowed & valid
        # Rows of padding queries see nothing; give them every slot (finite zeros at worst) so that no
        # NaN appears: their outputs are discarded, but their K/V at the next layer are stored.
        return allowed | ~allowed.any(dim=-1, keepdim=True)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, query_states: torch.Tensor | None = None) -> None:
        """Store tokens without attending (e.g. a prefix computed elsewhere); K/V ``(b, h, T, d)``.

        ``query_states`` are needed only on an empty layer of a scheme with ``k_equalize="qk"`` or
        ``k_rounding="query"`` (the 3-bit presets): their transform is fitted on them.
        """
        self.update(key_states, value_states)
        self._pending = None
        if self.transform is None:
            self.transform = self._fit(key_states, value_states, query_states)
        t = self.transform
        start = self.length if torch.compiler.is_compiling() else self._eager_length()
        self._commit(t.keys(key_states, start=start).to(self.fp_dtype), t.values(value_states).to(self.fp_dtype))

    def _encode(self, x: torch.Tensor, fmt: SideFormat) -> tuple[torch.Tensor, ...]:
        if fmt.quantized:
            return quantize_blockwise(x, fmt.encode_codebook, fmt.block, axis=-1, scale_dtype=self.scheme.scale_dtype,
                                      fit_scale=fmt.fit_scale,
                                      feedback=self.transform.k_feedback if fmt.feedback else None)
        return (x.to(self.fp_dtype),)

    def _write_bodies(self, index: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V tokens ``(b, h, n, d)`` in the body at slots ``index`` (a tensor, or the first slot).

        When K and V share a quantized format they are quantized in one call (blocks are independent,
        so the codes are the same): a single token costs about as much to quantize as a thousand.
        """
        if self._joint_format:
            codes, absmax = self._encode(torch.cat([k, v]), self.k_fmt)
            b = k.shape[0]
            parts = ((codes[:b], absmax[:b]), (codes[b:], absmax[b:]))
        else:
            parts = (self._encode(k, self.k_fmt), self._encode(v, self.v_fmt))
        for body, part in zip((self.k_body, self.v_body), parts):
            for buf, x in zip(body, part):
                if isinstance(index, int):
                    buf[:, :, index : index + x.shape[2]].copy_(x)
                else:
                    buf.index_copy_(2, index, x)

    def _commit_one(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """:meth:`_commit` of one token outside tracing: plain slice copies at known positions."""
        S, R, W = self.n_sinks, self.n_ring, self.window
        n = self._eager_length()
        leaving = n - W + 1  # the token that leaves the window (the new one itself when W == 1)
        if leaving >= S:
            if W > 1:
                slot = leaving % R
                self._write_bodies(leaving - S, self.k_ring[:, :, slot : slot + 1], self.v_ring[:, :, slot : slot + 1])
            else:
                self._write_bodies(leaving - S, k_new, v_new)
        if n < S:
            self.k_sink[:, :, n : n + 1].copy_(k_new)
            self.v_sink[:, :, n : n + 1].copy_(v_new)
        elif R:
            self.k_ring[:, :, n % R : n % R + 1].copy_(k_new)
            self.v_ring[:, :, n % R : n % R + 1].copy_(v_new)
        self._advance(1)

    def _eager_length(self) -> int:
        """``length`` as an int in an eager step: the value its update read, else a fresh read."""
        return self._step_length if self._step_length is not None else int(self.length)

    def _advance(self, n: int) -> None:
        """Count ``n`` committed tokens; ends the step (its host copy of ``length`` is stale now)."""
        self.length.add_(n)
        self._step_length = None

    def _commit(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store the ``T`` new tokens: sinks, ring, and quantize the ``T`` tokens that leave the window."""
        T, dev = k_new.shape[2], self.device
        if T == 1 and not torch.compiler.is_compiling():
            return self._commit_one(k_new, v_new)
        S, R, W = self.n_sinks, self.n_ring, self.window
        p0 = self.length
        # Tokens leaving the window: positions p0 - W + 1 + j, j < T; the first min(T, W - 1) come from the
        # ring (read before it is overwritten), the rest straight from this chunk.
        leaving = p0 - W + 1 + torch.arange(T, device=dev)
        from_ring = min(T, W - 1)
        if from_ring:
            slots = torch.remainder(leaving[:from_ring], max(R, 1))
            k_out = torch.cat([self.k_ring.index_select(2, slots), k_new[:, :, : T - from_ring]], dim=2)
            v_out = torch.cat([self.v_ring.index_select(2, slots), v_new[:, :, : T - from_ring]], dim=2)
        else:
            k_out, v_out = k_new, v_new
        index = torch.where(leaving >= S, leaving - S, self.capacity)  # not yet in the body: trash slot
        self._write_bodies(index, k_out, v_out)

        pos = p0 + torch.arange(T, device=dev)
        n = min(T, S)
        if n:
            sink_index = torch.where(pos[:n] < S, pos[:n], S)
            self.k_sink.index_copy_(2, sink_index, k_new[:, :, :n])
            self.v_sink.index_copy_(2, sink_index, v_new[:, :, :n])
        n = min(T, R)
        if n:
            last = pos[T - n :]
            ring_index = torch.where(last >= S, torch.remainder(last, R), R)
            self.k_ring.index_copy_(2, ring_index, k_new[:, :, T - n :])
            self.v_ring.index_copy_(2, ring_index, v_new[:, :, T - n :])
        self._advance(T)

    # -- transformers' layer interface -------------------------------------------------------------

    def get_seq_length(self, *args) -> int | torch.Tensor:
        """Tokens seen (a tensor while compiling, so that a compiled step does not specialise on it)."""
        return self.length if torch.compiler.is_compiling() else int(self.length)

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the mask: absolute positions ``[0, kv_length)``."""
        if isinstance(query_length, torch.Tensor):  # transformers < 5.12 passes cache_position
            query_length = query_length.shape[0]
        if torch.compiler.is_compiling() and self.max_cache_len is not None:
            return self.max_cache_len, 0
        return int(self.length) + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.max_cache_len is not None else -1

    get_max_cache_shape = get_max_length  # transformers < 5.18

    def reset(self) -> None:
        """Forget every token and the transform; buffers are kept (zeroed) for reuse."""
        self.length.zero_()
        self._step_length = None
        self.transform = None
        self._pending = None
        if self.is_initialized:
            for buf in (*self.k_body, *self.v_body, self.k_sink, self.v_sink, self.k_ring, self.v_ring):
                buf.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (or keep ``tokens_to_remove`` if positive).

        Exact when the window's tokens after cropping are still held in full precision: always while
        nothing has been quantized, and for up to ``crop_margin`` tokens otherwise. The quantized body
        is never changed: its tokens only get masked out and are quantized again, bit for bit the
        same, when they leave the window again.

        Raises:
            ValueError: if cropping would need full-precision values that were already quantized.
        """
        n = int(self.length)
        keep = tokens_to_remove if tokens_to_remove >= 0 else n + tokens_to_remove
        keep = max(min(keep, n), 0)
        if keep == n:
            return
        ring_from = max(self.n_sinks, n - self.n_ring)  # oldest position still held in fp
        if max(self.n_sinks, keep - self.window + 1) < ring_from:
            raise ValueError(
                f"cannot crop the NQKV cache from {n} to {keep} tokens: tokens that would re-enter the"
                f" full-precision window were already quantized (only the last {self.n_ring} are kept"
                f" exact). Create the cache with crop_margin>={n - keep} to allow it."
            )
        self.length.fill_(keep)
        self._step_length = None

    def _batch_map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.k_body = tuple(fn(x) for x in self.k_body)
        self.v_body = tuple(fn(x) for x in self.v_body)
        self.k_sink, self.v_sink = fn(self.k_sink), fn(self.v_sink)
        self.k_ring, self.v_ring = fn(self.k_ring), fn(self.v_ring)
        if self.transform is not None:
            for f in ("mu_k", "a_k", "mu_v", "b_v", "k_metric", "k_metric_iso", "k_feedback"):  # per batch row
                x = getattr(self.transform, f)
                if x is not None:
                    setattr(self.transform, f, fn(x))
        self.batch_size = self.k_sink.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: take batch rows ``beam_idx`` (codes and scales are gathered, not re-quantized)."""
        self._batch_map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_map(lambda x: x[indices])

    def offload(self):  # the base class moves .keys/.values, which this layer does not have
        raise NotImplementedError("NQKVCache does not support offloading")

    prefetch = offload

    # -- storage accounting and state ----------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors that define the cache contents (used parts of the body only)."""
        if not self.is_initialized:
            return {"length": self.length.clone()}
        n_body = self._body_capacity(int(self.length))
        out = {"length": self.length.clone()}
        for side in ("k", "v"):
            for i, x in enumerate(getattr(self, f"{side}_body")):
                out[f"{side}_body{i}"] = x[:, :, :n_body]
            out[f"{side}_sink"] = getattr(self, f"{side}_sink")[:, :, : self.n_sinks]
            out[f"{side}_ring"] = getattr(self, f"{side}_ring")[:, :, : self.n_ring]
        if self.transform is not None:
            for f in TRANSFORM_FIELDS:
                x = getattr(self.transform, f)
                if x is not None:
                    out[f"t_{f}"] = x
        return out

    def load_state(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Inverse of :meth:`state` on a fresh layer of the same scheme; ``dtype``: the model's."""
        n = int(state["length"])
        self.reset()
        if "k_sink" not in state:
            return
        k = state["k_sink"]
        empty = torch.zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=dtype, device=k.device)
        self.lazy_initialization(empty, empty)
        self._grow(n)
        n_body = self._body_capacity(n)
        for side in ("k", "v"):
            for i, x in enumerate(getattr(self, f"{side}_body")):
                x[:, :, :n_body].copy_(state[f"{side}_body{i}"])
            getattr(self, f"{side}_sink")[:, :, : self.n_sinks].copy_(state[f"{side}_sink"])
            getattr(self, f"{side}_ring")[:, :, : self.n_ring].copy_(state[f"{side}_ring"])
        fields = {f: state.get(f"t_{f}") for f in TRANSFORM_FIELDS}
        self.transform = KVTransform(**fields)
        self.transform.k_feedback = key_feedback(self.transform)
        if self.transform.inv_freq is not None:
            if self.rope.inv_freq is None:
                self.rope.inv_freq = self.transform.inv_freq
            self.rope.ensure(n, self.device)
        self.length.fill_(n)
        self._step_length = None

    @property
    def nbytes(self) -> int:
        """Bytes of all storage this layer holds (allocated capacity, not only the used part)."""
        if not self.is_initialized:
            return 0
        bufs = (*self.k_body, *self.v_body, self.k_sink, self.v_sink, self.k_ring, self.v_ring)
        return sum(x.nbytes for x in bufs)

    def bytes_per_token(self) -> float:
        """Storage bytes of one quantized (body) token: codes and scales of K and V, all heads."""
        if not self.is_initialized:
            raise RuntimeError("the layer holds no data yet")
        return sum(x[:, :, :1].nbytes for x in (*self.k_body, *self.v_body)) / self.batch_size


# -- a compiled step's layer as one op --------------------------------------------------------------

# The layers ``nqkv::cache_step`` runs, by ``NQKVLayer.step_name`` (an op's arguments are tensors and
# plain values; the layer's transform, buffers and prepared native step stay out of the graph).
_STEP_LAYERS: "weakref.WeakValueDictionary[str, NQKVLayer]" = weakref.WeakValueDictionary()
_STEP_NAMES = itertools.count()


def _allows_whole_cache(mask: torch.Tensor | None, n: int) -> bool:
    """Whether a one-token step's ``mask`` lets its query see every position ``0..n`` (its own is ``n``):
    then it masks nothing the cache holds, and the step may run as if it had no mask."""
    if mask is None:
        return True
    if mask.shape[-2] != 1 or mask.shape[-1] <= n:
        return False
    row = mask[..., -1, : n + 1]
    return bool(row.all() if row.dtype == torch.bool else (row > torch.finfo(row.dtype).min / 2).all())


@torch.library.custom_op("nqkv::cache_step", mutates_args=())
def cache_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Optional[torch.Tensor],
               length: torch.Tensor, k_sink: torch.Tensor, scaling: float, layer: str) -> torch.Tensor:
    """One layer's step of a compiled graph on CPU, run as the eager step: store the new ``key`` /
    ``value`` ``(b, hkv, T, d)`` and attend ``query`` ``(b, hq, T, d)`` to the cache; ``(b, T, hq, d)``.

    ``layer`` names the :class:`NQKVLayer` (``step_name``); ``length`` is its token count before the
    step, ``k_sink``, one of its buffers, proves that the graph was traced for this layer. The op
    writes the layer's sink, ring and body buffers, which nothing else in a graph reads (so it
    declares no mutation), but not ``length``: the graph advances that itself, after the op, as a
    traced step does (an op that mutated ``length`` let inductor recompute the model's positions
    from the advanced count). A one-token step whose mask hides nothing (no padding) runs the
    native step, as eager decoding does.
    """
    target = _STEP_LAYERS.get(layer)
    if target is None or not target.is_initialized or target.k_sink.data_ptr() != k_sink.data_ptr():
        raise RuntimeError(
            f"nqkv::cache_step: {layer!r} is not the NQKV cache layer this graph was compiled for (a cache"
            " replaced without recompiling?); call torch._dynamo.reset() or compile the step again"
        )
    own = target.length
    target.length = length.clone()  # the eager step counts on its own copy
    try:
        target.update(key, value)
        if query.shape[2] == 1 and _allows_whole_cache(attention_mask, target._eager_length()):
            attention_mask = None
        return target.attention(query, attention_mask, scaling).contiguous()
    finally:
        target.length = own
        target._pending = target._step_length = None


@cache_step.register_fake
def _(query, key, value, attention_mask, length, k_sink, scaling, layer):
    b, hq, T, d = query.shape
    return query.new_empty(b, T, hq, d)


# -- the cache --------------------------------------------------------------------------------------


def check_supported(config: Any) -> None:
    """Raise ``NotImplementedError`` for models whose attention the cache cannot serve.

    Supported: decoder-only causal self-attention over every position (Llama, Mistral without a
    sliding window, Qwen2/3, Phi-3, ...). Rejected: sliding-window or chunked layers, encoder-decoder
    models (cross-attention), non-causal models, and K/V of different head dims.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{name}: NQKVCache serves decoder-only models, not cross-attention")
    # (not ``is_decoder``: transformers 4.x leaves it False on decoder-only models such as Llama)
    if getattr(text, "is_causal", True) is False:
        raise NotImplementedError(f"{name}: NQKVCache needs causal attention")
    layer_types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    sliding = getattr(text, "sliding_window", None)
    if sliding is not None and getattr(text, "use_sliding_window", True):
        other.append(f"sliding_window={sliding}")
    if getattr(text, "attention_chunk_size", None) is not None:
        other.append("chunked attention")
    if other:
        raise NotImplementedError(
            f"{name}: NQKVCache supports full causal attention only; this model has {', '.join(map(str, other))}"
        )


class NQKVCache(Cache):
    """A quantized, append-only KV cache for transformers models (one :class:`NQKVLayer` per layer).

    Args:
        scheme: how K/V are stored (codebook schemes with blocks along head_dim).
        config: the model config; gives the number of layers and is checked for support.
        num_layers: the number of layers, if no ``config`` (otherwise layers are added as needed).
        max_cache_len: preallocate for this many tokens (prompt plus new tokens): a decode step then
            allocates nothing and can be compiled; exceeding it raises ``ValueError``. None: grow.
        crop_margin: extra full-precision tokens kept so that :meth:`crop` can go back that far.
        compiled_step: how a ``torch.compile``'d step runs each layer. ``"op"``: as one opaque op,
            ``torch.ops.nqkv.cache_step``, that runs the eager step (on CPU one native call per layer):
            a small graph that compiles quickly and steps as fast as eager decoding (CPU only).
            ``"traced"``: the step's torch ops traced into the graph, which CUDA graphs can capture.
            ``"auto"``: ``"op"`` on CPU, ``"traced"`` elsewhere. Eager steps are the same either way.

    Use with a model whose attention is ``"nqkv"`` (see :func:`enable`).
    """

    def __init__(
        self,
        scheme: KVScheme,
        config: Any = None,
        num_layers: int | None = None,
        max_cache_len: int | None = None,
        crop_margin: int = 0,
        compiled_step: CompiledStep = "auto",
    ):
        inv_freq = None
        if config is not None:
            check_supported(config)
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            num_layers = text.num_hidden_layers
            if scheme.k_centre and scheme.k_centre_rope:
                head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
                inv_freq = rope_inv_freq(text, head_dim)
        if scheme.layer_bits and num_layers is not None and num_layers != len(scheme.layer_bits):
            raise ValueError(
                f"scheme {scheme.name!r} has widths for {len(scheme.layer_bits)} layers; the model has {num_layers}"
            )
        self.scheme = scheme
        self._max_len = max_cache_len
        self.crop_margin = crop_margin
        self.compiled_step = compiled_step
        # One table of RoPE cos/sin per position for all layers (used by RoPE-centred schemes only).
        self.rope = RopeTable(inv_freq, max_cache_len)
        self.step_memo = StepMemo()
        layers = [self._new_layer(i) for i in range(num_layers or 0)]
        super().__init__(layers=layers)

    def _new_layer(self, layer_idx: int) -> NQKVLayer:
        return NQKVLayer(self.scheme.for_layer(layer_idx), self.max_cache_len, self.crop_margin, self.rope,
                         self.step_memo, self.compiled_step)

    def _layer(self, layer_idx: int) -> NQKVLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """transformers' hook (``cache_kwargs`` before 5.12, ``*args, **kwargs`` after): park new K/V."""
        return self._layer(layer_idx).update(key_states, value_states)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               query_states: torch.Tensor | None = None) -> None:
        """Store post-RoPE K/V ``(b, h, T, d)`` of layer ``layer_idx`` without attending."""
        self._layer(layer_idx).append(key_states, value_states, query_states)

    def get_seq_length(self, layer_idx: int = 0, *args) -> int | torch.Tensor:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.12 passes cache_position
            query_length = query_length.shape[0]
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_len if self.max_cache_len is not None else -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5.18
        return self.get_max_length()

    @property
    def max_cache_len(self) -> int | None:  # type: ignore[override]
        """Preallocated length (None: grows); read-only, as transformers 5.17's base class has it."""
        return self._max_len

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return self.max_cache_len is not None and len(self.layers) > 0

    @property
    def nbytes(self) -> int:
        """Bytes of all allocated cache storage."""
        return sum(layer.nbytes for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Storage bytes per quantized token over all layers (K and V, all kv heads, one sequence)."""
        return sum(layer.bytes_per_token() for layer in self.layers)

    # -- save / load (prefix reuse) ------------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        s = self.scheme
        scheme = {f: (str(getattr(s, f)).removeprefix("torch.") if f == "scale_dtype" else getattr(s, f))
                  for f in s.__dataclass_fields__}
        first = self.layers[0] if self.layers else None
        return {
            "format": "nqkv-cache",
            "version": FORMAT_VERSION,
            "scheme": json.dumps(scheme, sort_keys=True),
            "num_layers": str(len(self.layers)),
            "dtype": str(getattr(first, "dtype", "")).removeprefix("torch."),
        }

    def save(self, path: str | Path) -> None:
        """Write the cache contents to a safetensors file (used parts only, with a checksum)."""
        from safetensors.torch import save_file

        tensors = {}
        for i, layer in enumerate(self.layers):
            if layer._pending is not None:
                raise RuntimeError("cannot save an NQKVCache in the middle of a forward pass")
            for name, x in layer.state().items():
                # clone: layers share the RoPE frequencies, and safetensors refuses shared storage
                tensors[f"layer{i}.{name}"] = x.clone() if name == "t_inv_freq" else x.contiguous()
        meta = self._meta()
        meta["sha256"] = _digest(tensors, meta)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        scheme: KVScheme,
        config: Any = None,
        max_cache_len: int | None = None,
        crop_margin: int = 0,
        device: torch.device | str | None = None,
    ) -> "NQKVCache":
        """Read a cache written by :meth:`save` and check it against ``scheme`` and ``config``.

        Raises:
            ValueError: unreadable or corrupted file (checksum), another scheme, another number of
                layers, or a shape that does not fit ``config``.
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a bad header or size
            raise ValueError(f"{path}: not a readable safetensors NQKV cache ({type(e).__name__}: {e})") from e
        if meta.get("format") != "nqkv-cache" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not an NQKV cache file of format version {FORMAT_VERSION} (metadata {meta})")
        expected = meta.get("sha256")
        if _digest(tensors, {k: v for k, v in meta.items() if k != "sha256"}) != expected:
            raise ValueError(f"{path}: checksum mismatch; the file is corrupted or was modified")
        cache = cls(scheme, config=config, num_layers=int(meta["num_layers"]), max_cache_len=max_cache_len,
                    crop_margin=crop_margin)
        mine = cache._meta()
        if mine["scheme"] != meta["scheme"]:
            raise ValueError(f"{path}: saved with scheme {meta['scheme']}, not {mine['scheme']}")
        if len(cache.layers) != int(meta["num_layers"]):
            raise ValueError(f"{path}: {meta['num_layers']} layers saved, the model has {len(cache.layers)}")
        dtype = getattr(torch, meta.get("dtype") or "float32", None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{path}: unknown dtype {meta.get('dtype')!r}")
        for i, layer in enumerate(cache.layers):
            state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"layer{i}.")}
            if "k_sink" in state and config is not None:
                _check_shape(state["k_sink"], config, path)
            try:
                layer.load_state(state, dtype)
            except (KeyError, RuntimeError) as e:
                raise ValueError(f"{path}: layer {i} does not fit the scheme ({type(e).__name__}: {e})") from e
        return cache


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        x = tensors[name].contiguous()
        h.update(f"{name}:{x.dtype}:{tuple(x.shape)}".encode())
        h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def _check_shape(k_sink: torch.Tensor, config: Any, path) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if k_sink.shape[1] != heads or k_sink.shape[3] != head_dim:
        raise ValueError(
            f"{path}: cache has {k_sink.shape[1]} kv heads of dim {k_sink.shape[3]}; the model has"
            f" {heads} of dim {head_dim}"
        )


# -- the attention function and the one-call setup ---------------------------------------------------


def nqkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``attn_implementation="nqkv"``.

    With an :class:`NQKVCache`, ``key``/``value`` are layer handles and attention reads the quantized
    cache. Without one (no cache, or another cache type) it is exact SDPA over the given tensors.
    """
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{type(module).__name__}: NQKV attention is causal only")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(f"{type(module).__name__}: NQKV attention does not support sliding windows")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(key, _Handle):
        return key.layer.attention(query, attention_mask, scale, getattr(module, "config", None)), None
    T, tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        mask = torch.ones(T, tk, dtype=torch.bool, device=query.device).tril(tk - T)
    else:
        mask = attention_mask[:, :, -T:, -tk:]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    out = sdpa(query, key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`nqkv_attention` and its (SDPA-style boolean) mask under ``"nqkv"``."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, nqkv_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    except ImportError:  # pragma: no cover - older layouts build the mask from the attention name
        pass
    return ATTN_NAME


@dataclass
class NQKVModel:
    """What :func:`enable` returns: the model, its scheme and cache settings, and generate helpers."""

    model: torch.nn.Module
    scheme: KVScheme
    max_cache_len: int | None = None
    crop_margin: int = 0

    def new_cache(self, max_cache_len: int | None = None, compiled_step: CompiledStep = "auto") -> NQKVCache:
        """A fresh cache for one ``generate`` call (``max_cache_len`` overrides the default;
        ``compiled_step``: see :class:`NQKVCache`)."""
        return NQKVCache(self.scheme, config=self.model.config,
                         max_cache_len=max_cache_len if max_cache_len is not None else self.max_cache_len,
                         crop_margin=self.crop_margin, compiled_step=compiled_step)

    def generate_kwargs(self, max_cache_len: int | None = None) -> dict[str, Any]:
        """``{"cache": ...}`` (transformers >= 5.24) or ``{"past_key_values": ...}`` with a fresh cache."""
        key = "cache" if _version() >= (5, 24) else "past_key_values"
        return {key: self.new_cache(max_cache_len), "use_cache": True}

    def generate(self, *args, **kwargs):
        """``model.generate`` with a fresh NQKV cache."""
        return self.model.generate(*args, **self.generate_kwargs(), **kwargs)


def enable(
    model: torch.nn.Module,
    bits: int = 4,
    scheme: KVScheme | None = None,
    max_cache_len: int | None = None,
    crop_margin: int = 0,
) -> NQKVModel:
    """Make ``model`` attend through NQKV caches; returns the cache factory and generate kwargs.

    Args:
        model: a transformers decoder-only causal LM with full attention.
        bits: code bits for K and V of the default scheme (:func:`default_scheme`); ignored if
            ``scheme`` is given.
        scheme: the storage scheme.
        max_cache_len: preallocate caches for this many tokens (compileable decode); None grows.
        crop_margin: see :class:`NQKVCache`.

    Raises:
        NotImplementedError: for an unsupported model or scheme.

    Example::

        nq = nqkv_core.enable(model, bits=4)
        out = model.generate(ids, max_new_tokens=32, **nq.generate_kwargs())
    """
    config = model.config
    check_supported(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    scheme = scheme or default_scheme(bits, head_dim)
    side_format(scheme, "k"), side_format(scheme, "v")
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
    else:  # pragma: no cover - older transformers
        config._attn_implementation = ATTN_NAME
    return NQKVModel(model, scheme, max_cache_len, crop_margin)
