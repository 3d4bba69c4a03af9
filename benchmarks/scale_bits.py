"""What one-byte block scales cost in quality and give in memory: fp16 against E5M3 scales.

The 4-bit presets store one E5M3 byte per block of 64 (``nqkv_core.quantize.E5M3``: fp16's exponent
and its top three mantissa bits, the nearest byte; 0.125 bits per element), where they stored an
fp16 scale rounded up (0.25). This script measures both on the same windows: the preset with each
``--fp-window`` and each scale format, by fake quantization (the stored codes and scales, decoded),
by the mean KL divergence of its next-token distributions from full precision's and their top-1
agreement at every position of ``--windows`` windows (``nqkv_core.lab.evaluate.logit_fidelity``:
far less noisy than perplexity, which rounding perturbs by a few hundredths either way), and by
perplexity; and the bytes of a cache of SmolLM2-135M's shape holding ``--context`` tokens, every
tensor counted (``cache_memory.py``).

    python benchmarks/scale_bits.py --fp-window 16 20 24 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_memory import filled, smollm2_config  # noqa: E402  (a sibling script)

from nqkv_core.lab.evaluate import logit_fidelity, register_attention  # noqa: E402
from nqkv_core.lab.models import DEFAULT_MODEL, load_model, load_text, token_windows  # noqa: E402
from nqkv_core.quantize import E5M3  # noqa: E402
from nqkv_core.scheme import default_scheme  # noqa: E402

FORMATS = {"fp16": torch.float16, "e5m3": E5M3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model to evaluate (as nqkv eval --model)")
    ap.add_argument("--text-file", default=None, help="corpus (as nqkv eval --text-file)")
    ap.add_argument("--fp-window", type=int, nargs="+", default=[16, 32], help="full-precision windows")
    ap.add_argument("--scales", nargs="+", default=list(FORMATS), choices=list(FORMATS), help="scale formats")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--window-len", type=int, default=1024, help="tokens per evaluation window")
    ap.add_argument("--context", type=int, default=2048, help="tokens held by the cache whose bytes are counted")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schemes = [default_scheme(4, 64, window=w).replace(scale_dtype=FORMATS[f]) for w in args.fp_window
               for f in args.scales]
    lm = load_model(args.model, attn_implementation=register_attention())
    windows = token_windows(lm.tokenizer, load_text(args.text_file), args.window_len, args.windows)
    with tqdm(total=len(windows) * (len(schemes) + 1), desc="schemes", unit="pass") as bar:
        rows = logit_fidelity(lm.model, windows, schemes, progress=bar)
    config = smollm2_config(30)
    fp16 = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * args.context
    print(f"\n{args.windows} x {args.window_len} tokens; bytes: a SmolLM2-135M-shaped cache of {args.context}"
          " tokens of a bf16 model, every tensor counted\n")
    print(f"| scheme | scales | KL from fp (1e-3 nats) | top-1 agreement | PPL | fp16 / nbytes at {args.context} |")
    print("|---|---|---:|---:|---:|---:|")
    for s, row in zip(schemes, rows):
        held = filled(s, config, args.context, torch.bfloat16).nbytes
        fmt = next(k for k, v in FORMATS.items() if v == s.scale_dtype)
        print(f"| {s.name} | {fmt} | {1e3 * row.kl:.2f} | {100 * row.agree:.2f}% | {row.ppl:.3f} | {fp16 / held:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
