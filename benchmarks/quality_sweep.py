"""Sweep of KV-cache storage schemes: perplexity (and optionally greedy agreement) side by side.

Every candidate is a :class:`nqkv_core.scheme.KVScheme`; full precision is always the first row and
the reference of ΔPPL. Candidate sets (``--set``):

* ``explore``: NQKV design choices one at a time at 2/3/4 bits (layout, centring, equalisation,
  rotation, codebook) with 4 sinks and the window of ``--window``.
* ``ablation``: where the 3- and 2-bit error comes from (K vs V), statistics length, block size,
  RoPE-aware key centring.
* ``blocks``: block size (also with 8-bit scales), statistics length, K/V bit split, unbiased
  decoding, signed-scale levels, fitted scales and query-aware key rounding for the best transform.
* ``final``: the recommended presets next to the KIVI-style and uniform baselines at 4/3/2 bits,
  windows 0 / 32 / 64 / 128, plus transformers' quanto ``QuantizedCache`` when ``--quanto``.
* ``layers``: the presets of ``--bits`` and, for each count in ``--layer-widths``, the preset with
  that many of its most sensitive layers one bit wider. Sensitivity (each layer alone quantized)
  is measured on the last ``--calibration-windows`` windows of the text, which the evaluation
  windows and prompts never reach; it is saved with the results and plotted.

Example (the numbers in docs/quality.md)::

    python benchmarks/quality_sweep.py --set final --windows 8 --agree --quanto --out results/final
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nqkv_core.lab.evaluate import (
    evaluate, layer_sensitivity, markdown_table, num_layers, plot_layer_sensitivity, register_attention, save_rows,
    widen_layers,
)
from nqkv_core.lab.models import (
    DEFAULT_MODEL, calibration_windows, chat_prompts_after, load_model, load_text, prompts_after, token_windows,
)
from nqkv_core.scheme import KVScheme, kivi, nqkv_preset, uniform


def _nqkv(bits: int, name: str, **kw) -> KVScheme:
    base = dict(k_bits=bits, v_bits=bits, sinks=4)
    base.update(kw)
    return KVScheme(name, **base)


def explore_set(window: int, bits_list: list[int]) -> list[KVScheme]:
    out: list[KVScheme] = []
    for b in bits_list:
        w = dict(window=window)
        out += [
            kivi(b, window=window),
            uniform(b, window=window),
            _nqkv(b, f"nf{b} pt", **w),
            _nqkv(b, f"nf{b} pt rot", k_rotate=True, v_rotate=True, **w),
            _nqkv(b, f"nf{b} pt cK rot", k_centre=True, k_rotate=True, v_rotate=True, **w),
            _nqkv(b, f"nf{b} pt cKV rot", k_centre=True, v_centre=True, k_rotate=True, v_rotate=True, **w),
            _nqkv(b, f"nf{b} pt cK eqrms rot", k_centre=True, k_equalize="rms", k_rotate=True, v_rotate=True, **w),
            _nqkv(b, f"nf{b} pt cK eqqk rot", k_centre=True, k_equalize="qk", k_rotate=True, v_rotate=True, **w),
            _nqkv(b, f"lloyd{b} pt cK rot", k_quant="lloyd", v_quant="lloyd", k_centre=True, k_rotate=True,
                  v_rotate=True, **w),
            _nqkv(b, f"lloyd{b} pt cK eqqk rot", k_quant="lloyd", v_quant="lloyd", k_centre=True, k_equalize="qk",
                  k_rotate=True, v_rotate=True, **w),
            _nqkv(b, f"nf{b} K-ch32 cK, V pt rot", k_axis="channel", k_block=32, k_centre=True, v_rotate=True, **w),
        ]
    return out


def ablation_set(window: int) -> list[KVScheme]:
    """Where the error comes from (K vs V), stats length, block size, RoPE-aware key centring."""
    b3 = KVScheme("nf3 cKV rot", k_bits=3, v_bits=3, k_centre=True, v_centre=True, k_rotate=True, v_rotate=True,
                  sinks=4, window=window)
    l2 = KVScheme("lloyd2 cK rot", k_bits=2, v_bits=2, k_quant="lloyd", v_quant="lloyd", k_centre=True,
                  k_rotate=True, v_rotate=True, sinks=4, window=window)
    return [
        b3, b3.replace(name="nf3 cKV rot, K at 8 bits", k_bits=8), b3.replace(name="nf3 cKV rot, V at 8 bits", v_bits=8),
        b3.replace(name="nf3 cKV rot, stats over whole window", stats_tokens=4096),
        b3.replace(name="nf3 cKV rot, stats 256", stats_tokens=256),
        b3.replace(name="nf3 cKV rot, block 32", k_block=32, v_block=32),
        b3.replace(name="nf3 cKV rot, V lloyd", v_quant="lloyd"),
        b3.replace(name="nf3 cKV ropeC rot (NQKV-3)", k_centre_rope=True),
        l2, l2.replace(name="lloyd2 cK rot, K at 8 bits", k_bits=8), l2.replace(name="lloyd2 cK rot, V at 8 bits", v_bits=8),
        l2.replace(name="lloyd2 cK rot, block 32", k_block=32, v_block=32),
        l2.replace(name="lloyd2 cK ropeC rot (NQKV-2)", k_centre_rope=True),
        l2.replace(name="lloyd2 cK ropeC rot cV", k_centre_rope=True, v_centre=True),
        l2.replace(name="lloyd2 cK ropeC rot K3V2", k_centre_rope=True, k_bits=3, k_quant="nf"),
    ]


def blocks_set(window: int, bits_list: list[int]) -> list[KVScheme]:
    out: list[KVScheme] = []
    for b in bits_list:
        best = nqkv_preset(b).replace(window=window)
        out.append(best.replace(name=f"{best.name} (preset)"))
        for blk in (32, 128):
            out.append(best.replace(name=f"{best.name} block{blk}", k_block=blk, v_block=blk))
        out.append(best.replace(name=f"{best.name} K block32", k_block=32))  # keys carry most of the error
        out.append(best.replace(name=f"{best.name} stats128", stats_tokens=128))
        out.append(best.replace(name=f"{best.name} stats32", stats_tokens=32))
        out.append(best.replace(name=f"{best.name} biased", unbiased=False))
        # encoders; the one equal to the preset is its "(preset)" row already
        plain = best.replace(k_rounding="nearest", k_fit_scale=False, v_fit_scale=False)
        out.append(plain.replace(name=f"{best.name} signed", k_quant="signed", v_quant="signed"))
        encoders = {
            "nearest, absmax": {}, "fitted scales": dict(k_fit_scale=True, v_fit_scale=True),
            "K query-rounded": dict(k_rounding="query"),
            "K query-rounded, V fitted": dict(k_rounding="query", v_fit_scale=True),
        }
        for label, fields in encoders.items():
            if plain.replace(**fields, name=best.name) != best:
                out.append(plain.replace(**fields, name=f"{best.name} {label}"))
        # smaller blocks at the same scale cost: 8-bit (e4m3) scales, evaluation-only so far
        for blk in (32, 16):
            out.append(best.replace(name=f"{best.name} fp8 scales, block{blk}", k_block=blk, v_block=blk,
                                    scale_dtype=torch.float8_e4m3fn))
        if b < 4:
            out.append(best.replace(name=f"{best.name} K{b + 1}V{b}", k_bits=b + 1))
            out.append(best.replace(name=f"{best.name} K{b}V{b + 1}", v_bits=b + 1))
    return out


def final_set(windows_fp: list[int]) -> list[KVScheme]:
    """Presets and baselines; 2-bit schemes get twice the window (at least 64)."""
    out: list[KVScheme] = []
    for b in (4, 3, 2):
        for w in windows_fp:
            w = max(2 * w, 64) if b == 2 else w
            r = nqkv_preset(b).replace(window=w)
            p = nqkv_preset(b, rope_centre=False).replace(window=w)
            out += [r.replace(name=f"NQKV-{b} S4 W{w}"), p.replace(name=f"NQKV-{b} plain-centre S4 W{w}"),
                    kivi(b, window=w)]
            if b > 2:  # uniform int2 per token diverges (PPL in the hundreds, see the explore table)
                out.append(uniform(b, window=w))
    for kb, vb in ((4, 3), (3, 2)):  # one more bit for keys: the steps between the widths
        for w in windows_fp:
            out.append(nqkv_preset(kb, v_bits=vb).replace(window=w, name=f"NQKV-K{kb}V{vb} S4 W{w}"))
    return out


def layers_set(model, calibration: torch.Tensor, bits_list: list[int], window: int, counts: list[int],
               wide_bits: int | None) -> tuple[list[KVScheme], dict[str, list[float]]]:
    """Each preset and its calibrated versions; also returns each preset's per-layer sensitivity (%)."""
    out: list[KVScheme] = []
    sensitivity: dict[str, list[float]] = {}
    passes = (num_layers(model) + 1) * len(calibration)
    for b in bits_list:
        w = max(2 * window, 64) if b == 2 else window
        base = nqkv_preset(b, window=w)
        base = base.replace(name=f"{base.name} S{base.sinks} W{w}")
        with tqdm(total=passes, desc=f"layer sensitivity {base.name}", unit="win") as bar:
            sens = layer_sensitivity(model, calibration, base, bar)
        sensitivity[base.name] = sens
        print(f"{base.name}: layer sensitivity (ΔPPL %, alone) " + " ".join(f"{i}:{v:+.2f}" for i, v in enumerate(sens)))
        out += [base] + [widen_layers(base, sens, n, wide_bits) for n in counts]
    return out, sensitivity


def _fits_head_dim(s: KVScheme, head_dim: int) -> bool:
    """Whether every quantized per-token block of ``s`` divides ``head_dim``."""
    sides = ((s.k_bits, s.k_axis, s.k_block), (s.v_bits, s.v_axis, s.v_block))
    return all(bits >= 16 or axis == "channel" or head_dim % block == 0 for bits, axis, block in sides)


def plot_curve(json_paths: list[str], png: str) -> None:
    """ΔPPL (%) against bits/element for each method family found in result JSON files."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {"NQKV": [], "KIVI-style": [], "uniform int per token": [], "HF quanto": []}
    seen = set()
    for path in json_paths:
        for r in json.load(open(path))["rows"]:
            if r["ppl"] is None or r["method"] == "full precision" or not r["ppl"] == r["ppl"]:
                continue
            m = r["method"]
            if m in seen or "plain-centre" in m:  # a row repeated by another run; an ablation, not a preset
                continue
            seen.add(m)
            key = ("NQKV" if m.startswith("NQKV") else "KIVI-style" if m.startswith("kivi")
                   else "HF quanto" if "quanto" in m else "uniform int per token" if m.startswith("int") else None)
            if key:
                label = m.split()[0]
                wide = [w for w in m.split() if "@" in w]  # per-layer widths: "L1,17@3b" -> "+2L"
                label += f"+{len(wide[0].split('@')[0].split(','))}L" if wide else ""
                blocks = [w for w in m.split() if w.startswith("block")]  # "block32" -> "NQKV-3 b32"
                label += f" b{blocks[0][5:]}" if blocks else ""
                families[key].append((r["bits"], r["dppl_pct"], label))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, pts), marker in zip(families.items(), "osv^"):
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=name)
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("bits per K/V element (codes + scales + fp sink/window tokens, 1024-token context)")
    ax.set_ylabel("ΔPPL vs full precision (%)")
    ax.grid(True, which="both", lw=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=["explore", "ablation", "blocks", "final", "layers"], default="explore",
                    help="candidate set")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="bit widths (explore/blocks)")
    ap.add_argument("--window", type=int, default=32, help="full-precision recent window (explore/blocks)")
    ap.add_argument("--fp-windows", type=int, nargs="+", default=[32],
                    help="recent windows for --set final (doubled, min 64, at 2 bits)")
    ap.add_argument("--layer-widths", type=int, nargs="+", default=[1, 2, 4],
                    help="numbers of most sensitive layers to widen (--set layers)")
    ap.add_argument("--wide-bits", type=int, default=None, help="width of widened layers (default: one bit more)")
    ap.add_argument("--calibration-windows", type=int, default=2,
                    help="windows at the end of the text on which layer sensitivity is measured (--set layers)")
    ap.add_argument("--only", nargs="*", default=None, help="keep only candidates whose name contains one of these")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model id, local path or .gguf file")
    ap.add_argument("--text-file", default=None, help="corpus (default: WikiText-2 raw test split)")
    ap.add_argument("--windows", type=int, default=2, help="number of evaluation windows")
    ap.add_argument("--window-len", type=int, default=1024, help="tokens per evaluation window")
    ap.add_argument("--agree", action="store_true", help="also measure greedy agreement (32 new tokens per prompt)")
    ap.add_argument("--kl", action="store_true",
                    help="also measure top-1 agreement and KL divergence from full precision at every window position")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for greedy agreement")
    ap.add_argument("--prompt-len", type=int, default=256, help="prompt tokens for greedy agreement")
    ap.add_argument("--chat", action="store_true",
                    help="agreement prompts are instructions in the chat template over passages of --prompt-len tokens")
    ap.add_argument("--quanto", action="store_true", help="add transformers QuantizedCache(quanto) int4/int2 rows")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default="results/sweep", help="output directory for JSON and Markdown")
    ap.add_argument("--plot", nargs="+", default=None, metavar="JSON",
                    help="only plot ΔPPL vs bits/element from these result files (to --plot-png) and exit")
    ap.add_argument("--plot-png", default="docs/quality_curve.png", help="output PNG for --plot")
    args = ap.parse_args()
    if args.plot:
        plot_curve(args.plot, args.plot_png)
        return
    torch.set_num_threads(args.threads)

    if args.set == "explore":
        schemes = explore_set(args.window, args.bits)
    elif args.set == "ablation":
        schemes = ablation_set(args.window)
    elif args.set == "blocks":
        schemes = blocks_set(args.window, args.bits)
    elif args.set == "final":
        schemes = final_set(args.fp_windows)
    else:
        schemes = []  # needs the model: built below
    if args.only:
        schemes = [s for s in schemes if any(o in s.name for o in args.only)]

    lm = load_model(args.model, attn_implementation=register_attention())
    text = load_text(args.text_file)
    windows = token_windows(lm.tokenizer, text, args.window_len, args.windows)
    prompts = None
    if args.agree:  # prompts from the part of the corpus after the evaluation windows
        pick = chat_prompts_after if args.chat else prompts_after
        prompts = pick(lm.tokenizer, text, args.windows, args.window_len, args.prompt_len, args.prompts)
    sensitivity = None
    if args.set == "layers":
        used = args.windows * args.window_len + (args.prompts + 1) * args.prompt_len
        calibration = calibration_windows(lm.tokenizer, text, args.window_len, args.calibration_windows, used)
        schemes, sensitivity = layers_set(lm.model, calibration, args.bits, args.window, args.layer_widths,
                                          args.wide_bits)
        if args.only:
            schemes = [s for s in schemes if any(o in s.name for o in args.only)]
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for s in [s for s in schemes if not _fits_head_dim(s, head_dim)]:
        print(f"skipped {s.name}: its blocks along head_dim do not divide head_dim {head_dim}")
    schemes = [s for s in schemes if _fits_head_dim(s, head_dim)]
    t0 = time.perf_counter()
    rows = evaluate(lm.model, windows, schemes, prompts=prompts, quanto_bits=(4, 2) if args.quanto else (),
                    desc=args.set, fidelity=args.kl)
    meta = {
        "command": "python benchmarks/quality_sweep.py " + " ".join(__import__("sys").argv[1:]),
        "model": args.model, "windows": args.windows, "window_len": args.window_len,
        "seconds": time.perf_counter() - t0,
    }
    if sensitivity is not None:
        meta["layer_sensitivity_pct"] = sensitivity
        meta["calibration_windows"] = f"last {args.calibration_windows} windows of the text"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        print(f"wrote {plot_layer_sensitivity(sensitivity, Path(args.out) / 'layer_sensitivity.png')}")
    print(markdown_table(rows, with_agree=args.agree))
    js, md = save_rows(rows, args.out, args.set, meta)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
