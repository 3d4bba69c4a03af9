"""Decode step time and cache memory on a CUDA GPU: NQKVCache vs transformers' 16-bit caches.

The model is SmolLM2-135M's architecture (its config: 30 layers, 9 query / 3 KV heads of 64) with
random weights in ``--dtype``: a step's time does not depend on the weights, and the GGUF file of
the real model needs packages a GPU machine may lack (``--gguf`` loads the real weights instead).
Every variant runs on the same model in one process:

* ``DynamicCache eager``: transformers' default cache (16-bit, grows by concatenation), SDPA;
* ``NQKV eager``: ``NQKVCache`` with the ``--bits`` preset, attention through the ``nqkv`` op
  (the Triton split-K decode kernel reading the packed codes);
* ``StaticCache compiled``: transformers' preallocated 16-bit cache, the decode step compiled
  with ``torch.compile(fullgraph=True, mode=--mode)`` (``reduce-overhead``: CUDA graphs);
* ``NQKV compiled``: ``NQKVCache`` preallocated (``max_cache_len``), compiled the same way.

For each context and batch, each variant: an eager prefill of ``context`` random tokens (logits of
the last only) fills its cache; the bytes the cache holds (exact, from its tensors) and the
device's peak memory are recorded; then ``--warmup`` steps (compilation, graph capture) and
``--steps`` timed single-token steps (device synchronised around each; the median is kept). The
first step's logits of each NQKV variant are compared with the eager NQKV step's (same cache
contents), so a compiled GPU step that computes something else shows up as an error.

Output: a Markdown table on stdout and, with ``--out``, a CSV and the table in that folder.

    python benchmarks/bench_gpu_decode.py --contexts 4096 16384 32768 --batches 1 8 --out results/gpu
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench_compiled_decode import make_cache  # (benchmarks/, beside this file)
from nqkv_core.cache import enable
from nqkv_core.lab.models import cache_keyword

CACHE = cache_keyword()  # cache= from transformers 5.24 on, past_key_values= before

# SmolLM2-135M-Instruct's architecture (the config transformers reads from the GGUF file).
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)
VARIANTS = ("DynamicCache eager", "NQKV eager", "StaticCache compiled", "NQKV compiled")


def build_model(args: argparse.Namespace, max_positions: int) -> torch.nn.Module:
    dtype = getattr(torch, args.dtype)
    if args.gguf:
        from nqkv_core.lab.models import load_model

        return load_model(dtype=dtype, device=args.device).model
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(SMOLLM2_135M, max_position_embeddings=max_positions)
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> int:
    """Bytes of the tensors the cache holds (allocated storage)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


@torch.no_grad()
def measure(model, nq, name: str, context: int, batch: int, args) -> dict:
    device = torch.device(args.device)
    compiled = name.endswith("compiled")
    cache = make_cache(model, nq, name, total=context + args.warmup + args.steps + 1)
    g = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(100, 20000, (batch, context), generator=g, device=device)
    tok = torch.full((batch, 1), 42, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    model(prompt, use_cache=True, **{CACHE: cache}, logits_to_keep=1)
    sync(device)
    prefill = time.perf_counter() - t0

    def step(t, c):
        return model(t, use_cache=True, **{CACHE: c}).logits

    if compiled:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters["inductor"].clear()
        fn = torch.compile(step, fullgraph=True, mode=None if args.mode == "default" else args.mode)
    else:
        fn = step
    if compiled and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    t0 = time.perf_counter()
    first = fn(tok, cache).float().clone()  # the first step: compilation for compiled variants
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        if compiled and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        fn(tok, cache)
    times = []
    for _ in range(args.steps):
        if compiled and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        sync(device)
        t0 = time.perf_counter()
        fn(tok, cache)
        sync(device)
        times.append(time.perf_counter() - t0)
    row = dict(context=context, batch=batch, variant=name, step_ms=1e3 * statistics.median(times),
               prefill_s=prefill, first_step_s=first_s, cache_MiB=cache_bytes(cache) / 2**20,
               peak_MiB=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan"))
    if compiled:  # CUDA graphs that inductor declined to use (mutated inputs, CPU tensors, ...)
        row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    del cache
    return row, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--compiled-contexts", type=int, nargs="*", default=None,
                    help="contexts at which the compiled variants run too (default: all)")
    ap.add_argument("--bits", type=int, default=4, help="NQKV preset width")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--mode", default="reduce-overhead", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, graph capture)")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (a quick check); 0 = the model's")
    ap.add_argument("--gguf", action="store_true", help="load the real SmolLM2 weights (needs gguf)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--decode-config", type=Path, default=None,
                    help="JSON launch configuration of the Triton decode kernel (benchmarks/sweep_triton_decode.py)")
    ap.add_argument("--out", type=Path, default=None, help="folder for decode.csv and decode.md")
    args = ap.parse_args()
    if args.decode_config is not None and args.decode_config.is_file():
        from nqkv_core.ops import triton_decode

        triton_decode.DECODE_CONFIG.update(json.loads(args.decode_config.read_text()))
        print("Triton decode configuration", triton_decode.DECODE_CONFIG)

    model = build_model(args, max(args.contexts) + args.warmup + args.steps + 64)
    nq = enable(model, bits=args.bits)
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, {args.dtype}, scheme `{nq.scheme.name}`, compile mode {args.mode}",
          flush=True)
    rows, refs = [], {}
    # eager variants first, at every size; then the compiled ones (compilation dominates their time)
    plan = [(name, ctx, b) for compiled in (False, True) for ctx in args.contexts for b in args.batches
            for name in args.variants if name.endswith("compiled") == compiled
            and not (compiled and args.compiled_contexts is not None and ctx not in args.compiled_contexts)]
    for name, ctx, b in plan:
        try:
            row, logits = measure(model, nq, name, ctx, b, args)
        except Exception as e:  # one failing variant must not hide the others' figures
            print(f"{ctx} {b} {name}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
            continue
        if name == "NQKV eager":
            refs[ctx, b] = logits
        elif name == "NQKV compiled" and (ctx, b) in refs:
            ref = refs[ctx, b]
            row["logits_vs_eager"] = float((logits - ref).abs().max() / ref.abs().max())
        rows.append(row)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rows.sort(key=lambda r: (r["context"], r["batch"], VARIANTS.index(r["variant"])))
    lines = ["| context | batch | variant | step ms | vs DynamicCache eager | vs StaticCache compiled |"
             " cache MiB | peak MiB | prefill s | first step s |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = {x["variant"]: x["step_ms"] for x in rows if (x["context"], x["batch"]) == (r["context"], r["batch"])}
        ratio = lambda peer: f"{same[peer] / r['step_ms']:.2f}x" if peer in same else "-"  # noqa: E731
        lines.append(f"| {r['context']} | {r['batch']} | {r['variant']} | {r['step_ms']:.2f} |"
                     f" {ratio('DynamicCache eager')} | {ratio('StaticCache compiled')} | {r['cache_MiB']:.0f} |"
                     f" {r['peak_MiB']:.0f} | {r['prefill_s']:.2f} | {r['first_step_s']:.1f} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with open(args.out / "decode.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        (args.out / "decode.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
