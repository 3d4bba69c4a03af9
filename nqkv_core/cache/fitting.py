"""A layer's fit period: a sequence's first tokens, kept exact until its transform can be fitted.

A layer's frozen transform is fitted on the first ``F = scheme.fit_tokens`` tokens of each row (the
sinks and the statistics tokens; a left-padded row's own, from its first real token). Until a row
holds ``F`` tokens they are all kept exact, in the model's basis and dtype (:class:`Prefix`), and
its queries attend to them exactly; the step that brings it to ``F`` fits its transform on exactly
those tokens and stores them again (quantized where they left the window) under it. From then on
the layer is as if the transform had always been there, and a query at a row's position ``>= F``
reads the keys as any step does.

The rule depends on positions only, not on how a sequence is split into forward passes: a short
prompt decoded token by token, a chunked prompt, and assisted decoding's forwards of candidate
tokens (the rejected ones cropped) fit the same transform on the same tokens. So the exact tokens
are kept one step longer than the fit when a crop in between may remove tokens the transform was
fitted on (the layer is then fitted again, or goes back to holding them all exact); they are dropped
at the start of the first step after every row was fitted, or at once when no crop can reach them
(:meth:`NQKVLayer.crop_floor`: a prompt longer than ``F`` plus the crop margin).

A compiled step runs a layer's fit period inside the opaque ``nqkv::cache_step`` (CPU). A layer
that compiled steps trace instead (CUDA graphs: :attr:`NQKVLayer.compiles_traced`) has no fit
period when it is preallocated (``max_cache_len``): its transform is fitted on its first
forward's tokens, however few.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from nqkv_core.cache import commit
from nqkv_core.cache.attend import Logits, prompt_attention
from nqkv_core.scheme import FP_BITS, KVScheme


@dataclass
class Prefix:
    """The exact tokens of a layer's fit period: ``(b, hkv, n, d)`` K/V and, for a transform fitted
    on queries, ``(b, hq, n, d)`` queries, of the first ``n <= cap`` positions (the fit reads no
    later one); ``fitted``: every row was fitted at the last step."""

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor | None
    cap: int
    fitted: bool = False

    def append(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None) -> None:
        room = self.cap - self.k.shape[2]
        if room <= 0:
            return
        self.k, self.v = torch.cat([self.k, k[:, :, :room]], dim=2), torch.cat([self.v, v[:, :, :room]], dim=2)
        if self.q is not None:
            self.q = torch.cat([self.q, q[:, :, :room]], dim=2)

    def keep(self, n: int) -> None:
        self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]
        if self.q is not None:
            self.q = self.q[:, :, :n]

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in (self.k, self.v, self.q) if x is not None]


def fitted_on_queries(scheme: KVScheme) -> bool:
    """Whether ``scheme``'s transform is fitted on queries too (``k_equalize="qk"``, ``k_rounding="query"``)."""
    return scheme.k_equalize == "qk" or (scheme.k_rounding == "query" and scheme.k_bits < FP_BITS)


def active(layer) -> bool:
    """Whether the layer's next eager step belongs to its fit period (ending it first if the last
    step fitted every row: what it was fitted on can no longer be cropped away)."""
    if layer.prefix is not None and layer.prefix.fitted:
        layer.prefix = None
    if layer.prefix is not None:
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "an NQKV cache in its fit period (fewer tokens than scheme.fit_tokens) cannot run a traced"
                " compiled step: preallocate it (max_cache_len=...), which then fits on the first forward,"
                " or compile with compiled_step='op'"
            )
        return True
    return (layer.transform is None and layer.scheme.fit_tokens > 0 and not torch.compiler.is_compiling()
            and not (layer.max_cache_len is not None and layer.compiles_traced))


def _own_lengths(layer, n: int) -> torch.Tensor:
    """Each row's own token count when the layer holds ``n`` tokens, ``(b,)`` (padding excluded)."""
    own = torch.full((layer.batch_size,), n, dtype=torch.long, device=layer.device)
    return own - layer.starts if layer.starts is not None else own


def _begin(layer, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None) -> None:
    """Start the period (after the rows' padding is known): an empty prefix with room for every
    row's first ``F`` tokens."""
    pads = int(layer.starts.max()) if layer.starts is not None else 0
    q = q[:, :, :0] if fitted_on_queries(layer.scheme) else None
    layer.prefix = Prefix(k[:, :, :0], v[:, :, :0], q, cap=pads + layer.scheme.fit_tokens)


def _settle(layer, total: int) -> None:
    """After a fit at ``total`` tokens: drop the prefix now if no crop can reach a row's fit tokens."""
    p = layer.prefix
    if p.fitted and bool((_own_lengths(layer, layer.crop_floor(total)) >= layer.scheme.fit_tokens).all()):
        layer.prefix = None


def _refit(layer, n: int, total: int, config: Any = None) -> bool:
    """With ``total`` tokens, fit the transform on the prefix's rows if any holds ``F`` tokens (each
    row on its first ``F``; a row with fewer, on what it has: it is fitted again when it has them),
    then store the first ``n`` tokens again under it; with no such row, the layer holds no
    transform. Returns whether every row is fitted on its ``F`` tokens."""
    p, F = layer.prefix, layer.scheme.fit_tokens
    ready = _own_lengths(layer, total) >= F
    if not bool(ready.any()):
        layer.transform = None
        return False
    layer.transform = layer._fit(p.k, p.v, p.q, config)
    if layer.rope_centred:  # the step's own positions too (the prefix may hold fewer)
        layer.rope.ensure(total, layer.device)
    _replay(layer, n)
    return bool(ready.all())


def _replay(layer, n: int) -> None:
    """Store the prefix's first ``n`` tokens under the layer's transform, as one forward would."""
    t, p = layer.transform, layer.prefix
    layer.length.fill_(0)
    layer._step_length = 0
    layer._grow(n)  # a sliding layer's ring of codes, for a forward of n tokens
    if n:
        k, v = t.keys(p.k[:, :, :n], start=0).to(layer.fp_dtype), t.values(p.v[:, :, :n]).to(layer.fp_dtype)
        if layer.starts is not None:
            k, v = commit.zero_padding(layer, k, v)
        layer._commit(k, v)
    layer._step_length = n


def attention(layer, query: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float, config: Any, logits: Logits | None,
              step: Callable[..., torch.Tensor]) -> torch.Tensor:
    """A step of the fit period: queries before their row's ``F``-th position attend exactly to the
    prefix; if a row reaches ``F`` tokens, the layer is fitted and ``step`` (the layer's step after
    the period, committing the new tokens) serves the others. Returns ``(b, T, hq, d)``."""
    n, T = layer._eager_length(), k_new.shape[2]
    if layer.prefix is None:
        layer._find_starts(attention_mask, T, k_new.shape[0])
        _begin(layer, k_new, v_new, query)
    p, F = layer.prefix, layer.scheme.fit_tokens
    p.append(k_new, v_new, query if p.q is not None else None)
    before = _own_lengths(layer, n)
    m = int((F - before).clamp(0, T).max())  # the leading queries that some row reads exactly
    exact = None
    if m:
        mask = attention_mask[:, :, -T:][:, :, :m] if attention_mask is not None else None
        exact = prompt_attention(query[:, :, :m], p.k[:, :, : n + m], p.v[:, :, : n + m], mask, scaling,
                                 layer.sliding_window, logits).transpose(1, 2)
    if not bool((before + T >= F).any()):  # no row fitted yet
        layer._advance(T)
        return exact.contiguous()
    p.fitted = _refit(layer, n, n + T, config)
    out = step(layer, query, k_new, v_new, attention_mask, scaling, config, logits)
    _settle(layer, n + T)
    if exact is None:
        return out
    own_pos = before[:, None] + torch.arange(m, device=layer.device)  # (b, m)
    head = torch.where((own_pos < F)[:, :, None, None], exact.to(out.dtype), out[:, :m])
    return torch.cat([head, out[:, m:]], dim=1)


def append(layer, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None) -> bool:
    """:meth:`NQKVLayer.append` in the fit period: the tokens join the prefix. Returns whether the
    layer is fitted now (the tokens before these stored again under the transform), and the
    caller stores these as after the period; False: they are held in the prefix only."""
    if fitted_on_queries(layer.scheme) and q is None:
        raise ValueError(f"{layer.scheme.name!r} is fitted on queries too: pass query_states to append while the"
                         f" layer holds fewer than fit_tokens={layer.scheme.fit_tokens} tokens")
    if layer.prefix is None:
        _begin(layer, k, v, q)
    n, T = layer._eager_length(), k.shape[2]
    layer.prefix.append(k, v, q if layer.prefix.q is not None else None)
    layer.prefix.fitted = _refit(layer, n, n + T)
    if layer.transform is None:
        layer._advance(T)
        return False
    _settle(layer, n + T)
    return True


def crop(layer, keep: int) -> bool:
    """Crop a layer in its fit period to its first ``keep`` tokens. Returns False when every row
    keeps its first ``F`` tokens: the fit stands and the period ends; the caller crops as after
    it. Otherwise crops here (all the tokens are exact) and drops the transform: the next step fits
    it again on what remains (if a row holds ``F`` tokens then)."""
    if layer.transform is not None and bool((_own_lengths(layer, keep) >= layer.scheme.fit_tokens).all()):
        layer.prefix.fitted = True
        return False
    layer.prefix.keep(keep)
    layer.prefix.fitted = False
    layer.transform = None
    if layer.starts is not None:
        layer.starts.clamp_(max=keep)
    layer.length.fill_(keep)
    layer._step_length = None
    return True


def restore(layer, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None, n: int,
            starts: torch.Tensor | None) -> None:
    """Put a saved fit period back into a fresh layer: ``n`` tokens, all exact in ``k``, ``v``
    (and the queries ``q``); the next step fits the transform if a row holds ``F`` tokens by then."""
    layer.lazy_initialization(k[:, :, :0], v[:, :, :0])
    layer.starts = starts if starts is not None and bool(starts.any()) else None
    _begin(layer, k, v, q)
    layer.prefix.append(k, v, q)
    layer.length.fill_(n)
