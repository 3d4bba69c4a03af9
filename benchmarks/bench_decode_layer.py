"""One attention layer of decode, cache growing by one token per step: NQKV layer vs fp32 SDPA.

Isolates what a model's decode step spends per layer (no linear layers around it): one
``NQKVLayer`` filled with ``--tokens`` random post-RoPE tokens, then ``--steps`` steps of
``update`` + ``attention`` with one new token each (the cache grows, as in ``generate``):

* ``nqkv``: the ``--bits`` preset, 4 by default (RoPE-aware key centre: attention adds a score
  offset); with ``--also-block N`` the same preset in blocks of N too (``nqkv bN``);
* ``nqkv plain-centre``: the same with a post-RoPE key mean (no offset);
* ``nqkv bf16 model``: ``nqkv`` with bf16 tokens and queries (its sink and window tokens in bf16);
* ``nqkv torch path``: ``nqkv`` without the native CPU kernels (``nqkv_core.native.disabled()``);
* ``sdpa fp32 cat``: fp32 SDPA (``enable_gqa``) over a cache grown by ``torch.cat``, as
  ``DynamicCache`` does;
* ``sdpa fp32 static``: the same over a preallocated cache written in place.

Variants run in interleaved rounds; each figure is the median over rounds of the median step time.

    python benchmarks/bench_decode_layer.py --tokens 1024 4096 16384
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from nqkv_core import native
from nqkv_core.cache import NQKVCache
from nqkv_core.scheme import nqkv_preset


def rope_config(kv_heads: int, group: int, head_dim: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=kv_heads * group * head_dim, num_attention_heads=kv_heads * group,
                       num_key_value_heads=kv_heads, num_hidden_layers=1, head_dim=head_dim, rope_theta=1e5)


def nqkv_steps(scheme, config, tokens: int, steps: int, kv_heads: int, group: int, d: int, use_native: bool = True,
               dtype: torch.dtype = torch.float32) -> float:
    cache = NQKVCache(scheme, config=config)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    k, v = randn(1, kv_heads, tokens, d), randn(1, kv_heads, tokens, d)
    cache.append(k, v, 0, randn(1, kv_heads * group, tokens, d))  # (queries: the 3-bit key coder)
    layer = cache.layers[0]
    q = randn(1, kv_heads * group, 1, d)
    new = [(randn(1, kv_heads, 1, d), randn(1, kv_heads, 1, d)) for _ in range(steps)]
    times = []
    with contextlib.nullcontext() if use_native else native.disabled():
        for k, v in new:
            t = time.perf_counter()
            layer.update(k, v)
            layer.attention(q, None, d**-0.5)
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def sdpa_steps(tokens: int, steps: int, kv_heads: int, group: int, d: int, static: bool) -> float:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, kv_heads, tokens + (steps if static else 0), d, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(1, kv_heads * group, 1, d, generator=g)
    n = tokens
    times = []
    for _ in range(steps):
        kn, vn = torch.randn(1, kv_heads, 1, d), torch.randn(1, kv_heads, 1, d)
        t = time.perf_counter()
        if static:
            k[:, :, n : n + 1].copy_(kn)
            v[:, :, n : n + 1].copy_(vn)
            n += 1
            F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True)
        else:
            k, v = torch.cat([k, kn], dim=2), torch.cat([v, vn], dim=2)
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="cache lengths")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    ap.add_argument("--group", type=int, default=3, help="query heads per KV head (SmolLM2-135M: 3)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--bits", type=int, default=4, help="NQKV preset width")
    ap.add_argument("--also-block", type=int, default=None, help="also the preset in blocks of this size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, grp, d = args.kv_heads, args.group, args.head_dim
    config = rope_config(h, grp, d)
    rope = nqkv_preset(args.bits)
    plain = nqkv_preset(args.bits, rope_centre=False)
    variants = {
        "nqkv": lambda t: nqkv_steps(rope, config, t, args.steps, h, grp, d),
        "nqkv plain-centre": lambda t: nqkv_steps(plain, config, t, args.steps, h, grp, d),
        "nqkv bf16 model": lambda t: nqkv_steps(rope, config, t, args.steps, h, grp, d, dtype=torch.bfloat16),
        "nqkv torch path": lambda t: nqkv_steps(rope, config, t, args.steps, h, grp, d, use_native=False),
        # (each round starts a little further on: the torch path meets matmul shapes it has not seen)
        "sdpa fp32 cat": lambda t: sdpa_steps(t, args.steps, h, grp, d, static=False),
        "sdpa fp32 static": lambda t: sdpa_steps(t, args.steps, h, grp, d, static=True),
    }
    if args.also_block:
        other = nqkv_preset(args.bits, block=args.also_block)
        variants[f"nqkv b{args.also_block}"] = lambda t: nqkv_steps(other, config, t, args.steps, h, grp, d)
    print(f"NQKV-{args.bits}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); {h} KV heads x {grp} query heads,"
          f" head_dim {d}; {args.steps} steps x {args.rounds} rounds; CPU kernels: {native.vector_isa()};"
          " ms per layer and step\n")
    print("| tokens | " + " | ".join(variants) + " | nqkv / sdpa cat | nqkv / plain-centre | torch path / nqkv |")
    print("|---:|" + "---:|" * (len(variants) + 3))
    for t in args.tokens:
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, fn in variants.items():
                samples[name].append(fn(t + r * args.steps))
        ms = {name: 1e3 * statistics.median(v) for name, v in samples.items()}
        cells = " | ".join(f"{ms[n]:.3f}" for n in variants)
        print(f"| {t} | {cells} | {ms['nqkv'] / ms['sdpa fp32 cat']:.2f} | {ms['nqkv'] / ms['nqkv plain-centre']:.2f}"
              f" | {ms['nqkv torch path'] / ms['nqkv']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
