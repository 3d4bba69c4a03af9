"""How much greedy agreement a K/V cache loses when it only rounds: the floor of the agreement measure.

Greedy agreement (``nqkv_core.lab.evaluate.agreement``: the fraction of the first 32 generated tokens
equal, position by position, to the full-precision continuation) counts every token after the
first changed one as lost. This measures it for caches that lose (almost) nothing: the fp32 model
with its keys and values rounded to fp16 or bf16 (what an fp16/bf16 ``DynamicCache`` stores), next
to NQKV at 8, 4 and 3 bits and KIVI-style int4, on the same prompts as ``quality_sweep.py --agree`` (taken after the
evaluation windows). Per method: agreement, prompts whose 32 tokens all match, the mean
position of the first changed token, and the teacher-forced next-token agreement
(``nqkv_core.lab.evaluate.next_token_agreement``: each of the 32 positions given the full-precision
prefix, so a changed token costs only itself; the full-precision row checks that a single forward
pass reproduces the incremental greedy run).

    python benchmarks/agreement_floor.py --windows 8 --out results/agreement_floor
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from nqkv_core.lab.evaluate import (agreement, fakequant_attention, greedy_tokens, next_token_agreement,
                                    register_attention)
from nqkv_core.lab.models import DEFAULT_MODEL, load_model, load_text, prompts_after
from nqkv_core.scheme import kivi, nqkv_preset


def rounded_attention(dtype: torch.dtype):
    """Exact attention over keys and values rounded to ``dtype`` (a cache that stores them so)."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        return fakequant_attention(module, query, key.to(dtype).to(key.dtype), value.to(dtype).to(value.dtype),
                                   attention_mask, scaling, dropout, **kwargs)

    return attention


def first_change(tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per prompt, the index of the first token that differs (the length when none does)."""
    differs = tokens != reference
    return torch.where(differs.any(1), differs.int().argmax(1), torch.full_like(differs[:, 0], tokens.shape[1],
                                                                               dtype=torch.long))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model id, local path or .gguf file")
    ap.add_argument("--text-file", default=None, help="corpus (default: WikiText-2 raw test split)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows the prompts come after")
    ap.add_argument("--window-len", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path("results/agreement_floor"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, attn_implementation=register_attention())
    text = load_text(args.text_file)
    prompts = prompts_after(lm.tokenizer, text, args.windows, args.window_len, args.prompt_len, args.prompts)
    t0 = time.perf_counter()
    reference = greedy_tokens(lm.model, prompts, None, args.new_tokens)
    # method -> (scheme, attention function or None for the registered fake quantization)
    methods = {"full precision (teacher-forcing control)": (None, None),
               "K/V rounded to fp16": (None, rounded_attention(torch.float16)),
               "K/V rounded to bf16": (None, rounded_attention(torch.bfloat16)),
               "NQKV-8 S4 W32": (nqkv_preset(8), None), "NQKV-4 S4 W32": (nqkv_preset(4), None),
               "kivi-int4 g32 S4 W32": (kivi(4), None), "NQKV-3 S4 W32": (nqkv_preset(3), None)}
    runs, forced = {}, {}
    for name, (scheme, attention) in methods.items():
        if scheme is not None or attention is not None:
            runs[name] = greedy_tokens(lm.model, prompts, scheme, args.new_tokens, attention)
        forced[name] = next_token_agreement(lm.model, prompts, reference, scheme, attention)
    lines = [f"greedy agreement with the {next(lm.model.parameters()).dtype} model's continuation, "
             f"{args.prompts} prompts x {args.new_tokens} tokens ({time.perf_counter() - t0:.0f} s)", "",
             "| method | agreement | prompts all equal | mean first changed token | next-token agreement |",
             "|---|---:|---:|---:|---:|"]
    rows = []
    for name in methods:
        row = dict(method=name, next_token_agree=forced[name])
        if name in runs:
            first = first_change(runs[name], reference)
            row.update(agree=agreement(runs[name], reference), all_equal=int((first == args.new_tokens).sum()),
                       mean_first_change=float(first.float().mean()))
            lines.append(f"| {name} | {100 * row['agree']:.1f}% | {row['all_equal']} / {args.prompts} |"
                         f" {row['mean_first_change']:.1f} | {100 * row['next_token_agree']:.1f}% |")
        else:
            lines.append(f"| {name} | | | | {100 * row['next_token_agree']:.1f}% |")
        rows.append(row)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python benchmarks/agreement_floor.py " + " ".join(__import__("sys").argv[1:]),
                model=args.model)
    (args.out / "agreement_floor.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    (args.out / "agreement_floor.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
