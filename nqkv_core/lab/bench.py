"""KV cache memory and decode speed on SmolLM2-135M: NQKVCache vs DynamicCache vs QuantizedCache(quanto).

All caches are measured in one process on the same model:

* bytes per token, exact, from the tensors each cache holds (quanto's packed tensors are flattened
  to their inner data, scales and shifts);
* the largest context (batch 1) and the largest batch (at --batch-context) that fit --budget,
  found from the per-token bytes and then checked by actually allocating that cache (peak RSS kept);
* decode tokens/s at each context for batch 1 and 8; the caches are filled with random post-RoPE
  K/V (speed does not depend on the values) and then decode real model steps (median of --steps);
  each figure is the median of --rounds rounds that measure every cache in turn; "no cache"
  recomputes the whole sequence for each token (one round);
* greedy agreement of the first 32 new tokens with full precision, on WikiText-2 prompts;
* memory growth of a growing NQKV cache up to --growth tokens.

``--headline`` measures only the NQKV paper's three figures on the model, side by side
(:func:`headline`): max batch and max context at the budget against an fp16 DynamicCache, and decode
tokens/s against decoding without a KV cache. ``--model random:opt`` is OPT-125m's shape with random
weights (no corpus needed; greedy agreement is left out for random weights).

Usage (``benchmarks/bench_cache.py`` takes the same arguments; ``nqkv bench --help`` lists them):

    nqkv bench [--quick] [--headline] [--budget 1GiB] [--threads 1] [--markdown out.md] [--model ID] [--text-file F]
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics

import torch

from nqkv_core import native
from nqkv_core.cache import NQKVCache, enable
from nqkv_core.lab.models import cache_arg, is_random, load_model, load_text, token_windows
from nqkv_core.lab.report import decode_tokens_per_s, filled_cache, measure_speeds, parse_bytes, quanto_cache
from nqkv_core.scheme import nqkv_preset
from nqkv_core.lab.report import model_dims as dims

GIB = 1 << 30
BATCH_CONTEXT = 4096  # tokens per sequence of the largest-batch check
HEADLINE_CONTEXT = 1024  # context of --headline's figures: within OPT's 2048 positions


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(obj) -> int:
    """Bytes of the plain tensors inside ``obj`` (through tensor subclasses' ``__tensor_flatten__``)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.nbytes
    return 0


def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensor storages reachable from ``obj`` through containers, dataclasses and
    ``nqkv_core`` objects, each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(held_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(x, seen) for x in obj.values())
    if type(obj).__module__.startswith("nqkv_core") and hasattr(obj, "__dict__"):
        return sum(held_bytes(v, seen) for k, v in vars(obj).items() if k != "handle")
    return 0


@torch.no_grad()
def decode_state_bytes(model, scheme, batch: int, ctx: int, steps: int = 2) -> tuple[int, int]:
    """``(storage bytes, bytes the decode steps added)`` of a preallocated NQKV cache holding ``ctx``
    random tokens, after ``steps`` real model decode steps: what decoding holds beyond the storage
    (the prepared per-layer step state) for ``batch`` sequences."""
    n_layers, h, d = dims(model)
    cache = NQKVCache(scheme, config=model.config, max_cache_len=ctx + steps)
    g = torch.Generator().manual_seed(0)
    for i in range(n_layers):
        cache.append(torch.randn(batch, h, ctx, d, generator=g), torch.randn(batch, h, ctx, d, generator=g), i)
    before = held_bytes(cache.layers)
    attend_kind(model, "nqkv")
    tok = torch.full((batch, 1), 42, dtype=torch.long)
    for _ in range(steps):
        model(tok, **cache_arg(cache), use_cache=True)
    return cache.nbytes, held_bytes(cache.layers) - before


def fill(kind: str, model, scheme, batch: int, ctx: int):
    return filled_cache(kind, model, batch, ctx, scheme)


def layer_bytes(kind: str, cache) -> int:
    if kind == "nqkv":
        return cache.nbytes
    total = 0
    for layer in cache.layers:
        for name, x in vars(layer).items():
            total += tensor_bytes(x)
    return total


def bytes_per_token(model, scheme) -> dict[str, float]:
    """Marginal storage bytes per token (batch 1), from two fills that differ by 1024 tokens."""
    n_layers, h, d = dims(model)
    out = {"DynamicCache fp32": 2 * n_layers * h * d * 4, "DynamicCache fp16": 2 * n_layers * h * d * 2}
    nq_a, nq_b = (fill("nqkv", model, scheme, 1, n) for n in (1024, 2048))
    out["NQKV exact (body)"] = nq_a.bytes_per_token()
    qa, qb = (fill("quanto", model, scheme, 1, n) for n in (1024, 2048))
    out["QuantizedCache quanto int4"] = (layer_bytes("quanto", qb) - layer_bytes("quanto", qa)) / 1024
    return out


def attend_kind(model, kind: str) -> None:
    model.set_attn_implementation("nqkv" if kind == "nqkv" else "sdpa")


def decode_tps(model, kind: str, scheme, batch: int, ctx: int, steps: int) -> float:
    return decode_tokens_per_s(model, kind, batch, ctx, steps, scheme)


def fits_budget(model, scheme, budget: int, batch_context: int) -> list[dict]:
    """Largest context (batch 1) and batch (at batch_context) per cache, checked by allocating."""
    n_layers, h, d = dims(model)
    rows = []
    per_tok = {"DynamicCache fp16": 2 * n_layers * h * d * 2}
    probe = NQKVCache(scheme, config=model.config, max_cache_len=4096)
    probe.early_initialization(1, h, d, torch.float16, "cpu")
    fixed = probe.nbytes - probe.bytes_per_token() * probe.layers[0].capacity
    per_tok["NQKV"] = probe.bytes_per_token()
    for name, ptb in per_tok.items():
        ctx = int((budget - (fixed if name == "NQKV" else 0)) // ptb)
        seq_bytes = batch_context * ptb + (fixed if name == "NQKV" else 0)
        batch = int(budget // seq_bytes)
        gc.collect()
        before = rss()
        if name == "NQKV":
            cache = NQKVCache(scheme, config=model.config, max_cache_len=ctx)
            cache.early_initialization(1, h, d, torch.float16, "cpu")
            allocated = cache.nbytes
            for layer in cache.layers:  # touch every page, as filling the cache would
                for x in (*layer.k_body, *layer.v_body, layer.k_sink, layer.v_sink, layer.k_ring, layer.v_ring):
                    x.fill_(1)
        else:
            cache = torch.ones(2 * n_layers, 1, h, ctx, d, dtype=torch.float16)
            allocated = cache.nbytes
        grown = rss() - before
        rows.append(dict(cache=name, bytes_per_token=ptb, max_context=ctx, allocated=allocated,
                         rss_delta=grown, max_batch_at=batch))
        del cache
        gc.collect()
    return rows


# The NQKV paper's figures for OPT: with the KV cache at 4 bits, a larger batch and a longer
# context in the same memory, and decode throughput against generating without a KV cache.
PAPER = {"batch": 2.0, "context": 4.0, "no_cache": 9.3}


def headline(model, scheme, budget: int, context: int, steps: int, rounds: int, progress=None) -> dict:
    """The paper's three figures, NQKV against its baselines on one model.

    * max batch of ``context``-token sequences whose caches fit ``budget`` bytes, and max context at
      batch 1, NQKV against an fp16 ``DynamicCache`` (:func:`fits_budget`, checked by allocating);
    * decode tokens/s at batch 1 over ``context`` tokens, NQKV against decoding without a KV cache
      (the whole sequence recomputed for each token) and against a ``DynamicCache`` holding fp32
      (as :func:`~nqkv_core.lab.report.filled_cache` fills it);
    * decode tokens/s of NQKV at its max batch against ``DynamicCache`` at the fp16 max batch;

    every decode figure in interleaved rounds (:func:`~nqkv_core.lab.report.measure_speeds`).

    Returns:
        ``{"fits": {cache: fits_budget row}, "speed": {kind: SpeedFigure}, "ratios": {"batch",
        "context", "no_cache", "dynamic", "max_batch": NQKV / baseline}}``.

    Raises:
        ValueError: if ``context`` plus the decode steps pass the model's ``max_position_embeddings``
            (a model with learned positions cannot run them), or ``budget`` holds no fp16 cache of
            ``context`` tokens.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context + steps + 1 > limit:
        raise ValueError(f"decode context {context} plus {steps + 1} steps passes the model's {limit} positions;"
                         f" pass a context (--batch-context) of at most {limit - steps - 1}")
    n_layers, h, d = dims(model)
    if budget < context * 2 * n_layers * h * d * 2:
        raise ValueError(f"the budget holds no fp16 cache of {context} tokens: raise --budget or lower --batch-context")
    fits = {r["cache"]: r for r in fits_budget(model, scheme, budget, context)}
    fp16, nq = fits["DynamicCache fp16"], fits["NQKV"]
    runs = {"nqkv": ("nqkv", 1), "none": ("none", 1), "dynamic": ("dynamic", 1),
            "nqkv max batch": ("nqkv", nq["max_batch_at"]), "dynamic max batch": ("dynamic", fp16["max_batch_at"])}
    speed = measure_speeds(lambda name: decode_tps(model, runs[name][0], scheme, runs[name][1], context, steps),
                           list(runs), rounds, rounds, progress)
    return {"fits": fits, "speed": speed,
            "ratios": {"batch": nq["max_batch_at"] / fp16["max_batch_at"],
                       "context": nq["max_context"] / fp16["max_context"],
                       "no_cache": speed["nqkv"].median / speed["none"].median,
                       "dynamic": speed["nqkv"].median / speed["dynamic"].median,
                       "max_batch": speed["nqkv max batch"].median / speed["dynamic max batch"].median}}


def headline_markdown(h: dict, budget: str, context: int, scheme_name: str, limit: int | None) -> list[str]:
    """:func:`headline`'s figures as one table, NQKV beside each baseline and the paper's ratio."""
    fp16, nq = h["fits"]["DynamicCache fp16"], h["fits"]["NQKV"]
    speed, ratio = h["speed"], h["ratios"]
    lines = [f"| figure | baseline | baseline | {scheme_name} | {scheme_name} / baseline | paper |",
             "|---|---|---:|---:|---:|---:|",
             f"| max batch at {budget}, {context} tokens each | DynamicCache fp16 | {fp16['max_batch_at']:,} |"
             f" {nq['max_batch_at']:,} | {ratio['batch']:.2f}x | {PAPER['batch']:g}x |",
             f"| max context at {budget}, batch 1 | DynamicCache fp16 | {fp16['max_context']:,} |"
             f" {nq['max_context']:,} | {ratio['context']:.2f}x | {PAPER['context']:g}x |",
             f"| decode tokens/s, batch 1, {context} tokens | no KV cache (recompute) | {speed['none'].cell()} |"
             f" {speed['nqkv'].cell()} | {ratio['no_cache']:.2f}x | {PAPER['no_cache']:g}x |",
             f"| decode tokens/s, batch 1, {context} tokens | DynamicCache fp32 | {speed['dynamic'].cell()} |"
             f" {speed['nqkv'].cell()} | {ratio['dynamic']:.2f}x | - |",
             f"| decode tokens/s at each cache's max batch ({fp16['max_batch_at']} / {nq['max_batch_at']}),"
             f" {context} tokens | DynamicCache fp32 | {speed['dynamic max batch'].cell()} |"
             f" {speed['nqkv max batch'].cell()} | {ratio['max_batch']:.2f}x | - |"]
    if limit is not None and max(fp16["max_context"], nq["max_context"]) > limit:
        lines.append(f"\nMax context counts cache bytes only: the model has {limit} positions"
                     f" (max_position_embeddings), so contexts beyond {limit} cannot run on it.")
    return lines


@torch.no_grad()
def agreement(model, tok, scheme, n_prompts: int, prompt_len: int, n_new: int = 32,
              text_file: str | None = None) -> dict[str, float]:
    ids = token_windows(tok, load_text(text_file), prompt_len, n_prompts)
    # every continuation n_new tokens long: an end-of-text token does not end one early
    greedy = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    out = {}
    attend_kind(model, "dynamic")
    refs = [model.generate(p[None], **greedy)[0, prompt_len:] for p in ids]
    nq = enable(model, scheme=scheme)
    got = [nq.generate(p[None], **greedy)[0, prompt_len:] for p in ids]
    out["NQKV"] = float(torch.stack([(a == b).float().mean() for a, b in zip(got, refs)]).mean())
    attend_kind(model, "quanto")
    got = [model.generate(p[None], **greedy, **cache_arg(quanto_cache(model)))[0, prompt_len:] for p in ids]
    out["QuantizedCache quanto int4"] = float(torch.stack([(a == b).float().mean() for a, b in zip(got, refs)]).mean())
    return out


def growth(model, scheme, total: int, chunk: int = 512) -> list[tuple[int, int, int]]:
    """(tokens, allocated cache bytes, RSS) while a dynamic NQKV cache grows by ``chunk`` tokens."""
    n_layers, h, d = dims(model)
    cache = NQKVCache(scheme, config=model.config)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in range(chunk, total + 1, chunk):
        for i in range(n_layers):
            cache.append(torch.randn(1, h, chunk, d, generator=g), torch.randn(1, h, chunk, d, generator=g), i)
        rows.append((n, cache.nbytes, rss()))
    return rows


class _Lines:
    """The output so far: each :meth:`add` prints its lines and rewrites the Markdown file (if any),
    so an interrupted run keeps what it measured."""

    def __init__(self, path: str | None, bar=None):
        self.lines: list[str] = []
        self.path, self.bar = path, bar

    def add(self, *lines: str) -> None:
        self.lines += lines
        text = "\n".join(lines)
        self.bar.write(text) if self.bar is not None else print(text, flush=True)
        if self.path:
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")


def _decode_table(model, scheme, args, contexts: list[int], steps: int, out: _Lines, bar) -> None:
    # the same preset with a plain post-RoPE key mean: no per-position score offset to compute
    plain = nqkv_preset(4, rope_centre=False).replace(
        k_block=scheme.k_block, v_block=scheme.v_block, k_rotate=scheme.k_rotate, v_rotate=scheme.v_rotate)
    out.add("", "| context | batch | NQKV tok/s | NQKV plain-centre tok/s | DynamicCache tok/s | quanto tok/s |"
            " no cache tok/s | NQKV/Dynamic | NQKV/quanto | NQKV/plain-centre |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ctx in contexts:
        for b in args.batches:
            runs = {"nqkv": ("nqkv", scheme), "plain": ("nqkv", plain), "dynamic": ("dynamic", scheme),
                    "quanto": ("quanto", scheme)}
            if ctx * b <= args.no_recompute_above * 2:
                runs["none"] = ("none", scheme)
            # every cache once per round, rounds interleaved: slow drifts of a shared machine hit all alike
            samples = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, (kind, s) in runs.items():
                    if kind != "none" or not samples[name]:  # recomputing is slow and far behind anyway
                        bar.set_postfix_str(f"{name} @ {ctx} x{b}")
                        samples[name].append(decode_tps(model, kind, s, b, ctx, steps))
                    bar.update()
            tps = {name: statistics.median(v) for name, v in samples.items()}
            none = f"{tps['none']:.2f}" if "none" in tps else "skipped"
            out.add(f"| {ctx} | {b} | {tps['nqkv']:.1f} | {tps['plain']:.1f} | {tps['dynamic']:.1f} |"
                    f" {tps['quanto']:.1f} | {none} | {tps['nqkv'] / tps['dynamic']:.2f} |"
                    f" {tps['nqkv'] / tps['quanto']:.2f} | {tps['nqkv'] / tps['plain']:.2f} |")


# The full-precision window of the memory-first configuration, ``window=16``: 3.7x fewer bytes than
# fp16 at 2,048 tokens where the presets' 32 give 3.64x, for about a fifth more KL divergence from
# full precision (docs/benchmarks.md, "KV cache").
COMPACT_WINDOW = 16


def _memory_tables(model, scheme, args, budget: int, out: _Lines) -> dict[str, float]:
    bpt = bytes_per_token(model, scheme)
    out.add("| cache | bytes/token | vs fp16 |", "|---|---:|---:|",
            *(f"| {k} | {v:,.0f} | {bpt['DynamicCache fp16'] / v:.2f}x |" for k, v in bpt.items()))
    rows = fits_budget(model, scheme, budget, args.batch_context)
    out.add("", f"Budget {args.budget}: largest context (batch 1) and batch (at {args.batch_context} tokens)", "",
            "| cache | max context | allocated | RSS growth | max batch |", "|---|---:|---:|---:|---:|",
            *(f"| {r['cache']} | {r['max_context']:,} | {r['allocated'] / GIB:.3f} GiB |"
              f" {r['rss_delta'] / GIB:.3f} GiB | {r['max_batch_at']} |" for r in rows),
            f"\nContext ratio NQKV / fp16: {rows[1]['max_context'] / rows[0]['max_context']:.2f}x;"
            f" peak RSS of the process {peak_rss() / GIB:.2f} GiB.")
    stored, added = decode_state_bytes(model, scheme, 8, 1024)
    out.add(f"Decode state: after two decode steps at batch 8 over 1024 tokens the cache holds"
            f" {added / 2**10:,.1f} KiB beyond its {stored / 2**20:,.1f} MiB of storage"
            f" ({added / 8 / 2**10:,.1f} KiB per sequence).")
    # every tensor a short and a long cache holds, against fp16; the memory-first window too
    # (docs/benchmarks.md, "KV cache": a 16-token window for 3.7x at 2,048 tokens)
    compact = scheme.replace(window=COMPACT_WINDOW) if scheme.window > COMPACT_WINDOW else scheme
    for n in (2048, 16384):
        fp16 = bpt["DynamicCache fp16"] * n
        held = {dt: filled_cache("nqkv", model, 1, n, scheme, dt).nbytes for dt in (torch.bfloat16, torch.float32)}
        small = filled_cache("nqkv", model, 1, n, compact, torch.bfloat16).nbytes
        out.add(f"Every tensor held at {n:,} tokens (codes, scales, exact tokens, transforms, RoPE table):"
                f" {held[torch.bfloat16] / 2**20:,.2f} MiB for a bf16 model against {fp16 / 2**20:,.2f} MiB"
                f" for fp16 (fp16 / NQKV {fp16 / held[torch.bfloat16]:.2f}x; an fp32 model, exact tokens in fp32:"
                f" {fp16 / held[torch.float32]:.2f}x; a {compact.window}-token window, bf16:"
                f" {fp16 / small:.2f}x).")
    return bpt


def run(args: argparse.Namespace) -> None:
    """Measure and print the tables (rewriting ``args.markdown`` after each).

    Raises:
        ValueError: for a budget that is not a size or a corpus that is not text.
        FileNotFoundError: if the model or the corpus cannot be found.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(max(args.threads, 1))
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    steps = args.steps or (3 if args.quick else 8)
    budget = parse_bytes(args.budget)
    random_weights = is_random(args.model)
    if not random_weights and not args.headline:
        load_text(args.text_file)  # the agreement prompts come last: check the corpus before measuring

    lm = load_model(args.model)
    model = lm.model
    nq = enable(model, bits=4)
    scheme = nq.scheme
    n_decode = sum(args.rounds * (5 if c * b <= args.no_recompute_above * 2 else 4)
                   for c in contexts for b in args.batches)
    command = getattr(args, "command_line", "nqkv bench")
    with tqdm(total=5 * args.rounds if args.headline else 4 + n_decode, desc="bench", unit="step") as bar:
        out = _Lines(args.markdown, bar)
        out.add(f"Model {lm.name}{' (random weights)' if random_weights else ''}, fp32 activations,"
                f" {torch.get_num_threads()} threads, CPU kernels {native.vector_isa()}; scheme `{scheme.name}`;"
                f" command `{command}`.", "")
        if args.headline:
            context = args.batch_context or HEADLINE_CONTEXT
            bar.set_postfix_str("headline")
            h = headline(model, scheme, budget, context, steps, args.rounds, bar)
            out.add(*headline_markdown(h, args.budget, context, scheme.name,
                                       getattr(model.config, "max_position_embeddings", None)))
            return
        args.batch_context = args.batch_context or BATCH_CONTEXT
        bar.set_postfix_str("memory")
        bpt = _memory_tables(model, scheme, args, budget, out)
        bar.update(2)
        _decode_table(model, scheme, args, contexts, steps, out, bar)
        bar.set_postfix_str("agreement")
        if random_weights:
            out.add("", "Greedy agreement: not measured (random weights: agreement with full precision"
                    " says nothing about a trained model).")
        else:
            agree = agreement(model, lm.tokenizer, scheme, n_prompts=2 if args.quick else 8, prompt_len=256,
                              text_file=args.text_file)
            out.add("", "Greedy agreement of 32 new tokens with full precision (WikiText-2 prompts of 256 tokens): "
                    + ", ".join(f"{k} {v * 100:.1f}%" for k, v in agree.items()))
        bar.update()
        bar.set_postfix_str("growth")
        g = growth(model, scheme, 4096 if args.quick else 10240)
        n0, b0, r0 = g[0]
        n1, b1, r1 = g[-1]
        out.add("", f"Growth to {n1} tokens (dynamic NQKV cache, body grown in steps of 64 tokens):"
                f" allocated {b1 / 2**20:.1f} MiB"
                f" ({b1 / n1:,.0f} B/token incl. spare capacity, {bpt['NQKV exact (body)']:,.0f} B/token used);"
                f" RSS grew {(r1 - r0) / 2**20:.1f} MiB from {n0} to {n1} tokens.")
        bar.update()
