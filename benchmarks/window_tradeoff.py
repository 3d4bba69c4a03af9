"""Quality against memory of the full-precision window: perplexity and cache bytes per window size.

For each width (``--bits``) and each window (``--fp-window``) at ``--sinks`` sinks, the default preset
(``default_scheme(bits, window=W)``) is evaluated on ``--windows`` windows of ``--window-len`` tokens of
the corpus (fake quantization, as ``nqkv eval``), and an NQKV cache of SmolLM2-135M's shape holding
``--context`` tokens is filled as in ``cache_memory.py``: its ``nbytes`` counts every tensor it holds.
The cache always attends the current token exactly, so its window is at least 1 (window 0 = 1); it
holds ``sinks + window - 1`` tokens in full precision (the ring) beside the body.

    python benchmarks/window_tradeoff.py --bits 4 3 --fp-window 1 8 16 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_memory import filled, smollm2_config  # noqa: E402  (a sibling script)

from nqkv_core.lab.evaluate import evaluate, register_attention  # noqa: E402
from nqkv_core.lab.models import DEFAULT_MODEL, load_model, load_text, token_windows  # noqa: E402
from nqkv_core.scheme import default_scheme  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model to evaluate (as nqkv eval --model)")
    ap.add_argument("--text-file", default=None, help="corpus (as nqkv eval --text-file)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3], help="NQKV preset widths")
    ap.add_argument("--fp-window", type=int, nargs="+", default=[1, 8, 16, 32], help="full-precision windows")
    ap.add_argument("--sinks", type=int, default=4, help="full-precision sink tokens")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--window-len", type=int, default=1024, help="tokens per evaluation window")
    ap.add_argument("--context", type=int, default=2048, help="tokens held by the cache whose bytes are counted")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="dtype of the model whose cache bytes are counted (its exact tokens' width)")
    ap.add_argument("--bytes-only", action="store_true", help="count the bytes, skip the perplexity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schemes = [default_scheme(b, 64, sinks=args.sinks, window=w) for b in args.bits for w in args.fp_window]
    rows, fp = [None] * (len(schemes) + 1), float("nan")
    if not args.bytes_only:
        lm = load_model(args.model, attn_implementation=register_attention())
        windows = token_windows(lm.tokenizer, load_text(args.text_file), args.window_len, args.windows)
        rows = evaluate(lm.model, windows, schemes, desc="window trade-off")
        fp = rows[0].ppl
    config = smollm2_config(30)
    fp16 = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * args.context
    print(f"\nfull precision: PPL {fp:.3f} ({args.windows} x {args.window_len} tokens);"
          f" bytes: SmolLM2-135M-shaped cache of {args.context} tokens, {args.dtype} model\n")
    print(f"| scheme | window | exact tokens | PPL | PPL - fp | fp16 / nbytes at {args.context} |")
    print("|---|---:|---:|---:|---:|---:|")
    for s, row in zip(schemes, rows[1:]):
        exact = s.sinks + max(s.window, 1) - 1
        ratio = fp16 / filled(s, config, args.context, getattr(torch, args.dtype)).nbytes
        ppl = f"{row.ppl:.3f} | {row.ppl - fp:+.3f}" if row is not None else "- | -"
        print(f"| {s.name} | {s.window} | {exact} | {ppl} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
