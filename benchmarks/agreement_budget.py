"""What greedy agreement costs in fidelity: per-position top-1 agreement and KL divergence from full
precision, across widths, and what 90% free-running agreement would take.

Greedy agreement over 32 free-running tokens (``nqkv_core.lab.evaluate.agreement``) loses every token
after the first changed one, so it is set by how often a single step changes its choice. This
measures that rate where it can be counted precisely: at every position of the evaluation windows
(teacher-forced by the text itself, 8 x 1024 = 8,192 positions on the default run, against 512 for
the greedy prompts), for caches from bf16 rounding down to 3-bit codes, with the mean KL divergence
of each next-token distribution from full precision (``nqkv_core.lab.evaluate.logit_fidelity``). It
then fits how the number of changed positions grows with the KL, and converts the per-step
agreement that 90% over 32 free-running tokens needs (``step_agreement_needed``: changes
independent, everything after the first lost) into the KL, and so the error, a cache may have.

``--per-layer N`` adds, on the last N windows of the corpus (which no evaluation window reaches),
the KL and changed positions when one layer alone is stored at ``--layer-bits`` and every other
layer exactly: whether a few layers cause most of the changes (then widening them would be cheap)
or all share them.

    python benchmarks/agreement_budget.py --windows 8 --per-layer 4 --out results/agreement_budget --plot-png docs/agreement_budget.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nqkv_core.lab.evaluate import logit_fidelity, num_layers, register_attention, step_agreement_needed
from nqkv_core.lab.models import DEFAULT_MODEL, calibration_windows, load_model, load_text, token_windows
from nqkv_core.scheme import FP_BITS, kivi, nqkv_preset

sys.path.insert(0, str(Path(__file__).parent))
from agreement_floor import rounded_attention  # noqa: E402  (benchmarks/ is not a package)

TARGET = 0.90  # greedy agreement over 32 free-running tokens asked of 4-bit caches (docs/quality.md)


def methods() -> dict:
    """name -> (scheme or None, attention function or None, bits per element or None for the scheme's)."""
    return {
        "K/V rounded to bf16": (None, rounded_attention(torch.bfloat16), 16.0),
        "NQKV-8": (nqkv_preset(8), None, None),
        "NQKV-K8V4": (nqkv_preset(8, v_bits=4), None, None),
        "NQKV-K4V8": (nqkv_preset(4, v_bits=8), None, None),
        "NQKV-4 b32": (nqkv_preset(4, block=32), None, None),
        "NQKV-4": (nqkv_preset(4), None, None),
        "kivi-int4 g32 S4 W32": (kivi(4), None, None),
        "NQKV-K4V3": (nqkv_preset(4, v_bits=3), None, None),
        "NQKV-3": (nqkv_preset(3), None, None),
    }


def fit_power(kl: list[float], flips: list[int]) -> tuple[float, float]:
    """Least-squares ``log flips = a + s log kl``; returns ``(a, s)``."""
    x = torch.tensor([math.log(k) for k in kl], dtype=torch.float64)
    y = torch.tensor([math.log(f) for f in flips], dtype=torch.float64)
    s = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return float(y.mean() - s * x.mean()), s


def plot(rows: list[dict], fit: tuple[float, float], layers: list[dict] | None, layer_bits: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if layers else 1, figsize=(12 if layers else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    for i, r in enumerate(rows):  # labels alternate above right and below left: neighbours are close
        ax.scatter(r["kl"], 100 * r["agree"], color="C3" if r["method"].startswith("kivi") else "C0")
        ax.annotate(r["method"], (r["kl"], 100 * r["agree"]), fontsize=7, textcoords="offset points",
                    xytext=(5, 3) if i % 2 == 0 else (-5, -10), ha="left" if i % 2 == 0 else "right")
    a, s = fit
    positions = rows[0]["positions"]
    ks = torch.logspace(math.log10(min(r["kl"] for r in rows) / 2), math.log10(max(r["kl"] for r in rows) * 2), 50)
    ax.plot(ks, [100 * (1 - math.exp(a + s * math.log(k)) / positions) for k in ks], "k--", lw=0.8,
            label=f"fit: changed positions ~ KL^{s:.2f}")
    need = step_agreement_needed(TARGET)
    ax.axhline(100 * need, color="C2", lw=0.8, label=f"per step for {TARGET:.0%} over 32 free-running tokens")
    ax.set_xscale("log")
    ax.set_xlabel("mean KL(full precision || cache), nats per position")
    ax.set_ylabel("top-1 agreement per position, %")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Next-token fidelity, teacher-forced")
    if layers:
        ax = axes[0][1]
        ax.bar([r["layer"] for r in layers], [r["kl"] for r in layers])
        ax.set_xlabel(f"layer stored at {layer_bits} bits (all others exact)")
        ax.set_ylabel("mean KL, nats per position")
        ax.set_title("One layer at a time (held-out windows)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model id, local path or .gguf file")
    ap.add_argument("--text-file", default=None, help="corpus (default: WikiText-2 raw test split)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--window-len", type=int, default=1024)
    ap.add_argument("--per-layer", type=int, default=0, metavar="N",
                    help="also measure each layer alone on the last N windows of the corpus (0: skip)")
    ap.add_argument("--layer-bits", type=int, default=4, help="width of the one quantized layer (--per-layer)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path("results/agreement_budget"))
    ap.add_argument("--plot-png", type=Path, default=None, help="write the plot here (default: under --out)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(args.model, attn_implementation=register_attention())
    text = load_text(args.text_file)
    windows = token_windows(lm.tokenizer, text, args.window_len, args.windows)
    ms = methods()
    with tqdm(total=len(windows) * (len(ms) + 1), desc="caches", unit="pass") as bar:
        fid = logit_fidelity(lm.model, windows, [m[0] for m in ms.values()], [m[1] for m in ms.values()], bar)
    rows = []
    for (name, (scheme, _, bits)), f in zip(ms.items(), fid):
        rows.append(dict(method=name, bits=bits if bits is not None else scheme.bits_per_element(args.window_len),
                         agree=f.agree, flips=f.flips, positions=f.positions, kl=f.kl))
    fit = fit_power([r["kl"] for r in rows], [r["flips"] for r in rows])
    need = step_agreement_needed(TARGET)
    positions = rows[0]["positions"]
    flips_allowed = (1 - need) * positions
    kl_needed = math.exp((math.log(flips_allowed) - fit[0]) / fit[1])
    nq4 = next(r for r in rows if r["method"] == "NQKV-4")
    lines = [f"{args.windows} windows x {args.window_len} tokens, {positions} positions "
             f"({time.perf_counter() - t0:.0f} s)", "",
             "| cache | bits/elem | top-1 agreement per position | changed positions | mean KL (nats) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['bits']:.3f} | {100 * r['agree']:.2f}% | {r['flips']} | {r['kl']:.2e} |"
              for r in rows]
    lines += ["", f"fit over these rows: changed positions = {math.exp(fit[0]):.3g} x KL^{fit[1]:.3f}",
              f"{TARGET:.0%} over 32 free-running tokens needs {100 * need:.2f}% per step "
              f"({flips_allowed:.0f} changed positions of {positions}), i.e. a mean KL of {kl_needed:.2e}: "
              f"{nq4['kl'] / kl_needed:.1f}x below NQKV-4's ({nq4['kl']:.2e})"]
    layers = None
    if args.per_layer:
        held_out = args.windows * args.window_len + 16 * 256 + 256  # what the evaluation windows and prompts use
        cal = calibration_windows(lm.tokenizer, text, args.window_len, args.per_layer, held_out)
        n = num_layers(lm.model)
        base = nqkv_preset(args.layer_bits)
        alone = [base.replace(layer_bits=tuple(args.layer_bits if j == i else FP_BITS for j in range(n)))
                 for i in range(n)]
        with tqdm(total=len(cal) * (n + 2), desc="one layer at a time", unit="pass") as bar:
            f_all, *f_layers = logit_fidelity(lm.model, cal, [base, *alone], progress=bar)
        layers = [dict(layer=i, kl=f.kl, flips=f.flips) for i, f in enumerate(f_layers)]
        kls = sorted((r["kl"] for r in layers), reverse=True)
        lines += ["", f"one layer at {args.layer_bits} bits, all others exact, on the last {args.per_layer} windows "
                  f"({f_all.positions} positions): all layers quantized KL {f_all.kl:.2e} ({f_all.flips} changed); "
                  f"sum over single layers {sum(kls):.2e}; largest {kls[0]:.2e}, median {kls[len(kls) // 2]:.2e}; "
                  f"the 4 largest are {100 * sum(kls[:4]) / sum(kls):.0f}% of the sum",
                  "", "| layer | KL | changed positions |", "|---:|---:|---:|"]
        lines += [f"| {r['layer']} | {r['kl']:.2e} | {r['flips']} |" for r in layers]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python benchmarks/agreement_budget.py " + " ".join(sys.argv[1:]), model=args.model,
                seconds=time.perf_counter() - t0, fit=dict(log_a=fit[0], slope=fit[1]), step_needed=need,
                kl_needed=kl_needed)
    (args.out / "agreement_budget.json").write_text(json.dumps(dict(meta=meta, rows=rows, layers=layers), indent=1) + "\n")
    (args.out / "agreement_budget.md").write_text("\n".join(lines) + "\n")
    plot(rows, fit, layers, args.layer_bits, args.plot_png or args.out / "agreement_budget.png")


if __name__ == "__main__":
    main()
