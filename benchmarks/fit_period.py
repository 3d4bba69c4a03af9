"""Quality after a short first forward: the fit period against fitting on the first forward.

A cache fits its frozen transform on a sequence's first ``scheme.fit_tokens`` tokens, keeping them
exact until then (the fit period, ``nqkv_core.cache.fitting``); a preallocated cache whose compiled
steps are traced fits on its first forward instead, however short. Both run here on the same
WikiText-2 windows of SmolLM2-135M: each window is fed as a first forward of ``f`` tokens and then
the rest in one forward, and the mean next-token NLL over positions ``>= --score-from`` is compared
with full precision's. With the fit period the result does not depend on ``f``.

    python benchmarks/fit_period.py --windows 8 --firsts 3 5 8 16 128
"""

from __future__ import annotations

import argparse

import torch

from nqkv_core.cache import enable
from nqkv_core.lab.models import cache_arg, load_model, load_text, token_windows


def window_nll(model, x: torch.Tensor, first: int, cache, score_from: int) -> float:
    """Mean NLL of ``x``'s tokens from ``score_from`` on, fed as ``x[:first]`` then the rest."""
    with torch.no_grad():
        if cache is None:
            logits = model(x).logits
        else:
            parts = [model(x[:, :first], **cache_arg(cache), use_cache=True).logits,
                     model(x[:, first:], **cache_arg(cache), use_cache=True).logits]
            logits = torch.cat(parts, dim=1)
    lg = logits[0, score_from - 1 : -1].float()
    return torch.nn.functional.cross_entropy(lg, x[0, score_from:]).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 windows")
    ap.add_argument("--window-len", type=int, default=640, help="tokens per window")
    ap.add_argument("--score-from", type=int, default=128, help="first scored position")
    ap.add_argument("--firsts", type=int, nargs="+", default=[3, 5, 8, 16, 128], help="first forward lengths")
    ap.add_argument("--bits", type=int, default=4, help="preset width")
    ap.add_argument("--text-file", default=None, help="corpus (default: WikiText-2 raw test)")
    args = ap.parse_args()
    lm = load_model()
    model = lm.model
    windows = token_windows(lm.tokenizer, load_text(args.text_file), args.window_len, args.windows)
    nq = enable(model, bits=args.bits)
    print(f"{nq.scheme.name}: fit_tokens {nq.scheme.fit_tokens}; {len(windows)} windows of {args.window_len},"
          f" NLL from position {args.score_from}\n")
    fp = [window_nll(model, w[None], 0, None, args.score_from) for w in windows]
    print("| first forward | ΔNLL, fit period | ΔNLL, fit on the first forward |")
    print("|---:|---:|---:|")
    for f in args.firsts:
        period, first = [], []
        for w, ref in zip(windows, fp):  # interleaved: one window of each, then the next
            period.append(window_nll(model, w[None], f, nq.new_cache(), args.score_from) - ref)
            legacy = nq.new_cache(max_cache_len=args.window_len, compiled_step="traced")
            first.append(window_nll(model, w[None], f, legacy, args.score_from) - ref)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(f"| {f} | {mean(period):+.4f} | {mean(first):+.4f} |", flush=True)


if __name__ == "__main__":
    main()
