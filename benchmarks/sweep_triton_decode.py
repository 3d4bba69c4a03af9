"""The Triton decode kernel alone on a CUDA GPU: launch configurations, and the best against fp16 SDPA.

For each shape (batch, KV heads, query heads per KV head, head_dim, cached tokens) a 4-bit cache in
blocks of 64 along head_dim, one query token; every configuration of ``triton_decode.DECODE_CONFIG``
in the grid below is timed (CUDA events around a CUDA graph of ten calls, median of 20 replays,
its output checked against the first configuration's), and torch's SDPA in fp16 over the unquantized K/V (flash backend) in the same run. The
configuration with the smallest geometric mean of (time / best time of that shape) is written to
``decode_config.json``; the table compares it with SDPA, with each one's achieved bandwidth
(bytes it must read / time).

    python benchmarks/sweep_triton_decode.py --out results/gpu
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nqkv_core import NQTensor
from nqkv_core.ops import triton_decode
from nqkv_core.quantize import E5M3

# (batch, kv heads, group, head_dim, tokens): SmolLM2-135M's attention at 16k / 32k, batch 1 and 8,
# and a larger model's (8 KV heads of 128)
SHAPES = [(1, 3, 3, 64, 16384), (1, 3, 3, 64, 32768), (8, 3, 3, 64, 16384), (1, 8, 4, 128, 65536)]
GRID = dict(block_n=[64, 128], num_warps=[2, 4], num_stages=[2], programs=[264, 528], min_split=[128],
            nibble_lanes=[True, False], register_lut=[False, True])
PATHS = {"general": dict(nibble_lanes=False), "lanes": dict(nibble_lanes=True, register_lut=False),
         "lanes+lut": dict(nibble_lanes=True, register_lut=True)}  # the kernel's decode paths


def timed(fn, reps: int = 20, calls: int = 10) -> float:
    """GPU seconds per call: ``calls`` calls captured in a CUDA graph, median of ``reps`` replays.
    (Timing eager calls would measure the host's launch overhead: at these sizes the kernels take
    less time than Python takes to launch them.)"""
    fn()  # compile
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2] / 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    configs = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    configs = [c for c in configs if c["nibble_lanes"] or not c["register_lut"]]  # (the lookup is a lane path's)
    default = dict(triton_decode.DECODE_CONFIG)
    times = {}  # (shape, config index) -> seconds
    sdpa, nbytes, errors = {}, {}, {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in SHAPES:
        b, hkv, grp, d, t = shape
        k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16, generator=g)
        q = torch.randn(b, hkv * grp, 1, d, device="cuda", dtype=torch.float16, generator=g)
        K, V = (NQTensor.from_float(x, block=64, bits=4, scale_dtype=E5M3) for x in (k, v))  # the presets' scales
        call = (q, K.codes, K.absmax, K.codebook, 64, 3, V.codes, V.absmax, V.codebook, 64, 3,
                None, None, None, d ** -0.5, False)
        ref = F.scaled_dot_product_attention(q.float(), K.dequantize(torch.float32), V.dequantize(torch.float32),
                                             enable_gqa=True)
        first = None
        for i, cfg in enumerate(configs):
            triton_decode.DECODE_CONFIG.update(cfg)
            out = triton_decode.flash_decode(*call).float()
            if first is None:
                first = out
                errors[shape] = float((out - ref).abs().max())
            elif not torch.allclose(out, first, atol=2e-3, rtol=0):
                raise AssertionError(f"config {cfg} computes something else at {shape}")
            times[shape, i] = timed(lambda: triton_decode.flash_decode(*call))
        qf = q.view(b, hkv, grp, d)  # one query row per (kv head, group member): plain SDPA over the cache
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa[shape] = timed(lambda: F.scaled_dot_product_attention(qf, k, v))
        nbytes[shape] = (K.nbytes + V.nbytes, k.nbytes + v.nbytes)
        print(f"{shape}: best {min(times[shape, i] for i in range(len(configs))) * 1e6:.1f} us,"
              f" SDPA fp16 {sdpa[shape] * 1e6:.1f} us", flush=True)
    triton_decode.DECODE_CONFIG.update(default)

    def score(i: int) -> float:
        return math.exp(sum(math.log(times[s, i] / min(times[s, j] for j in range(len(configs))))
                            for s in SHAPES) / len(SHAPES))

    ranked = sorted(range(len(configs)), key=score)
    best = configs[ranked[0]]
    (args.out / "decode_config.json").write_text(json.dumps(best) + "\n")
    default_i = next((i for i, c in enumerate(configs) if c == default), None)
    lines = [f"best config {best} (geo-mean {score(ranked[0]):.3f}x of each shape's best);"
             + (f" the module default {default}: {score(default_i):.3f}x" if default_i is not None else ""),
             "", "| batch | kv heads | group | head_dim | tokens | nqkv us | nqkv GB/s | SDPA fp16 us | SDPA GB/s |"
             " speed-up | max abs err vs dequantized |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SHAPES:
        t_nq, (qb, fb) = times[s, ranked[0]], nbytes[s]
        lines.append(f"| {' | '.join(map(str, s))} | {t_nq * 1e6:.1f} | {qb / t_nq / 1e9:.0f} | {sdpa[s] * 1e6:.1f} |"
                     f" {fb / sdpa[s] / 1e9:.0f} | {sdpa[s] / t_nq:.2f}x | {errors[s]:.1e} |")
    lines += ["", "Each decode path's best configuration, speed-up over SDPA fp16 per shape:"]
    for name, fixed in PATHS.items():
        i = min((j for j, c in enumerate(configs) if fixed.items() <= c.items()), key=score)
        lines.append(f"  {name}: " + ", ".join(f"{sdpa[s] / times[s, i]:.2f}x" for s in SHAPES) + f"  {configs[i]}")
    lines += ["", "Top 8 configurations (geo-mean ratio to each shape's best):"]
    lines += [f"  {score(i):.3f}  {configs[i]}" for i in ranked[:8]]
    print("\n".join(lines))
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    with open(args.out / "sweep.csv", "w") as f:
        f.write("shape,config,seconds\n")
        for (s, i), sec in times.items():
            f.write(f"\"{s}\",\"{configs[i]}\",{sec:.3e}\n")


if __name__ == "__main__":
    main()
