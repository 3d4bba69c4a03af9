"""The grouped decode kernel on a CUDA GPU: correctness, achievable bandwidth, time against fp16 SDPA.

Writes ``gpu_decode_check.json`` and ``gpu_decode_check.md`` to ``--out``:

1. environment: device, SM count, torch / Triton / CUDA versions;
2. correctness: ``triton_decode_grouped`` (the path ``nqkv::attention`` takes for the presets' 4-bit
   layout) against ``triton_decode.reference`` (fp32 SDPA over the dequantized K/V) at head_dim 64
   and 128, groups 3 and 4, fp tails of 0 / 1 / 37 tokens, 1 / 1000 / 33k tokens, fp16 and bf16,
   with and without device-side lengths, with and without the RoPE-centre key bias the kernel
   computes itself (against the reference given that bias as a dense additive mask), and fp32
   queries (a transformed cache's storage basis: fp16 products, ``GROUPED_CONFIG["fp32_queries"]``);
3. per shape (batch, KV heads, group, head_dim, tokens; 4-bit K/V in blocks of 64 along head_dim,
   one query token), GPU time per call from CUDA graphs of ten calls (median of 20 replays) of:
   the grouped kernel (preallocated output and workspace, lengths from a device tensor; its
   default launch configuration and, while time allows, a few others: :data:`CONFIGS`), the same
   with the RoPE-centre key bias computed in the kernel and with that bias built in torch and passed
   as a dense additive mask (what the cache did before), what a RoPE-centred cache runs today with
   fp32 queries (the split-K kernel, fp32 products, the bias as a dense mask), the split-K kernel it
   replaces
   (``triton_decode.flash_decode``), ``F.scaled_dot_product_attention`` in fp16 (flash backend)
   over the unquantized K/V, and a streaming kernel that reads exactly the grouped kernel's bytes
   (codes and scales of K and V) and does nothing else: the bandwidth a decode over this storage
   could reach. "GB/s" is each one's bytes over its time.

``--dry-run`` runs everything on CPU in Triton's interpreter at tiny sizes (wall-clock times, no
CUDA graphs): a check of this script, not a measurement.

    python benchmarks/gpu_decode_check.py --out results/gpu
    python benchmarks/gpu_decode_check.py --dry-run --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # before triton is imported: the interpreter is chosen at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nqkv_core import NQTensor  # noqa: E402
from nqkv_core.ops import triton_decode, triton_decode_grouped  # noqa: E402
from nqkv_core.quantize import E5M3  # noqa: E402

# (batch, kv heads, group, head_dim, tokens): SmolLM2-135M's attention (3 KV heads of 64, 9 query
# heads) and an 8-KV-head model's (8 of 128, 32 query heads)
SHAPES = [(1, 3, 3, 64, 16384), (1, 3, 3, 64, 32768), (8, 3, 3, 64, 32768), (1, 8, 4, 128, 32768),
          (1, 8, 4, 128, 65536), (8, 8, 4, 128, 32768)]
DRY_SHAPES = [(1, 3, 3, 64, 300), (2, 2, 4, 128, 200)]
# (batch, kv heads, group, head_dim, tokens, tail, dtype name, device lengths, key bias)
CASES = [(2, 2, 3, 64, 1000, 0, "float16", False, False), (2, 2, 4, 64, 1, 1, "bfloat16", False, False),
         (2, 2, 3, 64, 1000, 37, "bfloat16", True, False), (2, 2, 4, 128, 1, 0, "float16", False, False),
         (2, 2, 3, 128, 1000, 1, "float16", True, False), (2, 2, 4, 128, 1000, 37, "bfloat16", False, False),
         (1, 1, 3, 64, 33000, 37, "float16", False, False), (1, 2, 4, 128, 33000, 37, "bfloat16", True, False),
         (2, 2, 3, 64, 1000, 37, "float16", False, True), (2, 2, 4, 128, 1000, 1, "bfloat16", True, True),
         (1, 2, 4, 128, 33000, 37, "float16", False, True), (1, 1, 3, 64, 33000, 0, "bfloat16", False, True),
         (2, 2, 3, 64, 1000, 37, "float32", False, True), (1, 2, 4, 128, 33000, 37, "float32", True, True)]
DRY_CASES = [(1, 2, 3, 64, 100, 5, "float16", True, False), (1, 1, 4, 128, 70, 0, "bfloat16", False, False),
             (1, 2, 3, 64, 100, 5, "float16", True, True), (1, 1, 3, 64, 100, 5, "float32", False, True)]
TOLERANCE = 2e-2  # max abs error against the fp32 reference: 16-bit operands and output
# launch configurations of the grouped kernel timed per shape (the first, {}, is GROUPED_CONFIG's),
# while the run is within CONFIG_BUDGET_S seconds
CONFIGS = [dict(), dict(num_stages=2), dict(block_n=128), dict(block_n=64), dict(programs_per_sm=8),
           dict(num_warps=2, block_n=32), dict(num_warps=1, block_n=32, programs_per_sm=8)]
CONFIG_BUDGET_S = 70


# -- a read-only kernel over the same bytes ----------------------------------------------------------------


@triton.jit
def _stream_kernel(ptr, n_words, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Each program xors ``ITERS`` blocks of 32-bit words (strided by the grid) and stores one word."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = (i * tl.num_programs(0) + pid) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, 0))


def stream_call(tensors: list, device: torch.device):
    """A function reading every byte of ``tensors`` (copied once into one int32 buffer) once."""
    flat = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors])
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 4)]).view(torch.int32)
    block, programs = 1024, 4 * (torch.cuda.get_device_properties(device).multi_processor_count
                                 if device.type == "cuda" else 1)
    iters = triton.cdiv(flat.numel(), block * programs)
    out = torch.empty(programs, dtype=torch.int32, device=device)
    return lambda: _stream_kernel[(programs,)](flat, flat.numel(), out, BLOCK=block, ITERS=iters)


# -- timing ------------------------------------------------------------------------------------------------


def timed(fn, device: torch.device, reps: int = 20, calls: int = 10) -> float:
    """Seconds per call: on CUDA ``calls`` calls captured in a CUDA graph, median of ``reps`` replays
    (``sweep_triton_decode.timed``); on CPU (dry run) one call's wall-clock time."""
    if device.type == "cuda":
        from sweep_triton_decode import timed as graph_timed

        return graph_timed(fn, reps, calls)
    fn()  # compile
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the checks --------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    info = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    return info


def packed(b, hkv, group, d, tokens, tail, dtype, device, seed=0):
    """Query, fp K/V, their 4-bit NQTensors (blocks of 64, one-byte E5M3 scales as the 4-bit presets
    store them) and fp tails."""
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(b, hkv, tokens, d, device=device, generator=g).to(dtype)
    v = torch.randn(b, hkv, tokens, d, device=device, generator=g).to(dtype)
    q = torch.randn(b, hkv * group, 1, d, device=device, generator=g).to(dtype)
    K, V = (NQTensor.from_float(x, block=64, bits=4, scale_dtype=E5M3) for x in (k, v))
    kt = vt = None
    if tail:
        kt = torch.randn(b, hkv, tail, d, device=device, generator=g).to(dtype)
        vt = torch.randn(b, hkv, tail, d, device=device, generator=g).to(dtype)
    return q, k, v, K, V, kt, vt


def key_bias(q: torch.Tensor, n_hist: int, n_tail: int, capacity: int | None = None, seed: int = 1):
    """A RoPE-centred cache's key bias for ``q`` over ``n_hist`` history slots (of ``capacity``,
    default ``n_hist``, the tensors hold) and ``n_tail`` tail tokens: weights ``(b, hq, 1, d)`` from a
    random key centre, the ``[cos | sin]`` table of head_dim's RoPE angles, and the positions of the
    key columns (history: one run after 4 sinks; tail: the sinks, then a shuffled window; then
    unread padding up to ``capacity + n_tail``). Returns ``((w, table, positions), dense)`` with
    ``dense`` the ``(b, hq, 1, n_hist + n_tail)`` offsets computed in torch."""
    from nqkv_core.transform import rope_bias_weights

    capacity = n_hist if capacity is None else capacity
    b, hq, _, d = q.shape
    g = torch.Generator(device=q.device).manual_seed(seed)
    mu = 2 * torch.randn(b, hq, 1, d, device=q.device, generator=g)
    w = rope_bias_weights(q, mu, d ** -0.5)
    n_pos = n_hist + n_tail + 8
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=q.device).float() / d)
    ang = torch.arange(n_pos, device=q.device).float()[:, None] * inv_freq[None, :]
    table = torch.cat([ang.cos(), ang.sin()], dim=-1)
    window = 4 + n_hist + torch.randperm(n_pos - 4 - n_hist, device=q.device, generator=g)
    read = torch.cat([torch.arange(4, 4 + n_hist, device=q.device), torch.arange(4, device=q.device), window])
    read = read[: n_hist + n_tail]
    positions = torch.cat([read, read.new_zeros(capacity - n_hist)])
    return (w, table, positions), (w @ table.T).index_select(-1, read)


def correctness(cases, device: torch.device) -> list[dict]:
    """Max abs error of the grouped kernel against the reference per case; with device lengths the
    tensors hold 7 more history tokens than the lengths let it read; with a key bias the reference
    takes it as a dense additive mask, and the kernel's merge also applies a cache's output transform
    (value rotation and centre), which the reference applies in torch."""
    from nqkv_core.transform import output_transform, rotation

    rows = []
    for b, hkv, group, d, tokens, tail, dname, lens, bias in cases:
        dtype = getattr(torch, dname)
        extra = 7 if lens else 0
        q, _, _, K, V, kt, vt = packed(b, hkv, group, d, tokens + extra, tail, dtype, device)
        lengths = torch.tensor([[tokens, tail]] * b, dtype=torch.int32, device=device) if lens else None
        parts, dense = key_bias(q, tokens, tail, tokens + extra) if bias else (None, None)
        transform = None
        if bias:
            g = torch.Generator(device=device).manual_seed(2)
            transform = (rotation(d, device=device), torch.randn(b, hkv, 1, d, device=device, generator=g))
        out = triton_decode_grouped.launch(q, K.codes, K.absmax, K.codebook, 64, V.codes, V.absmax, V.codebook,
                                           kt, vt, None, d ** -0.5, False, lengths=lengths, key_bias=parts,
                                           out_transform=transform)
        n = tokens
        ref = triton_decode.reference(q, K.codes[:, :, :n], K.absmax[:, :, :n], K.codebook, 64, 3,
                                      V.codes[:, :, :n], V.absmax[:, :, :n], V.codebook, 64, 3, kt, vt, dense,
                                      d ** -0.5, False)
        if transform is not None:
            ref = output_transform(ref.float(), *transform)
        err = float((out.float() - ref.float()).abs().max())
        rows.append(dict(batch=b, kv_heads=hkv, group=group, head_dim=d, tokens=tokens, tail=tail, dtype=dname,
                         device_lengths=lens, key_bias=bias, output_transform=bias, max_abs_err=err,
                         ok=bool(err <= TOLERANCE)))
        print(f"correctness {rows[-1]}", flush=True)
    return rows


def time_configs(shape, grouped_call, device: torch.device, deadline: float) -> dict:
    """Seconds per call of the grouped kernel under each of :data:`CONFIGS` (one output checked
    against the default's), as long as the clock is before ``deadline``."""
    saved = dict(triton_decode_grouped.GROUPED_CONFIG)
    times, first = {}, None
    try:
        for cfg in CONFIGS:
            if times and time.monotonic() > deadline:
                break
            triton_decode_grouped.GROUPED_CONFIG.update(saved, **cfg)
            out = grouped_call().float().clone()
            if first is None:
                first = out
            elif not torch.allclose(out, first, atol=2e-3, rtol=0):
                raise AssertionError(f"configuration {cfg} computes something else at {shape}")
            times[json.dumps(cfg)] = timed(grouped_call, device)
    finally:
        triton_decode_grouped.GROUPED_CONFIG.clear()
        triton_decode_grouped.GROUPED_CONFIG.update(saved)
    return times


def time_shape(shape, device: torch.device, deadline: float) -> dict:
    """Times and bandwidths of the grouped kernel (its best configuration), the split-K kernel,
    SDPA fp16 and the stream."""
    b, hkv, group, d, tokens = shape
    dtype = torch.float16
    q, k, v, K, V, _, _ = packed(b, hkv, group, d, tokens, 0, dtype, device)
    scale = d ** -0.5
    out = torch.empty_like(q)
    lengths = torch.tensor([[tokens, 0]] * b, dtype=torch.int32, device=device)
    max_splits = max(4, triton_decode_grouped.GROUPED_CONFIG["max_splits"])  # (any configuration's splits)
    work = (torch.empty(b * hkv * max_splits * group * d, device=device),
            torch.empty(b * hkv * max_splits * group, device=device))

    def grouped():
        splits = triton_decode_grouped.default_splits(b, hkv, device)  # (the configuration's)
        return triton_decode_grouped.launch(q, K.codes, K.absmax, K.codebook, 64, V.codes, V.absmax, V.codebook,
                                            None, None, None, scale, False, lengths=lengths, num_splits=splits,
                                            out=out, workspace=work)

    parts, _ = key_bias(q, tokens, 0)
    splits = triton_decode_grouped.default_splits(b, hkv, device)

    def grouped_bias():  # the RoPE-centre key bias computed in the kernel
        return triton_decode_grouped.launch(q, K.codes, K.absmax, K.codebook, 64, V.codes, V.absmax, V.codebook,
                                            None, None, None, scale, False, lengths=lengths, num_splits=splits,
                                            out=out, workspace=work, key_bias=parts)

    def grouped_dense_bias():  # the same bias built in torch and read as a dense additive mask
        w, table, positions = parts
        mask = (w @ table.T).index_select(-1, positions)
        return triton_decode_grouped.launch(q, K.codes, K.absmax, K.codebook, 64, V.codes, V.absmax, V.codebook,
                                            None, None, mask, scale, False, lengths=lengths, num_splits=splits,
                                            out=out, workspace=work)

    call = (q, K.codes, K.absmax, K.codebook, 64, 3, V.codes, V.absmax, V.codebook, 64, 3, None, None, None, scale,
            False)
    qf = q.view(b, hkv, group, d)  # a KV head's query rows as its query tokens: plain SDPA over the cache
    row = dict(batch=b, kv_heads=hkv, group=group, head_dim=d, tokens=tokens,
               splits=triton_decode_grouped.default_splits(b, hkv, device))
    packed_bytes = sum(t.nbytes for t in (K.codes, K.absmax, V.codes, V.absmax))
    configs = time_configs(shape, grouped, device, deadline)
    best = min(configs, key=configs.get)
    row["grouped_us"], row["grouped_default_us"] = configs[best] * 1e6, next(iter(configs.values())) * 1e6
    row["grouped_best_config"], row["grouped_configs_us"] = best, {c: t * 1e6 for c, t in configs.items()}
    row["grouped_bias_us"] = timed(grouped_bias, device) * 1e6
    row["grouped_dense_bias_us"] = timed(grouped_dense_bias, device) * 1e6
    q32 = q.float()

    def split_k_fp32_dense_bias():  # a RoPE-centred cache's CUDA path with fp32 queries
        w, table, positions = parts
        return triton_decode.flash_decode(q32, *call[1:13], (w @ table.T).index_select(-1, positions), scale, False)

    row["split_k_fp32_dense_bias_us"] = timed(split_k_fp32_dense_bias, device) * 1e6
    row["split_k_us"] = timed(lambda: triton_decode.flash_decode(*call), device) * 1e6
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            row["sdpa_fp16_us"] = timed(lambda: F.scaled_dot_product_attention(qf, k, v), device) * 1e6
    else:
        row["sdpa_fp16_us"] = timed(lambda: F.scaled_dot_product_attention(qf, k, v), device) * 1e6
    row["stream_us"] = timed(stream_call([K.codes, K.absmax, V.codes, V.absmax], device), device) * 1e6
    for key, nbytes in (("grouped", packed_bytes), ("split_k", packed_bytes), ("stream", packed_bytes),
                        ("sdpa_fp16", k.nbytes + v.nbytes)):
        row[f"{key}_gbs"] = nbytes / (row[f"{key}_us"] * 1e-6) / 1e9
    row["grouped_vs_sdpa"] = row["sdpa_fp16_us"] / row["grouped_us"]
    row["grouped_default_vs_sdpa"] = row["sdpa_fp16_us"] / row["grouped_default_us"]
    row["grouped_vs_split_k"] = row["split_k_us"] / row["grouped_us"]
    print(f"timing {row}", flush=True)
    return row


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Grouped decode check{' (dry run: interpreter, not a measurement)' if report['dry_run'] else ''}",
             "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "## Correctness (max abs error against the fp32 reference; tolerance "
             f"{TOLERANCE})", "",
             "| batch | kv heads | group | head_dim | tokens | tail | dtype | device lengths | key bias and output"
             " transform | max abs err | ok |", "|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|"]
    for r in report["correctness"]:
        lines.append(f"| {r['batch']} | {r['kv_heads']} | {r['group']} | {r['head_dim']} | {r['tokens']} |"
                     f" {r['tail']} | {r['dtype']} | {r['device_lengths']} | {r['key_bias']} | {r['max_abs_err']:.1e} |"
                     f" {r['ok']} |")
    lines += ["", "## Time per call (CUDA graphs of 10 calls, median of 20 replays; GB/s = bytes read / time)", "",
              "| batch | kv heads | group | head_dim | tokens | grouped us (default config) | grouped us (best) |"
              " GB/s | grouped + key bias us (in kernel, as a dense mask) | split-K fp32 + dense bias us |"
              " split-K us | SDPA fp16 us | GB/s |"
              " stream us | stream GB/s | grouped vs SDPA (default, best) | grouped vs split-K | best config |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["timing"]:
        lines.append(f"| {r['batch']} | {r['kv_heads']} | {r['group']} | {r['head_dim']} | {r['tokens']} |"
                     f" {r['grouped_default_us']:.1f} | {r['grouped_us']:.1f} | {r['grouped_gbs']:.0f} |"
                     f" {r['grouped_bias_us']:.1f}, {r['grouped_dense_bias_us']:.1f} |"
                     f" {r['split_k_fp32_dense_bias_us']:.1f} | {r['split_k_us']:.1f} |"
                     f" {r['sdpa_fp16_us']:.1f} | {r['sdpa_fp16_gbs']:.0f} |"
                     f" {r['stream_us']:.1f} | {r['stream_gbs']:.0f} |"
                     f" {r['grouped_default_vs_sdpa']:.2f}x, {r['grouped_vs_sdpa']:.2f}x |"
                     f" {r['grouped_vs_split_k']:.2f}x | {r['grouped_best_config']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny sizes")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    report = dict(dry_run=args.dry_run, environment=environment(device), correctness=[], timing=[])

    def save():
        (args.out / "gpu_decode_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "gpu_decode_check.md").write_text(markdown(report))

    report["correctness"] = correctness(DRY_CASES if args.dry_run else CASES, device)
    save()
    if not args.skip_timing:
        deadline = time.monotonic() + CONFIG_BUDGET_S
        for shape in DRY_SHAPES if args.dry_run else SHAPES:
            report["timing"].append(time_shape(shape, device, deadline))
            save()  # (what was measured survives a timeout)
    print(markdown(report))
    if not all(r["ok"] for r in report["correctness"]):
        raise SystemExit("the grouped kernel disagrees with the reference")


if __name__ == "__main__":
    main()
