"""The main job: quality, memory and decode speed of full precision, NQKV and peers, in one run.

``nqkv report`` (``make report``) evaluates, on one model and corpus (SmolLM2-135M-Instruct and
WikiText-2 by default):

* perplexity, the mean KL divergence of next-token distributions from full precision at every
  window position, and greedy agreement of full precision, NQKV at 4/3/2 bits, the KIVI-style and
  uniform int baselines and transformers' ``QuantizedCache`` (quanto, perplexity only) --
  :mod:`nqkv_core.lab.evaluate`;
* bits per element (codes, scales and full-precision tokens), cache bytes at a context and the
  largest context that fits a memory budget;
* decode tokens/s of ``NQKVCache`` vs ``DynamicCache`` vs ``QuantizedCache`` at several contexts,
  caches pre-filled with random post-RoPE K/V (speed does not depend on the values).

It prints one table, writes ``report.json`` / ``report.md`` and two plots (memory vs context,
tokens/s vs context) under ``--out``. ``--quick`` shortens everything to a few minutes.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nqkv_core.scheme import FP_BITS, KVScheme, kivi, nqkv_preset, uniform

GIB = 1 << 30


def parse_bytes(text: str) -> int:
    """``"1GiB"``, ``"512MiB"``, ``"2GB"`` or a plain number of bytes.

    Raises:
        ValueError: if ``text`` is not such a size, or not positive.
    """
    units = {"gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
    number, factor = text.strip(), 1
    for unit, f in units.items():
        if number.lower().endswith(unit):
            number, factor = number[: -len(unit)], f
            break
    try:
        size = int(float(number) * factor)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"budget {text!r} is not a positive size: use e.g. 1GiB, 512MiB, 2GB or a number of bytes")
    return size


def model_dims(model) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers decoder."""
    from nqkv_core import _hf

    return _hf.num_layers(model.config), _hf.kv_heads(model.config), _hf.head_dim(model.config)


def cache_bytes(bits_per_element: float, context: int, dims: tuple[int, int, int]) -> float:
    """Bytes of K and V for ``context`` tokens at ``bits_per_element`` (batch 1)."""
    layers, heads, head_dim = dims
    return bits_per_element * context * 2 * layers * heads * head_dim / 8


def max_context(scheme: KVScheme | None, budget: int, dims: tuple[int, int, int]) -> int:
    """Largest context whose cache fits ``budget`` bytes (``None`` = fp16 ``DynamicCache``)."""
    bits = (lambda n: float(FP_BITS)) if scheme is None else scheme.bits_per_element
    lo, hi = 0, 1 << 26
    while lo < hi:  # bits_per_element(n) * n grows with n: bisect
        mid = (lo + hi + 1) // 2
        if cache_bytes(bits(mid), mid, dims) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- decode speed -------------------------------------------------------------------------------


def filled_cache(kind: str, model, batch: int, context: int, scheme: KVScheme | None = None,
                 dtype: torch.dtype = torch.float32):
    """A cache of ``kind`` (``"nqkv"``, ``"dynamic"``, ``"quanto"``) holding ``context`` random tokens
    of ``dtype`` (a 16-bit model's tokens: the NQKV cache keeps its exact ones in 16 bits)."""
    layers, heads, head_dim = model_dims(model)
    if kind == "nqkv":
        from nqkv_core.cache import NQKVCache

        cache = NQKVCache(scheme, config=model.config)
    elif kind == "dynamic":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    elif kind == "quanto":
        cache = quanto_cache(model)
    else:
        raise ValueError(f"unknown cache kind {kind!r}")
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        k = torch.randn(batch, heads, context, head_dim, generator=g).to(dtype)
        v = torch.randn(batch, heads, context, head_dim, generator=g).to(dtype)
        cache.append(k, v, i) if kind == "nqkv" else cache.update(k, v, i)
    return cache


def quanto_cache(model, bits: int = 4):
    """transformers' ``QuantizedCache`` with the quanto backend (group 64, residual 128)."""
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=model.config, nbits=bits, axis_key=0, axis_value=0,
                          q_group_size=64, residual_length=128)


@torch.no_grad()
def decode_tokens_per_s(model, kind: str, batch: int, context: int, steps: int,
                        scheme: KVScheme | None = None) -> float:
    """Median tokens/s of single-token decode steps over a cache pre-filled with ``context`` tokens.

    ``kind="none"`` is decoding without a cache: the whole sequence is recomputed for each token.
    """
    from nqkv_core.cache import ATTN_NAME
    from nqkv_core.lab.models import cache_arg

    model.set_attn_implementation(ATTN_NAME if kind == "nqkv" else "sdpa")
    tok = torch.full((batch, 1), 42, dtype=torch.long)
    if kind == "none":
        ids = torch.full((batch, context + 1), 42, dtype=torch.long)
        step = lambda: model(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    else:
        cache = filled_cache(kind, model, batch, context, scheme)
        step = lambda: model(tok, **cache_arg(cache), use_cache=True)  # noqa: E731
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    gc.collect()
    return batch / statistics.median(times[1:])


# -- the report ---------------------------------------------------------------------------------


@dataclass
class ReportRow:
    method: str
    bits: float
    ppl: float
    dppl_pct: float
    agree: float | None
    kl: float | None  # mean KL(full precision || method) per window position (logit_fidelity)
    context_at_budget: int | None
    context_x_fp16: float | None


def report_schemes(bits: tuple[int, ...], sinks: int, window: int) -> list[KVScheme]:
    """NQKV presets and the KIVI-style / uniform baselines with the same full-precision tokens."""
    schemes: list[KVScheme] = []
    for b in bits:
        schemes.append(nqkv_preset(b, sinks=sinks, window=window))
        schemes.append(kivi(b, sinks=sinks, window=window))
        if b - 1 in bits:  # keys one bit wider than values: the step between two widths
            schemes.append(nqkv_preset(b, v_bits=b - 1, sinks=sinks, window=window))
    schemes.append(uniform(4, sinks=sinks, window=window))
    return schemes


def _plot(out: Path, dims, schemes: list[KVScheme], speed: dict[str, dict[int, float]], budget: int) -> list[Path]:
    # Figure objects drawn by their own Agg canvas: the process's pyplot backend is left alone.
    from matplotlib.figure import Figure

    paths = []
    ctx = [2**i for i in range(9, 18)]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(ctx, [cache_bytes(FP_BITS, n, dims) / GIB for n in ctx], "k-o", ms=3, label="fp16 (DynamicCache)")
    for s in schemes:
        if s.name.startswith("NQKV") or s.name.startswith("kivi"):
            style = "-o" if s.name.startswith("NQKV") else "--"
            ax.plot(ctx, [cache_bytes(s.bits_per_element(n), n, dims) / GIB for n in ctx], style, ms=3, label=s.name)
    ax.axhline(budget / GIB, color="grey", lw=0.8, ls=":", label=f"budget {budget / GIB:g} GiB")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens, batch 1)", ylabel="KV cache (GiB)",
           title="KV cache memory vs context")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "memory_vs_context.png")
    fig.savefig(paths[-1], dpi=120)
    if speed:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, by_ctx in speed.items():
            xs = sorted(by_ctx)
            ax.plot(xs, [by_ctx[x] for x in xs], "-o", ms=3, label=name)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (batch 1)",
               title="Decode speed vs context")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "tokens_per_s_vs_context.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


# How far two interleaved rounds of one decode figure may differ (relative to their median) before
# the figure is re-measured and, if they still differ, flagged as noisy.
SPREAD_LIMIT = 0.10


@dataclass
class SpeedFigure:
    """One decode figure: the median tokens/s over interleaved rounds and how far the rounds spread."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def spread(self) -> float:
        """``(high - low) / median``: 0 when every round measured the same."""
        return (self.high - self.low) / self.median

    @property
    def noisy(self) -> bool:
        return self.spread > SPREAD_LIMIT

    def cell(self, base: "SpeedFigure | None" = None) -> str:
        """``median (ratio to base) ±half-range%``, with ``†`` when :attr:`noisy`."""
        ratio = f" ({self.median / base.median:.2f}x)" if base is not None else ""
        return f"{self.median:.2f}{ratio} ±{50 * self.spread:.0f}%" + (" †" if self.noisy else "")


def speed_figure(samples: list[float]) -> SpeedFigure:
    """Summarise one figure's per-round tokens/s.

    Raises:
        ValueError: if ``samples`` is empty or holds a non-positive rate.
    """
    if not samples or min(samples) <= 0:
        raise ValueError(f"need positive tokens/s samples, got {samples}")
    return SpeedFigure(statistics.median(samples), min(samples), max(samples), len(samples))


def measure_speeds(measure: Callable[[str], float], names: list[str], rounds: int, max_rounds: int,
                   progress=None) -> dict[str, SpeedFigure]:
    """Decode figures of every name at one context, in interleaved rounds (each name once per round,
    so slow drifts of a shared machine hit all alike).

    After ``rounds`` rounds, while some figure's rounds spread by more than :data:`SPREAD_LIMIT`,
    another round of every name runs, up to ``max_rounds`` in all.

    Args:
        measure: tokens/s of one measurement of a name.
        progress: advanced once per measurement (e.g. a ``tqdm`` bar); its total grows by a round of
            ``len(names)`` for each extra round.
    """
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max_rounds):
        if r >= rounds:
            if not any(speed_figure(v).noisy for v in samples.values()):
                break
            if progress is not None:
                progress.total += len(names)
        for name in names:
            samples[name].append(measure(name))
            if progress is not None:
                progress.update(1)
    return {name: speed_figure(v) for name, v in samples.items()}


def speed_markdown(speed: dict[str, dict[int, SpeedFigure]], base: str) -> list[str]:
    """The decode table: a row per context, a column per cache, the ratio to ``base`` in brackets."""
    names = list(speed)
    contexts = sorted({c for by_ctx in speed.values() for c in by_ctx})
    lines = ["| context | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for ctx in contexts:
        ref = speed[base].get(ctx)
        lines.append(f"| {ctx} | " + " | ".join(speed[n][ctx].cell(ref) if ctx in speed[n] else "-" for n in names)
                     + " |")
    return lines


def _quality_rows(quality, schemes: list[KVScheme], budget: int, dims) -> list[ReportRow]:
    fp16_ctx = max_context(None, budget, dims)
    by_name = {s.name: s for s in schemes}
    rows = []
    for r in quality:
        s = by_name.get(r.method)
        ctx = fp16_ctx if r.method == "full precision" else (max_context(s, budget, dims) if s else None)
        rows.append(ReportRow(r.method + (f" ({r.note})" if r.note else ""), r.bits, r.ppl, r.dppl_pct,
                              r.agree, r.kl, ctx, ctx / fp16_ctx if ctx else None))
    return rows


def _quality_markdown(rows: list[ReportRow]) -> list[str]:
    lines = ["| method | bits/elem | PPL | ΔPPL % | KL vs full precision | greedy agree | max context at budget | x fp16 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        agree = f"{100 * r.agree:.1f}%" if r.agree is not None else "-"
        ctx = f"{r.context_at_budget:,}" if r.context_at_budget else "-"
        x = f"{r.context_x_fp16:.2f}x" if r.context_x_fp16 else "-"
        kl = f"{r.kl:.2e}" if r.kl is not None else "-"
        lines.append(f"| {r.method} | {r.bits:.3f} | {r.ppl:.3f} | {r.dppl_pct:+.2f} | {kl} | {agree} | {ctx} | {x} |")
    return lines


def _write(out: Path, header: str, rows: list[ReportRow], speed: dict[str, dict[int, SpeedFigure]], base: str,
           steps: int, meta: dict, plots: list[Path] = ()) -> str:
    """Write report.md and report.json with what has been measured so far; returns the Markdown."""
    lines = [header, "", *_quality_markdown(rows)]
    if any(speed.values()):
        noisy = any(f.noisy for by_ctx in speed.values() for f in by_ctx.values())
        lines += ["", f"Decode tokens/s, batch 1, eager: median of interleaved rounds of {steps} steps (ratio to"
                  f" {base} in brackets; ± half the range of the rounds, relative to the median)."
                  + (f" † marks figures whose rounds still spanned more than {SPREAD_LIMIT:.0%} of the median"
                     f" (± above {SPREAD_LIMIT / 2:.0%}) after extra rounds: the machine was busy; trust them less."
                     if noisy else ""), ""]
        lines += speed_markdown(speed, base)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    md = "\n".join(lines) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(
        {**meta, "rows": [asdict(r) for r in rows],
         "decode_tokens_per_s": {n: {c: f.median for c, f in by.items()} for n, by in speed.items()},
         "decode_rounds": {n: {c: {**asdict(f), "spread": f.spread, "noisy": f.noisy} for c, f in by.items()}
                           for n, by in speed.items()}}, indent=1))
    return md


def run_report(
    model_name: str,
    text_file: str | None,
    out: str | Path,
    quick: bool = False,
    budget: int = GIB,
    bits: tuple[int, ...] = (4, 3, 2),
    sinks: int = 4,
    window: int = 32,
    contexts: tuple[int, ...] | None = None,
    speed_bits: int = 4,
    command: str | None = None,
) -> str:
    """Run the whole report; returns the Markdown it wrote to ``out/report.md``.

    ``report.md`` and ``report.json`` are rewritten after the quality table and after each decode
    context, so an interrupted run keeps what it measured. ``command`` (the command line that asked
    for the report) is recorded in both.

    Raises:
        FileNotFoundError: if the model or the corpus cannot be found.
        ValueError: if the corpus is too short for the windows and prompts.
    """
    from nqkv_core.cache import enable
    from nqkv_core.lab.evaluate import evaluate, register_attention
    from nqkv_core.lab.models import load_model, load_text, prompts_after, token_windows

    out = Path(out)
    n_windows, window_len = (2, 512) if quick else (8, 1024)
    contexts = contexts or ((512, 2048) if quick else (1024, 4096, 16384))
    steps = 3 if quick else 8
    text = load_text(text_file)  # before the model: a bad corpus fails at once
    lm = load_model(model_name, attn_implementation=register_attention())
    model, dims = lm.model, model_dims(lm.model)
    windows = token_windows(lm.tokenizer, text, window_len, n_windows)
    # free-running greedy agreement costs a fake-quantized decode loop per scheme and means little
    # over the few prompts a quick run could afford: --quick leaves it out
    prompts = None if quick else prompts_after(lm.tokenizer, text, n_windows, window_len, 256, 16)
    out.mkdir(parents=True, exist_ok=True)

    header = (f"Model `{lm.name}`; corpus {text_file or 'WikiText-2 raw test'}; {n_windows} windows of {window_len}"
              f" tokens; {sinks} sink tokens and a {window}-token recent window in full precision for every"
              f" quantized scheme; budget {budget / GIB:g} GiB"
              + ("; no greedy agreement with --quick" if quick else "")
              + (f"; command `{command}`." if command else "."))
    meta = {"command": command, "quick": quick, "model": lm.name, "budget_bytes": budget}
    base = "DynamicCache (fp32)"
    kinds = {base: "dynamic", f"NQKV-{speed_bits}": "nqkv", "QuantizedCache quanto int4": "quanto"}
    speed: dict[str, dict[int, SpeedFigure]] = {name: {} for name in kinds}

    schemes = report_schemes(bits, sinks, window)
    quality = evaluate(model, windows, schemes, prompts=prompts, quanto_bits=(4,), desc="perplexity", fidelity=True,
                       on_row=lambda q: _write(out, header, _quality_rows(q, schemes, budget, dims), speed, base,
                                               steps, meta))
    rows = _quality_rows(quality, schemes, budget, dims)

    speed_scheme = nqkv_preset(speed_bits, sinks=sinks, window=window)
    enable(model, scheme=speed_scheme)
    rounds = 2 if quick else 3
    with tqdm(total=len(kinds) * len(contexts) * rounds, desc="decode speed", unit="run") as bar:
        for ctx in contexts:
            def measure(name: str) -> float:
                bar.set_postfix_str(f"{name} @ {ctx}")
                return decode_tokens_per_s(model, kinds[name], 1, ctx, steps, speed_scheme)

            for name, fig in measure_speeds(measure, list(kinds), rounds, rounds + 2, bar).items():
                speed[name][ctx] = fig
            _write(out, header, rows, speed, base, steps, meta)
    plots = _plot(out, dims, schemes, {n: {c: f.median for c, f in by.items()} for n, by in speed.items()}, budget)
    return _write(out, header, rows, speed, base, steps, meta, plots)
