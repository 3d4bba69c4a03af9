"""Compiled decode on SmolLM2-135M: ``torch.compile(fullgraph=True)`` of one decode step.

For each context: a prompt of random token ids fills the cache, then single-token decode steps.
Caches and step functions, all with the same model in one process:

* ``NQKV compiled``: ``NQKVCache`` preallocated for ``context + steps`` tokens (``max_cache_len``),
  the step ``model(tok, past_key_values=cache)`` compiled with ``fullgraph=True`` (a graph break
  is an error); each layer's cache step is one opaque op, ``nqkv::cache_step``, that runs the
  eager step (the cache's ``compiled_step="op"``, its default on CPU);
* ``NQKV compiled traced`` (with ``--variants``): the same with ``compiled_step="traced"``, the
  step's torch ops in the graph (what a GPU's CUDA graphs capture), with the attention one op
  that reads the tokens present (``benchmarks/bench_traced_step.py`` times it against the
  preallocation);
* ``NQKV eager``: the same cache, growing, eager;
* ``StaticCache compiled``: transformers' fp32 ``StaticCache`` with SDPA, compiled the same way;
* ``DynamicCache eager``: transformers' default.

Printed: the eager prefill time of the prompt, compile time (first two compiled calls: trace and
lowering, then the first re-use) and the step time: the median over ``--rounds`` rounds, each
running ``--steps`` steps of every variant in turn, with ratios to ``DynamicCache eager``.

    python benchmarks/bench_compiled_decode.py --contexts 1024 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nqkv_core.cache import ATTN_NAME, enable
from nqkv_core.lab.models import cache_keyword, load_model

CACHE = cache_keyword()  # cache= from transformers 5.24 on, past_key_values= before


def make_cache(model, nq, name: str, total: int):
    """The cache of a variant (``NQKV compiled`` / ``NQKV eager`` / ``StaticCache compiled`` /
    ``DynamicCache eager``), with the model's attention set for it; ``total``: preallocated length."""
    from transformers import DynamicCache, StaticCache

    model.set_attn_implementation(ATTN_NAME if name.startswith("NQKV") else "sdpa")
    if name == "NQKV compiled":
        return nq.new_cache(max_cache_len=total, compiled_step="op")
    if name == "NQKV compiled traced":
        return nq.new_cache(max_cache_len=total, compiled_step="traced")
    if name == "NQKV eager":
        return nq.new_cache()
    if name == "StaticCache compiled":
        return StaticCache(config=model.config, max_cache_len=total)
    return DynamicCache(config=model.config)


def step_times(fn, cache, tok: torch.Tensor, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(tok, cache)
        times.append(time.perf_counter() - t)
    return times


VARIANTS = ("NQKV compiled", "NQKV eager", "StaticCache compiled", "DynamicCache eager")


@torch.no_grad()
def run(model, nq, context: int, steps: int, rounds: int,
        names: tuple[str, ...] = VARIANTS) -> dict[str, tuple[float, float, float]]:
    """``{variant: (prefill s, first two calls s, median step s)}``; steps interleaved in rounds."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, context), generator=g)
    tok = torch.full((1, 1), 42, dtype=torch.long)
    total = context + 2 + rounds * steps

    def step(t, cache):
        return model(t, use_cache=True, **{CACHE: cache}).logits

    variants = {}
    torch._dynamo.reset()
    for name in names:
        cache = make_cache(model, nq, name, total)
        t = time.perf_counter()
        model(prompt, use_cache=True, **{CACHE: cache})  # prefill, eager
        prefill = time.perf_counter() - t
        fn = torch.compile(step, fullgraph=True) if "compiled" in name else step
        first = sum(step_times(fn, cache, tok, 2))  # compiled: trace, lower, then the first re-use
        variants[name] = (fn, cache, prefill, first)
        print(f"  {context} {name}: prefill {prefill:.1f} s, first two calls {first:.1f} s", flush=True)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # each variant in turn, so that drifts of a shared machine hit all alike
        for name, (fn, cache, _, _) in variants.items():
            model.set_attn_implementation(ATTN_NAME if name.startswith("NQKV") else "sdpa")
            samples[name].append(statistics.median(step_times(fn, cache, tok, steps)))
    return {name: (v[2], v[3], statistics.median(samples[name])) for name, v in variants.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="prompt lengths")
    ap.add_argument("--steps", type=int, default=5, help="decode steps per variant and round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (median of round medians)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help="caches / steps to run (DynamicCache eager is always run); also: 'NQKV compiled traced'")
    args = ap.parse_args()
    names = tuple(dict.fromkeys([*args.variants, "DynamicCache eager"]))
    torch.set_num_threads(args.threads)
    lm = load_model()
    nq = enable(lm.model, bits=4)
    print(f"Model {lm.name}, fp32, torch {torch.__version__}, {torch.get_num_threads()} thread(s);"
          f" scheme `{nq.scheme.name}`")
    rows = []
    for ctx in args.contexts:
        res = run(lm.model, nq, ctx, args.steps, args.rounds, names)
        base = res["DynamicCache eager"][2]
        for name, (prefill, first, step) in res.items():
            rows.append(f"| {ctx} | {name} | {prefill:.1f} | {first:.1f} | {1e3 * step:.1f} | {base / step:.2f}x |")
    print("\n| context | cache / step | prefill s (eager) | first two calls s | step ms | step speed vs DynamicCache eager |")
    print("|---:|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
