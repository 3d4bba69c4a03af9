"""Expected MSE of NF and block-size-aware Lloyd-Max codebooks on i.i.d. N(0,1) blocks.

``--encoders``: instead, for the presets' codebooks at 64, the MSE of absmax codes decoded with the
unbiased levels against fitted scales (both decode unbiased).

Usage: python benchmarks/codebook_mse.py [--samples 1048576] [--encoders]
"""

from __future__ import annotations

import argparse

import torch

from nqkv_core.codebook import expected_mse, get_codebook, lloyd_max_codebook, nf_codebook
from nqkv_core.quantize import dequantize_blockwise, quantize_blockwise


def encoders(samples: int) -> None:
    x = torch.randn(samples // 64, 64, generator=torch.Generator().manual_seed(0))
    print("| codebook | absmax, unbiased levels | fitted scales | fitted / absmax |")
    print("|---|---|---|---|")
    for kind, bits in (("nf", 4), ("nf", 3), ("lloyd", 2)):
        cb = get_codebook(kind, bits, 64)
        gain = dequantize_blockwise(*quantize_blockwise(x, cb, 64), get_codebook(kind, bits, 64, unbiased=True), 64)
        fit = dequantize_blockwise(*quantize_blockwise(x, cb, 64, fit_scale=True), cb, 64)
        a, f = float(((gain - x) ** 2).mean()), float(((fit - x) ** 2).mean())
        print(f"| {kind}{bits} | {a:.5f} | {f:.5f} | {f / a:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1 << 20, help="Gaussian samples per estimate")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128], help="block sizes")
    parser.add_argument("--encoders", action="store_true", help="absmax vs fitted scales (blocks of 64)")
    args = parser.parse_args()
    if args.encoders:
        encoders(args.samples)
        return
    print("| bits | block | NF MSE | Lloyd-Max MSE | Lloyd / NF |")
    print("|---|---|---|---|---|")
    for bits in (2, 3, 4):
        for block in args.blocks:
            nf = expected_mse(nf_codebook(bits), block, args.samples)
            lloyd = expected_mse(lloyd_max_codebook(bits, block), block, args.samples)
            print(f"| {bits} | {block} | {nf:.5f} | {lloyd:.5f} | {lloyd / nf:.3f} |")


if __name__ == "__main__":
    main()
