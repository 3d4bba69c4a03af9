"""A compiled step's cache layer as one opaque op: ``torch.ops.nqkv.cache_step``.

On CPU a ``torch.compile``'d decode step runs each layer's cache step as this op, whose body is the
eager step (one native call per layer), instead of tracing its ~180 torch ops into the graph.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

from nqkv_core._hf import bool_mask

# The layers ``nqkv::cache_step`` runs, by ``NQKVLayer.step_name`` (an op's arguments are tensors and
# plain values; the layer's transform, buffers and prepared native step stay out of the graph).
STEP_LAYERS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
STEP_NAMES = itertools.count()


def allows_whole_cache(mask: torch.Tensor | None, n: int) -> bool:
    """Whether a one-token step's ``mask`` lets its query see every position ``0..n`` (its own is ``n``):
    then it masks nothing the cache holds, and the step may run as if it had no mask."""
    if mask is None:
        return True
    if mask.shape[-2] != 1 or mask.shape[-1] <= n:
        return False
    row = mask[..., -1, : n + 1]
    return bool(bool_mask(row).all())


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
    target = STEP_LAYERS.get(layer)
    if target is None or not target.is_initialized or target.k_sink.data_ptr() != k_sink.data_ptr():
        raise RuntimeError(
            f"nqkv::cache_step: {layer!r} is not the NQKV cache layer this graph was compiled for (a cache"
            " replaced without recompiling?); call torch._dynamo.reset() or compile the step again"
        )
    own = target.length
    target.length = length.clone()  # the eager step counts on its own copy
    try:
        target.update(key, value)
        if query.shape[2] == 1 and allows_whole_cache(attention_mask, target._eager_length()):
            attention_mask = None
        return target.attention(query, attention_mask, scaling).contiguous()
    finally:
        target.length = own
        target._pending = target._step_length = None


@cache_step.register_fake
def _(query, key, value, attention_mask, length, k_sink, scaling, layer):
    b, hq, T, d = query.shape
    return query.new_empty(b, T, hq, d)

