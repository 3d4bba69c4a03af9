"""What a cache layer accepts: the K/V and queries of a step, checked before any kernel indexes them.

The decode kernels index new tokens with the layer's buffer sizes and dtype, so a tensor that does
not fit must stop here with an error naming what to change, not read past its storage.
"""

from __future__ import annotations

import torch


def check_first_kv(key_states: torch.Tensor, value_states: torch.Tensor, compiled_step: str) -> None:
    """The first K/V of a layer, from which it allocates its buffers: ``(b, h, T, d)`` each, of one shape.

    Raises:
        ValueError: not 4-D, or ``compiled_step="op"`` (the eager CPU step as an op) off CPU.
        NotImplementedError: keys and values of different shapes.
    """
    if key_states.dim() != 4:
        raise ValueError(
            f"NQKVCache takes K/V of shape (batch, kv heads, tokens, head_dim), got {tuple(key_states.shape)}"
        )
    if key_states.shape != value_states.shape:
        raise NotImplementedError(
            f"NQKVCache needs keys and values of one shape, got {tuple(key_states.shape)} and"
            f" {tuple(value_states.shape)}"
        )
    if compiled_step == "op" and key_states.device.type != "cpu":
        raise ValueError(
            f"compiled_step='op' runs the eager CPU step inside compiled graphs; on {key_states.device.type}"
            " use 'traced' (or 'auto'), whose graphs CUDA graphs can capture"
        )


def check_like_buffers(layer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """ValueError, naming the fix, unless K/V fit the buffers the layer's first step allocated."""
    want = (layer.batch_size, layer.num_heads, layer.head_dim, layer.dtype, layer.device)
    for name, x in (("keys", key_states), ("values", value_states)):
        if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3], x.dtype, x.device) != want or (
                x.shape != key_states.shape):
            raise ValueError(
                f"NQKVCache was filled with batch {layer.batch_size}, {layer.num_heads} kv heads of dim"
                f" {layer.head_dim}, {layer.dtype} on {layer.device}; got {name} of shape {tuple(x.shape)},"
                f" {x.dtype} on {x.device}. Use one cache per model; call cache.reset() to start a new batch"
            )


def check_query(layer, query: torch.Tensor) -> None:
    """ValueError, naming the fix, unless ``query`` fits the keys parked by the layer's ``update``."""
    if layer._pending is None:
        return  # the step raises its own error
    k = layer._pending[0]
    b, hq, t, d = query.shape if query.dim() == 4 else (None, 0, None, None)
    if (b, t, d, query.device) != (layer.batch_size, k.shape[2], layer.head_dim, layer.device) or (
            not hq or hq % layer.num_heads):
        raise ValueError(
            f"NQKVCache attention needs queries (batch {layer.batch_size}, a multiple of {layer.num_heads}"
            f" heads, {k.shape[2]} tokens, dim {layer.head_dim}) on {layer.device}, like the cached keys;"
            f" got shape {tuple(query.shape)} on {query.device}"
        )
