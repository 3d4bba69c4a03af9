"""Bytes an NQKV cache holds against an fp16 cache of the same tokens, counting every tensor.

A SmolLM2-135M-shaped cache (30 layers, 3 KV heads, head_dim 64; no weights needed) is filled with
``--contexts`` random tokens through ``NQKVCache.append``; ``cache.nbytes`` counts every tensor it
holds (codes and scales at their allocated capacity, the full-precision sink and window tokens,
the frozen transforms, the shared RoPE table), each storage once, and ``held`` re-counts every
tensor reachable from the cache object as a cross-check; ``one token later`` is the ratio after
one more token, which makes a growing body allocate room for the tokens that follow (in steps of
16 to 64, ``growth_step``). ``bound`` is the ratio the preset could reach if nothing but its tokens
were stored: body tokens at the scheme's bits per element, the ``sinks + window - 1`` exact tokens
at 16 bits. ``--window`` sets another full-precision window.

    python benchmarks/cache_memory.py --contexts 512 1024 2048 4096 16384 [--window 16]
"""

from __future__ import annotations

import argparse

import torch

from nqkv_core.cache import NQKVCache
from nqkv_core.lab.bench import held_bytes
from nqkv_core.quantize import bits_per_element
from nqkv_core.scheme import default_scheme


def smollm2_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=layers,
                       head_dim=64, rope_theta=1e5)


def filled(scheme, config, context: int, dtype: torch.dtype, cache: NQKVCache | None = None) -> NQKVCache:
    """``cache`` (a new one by default) with ``context`` more random tokens in every layer."""
    cache = NQKVCache(scheme, config=config) if cache is None else cache
    g = torch.Generator().manual_seed(context)
    h, d = config.num_key_value_heads, config.head_dim
    for i in range(config.num_hidden_layers):
        kv = torch.randn(2, 1, h, context, d, generator=g).to(dtype)
        q = torch.randn(1, config.num_attention_heads, context, d, generator=g).to(dtype)
        cache.append(kv[0], kv[1], i, q)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 16384], help="tokens held")
    ap.add_argument("--bits", type=int, default=4, help="NQKV preset width")
    ap.add_argument("--window", type=int, default=None, help="full-precision window (default: the preset's)")
    ap.add_argument("--layers", type=int, default=30, help="layers (SmolLM2-135M: 30)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="the model's dtype (a 16-bit model's exact tokens are kept in bf16, an fp32 model's in fp32)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    config = smollm2_config(args.layers)
    scheme = default_scheme(args.bits, config.head_dim, window=args.window)
    per_token_fp16 = 2 * args.layers * config.num_key_value_heads * config.head_dim * 2
    body_bits = (bits_per_element(scheme.k_bits, scheme.k_block, scheme.scale_dtype)
                 + bits_per_element(scheme.v_bits, scheme.v_block, scheme.scale_dtype)) / 2
    exact_bits = 8 * scheme.exact_dtype(dtype).itemsize
    print(f"{scheme.name}, {args.dtype} model: {body_bits:.2f} bits per body element; {scheme.sinks} sinks +"
          f" {scheme.window}-token window at {exact_bits} bits\n")
    print("| tokens | fp16 MiB | NQKV nbytes MiB | fp16 / nbytes | fp16 / held | one token later | bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.contexts:
        cache = filled(scheme, config, n, dtype)
        fp16 = per_token_fp16 * n
        exact = min(n, scheme.sinks + scheme.window - 1)
        bound = 16 * n / (body_bits * (n - exact) + 16 * exact)
        row = f"| {n} | {fp16 / 2**20:.2f} | {cache.nbytes / 2**20:.2f} | {fp16 / cache.nbytes:.2f}"
        row += f" | {fp16 / held_bytes(cache):.2f}"
        more = filled(scheme, config, 1, dtype, cache)  # the body grows for the tokens that follow
        row += f" | {per_token_fp16 * (n + 1) / more.nbytes:.2f} | {bound:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
