"""Quality of KV-cache schemes: perplexity and greedy agreement with K/V fake-quantized post-RoPE.

The model attends through a :class:`FakeQuant`, a transformers attention function registered under
a name (:data:`ATTN_NAME` by default) that holds the scheme it applies. Before every attention call
it passes the layer's keys and values through that :class:`~nqkv_core.scheme.KVScheme` and then
attends the way a streaming cache would: for each query position, keys/values of the first
``sinks`` tokens and of the last ``window`` positions (``q_pos - k_pos < window``) are exact and all
others are the quantized ones. Scores are computed against both exact and quantized keys and chosen
per (query, key) pair; the output sums the split probability matrix times exact and quantized values.

The per-channel statistics of a scheme (centre, equalisation) are measured on the sequence's first
``scheme.fit_tokens`` tokens once a call holds them, and frozen, per layer, in the :class:`FakeQuant`
for that sequence's later calls; queries before that position read every key exact. This is the
cache's rule (:mod:`nqkv_core.cache.fitting`).

Usage::

    with fake_quantized(model, scheme) as fq:  # the model attends through fq inside the block
        for ids in sequences:
            fq.new_sequence()
            logits = model(ids).logits
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nqkv_core.lab.models import cache_arg, returned_cache
from nqkv_core.scheme import FP_BITS, KVScheme, KVTransform, fit_transform, roundtrip

ATTN_NAME = "nqkv_fakequant"


def _is_fp(scheme: KVScheme | None) -> bool:
    return scheme is None or (scheme.k_bits >= FP_BITS and scheme.v_bits >= FP_BITS)


class FakeQuant:
    """A transformers attention function over fake-quantized K/V, and its state: the scheme it
    applies (``None`` = exact attention) and the transforms it froze per layer for the current
    sequence.

    Register it with :meth:`register` (or use :func:`fake_quantized`), switch schemes with
    :meth:`applying` and call :meth:`new_sequence` before each independent sequence.
    """

    def __init__(self, scheme: KVScheme | None = None):
        self.scheme = scheme
        self.attention: Callable | None = None
        self.transforms: dict[int, KVTransform] = {}
        self.queries: dict[int, torch.Tensor] = {}  # a layer's queries until its transform is fitted

    def register(self, name: str = ATTN_NAME) -> str:
        """Register this object (and an SDPA-style boolean mask) as attention ``name``; returns ``name``."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(name, self)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
        return name

    def new_sequence(self) -> None:
        """Forget the frozen per-layer statistics: the next attention call starts a new sequence."""
        self.transforms, self.queries = {}, {}

    @contextmanager
    def applying(self, scheme: KVScheme | None, attention: Callable | None = None) -> Iterator[FakeQuant]:
        """Apply ``scheme`` inside the block (a new sequence at entry); ``attention``, if given, is
        called instead of :meth:`attend` (with the same arguments; it may call :func:`fakequant_attention`)."""
        prev = self.scheme, self.attention
        self.scheme, self.attention, self.transforms, self.queries = scheme, attention, {}, {}
        try:
            yield self
        finally:
            (self.scheme, self.attention), self.transforms, self.queries = prev, {}, {}

    def _transform(self, module, layer: int, scheme: KVScheme, query, key, value) -> KVTransform | None:
        """The layer's frozen transform, fitted as a cache fits it (:mod:`nqkv_core.cache.fitting`): on
        the sequence's first ``scheme.fit_tokens`` tokens once it holds them (None before), then
        kept for the sequence (beam search's reordered rows keep the rows of the fit)."""
        t = self.transforms.get(layer)
        if t is not None:
            return t
        F, tk = scheme.fit_tokens, key.shape[2]
        if scheme.k_equalize == "qk" or scheme.k_rounding == "query":  # the queries of earlier calls too
            seen = self.queries.get(layer)
            query = self.queries[layer] = query if seen is None else torch.cat([seen, query], dim=2)
        if tk < F:
            return None
        n = F if F else tk
        inv_freq = order = None
        if scheme.k_centre_rope:
            inv_freq, order = _layer_rope(module.config, layer, key.shape[-1])
            inv_freq = inv_freq.to(key.device)
        q = query[:, :, :n] if query.shape[2] >= n else query
        self.transforms[layer] = fit_transform(scheme, key[:, :, :n], value[:, :, :n], q, inv_freq, order)
        self.queries.pop(layer, None)
        return self.transforms[layer]

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        return (self.attention or self.attend)(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """Attention over K/V fake-quantized by :attr:`scheme`, with exact sinks and recent window, in fp32.

        Shapes: ``query (b, hq, T, d)``, ``key``/``value`` ``(b, hkv, Tk, d)`` with the ``T`` queries at
        the last ``T`` positions; ``attention_mask`` is None or a boolean ``(b, 1, T, Tk)`` (True =
        attend). The model's ``sliding_window`` (a query at ``p`` sees keys in ``(p - sliding_window, p]``),
        ``softcap`` (scores ``softcap * tanh(s / softcap)``) and ``s_aux`` (learned sink logits per query
        head) keyword arguments are honoured. Returns ``(b, T, hq, d)`` in the query dtype.
        """
        T, tk = query.shape[2], key.shape[2]
        qpos = torch.arange(tk - T, tk, device=query.device)
        kpos = torch.arange(tk, device=query.device)
        allowed = kpos[None, :] <= qpos[:, None]
        if kwargs.get("sliding_window") is not None:
            allowed = allowed & (kpos[None, :] > qpos[:, None] - kwargs["sliding_window"])
        softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
        if attention_mask is not None:
            m = attention_mask[:, :, -T:, :]
            allowed = allowed & (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2)
        q, k, v = query.float(), key.float(), value.float()
        layer = getattr(module, "layer_idx", 0)
        scheme = self.scheme.for_layer(layer) if self.scheme is not None else None
        if _is_fp(scheme):
            out = _explicit_attention(q, k, v, allowed, scaling, softcap, sinks)
        elif (t := self._transform(module, layer, scheme, query, key, value)) is None:
            out = _explicit_attention(q, k, v, allowed, scaling, softcap, sinks)  # the fit period: all exact
        else:
            k_hat, v_hat = roundtrip(scheme, key, value, transform=t)
            # Each key appears twice, quantized and exact; the mask lets every (query, key) pair see
            # exactly one of the two, so one softmax over both is the streaming cache's attention.
            # Queries of the fit period (the first fit_tokens positions) read every key exact.
            exact = ((kpos[None, :] < scheme.sinks) | (qpos[:, None] - kpos[None, :] < scheme.window)
                     | (qpos[:, None] < scheme.fit_tokens))
            mask = torch.cat([allowed & ~exact, allowed & exact], dim=-1)
            out = _explicit_attention(q, torch.cat([k_hat, k], dim=-2), torch.cat([v_hat, v], dim=-2), mask,
                                      scaling, softcap, sinks)
        out = out.transpose(1, 2).contiguous()
        return out.to(query.dtype), None


def _explicit_attention(q, k, v, mask, scale: float, softcap: float | None, sinks: torch.Tensor | None):
    """SDPA, or with soft-capping / learned sink logits the explicit softmax of transformers' eager
    attention (a sink column takes probability and contributes no value)."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.float().reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    return s.softmax(dim=-1)[..., : k.shape[2]] @ v.repeat_interleave(group, 1)


def _layer_rope(config, layer: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RoPE frequencies and key channel order of layer ``layer`` (per layer type where the model
    has them per type; :func:`nqkv_core.cache.rope_layouts`)."""
    from nqkv_core.cache.support import layer_types, rope_layouts

    return rope_layouts(config, head_dim)[layer_types(config)[layer]]


def _registered(name: str | None) -> FakeQuant | None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS.get(name) if isinstance(name, str) else None
    return fn if isinstance(fn, FakeQuant) else None


def attending_fake_quant(model: torch.nn.Module) -> FakeQuant | None:
    """The :class:`FakeQuant` that ``model`` (or a module holding its config) attends through, or None."""
    return _registered(getattr(model.config, "_attn_implementation", None))


def register_attention(name: str = ATTN_NAME) -> str:
    """Register a :class:`FakeQuant` (exact until a scheme is applied) as attention ``name``, unless
    one is registered there already; returns ``name``, for ``model.set_attn_implementation(name)``
    or ``from_pretrained(..., attn_implementation=name)``."""
    if _registered(name) is None:
        FakeQuant().register(name)
    return name


@contextmanager
def fake_quantized(model: torch.nn.Module, scheme: KVScheme | None,
                   attention: Callable | None = None) -> Iterator[FakeQuant]:
    """Run ``model`` with K/V fake-quantized by ``scheme`` (``None`` = exact) inside the block; yields
    the :class:`FakeQuant` it attends through.

    A model that attends through a :class:`FakeQuant` keeps it, with ``scheme`` (and ``attention``:
    :meth:`FakeQuant.applying`) applied for the block. Any other model attends through the one
    :func:`register_attention` provides for the block, and gets its own attention back afterwards.
    """
    fq = attending_fake_quant(model)
    prev = None
    if fq is None:
        prev = model.config._attn_implementation
        model.set_attn_implementation(register_attention())
        fq = attending_fake_quant(model)
    try:
        with fq.applying(scheme, attention):
            yield fq
    finally:
        if prev is not None:
            model.set_attn_implementation(prev)


def fakequant_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The fake-quantized attention (:meth:`FakeQuant.attend`) of the :class:`FakeQuant` that
    ``module``'s model attends through (else the one registered as :data:`ATTN_NAME`); for attention
    functions that wrap it, e.g. :func:`logit_fidelity`'s ``attentions``.

    Raises:
        ValueError: if there is no such :class:`FakeQuant`.
    """
    fq = attending_fake_quant(module) or _registered(ATTN_NAME)
    if fq is None:
        raise ValueError("no fake-quantized attention registered: model.set_attn_implementation(register_attention())")
    return fq.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


@contextmanager
def active_scheme(scheme: KVScheme | None):
    """Deprecated: use :func:`fake_quantized` (``with fake_quantized(model, scheme):``). Applies
    ``scheme`` to the :class:`FakeQuant` registered as :data:`ATTN_NAME` inside the block."""
    warnings.warn("active_scheme(scheme) is deprecated; use fake_quantized(model, scheme)", DeprecationWarning,
                  stacklevel=3)
    with _registered(register_attention()).applying(scheme):
        yield


def new_sequence() -> None:
    """Deprecated: use :meth:`FakeQuant.new_sequence`. Starts a new sequence for the
    :class:`FakeQuant` registered as :data:`ATTN_NAME`."""
    warnings.warn("new_sequence() is deprecated; use FakeQuant.new_sequence()", DeprecationWarning, stacklevel=2)
    _registered(register_attention()).new_sequence()


# -- perplexity ---------------------------------------------------------------------------------


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) and token count of one ``(1, n)`` window, a new sequence for the
    :class:`FakeQuant` the model attends through (if any)."""
    fq = attending_fake_quant(model)
    if fq is not None:
        fq.new_sequence()
    logits = model(ids).logits.float()
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, scheme: KVScheme | None, progress=None) -> float:
    """Perplexity over ``windows`` ``(n, len)`` token ids, each window an independent sequence."""
    nll, count = 0.0, 0
    with fake_quantized(model, scheme):
        for w in windows:
            s, c = window_nll(model, w[None])
            nll, count = nll + s, count + c
            if progress is not None:
                progress.update(1)
    return math.exp(nll / count)


def num_layers(model: torch.nn.Module) -> int:
    """Decoder layers of a transformers causal LM."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def layer_sensitivity(
    model: torch.nn.Module, windows: torch.Tensor, scheme: KVScheme, progress=None,
    on_layer: Callable[[list[float]], object] | None = None,
) -> list[float]:
    """ΔPPL (%) of storing one layer with ``scheme`` and every other layer exactly, for each layer.

    ``scheme`` needs equal K and V widths. Costs ``num_layers + 1`` passes over ``windows``.
    ``on_layer`` is called with the values so far after each layer (e.g. to save them).
    """
    n = num_layers(model)
    fp = perplexity(model, windows, None, progress)
    out = []
    for i in range(n):
        alone = scheme.replace(layer_bits=tuple(scheme.k_bits if j == i else FP_BITS for j in range(n)))
        out.append(100 * (perplexity(model, windows, alone, progress) / fp - 1))
        if on_layer is not None:
            on_layer(out)
    return out


def calibrate_layer_bits(
    model: torch.nn.Module,
    windows: torch.Tensor,
    scheme: KVScheme,
    wide_layers: int = 2,
    wide_bits: int | None = None,
    progress=None,
    on_layer: Callable[[list[float]], object] | None = None,
) -> tuple[KVScheme, list[float]]:
    """``scheme`` with its ``wide_layers`` most sensitive layers stored ``wide_bits`` wide.

    Some layers cost a low-width scheme more perplexity than others; widening them costs
    ``wide_layers / layers`` of a bit per element. How much it gains depends on the scheme (on
    SmolLM2, 16 windows: four widened layers take NQKV-2 from +5.99% to +3.80%, while at 3 bits the
    loss is spread out and two layers gain 0.13 point: docs/quality.md). Sensitivity is each layer's ΔPPL when it alone
    is quantized (:func:`layer_sensitivity`); measure it on text held out from any evaluation
    (:func:`nqkv_core.lab.models.calibration_windows`).

    Args:
        scheme: the base scheme (equal K and V widths); ``wide_bits`` defaults to one bit wider (8
            for a 4-bit scheme).
        wide_layers: how many layers to widen.
        progress, on_layer: as in :func:`layer_sensitivity`.

    Returns:
        ``(scheme with layer_bits, per-layer sensitivity in %)``.
    """
    sens = layer_sensitivity(model, windows, scheme, progress, on_layer)
    return widen_layers(scheme, sens, wide_layers, wide_bits), sens


def widen_layers(scheme: KVScheme, sensitivity: list[float], wide_layers: int, wide_bits: int | None = None) -> KVScheme:
    """``scheme`` with the ``wide_layers`` layers of highest ``sensitivity`` stored ``wide_bits`` wide
    (default one bit wider; 8 for a 4-bit scheme). Named ``"<scheme> L<i>,<j>@<wide_bits>b"``."""
    if wide_bits is None:
        wide_bits = 8 if scheme.k_bits >= 4 else scheme.k_bits + 1
    wide = sorted(sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i])[:wide_layers])
    bits = tuple(wide_bits if i in wide else scheme.k_bits for i in range(len(sensitivity)))
    name = f"{scheme.name} L{','.join(map(str, wide))}@{wide_bits}b"
    return scheme.replace(name=name, layer_bits=bits)


def plot_layer_sensitivity(sensitivity: dict[str, list[float]], png: str | Path) -> Path:
    """Bars of each layer's ΔPPL when it alone is quantized (:func:`layer_sensitivity`), a panel per scheme."""
    from matplotlib.figure import Figure  # drawn by its own Agg canvas: pyplot's backend is left alone

    fig = Figure(figsize=(7, 2.2 * len(sensitivity)))
    axes = fig.subplots(len(sensitivity), 1, squeeze=False)
    for ax, (name, sens) in zip(axes[:, 0], sensitivity.items()):
        ax.bar(range(len(sens)), sens, color="tab:blue")
        ax.set_title(f"{name}: ΔPPL when only this layer is quantized", fontsize=9)
        ax.set_ylabel("ΔPPL %")
        ax.grid(True, axis="y", lw=0.3)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return Path(png)


@torch.no_grad()
def quanto_perplexity(
    model: torch.nn.Module, windows: torch.Tensor, bits: int, chunk: int = 128, residual: int = 128, group: int = 64
) -> float:
    """Perplexity with transformers' ``QuantizedCache(backend="quanto")``, feeding each window in chunks.

    The cache returns un-quantized states for the call that filled it, so one full-window forward
    would measure full precision; feeding ``chunk`` tokens at a time makes later chunks attend to the
    quantized earlier ones. Raises whatever the backend raises if it cannot run.
    """
    from transformers import QuantizedCache

    nll, count = 0.0, 0
    with fake_quantized(model, None):
        for w in windows:
            cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits, axis_key=0, axis_value=0,
                                   q_group_size=group, residual_length=residual)
            logits = []
            for start in range(0, w.numel(), chunk):
                out = model(w[None, start : start + chunk], **cache_arg(cache), use_cache=True)
                cache = returned_cache(out)
                logits.append(out.logits[0].float())
            logits = torch.cat(logits)
            nll += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
            count += w.numel() - 1
    return math.exp(nll / count)


# -- greedy agreement ---------------------------------------------------------------------------


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompts: torch.Tensor | list[torch.Tensor], scheme: KVScheme | None,
                  n_new: int = 32, attention: Callable | None = None) -> torch.Tensor:
    """Greedy continuations ``(n_prompts, n_new)`` of each prompt (a row of ``prompts``, or 1-D
    tensors of any lengths) under ``scheme`` (and ``attention``, as in :func:`fake_quantized`)."""
    outs = []
    with fake_quantized(model, scheme, attention) as fq:
        for p in prompts:
            fq.new_sequence()
            ids = p[None]
            cache = None
            gen = []
            for _ in range(n_new):
                out = model(ids, **cache_arg(cache), use_cache=True)
                cache = returned_cache(out)
                nxt = out.logits[0, -1].argmax()
                gen.append(nxt)
                ids = nxt.view(1, 1)
            outs.append(torch.stack(gen))
    return torch.stack(outs)


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of generated positions equal to the reference continuation."""
    return float((tokens == reference).float().mean())


@torch.no_grad()
def next_token_agreement(model: torch.nn.Module, prompts: torch.Tensor | list[torch.Tensor],
                         reference: torch.Tensor, scheme: KVScheme | None, attention: Callable | None = None) -> float:
    """Teacher-forced agreement: the fraction of positions of ``reference`` (``(n_prompts, n_new)``,
    e.g. the full-precision greedy continuations) whose token is the greedy choice of the model
    under ``scheme`` when it is given the prompt and the reference tokens before that position.

    Unlike :func:`agreement` of free-running continuations, one changed token does not change the
    prefix of every later one, so this counts each step's choice once. ``attention``: as in
    :func:`fake_quantized`."""
    hits = []
    with fake_quantized(model, scheme, attention) as fq:
        for p, ref in zip(prompts, reference):
            fq.new_sequence()
            ids = torch.cat([p, ref[:-1]])[None]
            logits = model(ids, use_cache=False).logits[0, len(p) - 1:]
            hits.append(logits.argmax(-1) == ref)
    return float(torch.stack(hits).float().mean())


@dataclass
class Fidelity:
    """How close a scheme's next-token distributions stay to full precision over every position of
    some windows (:func:`logit_fidelity`): ``agree`` is the fraction of positions whose top-1 token
    is full precision's, ``flips`` their complement as a count out of ``positions``, ``kl`` the mean
    ``KL(p_fp || p_scheme)`` in nats; ``nll`` the scheme's mean next-token NLL over the windows
    (nats; :attr:`ppl` is its perplexity, what :func:`perplexity` measures)."""

    agree: float
    flips: int
    positions: int
    kl: float
    nll: float = float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def logit_fidelity(model: torch.nn.Module, windows: torch.Tensor, schemes: list[KVScheme | None],
                   attentions: list | None = None, progress=None) -> list[Fidelity]:
    """Top-1 agreement and KL divergence from full precision of each scheme, at every position of
    ``windows`` ``(n, len)`` (teacher-forced by the text itself: no position depends on another's
    choice, so each changed choice is counted once).

    ``attentions``: optionally, per scheme, an attention function the model attends through while
    that scheme runs (e.g. one that rounds K/V to bf16 and calls :func:`fakequant_attention`;
    :meth:`FakeQuant.applying`), ``None`` for the fake quantization. Windows are the outer loop, so
    the full-precision logits of one window are all that is held (a window of SmolLM2's 49k-token
    vocabulary is 200 MB in fp32). ``progress`` (e.g. a ``tqdm`` bar) is advanced once per forward
    pass: ``len(windows) * (len(schemes) + 1)``.

    Raises:
        ValueError: if ``attentions`` and ``schemes`` differ in length.
    """
    attentions = attentions or [None] * len(schemes)
    if len(attentions) != len(schemes):
        raise ValueError(f"{len(attentions)} attention functions for {len(schemes)} schemes")
    agree, kl, nll = [0] * len(schemes), [0.0] * len(schemes), [0.0] * len(schemes)
    positions = predicted = 0
    for w in windows:
        with fake_quantized(model, None) as fq:
            fq.new_sequence()
            ref = model(w[None]).logits[0].float().log_softmax(-1)
        if progress is not None:
            progress.update(1)
        top = ref.argmax(-1)
        positions, predicted = positions + len(top), predicted + len(top) - 1
        for i, (scheme, attention) in enumerate(zip(schemes, attentions)):
            if _is_fp(scheme) and attention is None:
                out = ref  # the reference pass, again
            else:
                with fake_quantized(model, scheme, attention) as fq:
                    fq.new_sequence()
                    out = model(w[None]).logits[0].float().log_softmax(-1)
            agree[i] += int((out.argmax(-1) == top).sum())
            kl[i] += float((ref.exp() * (ref - out)).sum(-1).sum())
            nll[i] -= float(out[:-1].gather(-1, w[1:, None]).sum())
            if progress is not None:
                progress.update(1)
    return [Fidelity(a / positions, positions - a, positions, k / positions, n / predicted)
            for a, k, n in zip(agree, kl, nll)]


def free_running_agreement(step_agree: float, n_new: int = 32) -> float:
    """The greedy agreement over ``n_new`` free-running tokens that a per-step agreement gives if
    changes were independent and every token after the first change were lost:
    ``(1 / n) sum_{i=1..n} p^i``. (:func:`agreement` scores continuations this way.)"""
    p = step_agree
    return sum(p**i for i in range(1, n_new + 1)) / n_new


def step_agreement_needed(free_running: float, n_new: int = 32) -> float:
    """The per-step agreement at which :func:`free_running_agreement` reaches ``free_running``
    (bisection; it increases with the per-step agreement)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if free_running_agreement(mid, n_new) < free_running else (lo, mid)
    return hi


# -- tables -------------------------------------------------------------------------------------


@dataclass
class Row:
    """One result: ``bits`` per K/V element includes scales, zero-points and full-precision tokens."""

    method: str
    bits: float
    ppl: float
    dppl_pct: float
    agree: float | None = None
    next_agree: float | None = None  # teacher-forced (next_token_agreement)
    step_agree: float | None = None  # top-1 agreement at every window position (logit_fidelity)
    kl: float | None = None  # mean KL(full precision || scheme) per window position, nats
    seconds: float = 0.0
    note: str = ""
    scheme: dict = field(default_factory=dict)


def markdown_table(rows: list[Row], with_agree: bool = True, with_fidelity: bool | None = None) -> str:
    """The rows as a Markdown table; ``with_fidelity=None`` adds the :func:`logit_fidelity` columns
    when some row has them."""
    if with_fidelity is None:
        with_fidelity = any(r.kl is not None for r in rows)
    head = "| method | bits/elem | PPL | ΔPPL % |" + (" greedy agree | next-token agree |" if with_agree else "")
    head += " top-1 agree per position | KL (nats) |" if with_fidelity else ""
    sep = "|---|---:|---:|---:|" + ("---:|---:|" if with_agree else "") + ("---:|---:|" if with_fidelity else "")
    lines = [head, sep]
    for r in rows:
        ppl = f"{r.ppl:.3f}" if math.isfinite(r.ppl) else "n/a"
        d = f"{r.dppl_pct:+.2f}" if math.isfinite(r.dppl_pct) else "n/a"
        line = f"| {r.method}{' (' + r.note + ')' if r.note else ''} | {r.bits:.3f} | {ppl} | {d} |"
        if with_agree:
            for a in (r.agree, r.next_agree):
                line += f" {a * 100:.1f}% |" if a is not None else " |"
        if with_fidelity:
            line += f" {r.step_agree * 100:.2f}% |" if r.step_agree is not None else " |"
            line += f" {r.kl:.2e} |" if r.kl is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    schemes: list[KVScheme],
    prompts: torch.Tensor | list[torch.Tensor] | None = None,
    n_new: int = 32,
    quanto_bits: tuple[int, ...] = (),
    desc: str = "eval",
    fidelity: bool = False,
    on_row: Callable[[list[Row]], object] | None = None,
) -> list[Row]:
    """Run full precision and every scheme on the same windows; one :class:`Row` each.

    The model attends through a :class:`FakeQuant` (:func:`fake_quantized`). ``prompts`` (``(n, len)``,
    or a list of 1-D token tensors) enables greedy agreement against the full-precision continuation,
    free-running (:func:`agreement`) and teacher-forced (:func:`next_token_agreement`).
    ``quanto_bits`` adds transformers' ``QuantizedCache`` rows (a failure becomes a row with PPL n/a
    and the reason in ``note``). ``fidelity`` adds, for every scheme, the top-1 agreement and KL
    divergence from full precision at every position of the windows (:func:`logit_fidelity`, whose
    passes also give the perplexities: no pass more than without it); the full-precision row gets 1
    and 0. ``on_row`` is called with the rows so far whenever one is added (e.g. to save them, so
    that an interrupted run keeps what it measured).
    """
    on_row = on_row or (lambda rows: None)
    ctx = windows.shape[1]
    total = len(windows) * (1 + len(schemes) + len(quanto_bits) + int(fidelity))  # fidelity: + the reference
    rows: list[Row] = []
    ref_tokens = None
    with tqdm(total=total, desc=desc, unit="win") as bar:
        fids = None
        if fidelity:  # every window's passes, full precision and each scheme, first
            bar.set_postfix_str("perplexity, top-1 agreement and KL")
            fids = logit_fidelity(model, windows, [None, *schemes], progress=bar)
        fp = None
        for i, s in enumerate([None, *schemes]):
            t0 = time.perf_counter()
            bar.set_postfix_str("full precision" if s is None else s.name)
            ppl = fids[i].ppl if fids else perplexity(model, windows, s, bar)
            fp = fp or ppl
            row = Row("full precision", float(FP_BITS), ppl, 0.0) if s is None else \
                Row(s.name, s.bits_per_element(ctx), ppl, 100 * (ppl / fp - 1), scheme=s.to_dict())
            if fids:
                row.step_agree, row.kl = fids[i].agree, fids[i].kl
            if prompts is not None:
                tokens = greedy_tokens(model, prompts, s, n_new)
                ref_tokens = tokens if s is None else ref_tokens
                row.agree = agreement(tokens, ref_tokens)
                row.next_agree = next_token_agreement(model, prompts, ref_tokens, s)
            row.seconds = time.perf_counter() - t0
            rows.append(row)
            on_row(rows)
            bar.write(f"{row.method}: {row.bits:.3f} bits/elem, PPL {row.ppl:.3f} ({row.dppl_pct:+.2f}%)"
                      + (f", agree {100 * row.agree:.1f}% (next token {100 * row.next_agree:.1f}%)"
                         if row.agree is not None else ""))
        for bits in quanto_bits:
            rows.append(_quanto_row(model, windows, bits, fp))
            bar.update(len(windows))
            on_row(rows)
    return rows


def _quanto_row(model, windows: torch.Tensor, bits: int, fp: float) -> Row:
    name = f"HF QuantizedCache quanto int{bits} (g64, residual 128, chunks of 128)"
    t0 = time.perf_counter()
    try:
        ppl = quanto_perplexity(model, windows, bits)
    except Exception as e:  # noqa: BLE001 - the reason goes into the table
        return Row(name, float("nan"), float("nan"), float("nan"), note=f"did not run: {type(e).__name__}: {e}"[:200])
    # int scale + zero-point per group of 64 in fp16 (quanto keeps them in the model dtype),
    # residual of up to 128 tokens in full precision (charged at its mean, 64).
    ctx = windows.shape[1]
    eff = ((ctx - 64) * (bits + 32 / 64) + 64 * FP_BITS) / ctx
    return Row(name, eff, ppl, 100 * (ppl / fp - 1), seconds=time.perf_counter() - t0)


def save_rows(rows: list[Row], out_dir: str | Path, stem: str, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (rows and ``meta``) and ``<stem>.md`` (the table) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    js.write_text(json.dumps({"meta": meta or {}, "rows": [asdict(r) for r in rows]}, indent=1, default=str))
    md.write_text(markdown_table(rows, with_agree=any(r.agree is not None for r in rows)) + "\n")
    return js, md
