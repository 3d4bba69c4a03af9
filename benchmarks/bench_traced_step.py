"""The traced compiled step at several lengths under one large preallocation (CPU).

One cache layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64), the NQKV 4-bit
preset, preallocated for ``--max-cache-len`` tokens (``compiled_step="traced"``): the step
``update(k, v); attention(q)`` compiled once with ``fullgraph=True``, then timed at each of
``--lengths`` tokens present (filled eagerly in between, with no recompile). Two ways to read the
body, from the same graph:

* ``present``: ``nqkv::present_attention`` slices the body to the tokens present (what CPU steps do);
* ``whole body``: the same op reading the whole preallocated body with the empty slots masked by the
  device-side length (what it does on a GPU, where reading the length back is a sync).

Printed: the median step time over ``--rounds`` rounds of ``--steps`` steps of each way in turn.

    python benchmarks/bench_traced_step.py --max-cache-len 32768 --lengths 1024 16384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nqkv_core.cache import NQKVCache, compiled
from nqkv_core.scheme import nqkv_preset


def config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_hidden_layers=1,
                       max_position_embeddings=1 << 20, rope_theta=100000.0)


def step(cache: NQKVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    cache.update(k, v, 0)
    return cache.layers[0].attention(q, None, 0.125)


def times(fn, cache, whole: bool, n: int, gen: torch.Generator) -> list[float]:
    reads = compiled.reads_length
    compiled.reads_length = (lambda body_len: False) if whole else reads  # the op's GPU way, on CPU
    try:
        out = []
        for _ in range(n):
            q, k, v = torch.randn(1, 9, 1, 64, generator=gen), *torch.randn(2, 1, 3, 1, 64, generator=gen)
            t = time.perf_counter()
            fn(cache, q, k, v)
            out.append(time.perf_counter() - t)
        return out
    finally:
        compiled.reads_length = reads


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-cache-len", type=int, default=32768, help="preallocated tokens")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 16384], help="tokens present when timed")
    ap.add_argument("--steps", type=int, default=5, help="steps per round and way")
    ap.add_argument("--rounds", type=int, default=4, help="rounds (median over all steps)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    cache = NQKVCache(nqkv_preset(4), config=config(), max_cache_len=args.max_cache_len, compiled_step="traced")
    fn = torch.compile(step, fullgraph=True)
    print(f"max_cache_len {args.max_cache_len}, one layer, 3 KV heads x 64, NQKV-4, 1 thread")
    print("| tokens present | present ms | whole body ms | whole body / present |")
    print("|---:|---:|---:|---:|")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in sorted(args.lengths):
            missing = n - int(cache.layers[0].length)
            while missing > 0:  # fill eagerly, in chunks
                chunk = min(missing, 4096)
                cache.append(*torch.randn(2, 1, 3, chunk, 64, generator=gen), 0)
                missing -= chunk
            t0 = time.perf_counter()
            times(fn, cache, False, 1, gen)  # the first call compiles
            if n == min(args.lengths):
                print(f"(compile: {time.perf_counter() - t0:.1f} s)")
            res = {False: [], True: []}
            for _ in range(args.rounds):
                for whole in res:
                    res[whole] += times(fn, cache, whole, args.steps, gen)
            present, whole = (1e3 * statistics.median(res[w]) for w in (False, True))
            print(f"| {n} | {present:.2f} | {whole:.2f} | {whole / present:.1f}x |")


if __name__ == "__main__":
    main()
