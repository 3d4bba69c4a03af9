"""What 8-bit block scales would cost in quality and give in memory: a simulation, not a format.

The presets store one fp16 scale per block of 64 (0.25 bits per element); an 8-bit scale would
take 0.125. This script measures the quality side before any storage changes: the default preset
is evaluated by fake quantization with each block's scale rounded *up* to the grid of an 8-bit code
instead of to fp16 (the codes are then chosen against that scale, as an encoder would), by the
mean KL divergence of its next-token distributions from full precision's and their top-1
agreement at every position of ``--windows`` windows (``nqkv_core.lab.evaluate.logit_fidelity``:
far less noisy than perplexity, which rounding perturbs by a few hundredths either way), and by
perplexity. The bytes are those of a cache of SmolLM2-135M's shape holding ``--context`` tokens
(``cache_memory.py``) with its block scales counted at 8 bits. Grids:

* ``fp16``: the stored format (the reference);
* ``log8``: 256 levels 2^(k/16), a sixteenth of an octave apart (16 octaves; the range would be
  placed per layer and head, which this simulation leaves unbounded);
* ``e4m3``: fp8 with 3 mantissa bits (steps of 6-12%), also unbounded in range.

    python benchmarks/scale_bits.py --fp-window 16 32
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_memory import filled, smollm2_config  # noqa: E402  (a sibling script)

from nqkv_core import native, quantize  # noqa: E402
from nqkv_core.lab.evaluate import logit_fidelity, register_attention  # noqa: E402
from nqkv_core.lab.models import DEFAULT_MODEL, load_model, load_text, token_windows  # noqa: E402
from nqkv_core.scheme import default_scheme  # noqa: E402


def log8(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax`` rounded up to the grid 2^(k/16) (zero stays zero)."""
    a = absmax.double()
    s = torch.exp2(torch.ceil(torch.log2(a.clamp_min(1e-30)) * 16 - 1e-9) / 16)
    return torch.where(a > 0, torch.maximum(s, a), a).float()


def e4m3(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax`` rounded up to 3 mantissa bits (zero stays zero)."""
    a = absmax.double()
    e = torch.floor(torch.log2(a.clamp_min(1e-30)))
    step = torch.exp2(e - 3)
    s = torch.ceil(a / step) * step
    return torch.where(a > 0, torch.maximum(s, a), a).float()


GRIDS = {"fp16": None, "log8": log8, "e4m3": e4m3}


@contextlib.contextmanager
def scale_grid(grid):
    """Fake quantization with block scales rounded up to ``grid`` (then to fp16, upward, so the
    stored scale still bounds the block). The torch encoder is used: the native one rounds itself."""
    if grid is None:
        yield
        return
    real_round_up, real_supported = quantize._round_up, native.quantize_rows_supported
    quantize._round_up = lambda absmax, dtype: real_round_up(grid(absmax), dtype)
    native.quantize_rows_supported = lambda *a: False
    try:
        yield
    finally:
        quantize._round_up, native.quantize_rows_supported = real_round_up, real_supported


def scale_bytes(cache) -> int:
    """Bytes of the block scales a cache holds (fp16)."""
    return sum(layer.k_body[1].nbytes + layer.v_body[1].nbytes for layer in cache.layers
               if len(layer.k_body) == 2 and len(layer.v_body) == 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model to evaluate (as nqkv eval --model)")
    ap.add_argument("--text-file", default=None, help="corpus (as nqkv eval --text-file)")
    ap.add_argument("--bits", type=int, default=4, help="NQKV preset width")
    ap.add_argument("--fp-window", type=int, nargs="+", default=[16, 32], help="full-precision windows")
    ap.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS), help="scale grids")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--window-len", type=int, default=1024, help="tokens per evaluation window")
    ap.add_argument("--context", type=int, default=2048, help="tokens held by the cache whose bytes are counted")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schemes = [default_scheme(args.bits, 64, window=w) for w in args.fp_window]
    lm = load_model(args.model, attn_implementation=register_attention())
    windows = token_windows(lm.tokenizer, load_text(args.text_file), args.window_len, args.windows)
    results = {}
    with tqdm(total=len(args.grids) * len(windows) * (len(schemes) + 1), desc="scale grids", unit="pass") as bar:
        for grid in args.grids:
            with scale_grid(GRIDS[grid]):
                results[grid] = logit_fidelity(lm.model, windows, schemes, progress=bar)
    config = smollm2_config(30)
    fp16 = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * args.context
    print(f"\n{args.windows} x {args.window_len} tokens; bytes: SmolLM2-135M-shaped cache of {args.context} tokens,"
          " bf16 model, scales at 16 bits (fp16) or 8 (the others)\n")
    print(f"| scheme | scales | KL from fp (1e-3 nats) | top-1 agreement | PPL | fp16 / nbytes at {args.context} |")
    print("|---|---|---:|---:|---:|---:|")
    for i, s in enumerate(schemes):
        cache = filled(s, config, args.context, torch.bfloat16)
        for grid in args.grids:
            held = cache.nbytes - (0 if grid == "fp16" else scale_bytes(cache) // 2)
            row = results[grid][i]
            print(f"| {s.name} | {grid} | {1e3 * row.kl:.2f} | {100 * row.agree:.2f}% | {row.ppl:.3f} |"
                  f" {fp16 / held:.2f} |", flush=True)


if __name__ == "__main__":
    main()
