"""``NQKVLayer``: one attention layer's quantized, append-only K/V store.

Per ``(batch, kv head)``, in the storage basis of the scheme (after its exact transform, see
:mod:`nqkv_core.scheme`), positions are split three ways::

    [0, S)                 sinks: full precision, never quantized
    [S, n - W)             body: quantized once, when the token leaves the window; never re-quantized
    [n - W, n)             window: full precision (the query's own token is the W-th)

with ``n`` the number of tokens seen, ``S = scheme.sinks`` and ``W = max(scheme.window, 1)``. The
window is a ring buffer of ``W - 1 + crop_margin`` slots; the body is a preallocated code and scale
buffer (grown in steps of ``GROWTH_STEP`` tokens in the dynamic mode, fixed with ``max_cache_len``). Every write is an
``index_copy_`` at tensor positions and every read is masked, so a decode step with a fixed
``max_cache_len`` has static shapes, allocates no cache storage, and traces with
``torch.compile(fullgraph=True)``. The attention step itself is :mod:`nqkv_core.cache.step`; a
sequence's first tokens, before the transform is fitted on them, :mod:`nqkv_core.cache.fitting`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers.cache_utils import CacheLayerMixin

from nqkv_core import _hf, native
from nqkv_core.cache import commit, fitting, step
from nqkv_core.cache.attend import Logits
from nqkv_core.cache.compiled import STEP_LAYERS, STEP_NAMES
from nqkv_core.cache.format import (RopeTable, SideFormat, check_head_dim, grown, joint_format, side_format,
                                    storage_bytes)
from nqkv_core.cache.handle import Handle
from nqkv_core.cache.inputs import check_first_kv, check_like_buffers, check_query
from nqkv_core.cache.state import layer_state, load_layer_state
from nqkv_core.scheme import KVScheme, KVTransform, fit_transform, rope_layout
from nqkv_core.transform import ROW_FIELDS, fit_transform_rows

# How a compiled step runs a layer (``NQKVCache(compiled_step=...)``).
CompiledStep = Literal["auto", "op", "traced"]


class NQKVLayer(CacheLayerMixin):
    """The quantized K/V cache of one attention layer (layout in the module docstring).

    Buffers, for batch ``b``, ``h`` kv heads, head_dim ``d``, body capacity ``C`` and ring size ``R``
    (one extra "trash" slot in each, where writes that must not land go):

    * ``k_body`` / ``v_body``: ``(codes uint8 (b, h, C+1, d*bits/8), absmax (b, h, C+1, d/block))``,
      or ``(values (b, h, C+1, d),)`` for a 16-bit side.
    * ``k_sink`` / ``v_sink``: ``(b, h, S+1, d)``; ``k_ring`` / ``v_ring``: ``(b, h, R+1, d)``.
    * ``length``: int64 scalar tensor, tokens seen (a tensor so compiled steps do not recompile).
    * ``transform``: the frozen :class:`~nqkv_core.scheme.KVTransform` (None until it is fitted).
    * ``prefix``: the fit period's exact tokens (:mod:`nqkv_core.cache.fitting`), or None: until a
      row holds ``scheme.fit_tokens`` tokens they are all kept exact there, and the transform is
      then fitted on them.
    * ``starts``: ``(b,)`` int64, the leading padding slots of each row of a left-padded batch, or
      None (no row padded). Found from the attention mask of the first (eager) step; row ``r``
      then keeps as sinks its own first tokens, positions ``[starts[r], starts[r] + S)``, its
      transform is fitted on its own tokens (:func:`~nqkv_core.transform.fit_transform_rows`), and
      its slots before its sinks end are masked: each row attends as it would alone.

    With a RoPE-aware key centre (``k_centre_rope``) the keys are stored minus ``R(p) mu`` at their
    position ``p`` and attention adds ``q . R(p) mu`` to each score as an additive mask, from the
    cos/sin table ``rope`` shared by the layers of a cache.
    """

    is_sliding = False
    is_croppable = True
    supports_early_init = True
    sliding_window: int | None = None  # a query reads every earlier token
    stores_body = True  # tokens that leave the window are quantized into the body

    def __init__(self, scheme: KVScheme, max_cache_len: int | None = None, crop_margin: int = 0,
                 rope: RopeTable | None = None, step_memo: step.StepMemo | None = None,
                 compiled_step: CompiledStep = "auto", decode: step.Decode = "auto"):
        super().__init__()
        if max_cache_len is not None and max_cache_len < 1:
            raise ValueError(f"max_cache_len must be positive or None, got {max_cache_len}")
        if compiled_step not in ("auto", "op", "traced"):
            raise ValueError(f"compiled_step must be 'auto', 'op' or 'traced', got {compiled_step!r}")
        self.compiled_step = compiled_step
        self.decode = step.check_decode(decode)
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
        self.starts: torch.Tensor | None = None
        self.prefix: fitting.Prefix | None = None  # the fit period's exact tokens
        self.rope_centred = scheme.k_centre and scheme.k_centre_rope
        self.rope = rope if rope is not None else RopeTable(max_len=max_cache_len)
        self.step_memo = step_memo if step_memo is not None else step.StepMemo()
        self._step_maps: step.StepMaps | None = None
        self._decode_step: native.DecodeStep | None = None
        self._decode_step_key: tuple = ()  # what _decode_step was built from (compared by identity)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # ``length`` as a Python int, read once by an eager step's update and used by its attention
        # and commit (on a GPU every read of the device tensor is a host-device sync); None outside
        # such a step. Never carried across steps: a compiled step advances ``length`` unseen.
        self._step_length: int | None = None
        self.handle = Handle(self)
        self._register_step()

    def _register_step(self) -> None:
        """Give the layer the name by which ``nqkv::cache_step`` finds it (:func:`cache_step`)."""
        self.step_name = f"layer{next(STEP_NAMES)}"
        STEP_LAYERS[self.step_name] = self

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
        """Tokens that have left the window (and are in the body) once ``n_tokens`` were seen."""
        return max(n_tokens - self.n_sinks - self.window + 1, 0)

    def _initial_capacity(self) -> int:
        return self._body_capacity(self.max_cache_len or 64)

    def body_slot(self, position):
        """The body slot of the token at ``position`` (an int or a tensor; ``>= n_sinks``)."""
        return position - self.n_sinks

    def body_positions(self, p0, n_body: int, T: int) -> torch.Tensor:
        """Positions of the tokens in body slots ``[0, n_body)`` during a step of ``T`` tokens from ``p0``."""
        return torch.arange(n_body, device=self.device) + self.n_sinks

    def _new_body(self, fmt: SideFormat, capacity: int) -> tuple[torch.Tensor, ...]:
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        if not fmt.quantized:
            return (torch.zeros(b, h, capacity + 1, d, dtype=self.fp_dtype, device=self.device),)
        return (
            torch.zeros(b, h, capacity + 1, d * fmt.bits // 8, dtype=torch.uint8, device=self.device),
            torch.zeros(b, h, capacity + 1, d // fmt.block, dtype=self.scheme.scale_dtype, device=self.device),
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate every buffer from the first K/V's batch, heads, head_dim, dtype and device
        (transformers 4.x's ``Cache.early_initialization`` passes the keys only)."""
        check_first_kv(key_states, key_states if value_states is None else value_states, self.compiled_step)
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        s = self.scheme
        self.fp_dtype = s.exact_dtype(self.dtype)
        self.k_fmt = side_format(s, "k", self.device)
        self.v_fmt = side_format(s, "v", self.device)
        kf, vf = self.k_fmt, self.v_fmt
        self._joint_format = joint_format(kf, vf)
        check_head_dim(kf, self.head_dim), check_head_dim(vf, self.head_dim)
        capacity = self._initial_capacity()
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
    def compiles_traced(self) -> bool:
        """Whether a compiled step traces this layer's step into its graph (what CUDA graphs capture)
        rather than running it as the opaque ``nqkv::cache_step``: sliding layers,
        ``compiled_step="traced"``, and ``"auto"`` off the CPU."""
        return self.is_sliding or self.compiled_step == "traced" or (
            self.compiled_step == "auto" and self.device.type != "cpu")

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
        capacity = grown(needed)
        n = self.capacity
        for name, fmt in (("k_body", self.k_fmt), ("v_body", self.v_fmt)):
            old, new = getattr(self, name), self._new_body(fmt, capacity)
            for o, t in zip(old, new):
                t[:, :, :n].copy_(o[:, :, :n])
            setattr(self, name, new)

    # -- the step ---------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Park the new K/V ``(b, h, T, d)`` for the attention call that follows; returns ``(handle, handle)``.

        Raises:
            ValueError: K/V of another batch, kv head count, head_dim, dtype or device than the
                layer's buffers (allocated by the first step), or not of one ``(b, h, T, d)`` shape.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            check_like_buffers(self, key_states, value_states)
        if not torch.compiler.is_compiling():
            n = self._step_length = int(self.length)
            self._grow(n + key_states.shape[2])
            if self.rope_centred and self.rope.inv_freq is not None:
                self.rope.ensure(n + key_states.shape[2], self.device)
        self._pending = (key_states, value_states)
        return self.handle, self.handle

    def _fit(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None, config: Any = None,
             attention_mask: torch.Tensor | None = None) -> KVTransform:
        """Fit the frozen transform on the first tokens (with the RoPE frequencies for ``k_centre_rope``);
        on an empty layer, first find the rows' leading padding from ``attention_mask`` (``starts``)."""
        inv_freq = None
        if self.rope_centred:
            if self.rope.inv_freq is None:
                if config is None:
                    raise ValueError(
                        "a RoPE-centred NQKV scheme needs the model's RoPE frequencies: create the cache"
                        " with config=model.config"
                    )
                # (a model may turn sliding and full layers with different RoPE)
                kind = "sliding_attention" if self.is_sliding else "full_attention"
                self.rope.inv_freq, self.rope.order = rope_layout(config, k.shape[-1], layer_type=kind)
            inv_freq = self.rope.inv_freq.to(k.device)
            self.rope.ensure(int(self.length) + k.shape[2], self.device)
        if attention_mask is not None and not torch.compiler.is_compiling() and int(self.length) == 0:
            self._find_starts(attention_mask, k.shape[2], k.shape[0])
        order = self.rope.order if self.rope_centred else None
        if self.starts is not None:
            return fit_transform_rows(self.scheme, k, v, self.starts.tolist(), q, inv_freq, order)
        return fit_transform(self.scheme, k, v, q, inv_freq, order)

    def _find_starts(self, attention_mask: torch.Tensor | None, T: int, batch: int) -> None:
        """Read the rows' leading padding (``starts``) from the first step's ``attention_mask``."""
        if attention_mask is None:
            return
        starts = _hf.leading_pads(attention_mask, T, batch)
        self.starts = starts.to(self.device) if bool(starts.any()) else None
        if self.starts is not None and self.max_cache_len is not None:  # as lazy_initialization's buffers
            torch._dynamo.mark_static_address(self.starts)

    def attention(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, config: Any = None,
        logits: Logits | None = None,
    ) -> torch.Tensor:
        """Attend ``query`` ``(b, hq, T, d)`` to the cache plus the parked tokens, then commit them
        (:func:`nqkv_core.cache.step.attention`; ``logits``: soft-capping and learned sinks);
        returns ``(b, T, hq, d)`` in the query dtype.

        Raises:
            ValueError: ``query`` of another batch, head_dim, token count or device than the parked
                keys, or with a head count that is not a multiple of the kv heads.
        """
        check_query(self, query)
        return step.attention(self, query, attention_mask, scaling, config, logits)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, query_states: torch.Tensor | None = None) -> None:
        """Store tokens without attending (e.g. a prefix computed elsewhere); K/V ``(b, h, T, d)``.

        ``query_states`` are needed only while the layer holds fewer than ``scheme.fit_tokens`` tokens
        (its fit period), for a scheme with ``k_equalize="qk"`` or ``k_rounding="query"`` (the 3-bit
        presets): their transform is fitted on them.
        """
        self.update(key_states, value_states)
        self._pending = None
        if fitting.active(self) and not fitting.append(self, key_states, value_states, query_states):
            return  # held exact in the fit period
        if self.transform is None:
            self.transform = self._fit(key_states, value_states, query_states)
        t = self.transform
        start = self.length if torch.compiler.is_compiling() else self._eager_length()
        self._commit(t.keys(key_states, start=start).to(self.fp_dtype), t.values(value_states).to(self.fp_dtype))

    def _eager_length(self) -> int:
        """``length`` as an int in an eager step: the value its update read, else a fresh read."""
        return self._step_length if self._step_length is not None else int(self.length)

    def _advance(self, n: int) -> None:
        """Count ``n`` committed tokens; ends the step (its host copy of ``length`` is stale now)."""
        self.length.add_(n)
        self._step_length = None

    def _commit(self, k_new: torch.Tensor, v_new: torch.Tensor, leaving_written: bool = False) -> None:
        """Store the ``T`` new tokens (storage basis): sinks, ring, and quantize those that leave the window."""
        commit.commit(self, k_new, v_new, leaving_written)

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
        self.starts = None
        self.prefix = None
        self._pending = None
        if self.is_initialized:
            for buf in (*self.k_body, *self.v_body, self.k_sink, self.v_sink, self.k_ring, self.v_ring):
                buf.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens; with a positive value, keep that many (the legacy
        meaning of transformers 4.x). ``0`` removes nothing on transformers >= 5, whose assisted
        decoding calls ``crop(0)`` as a no-op, and keeps nothing on 4.x, as its ``DynamicCache`` does.

        Exact when the window's tokens after cropping are still held in full precision: always while
        nothing has been quantized, and for up to ``crop_margin`` tokens otherwise. The quantized body
        is never changed: its tokens only get masked out and are quantized again, bit for bit the
        same, when they leave the window again.

        Raises:
            ValueError: if cropping would need full-precision values that were already quantized.
        """
        if tokens_to_remove == 0 and _hf.transformers_version() >= (5, 0):
            return
        n = int(self.length)
        keep = tokens_to_remove if tokens_to_remove >= 0 else n + tokens_to_remove
        keep = max(min(keep, n), 0)
        if keep == n:
            return
        if self.prefix is not None and fitting.crop(self, keep):  # the fit period's tokens are all exact
            return
        if keep < self.crop_floor(n):
            raise ValueError(
                f"cannot crop the NQKV cache from {n} to {keep} tokens: tokens that would re-enter the"
                f" full-precision window were already quantized (only the last {self.n_ring} are kept"
                f" exact). Create the cache with crop_margin>={n - keep} to allow it."
            )
        self.length.fill_(keep)
        self._step_length = None
        if self.starts is not None:  # a row cropped to no token of its own starts again at keep
            self.starts.clamp_(max=keep)

    def crop_floor(self, n: int) -> int:
        """The fewest tokens :meth:`crop` can keep of ``n``: those whose window is still in the ring
        (all of them while the ring reaches back to the sinks)."""
        ring_from = n - self.n_ring  # oldest position still held in full precision
        return ring_from + self.window - 1 if ring_from > self.n_sinks else 0

    def _batch_map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.k_body = tuple(fn(x) for x in self.k_body)
        self.v_body = tuple(fn(x) for x in self.v_body)
        self.k_sink, self.v_sink = fn(self.k_sink), fn(self.v_sink)
        self.k_ring, self.v_ring = fn(self.k_ring), fn(self.v_ring)
        if self.transform is not None:
            for f in ROW_FIELDS:
                x = getattr(self.transform, f)
                if x is not None:
                    setattr(self.transform, f, fn(x))
        if self.starts is not None:
            self.starts = fn(self.starts)
        if self.prefix is not None:
            p = self.prefix
            p.k, p.v, p.q = fn(p.k), fn(p.v), fn(p.q) if p.q is not None else None
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

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors that define the layer's contents (:func:`nqkv_core.cache.state.layer_state`)."""
        return layer_state(self)

    def load_state(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Inverse of :meth:`state` on a fresh layer of the same scheme; ``dtype``: the model's."""
        load_layer_state(self, state, dtype)

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the layer holds: buffers, the frozen transform, the prepared step state and
        the RoPE table it shares with the other layers of its cache."""
        out = [self.length] + ([self.starts] if self.starts is not None else [])
        out += self.prefix.tensors() if self.prefix is not None else []
        if self.is_initialized:
            out += [*self.k_body, *self.v_body, self.k_sink, self.v_sink, self.k_ring, self.v_ring]
        for obj in (self.transform, self._step_maps):
            out += [x for x in vars(obj).values() if isinstance(x, torch.Tensor)] if obj is not None else []
        return out + [x for x in (self.rope.inv_freq, *self.rope.tensors) if x is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds (:meth:`held_tensors`; allocated capacity, not only
        the used part), each storage counted once."""
        return storage_bytes(self.held_tensors())

    def bytes_per_token(self) -> float:
        """Storage bytes of one quantized (body) token: codes and scales of K and V, all heads."""
        if not self.is_initialized:
            raise RuntimeError("the layer holds no data yet")
        return sum(x[:, :, :1].nbytes for x in (*self.k_body, *self.v_body)) / self.batch_size
