"""Expected MSE of NF and block-size-aware Lloyd-Max codebooks on i.i.d. N(0,1) blocks.

Usage: python benchmarks/codebook_mse.py [--samples 1048576]
"""

from __future__ import annotations

import argparse

from nqkv_core.codebook import expected_mse, lloyd_max_codebook, nf_codebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1 << 20, help="Gaussian samples per estimate")
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128], help="block sizes")
    args = parser.parse_args()
    print("| bits | block | NF MSE | Lloyd-Max MSE | Lloyd / NF |")
    print("|---|---|---|---|---|")
    for bits in (2, 3, 4):
        for block in args.blocks:
            nf = expected_mse(nf_codebook(bits), block, args.samples)
            lloyd = expected_mse(lloyd_max_codebook(bits, block), block, args.samples)
            print(f"| {bits} | {block} | {nf:.5f} | {lloyd:.5f} | {lloyd / nf:.3f} |")


if __name__ == "__main__":
    main()
