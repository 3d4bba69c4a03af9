"""Compiled decode on SmolLM2-135M: ``torch.compile(fullgraph=True)`` of one decode step.

For each context: a prompt of random token ids fills the cache, then single-token decode steps.
Caches and step functions, all with the same model in one process:

* ``NQKV compiled``: ``NQKVCache`` preallocated for ``context + steps`` tokens (``max_cache_len``),
  the step ``model(tok, past_key_values=cache)`` compiled with ``fullgraph=True`` (a graph break
  is an error); the compiled step reads the whole preallocated body, masked;
* ``NQKV eager``: the same cache, growing, eager;
* ``StaticCache compiled``: transformers' fp32 ``StaticCache`` with SDPA, compiled the same way;
* ``DynamicCache eager``: transformers' default.

Printed: compile time (first two compiled calls: trace and lowering, then the first re-use) and the
median step time after warm-up, with ratios to ``DynamicCache eager``.

    python benchmarks/bench_compiled_decode.py --contexts 1024 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nqkv_core.cache import ATTN_NAME, enable
from nqkv_core.models import load_model


def timed_steps(step, cache, tok: torch.Tensor, steps: int) -> tuple[float, float]:
    """(seconds of the first two calls, median seconds of the rest)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(tok, cache)
        times.append(time.perf_counter() - t)
    return times[0] + times[1], statistics.median(times[3:])


@torch.no_grad()
def run(model, nq, context: int, steps: int) -> dict[str, tuple[float, float]]:
    from transformers import DynamicCache, StaticCache

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 20000, (1, context), generator=g)
    tok = torch.full((1, 1), 42, dtype=torch.long)

    def step(t, cache):
        return model(t, past_key_values=cache, use_cache=True).logits

    out = {}
    for name in ("NQKV compiled", "NQKV eager", "StaticCache compiled", "DynamicCache eager"):
        nqkv = name.startswith("NQKV")
        model.set_attn_implementation(ATTN_NAME if nqkv else "sdpa")
        if name == "NQKV compiled":
            cache = nq.new_cache(max_cache_len=context + steps)
        elif name == "NQKV eager":
            cache = nq.new_cache()
        elif name == "StaticCache compiled":
            cache = StaticCache(config=model.config, max_cache_len=context + steps)
        else:
            cache = DynamicCache(config=model.config)
        model(prompt, past_key_values=cache, use_cache=True)  # prefill, eager
        fn = step
        if "compiled" in name:
            torch._dynamo.reset()
            fn = torch.compile(step, fullgraph=True)
        out[name] = timed_steps(fn, cache, tok, steps)
        print(f"  {context} {name}: first calls {out[name][0]:.1f} s, step {1e3 * out[name][1]:.1f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="prompt lengths")
    ap.add_argument("--steps", type=int, default=12, help="decode steps per cache (3 warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model()
    nq = enable(lm.model, bits=4)
    print(f"Model {lm.name}, fp32, torch {torch.__version__}, {torch.get_num_threads()} thread(s);"
          f" scheme `{nq.scheme.name}`")
    rows = []
    for ctx in args.contexts:
        res = run(lm.model, nq, ctx, args.steps)
        base = res["DynamicCache eager"][1]
        for name, (first, step) in res.items():
            rows.append(f"| {ctx} | {name} | {first:.1f} | {1e3 * step:.1f} | {base / step:.2f}x |")
    print("\n| context | cache / step | first two calls s | step ms | speed vs DynamicCache eager |")
    print("|---:|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
