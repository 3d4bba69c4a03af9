"""CPU decode attention over a 4-bit cache: nqkv::attention vs full-precision torch SDPA.

One decode step (one query per query head, 4 query heads per KV head) over a cache of T tokens.
Every variant runs in the same loop, interleaved, and the median of the repeats is reported:

* ``nqkv fp32`` / ``nqkv bf16``: ``F.scaled_dot_product_attention(q, K, V, enable_gqa=True)`` with
  NQTensor K/V (NF codes, 4-bit unless --bits, blocks of 64 along head_dim, fp16 scales) and fp32 / bf16 queries;
  the native decode kernel when it is built (``nqkv_core.native``);
* ``nqkv e5m3``: ``nqkv fp32`` with the one-byte E5M3 block scales the 4-bit presets store;
* ``nqkv torch``: the same call (bf16 queries) on the plain-torch path, the fallback without the
  native kernels;
* ``fp32 gqa``: torch SDPA on the unquantized fp32 cache with ``enable_gqa=True``;
* ``fp32 fold`` / ``bf16 fold``: the query-head group folded into query rows, (B, Hkv, 4, D);
* ``deq+sdpa``: ``K.dequantize()``, ``V.dequantize()`` then ``fp32 fold``.

Also printed: the ratio of nqkv to the fastest full-precision variant, peak memory allocated by the
call (glibc heap in use, sampled from a thread), and the floor = bytes of the 4-bit cache / measured
read bandwidth (a streaming ``sum`` over 512 MiB with the same threads).

    python benchmarks/bench_attention.py --quick
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import itertools
import statistics
import threading
import time

import torch
import torch.nn.functional as F

import nqkv_core.ops  # noqa: F401  (registers the SDPA route for NQTensor)
from nqkv_core import NQTensor, native

GROUP = 4
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    _LIBC.mallinfo2.restype = None
except (OSError, AttributeError, TypeError):
    _LIBC = None
if _LIBC is not None:
    try:
        _LIBC.mallinfo2.restype = None  # set below, once the structure exists
    except AttributeError:
        _LIBC = None


def read_bandwidth() -> float:
    """Streaming read bandwidth in bytes/s (median of 5 sums over 512 MiB)."""
    x = torch.ones(128 << 20)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


if _LIBC is not None:
    _LIBC.mallinfo2.restype = _MallInfo2


def _heap_in_use() -> int:
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd  # bytes in use: arena chunks + mmapped chunks


def peak_bytes(fn) -> int:
    """Peak heap growth while ``fn`` runs (glibc ``mallinfo2`` sampled from a thread), or -1."""
    if _LIBC is None:
        return -1
    base = _heap_in_use()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _heap_in_use())

    th = threading.Thread(target=sample)
    th.start()
    try:
        for _ in range(3):
            fn()
    finally:
        done.set()
        th.join()
    return peak[0] - base


def _torch_path(fn):
    with native.disabled():
        return fn()


def bench_config(b: int, hkv: int, d: int, t: int, repeats: int, bw: float, bits: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(b, hkv, t, d, generator=gen)
    v = torch.randn(b, hkv, t, d, generator=gen)
    q = torch.randn(b, hkv * GROUP, 1, d, generator=gen)
    K = NQTensor.from_float(k, block=64, bits=bits)
    V = NQTensor.from_float(v, block=64, bits=bits)
    K8, V8 = (NQTensor.from_float(x, block=64, bits=bits, scale_dtype=torch.uint8) for x in (k, v))
    qf = q.view(b, hkv, GROUP, d)
    kb, vb, qb = k.bfloat16(), v.bfloat16(), qf.bfloat16()
    qbh = q.bfloat16()
    variants = {
        "nqkv fp32": lambda: F.scaled_dot_product_attention(q, K, V, enable_gqa=True),
        "nqkv bf16": lambda: F.scaled_dot_product_attention(qbh, K, V, enable_gqa=True),
        "nqkv e5m3": lambda: F.scaled_dot_product_attention(q, K8, V8, enable_gqa=True),
        "nqkv torch": lambda: _torch_path(lambda: F.scaled_dot_product_attention(qbh, K, V, enable_gqa=True)),
        "fp32 gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "fp32 fold": lambda: F.scaled_dot_product_attention(qf, k, v),
        "bf16 fold": lambda: F.scaled_dot_product_attention(qb, kb, vb),
        "deq+sdpa": lambda: F.scaled_dot_product_attention(qf, K.dequantize(), V.dequantize()),
    }
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up (lookup tables, allocator)
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    fp = {n: ms[n] for n in ("fp32 gqa", "fp32 fold", "bf16 fold")}
    fastest = min(fp, key=fp.get)
    cache_bytes = K.nbytes + V.nbytes
    nq = min(ms["nqkv fp32"], ms["nqkv bf16"])
    return dict(
        config=f"B={b} Hkv={hkv} D={d} T={t}",
        ms=ms,
        fastest=fastest,
        ratio_fp32=ms["nqkv fp32"] / fp[fastest],
        ratio_bf16=ms["nqkv bf16"] / fp[fastest],
        speedup_deq=ms["deq+sdpa"] / nq,
        peak_mb=peak_bytes(variants["nqkv fp32"]) / 2**20,
        deq_mb=2 * k.numel() * 4 / 2**20,
        floor_ms=1e3 * cache_bytes / bw,
        cache_mb=cache_bytes / 2**20,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B=1, Hkv=8, D=128, T in {1k, 8k}, 5 repeats")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[8, 3], help="KV heads (4 query heads each)")
    p.add_argument("--head-dim", type=int, nargs="+", default=[128, 64], help="head dims")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768], help="cache lengths")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per variant (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4], help="code bits of K and V (NF codebook)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.kv_heads, args.head_dim, args.tokens, args.repeats = [1], [8], [128], [1024, 8192], 5
    bw = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.bits}-bit codes, read bandwidth {bw / 1e9:.1f} GB/s,"
          f" native kernels: {native.vector_isa() if native.available() else 'no (torch path)'}")
    names = ["nqkv fp32", "nqkv bf16", "nqkv e5m3", "nqkv torch", "fp32 gqa", "fp32 fold", "bf16 fold", "deq+sdpa"]
    print("| config | " + " | ".join(f"{n} ms" for n in names)
          + " | nqkv/fastest fp (fp32 q, bf16 q) | deq+sdpa/nqkv | peak MiB (nqkv vs deq copy) | floor ms (op/floor) |")
    print("|" + "---|" * (len(names) + 5))
    for b, hkv, d, t in itertools.product(args.batch, args.kv_heads, args.head_dim, args.tokens):
        r = bench_config(b, hkv, d, t, args.repeats, bw, args.bits)
        nq = min(r["ms"]["nqkv fp32"], r["ms"]["nqkv bf16"])
        print(
            f"| {r['config']} | " + " | ".join(f"{r['ms'][n]:.2f}" for n in names)
            + f" | {r['ratio_fp32']:.2f}x, {r['ratio_bf16']:.2f}x vs {r['fastest']} | {r['speedup_deq']:.1f}x"
            f" | {r['peak_mb']:.1f} vs {r['deq_mb']:.0f} | {r['floor_ms']:.2f} ({nq / r['floor_ms']:.0f}x) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
