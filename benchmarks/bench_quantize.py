"""Blockwise 4-bit quantize / dequantize on CPU: nqkv vs bitsandbytes NF4 vs torchao NF4.

Every library runs in the same process on the same input; the table gives medians and each time as
a ratio to bitsandbytes, plus the MSE of each round trip. Usage:

    python benchmarks/bench_quantize.py [--numel 4194304] [--repeats 9] [--rounds 3] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from nqkv_core import native
from nqkv_core.codebook import get_codebook
from nqkv_core.quantize import dequantize_blockwise, quantize_blockwise


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


Method = tuple[str, Callable[[], object], Callable[[], object], float]  # name, quantize, dequantize, MSE


def _in(ctx_factory, fn):
    def run():
        with ctx_factory():
            return fn()
    return run


def nqkv_methods(x: torch.Tensor, block: int) -> list[Method]:
    cb = get_codebook("nf", 4, block)
    rows_view = x.view(-1, block)
    codes, absmax = quantize_blockwise(rows_view, cb, block)
    y = dequantize_blockwise(codes, absmax, cb, block, dtype=x.dtype)
    mse = ((y.float() - rows_view.float()) ** 2).mean().item()
    q = lambda: quantize_blockwise(rows_view, cb, block)  # noqa: E731
    dq = lambda: dequantize_blockwise(codes, absmax, cb, block, dtype=x.dtype)  # noqa: E731
    compiled = torch.compile(dequantize_blockwise, dynamic=False)
    methods = [("nqkv (torch ops)", _in(native.disabled, q), _in(native.disabled, dq), mse),
               ("nqkv (torch ops, compiled dequantize)", _in(native.disabled, q),
                lambda: compiled(codes, absmax, cb, block, dtype=x.dtype), mse)]
    if native.available():
        methods.insert(0, ("nqkv (native)", q, dq, mse))
        # the one-byte E5M3 scales of the 4-bit presets (nearest byte, not fp16 rounded up)
        codes8, scales8 = quantize_blockwise(rows_view, cb, block, scale_dtype=torch.uint8)
        y8 = dequantize_blockwise(codes8, scales8, cb, block, dtype=x.dtype)
        methods.insert(1, ("nqkv (native, E5M3 scales)",
                           lambda: quantize_blockwise(rows_view, cb, block, scale_dtype=torch.uint8),
                           lambda: dequantize_blockwise(codes8, scales8, cb, block, dtype=x.dtype),
                           ((y8.float() - rows_view.float()) ** 2).mean().item()))
    return methods


def bitsandbytes_method(x: torch.Tensor, block: int):
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        return None
    packed, state = bnb.quantize_4bit(x, blocksize=block, quant_type="nf4")
    y = bnb.dequantize_4bit(packed, state)
    mse = ((y.float() - x.float()) ** 2).mean().item()
    return ("bitsandbytes nf4", lambda: bnb.quantize_4bit(x, blocksize=block, quant_type="nf4"),
            lambda: bnb.dequantize_4bit(packed, state), mse)


def torchao_method(x: torch.Tensor, block: int):
    try:
        from torchao.dtypes.nf4tensor import to_nf4
    except ImportError:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
        except ImportError:
            return None
    # torchao's double quantization needs the number of blocks to divide its scaler block (256).
    shaped = x.view(-1, 4096)
    nf4 = to_nf4(shaped, block_size=block, scaler_block_size=256)
    y = nf4.get_original_weight()
    mse = ((y.float() - shaped.float()) ** 2).mean().item()
    return ("torchao nf4", lambda: to_nf4(shaped, block_size=block, scaler_block_size=256),
            lambda: nf4.get_original_weight(), mse)


def timed(methods: list[Method], repeats: int, rounds: int) -> list[tuple[str, float, float, float]]:
    """Median over interleaved rounds (each a median of ``repeats``) of every method's two calls."""
    for _, q, dq, _ in methods:  # warm-up and compilation
        q(), dq()
    per = {name: ([], []) for name, *_ in methods}
    for _ in range(rounds):
        for name, q, dq, _ in methods:
            per[name][0].append(median_time(q, repeats))
            per[name][1].append(median_time(dq, repeats))
    return [(name, statistics.median(per[name][0]), statistics.median(per[name][1]), mse)
            for name, _, _, mse in methods]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=4 << 20, help="elements to quantize")
    parser.add_argument("--block", type=int, default=64, help="block size")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of their medians)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lines = [
        f"{args.numel} elements, block {args.block}, 4-bit, {torch.get_num_threads()} threads,"
        f" median of {args.rounds} interleaved rounds of {args.repeats} repeats;"
        " ratios are bitsandbytes time / this time (>1 = faster).",
        "",
        "| input | method | quantize ms | x bnb | dequantize ms | x bnb | MSE | MSE / bnb |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)).to(dtype)
        methods = nqkv_methods(x, args.block)
        methods += [m for m in (bitsandbytes_method(x, args.block), torchao_method(x, args.block)) if m is not None]
        rows = timed(methods, args.repeats, args.rounds)
        ref = next((r for r in rows if r[0] == "bitsandbytes nf4"), None)
        for name, q, dq, mse in rows:
            rq = f"{ref[1] / q:.2f}" if ref else "-"
            rdq = f"{ref[2] / dq:.2f}" if ref else "-"
            rmse = f"{mse / ref[3]:.4f}" if ref else "-"
            lines.append(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {q * 1e3:.1f} | {rq} |"
                f" {dq * 1e3:.2f} | {rdq} | {mse:.3e} | {rmse} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
