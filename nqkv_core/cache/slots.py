"""Which stored slots a step's queries read: slot positions, validity, masks, and the RoPE-centred key bias.

A layer's slots are ``[body | sinks | ring]`` followed by the step's new tokens (see
:mod:`nqkv_core.cache.layer`); this module says, per query, which of them hold a token it may
attend to (causality, the window, the model's mask, a left-padded row's own slots) and the score
offset ``q . R(p) mu`` of a RoPE-centred key at each.
"""

from __future__ import annotations

import torch

from nqkv_core._hf import bool_mask
from nqkv_core.cache.format import KeyBias
from nqkv_core.ops.cpu import key_bias_scores
from nqkv_core.scheme import per_query_head
from nqkv_core.transform import rope_bias_weights


def all_slots_valid(layer, n: int) -> bool:
    """Whether every slot ``[body | sinks | ring]`` read at ``n`` tokens holds a token to attend to:
    true once sinks and ring are full, unless the ring keeps a crop margin (older, masked tokens);
    never in a sliding layer (its sinks and its ring of codes hold tokens that left the window), nor
    for a left-padded batch."""
    if layer.is_sliding or layer.starts is not None:  # (padded rows mask their own slots)
        return False
    return layer.n_ring == layer.window - 1 and n >= layer.n_sinks + layer.n_ring


def slot_positions(layer, p0: torch.Tensor, n_body: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and validity of the stored slots ``[body n_body | sinks S | ring R]`` before this
    step, followed by the ``T`` new tokens."""
    dev, S, R, W = layer.device, layer.n_sinks, layer.n_ring, layer.window
    body = layer.body_positions(p0, n_body, T)
    sinks = torch.arange(S, device=dev)
    slots = torch.arange(R, device=dev)
    ring = p0 - 1 - torch.remainder(p0 - 1 - slots, max(R, 1))
    new = p0 + torch.arange(T, device=dev)
    valid = torch.cat([
        torch.zeros(n_body, dtype=torch.bool, device=dev),  # quantized: per query, in allowed_slots
        sinks < p0,
        (ring >= S) & (ring > p0 - W),  # the W - 1 tokens before p0 (no margin)
        torch.ones(T, dtype=torch.bool, device=dev),
    ])
    return torch.cat([body, sinks, ring, new]), valid


def allowed_slots(layer, p0: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, T: int,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The boolean mask ``(b or 1, 1, T, slots + T)`` of the ``T`` new queries over the stored slots
    and the new tokens (``positions``, ``valid``: from :func:`slot_positions`).

    Each query at position ``p`` reads a key quantized if it is at least ``W`` positions older and
    not a sink, exactly otherwise (what the fake-quantized reference computes): a body slot at
    ``r`` counts for it when ``r <= p - W``, an exact slot when ``r < S`` or ``r > p - W``. A
    sliding layer's query also reads only ``r > p - sliding_window``.
    """
    S, W = layer.n_sinks, layer.window
    q_pos = (p0 + torch.arange(T, device=layer.device))[:, None]
    n_body = positions.shape[0] - S - layer.n_ring - T
    is_body = torch.arange(positions.shape[0], device=layer.device) < n_body
    exact = (positions < S) | (positions > q_pos - W)
    allowed = torch.where(is_body, positions <= q_pos - W, exact & valid)
    if layer.sliding_window is not None:
        allowed = allowed & (positions > q_pos - layer.sliding_window)
    if attention_mask is None:
        allowed = (allowed & (positions <= q_pos))[None, None]
    else:
        mask = bool_mask(attention_mask)
        cols = positions.clamp(0, mask.shape[-1] - 1)
        allowed = mask[:, :, -T:, :].index_select(-1, cols) & allowed
    # Rows of padding queries see nothing; give them every slot (finite zeros at worst) so that no
    # NaN appears: their outputs are discarded, but their K/V at the next layer are stored.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def padded_allowed_slots(layer, p0: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, T: int,
                         attention_mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`allowed_slots` of a left-padded batch (``layer.starts``), ``(b, 1, T, slots + T)``.

    Row ``r`` counts positions from its start ``s = starts[r]``: its sink slot ``i`` holds position
    ``s + i``, exact are the positions below ``s + S`` and the window's, and a body or ring slot
    counts only from ``s + S`` on (earlier ones hold the row's padding, or copies of its sinks).
    Slots before ``s`` (padding) are never read, mask or not.
    """
    S, R, W, b, dev = layer.n_sinks, layer.n_ring, layer.window, layer.batch_size, layer.device
    n_body = positions.shape[0] - S - R - T
    lo = layer.starts[:, None]
    sinks = lo + torch.arange(S, device=dev)  # (b, S)
    ring = positions[n_body + S : n_body + S + R]
    pos = torch.cat([positions[:n_body].expand(b, -1), sinks, positions[n_body + S :].expand(b, -1)], dim=1)
    ok = torch.cat([valid[:n_body].expand(b, -1), sinks < p0, valid[n_body + S : n_body + S + R] & (ring >= lo + S),
                    valid[n_body + S + R :].expand(b, -1)], dim=1)
    pos, ok, lo = pos[:, None, :], ok[:, None, :], lo[:, :, None]  # (b, 1, slots), (b, 1, 1)
    q_pos = (p0 + torch.arange(T, device=dev))[None, :, None]
    is_body = torch.arange(pos.shape[-1], device=dev) < n_body
    exact = (pos < lo + S) | (pos > q_pos - W)
    allowed = torch.where(is_body, (pos <= q_pos - W) & (pos >= lo + S), exact & ok) & (pos >= lo)
    if layer.sliding_window is not None:
        allowed = allowed & (pos > q_pos - layer.sliding_window)
    if attention_mask is None:
        allowed = allowed & (pos <= q_pos)
    else:
        mask = bool_mask(attention_mask)[:, 0, -T:, :]
        cols = pos.clamp(0, mask.shape[-1] - 1).expand(b, T, -1)
        allowed = mask.expand(b, -1, -1).gather(-1, cols) & allowed
    allowed = allowed[:, None]
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def slot_key_bias(layer, query: torch.Tensor, positions: torch.Tensor, n: int | None, scaling: float,
              w: torch.Tensor | None = None) -> KeyBias:
    """``scaling * q . R(p) mu`` of every query row for the slots at ``positions`` (``(b, hq, T, slots)``).

    ``w``: the query rows' bias weights if already computed (:class:`StepMaps`).
    Densely, the bias is computed for positions ``[0, P)`` in order and cut into the slot order
    ``[body | sinks | ring | new]``: body and sinks are contiguous runs of positions, so only the
    ring and the new tokens are gathered (gathering a table row per slot costs as much as the bias).
    """
    b, hq, T, d = query.shape
    S = layer.n_sinks
    n_body = positions.shape[0] - S - layer.n_ring - T
    table, clamped = bias_table(layer, positions, n, n_body, T)
    if w is None:
        t = layer.transform
        w = rope_bias_weights(t.key_order(query), per_query_head(t.mu_k, hq // layer.num_heads), scaling)

    def dense() -> torch.Tensor:
        bias = key_bias_scores(w, table)  # (b, hq, T, P), P the positions the table covers
        if layer.is_sliding:  # a ring of codes: body positions are not one run
            out = bias.index_select(-1, clamped)
        else:
            tail = clamped[n_body + S :]  # ring and new tokens
            out = torch.cat([bias[..., S : S + n_body], bias[..., :S], bias.index_select(-1, tail)], dim=-1)
        if layer.starts is None or not S:
            return out
        # a left-padded row's sink slot i holds its position starts + i
        sinks = (layer.starts[:, None] + torch.arange(S, device=layer.device)).clamp(max=bias.shape[-1] - 1)
        sinks = bias.gather(-1, sinks[:, None, None, :].expand(b, hq, T, S))
        return torch.cat([out[..., :n_body], sinks, out[..., n_body + S :]], dim=-1)

    return KeyBias((w, table, clamped), dense)


def bias_table(layer, positions: torch.Tensor, n: int | None, n_body: int, T: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of the RoPE table that covers positions ``[0, P)`` a step's key bias reads (a view of
    :attr:`~nqkv_core.cache.format.RopeTable.table`), and the slot positions clamped into ``[0, P)``."""
    if n is None:  # compiled: static shapes; the table was sized for max_cache_len eagerly
        P = layer.rope.positions
        return layer.rope.table, positions.clamp(0, P - 1)  # unused ring slots (masked) hold positions < 0
    P = max(layer.n_sinks + n_body, n + T)
    layer.rope.ensure(P, layer.device)
    key = (n, n_body, T, P, layer.n_sinks, layer.n_ring, layer.window, layer.sliding_window, layer.capacity,
           layer.device)  # what positions depend on
    clamped = layer.step_memo.get("clamped positions", key, lambda: positions.clamp(0, P - 1))
    return layer.rope.head(P), clamped
