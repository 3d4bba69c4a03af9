"""``NQKVSlidingLayer``: a sliding-window attention layer's quantized K/V store.

A query at ``p`` sees the keys in ``(p - sliding_window, p]``; inside that span a key is exact or
quantized as in a full layer (:class:`~nqkv_core.cache.layer.NQKVLayer`), and its quantized tokens
live in a ring of their own instead of an append-only body.
"""

from __future__ import annotations

import torch

from nqkv_core import _hf
from nqkv_core.cache import fitting, step
from nqkv_core.cache.format import RopeTable
from nqkv_core.cache.layer import CompiledStep, NQKVLayer
from nqkv_core.cache.state import load_sliding_layer_state, sliding_layer_state
from nqkv_core.scheme import KVScheme


class NQKVSlidingLayer(NQKVLayer):
    """The quantized K/V cache of a sliding-window attention layer (Mistral, Gemma 2/3, GPT-OSS, ...).

    A query at position ``p`` reads the keys at ``(p - sliding_window, p]`` only (transformers'
    ``sliding_window_causal_mask``); within that span keys are read as in :class:`NQKVLayer`: exact
    if they are sinks or among the ``W`` latest, quantized otherwise. So the layer holds:

    * ``sliding_window <= W`` (the exact window covers the sliding one): the ring of exact tokens
      alone (``sliding_window - 1``, plus the crop margin) and the sinks; nothing is ever quantized.
    * otherwise: the ring of ``W - 1`` exact tokens and the sinks as in :class:`NQKVLayer`, and a body
      that is itself a ring of codes: the token at position ``r`` in slot ``(r - S) mod C``, with
      ``C = sliding_window - W + crop_margin`` slots for one-token steps. A forward of ``T > 1``
      tokens quantizes the tokens that leave the window before attending (as a full layer does), so
      it needs ``T`` more slots: the body grows to them, eagerly, and keeps them.

    Steps are served by the general torch step with the ``torch.ops.nqkv`` attention ops (or the
    reference); the native one-call CPU step and the opaque compiled op serve full layers only.
    Saved and loaded with its ring of codes whole (:func:`nqkv_core.cache.state.sliding_layer_state`).
    """

    is_sliding = True

    def __init__(self, scheme: KVScheme, sliding_window: int, max_cache_len: int | None = None,
                 crop_margin: int = 0, rope: RopeTable | None = None, step_memo: step.StepMemo | None = None,
                 compiled_step: CompiledStep = "auto", decode: step.Decode = "auto"):
        if not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
        super().__init__(scheme, max_cache_len, crop_margin, rope, step_memo, compiled_step, decode)
        self.sliding_window = sliding_window
        self.stores_body = sliding_window > self.window
        self.window = min(self.window, sliding_window)  # exact tokens beyond the sliding window: never read
        self.n_ring = self.window - 1 + crop_margin

    def __repr__(self) -> str:
        return (
            f"NQKVSlidingLayer(scheme={self.scheme.name!r}, sliding_window={self.sliding_window},"
            f" length={int(self.length)}, max_cache_len={self.max_cache_len})"
        )

    def _ring_slots(self, T: int) -> int:
        """Body slots a forward of ``T`` tokens needs (those it quantizes first, if ``T > 1``)."""
        return self.sliding_window - self.window + self.crop_margin + (T if T > 1 else 0)

    def _initial_capacity(self) -> int:
        return min(self._body_capacity(self.max_cache_len or 64), self._ring_slots(1)) if self.stores_body else 0

    def body_slot(self, position):
        if isinstance(position, torch.Tensor):
            return torch.remainder(position - self.n_sinks, max(self.capacity, 1))
        return (position - self.n_sinks) % self.capacity

    def body_positions(self, p0, n_body: int, T: int) -> torch.Tensor:
        # The newest token in the body: p0 - W before a one-token step (it quantizes after attending),
        # p0 + T - W in a forward of T tokens (quantized first).
        last = p0 - self.window + (T if T > 1 else 0)
        slots = torch.arange(n_body, device=self.device)
        return last - torch.remainder(last - self.n_sinks - slots, max(self.capacity, 1))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """As :meth:`NQKVLayer.update`.

        Raises:
            ValueError: for a compiled forward of more tokens than the ring of codes was grown for
                (a compiled step cannot grow it).
        """
        out = super().update(key_states, value_states, *args, **kwargs)
        T = key_states.shape[2]
        if torch.compiler.is_compiling() and self.stores_body and T > 1:
            needed = self._ring_slots(T)
            if self.max_cache_len is not None:
                needed = min(needed, self._body_capacity(self.max_cache_len))
            if self.capacity < needed:
                raise ValueError(
                    f"a compiled forward of {T} tokens needs {needed} slots in the sliding layer's ring of codes,"
                    f" which holds {self.capacity}: run a first forward of at least {T} tokens eagerly"
                    " (it grows the ring), or compile one-token steps only"
                )
        return out

    def _grow(self, n_tokens: int) -> None:
        """Make the ring of codes large enough for a forward up to ``n_tokens`` tokens (eager steps)."""
        if self.max_cache_len is not None and n_tokens > self.max_cache_len:
            super()._grow(n_tokens)  # raises, naming max_cache_len
        if not self.stores_body:
            return
        n = self._eager_length()
        ring = self._ring_slots(n_tokens - n)
        needed = min(self._body_capacity(n_tokens), ring)
        if needed > self.capacity:
            self._relayout(min(max(needed, 2 * self.capacity), ring), n)  # (bounded by the ring)

    def _relayout(self, capacity: int, n: int) -> None:
        """Move the ring of codes to ``capacity`` slots; the tokens held (positions up to ``n - W``) keep
        their codes, each in its slot for the new size."""
        old, S = self.capacity, self.n_sinks
        last = n - self.window
        held = min(max(last - S + 1, 0), old)
        pos = torch.arange(last - held + 1, last + 1, device=self.device) - S
        to, frm = torch.remainder(pos, capacity), torch.remainder(pos, max(old, 1))
        for name, fmt in (("k_body", self.k_fmt), ("v_body", self.v_fmt)):
            bufs, new = getattr(self, name), self._new_body(fmt, capacity)
            for o, t in zip(bufs, new):
                if held:
                    t.index_copy_(2, to, o.index_select(2, frm))
                if self.max_cache_len is not None:  # as lazy_initialization marks the buffers it allocates
                    torch._dynamo.mark_static_address(t)
            setattr(self, name, new)

    def crop(self, tokens_to_remove: int) -> None:
        """As :meth:`NQKVLayer.crop`; also needs the window's quantized tokens after cropping still in
        the ring of codes (``crop_margin`` tokens back, at least)."""
        n = int(self.length)
        if tokens_to_remove == 0 and _hf.transformers_version() >= (5, 0):
            return
        keep = tokens_to_remove if tokens_to_remove >= 0 else n + tokens_to_remove
        keep = max(min(keep, n), 0)
        if self.prefix is not None and keep < n and fitting.crop(self, keep):  # the fit period: all exact
            return
        oldest_needed = max(self.n_sinks, keep - self.sliding_window + 1)  # of the body tokens read after it
        reads_body = self.stores_body and keep < n and oldest_needed <= keep - self.window
        if reads_body and oldest_needed < n - self.window - self.capacity + 1:  # the oldest token held
            raise ValueError(
                f"cannot crop the NQKV sliding layer from {n} to {keep} tokens: quantized tokens of the window"
                f" after cropping were overwritten in its ring of codes. Create the cache with"
                f" crop_margin>={n - keep} to allow it."
            )
        super().crop(tokens_to_remove)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors that define the layer's contents (:func:`nqkv_core.cache.state.sliding_layer_state`)."""
        return sliding_layer_state(self)

    def load_state(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Inverse of :meth:`state` on a fresh layer of the same scheme, window and crop margin."""
        load_sliding_layer_state(self, state, dtype)
