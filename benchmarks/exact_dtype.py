"""Quality of a bf16 model's cache with its sink and window tokens in bf16 against fp32.

A 16-bit model's NQKV cache keeps its exact tokens (sinks, window) in bf16 in the storage basis
(``KVScheme.exact_dtype``); before, it kept them in fp32 at twice the bytes. SmolLM2-135M runs in bf16
on WikiText-2 windows; each window goes through an NQKV cache as a first forward of ``--first``
tokens and then the rest in one forward (each query reads every key as a one-token step at its
position would), once with the exact tokens in bf16 and once in fp32, and through no cache (full
precision, bf16). Printed: the mean next-token NLL over positions ``>= --first`` and the
difference to full precision, per variant, with the cache's bytes at the end of a window.

    python benchmarks/exact_dtype.py --windows 8
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from unittest import mock

import torch

from nqkv_core.cache import enable
from nqkv_core.lab.models import cache_arg, load_model, load_text, token_windows
from nqkv_core.scheme import KVScheme


def fp32_exact_tokens():
    """The previous storage: a transformed scheme's exact tokens in fp32 whatever the model's dtype."""
    return mock.patch.object(KVScheme, "exact_dtype", lambda self, dtype: torch.float32 if self.transformed else dtype)


def window_nll(model, x: torch.Tensor, first: int, nq) -> tuple[float, int]:
    """Mean NLL of ``x``'s tokens from ``first`` on, and the bytes the cache holds (0 without one)."""
    with torch.no_grad():
        if nq is None:
            logits, held = model(x).logits, 0
        else:
            cache = nq.new_cache()
            parts = [model(x[:, :first], **cache_arg(cache), use_cache=True).logits,
                     model(x[:, first:], **cache_arg(cache), use_cache=True).logits]
            logits, held = torch.cat(parts, dim=1), cache.nbytes
    lg = logits[0, first - 1 : -1].float()
    return torch.nn.functional.cross_entropy(lg, x[0, first:]).item(), held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 windows")
    ap.add_argument("--window-len", type=int, default=640, help="tokens per window")
    ap.add_argument("--first", type=int, default=128, help="tokens of the first forward (the rest are scored)")
    ap.add_argument("--text-file", default=None, help="corpus (as nqkv eval --text-file)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(dtype=torch.bfloat16)
    windows = token_windows(lm.tokenizer, load_text(args.text_file), args.window_len, args.windows)
    nq = enable(lm.model)  # the default 4-bit preset
    variants = {"full precision (bf16, no cache)": (None, contextlib.nullcontext),
                "NQKV-4, exact tokens bf16": (nq, contextlib.nullcontext),
                "NQKV-4, exact tokens fp32": (nq, fp32_exact_tokens)}
    nll: dict[str, list[float]] = {k: [] for k in variants}
    held: dict[str, int] = {}
    for x in windows:  # variants interleaved per window
        for name, (cache, ctx) in variants.items():
            with ctx():
                v, held[name] = window_nll(lm.model, x[None], args.first, cache)
            nll[name].append(v)
    fp = statistics.mean(nll["full precision (bf16, no cache)"])
    print(f"SmolLM2-135M in bf16, {args.windows} windows of {args.window_len} tokens, scored from {args.first}\n")
    print("| variant | mean NLL | vs full precision | cache MiB at the end of a window |")
    print("|---|---:|---:|---:|")
    for name in variants:
        m = statistics.mean(nll[name])
        print(f"| {name} | {m:.4f} | {m - fp:+.4f} | {held[name] / 2**20:.2f} |")


if __name__ == "__main__":
    main()
