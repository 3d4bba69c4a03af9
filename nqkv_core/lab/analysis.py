"""How normal are KV-cache blocks? D'Agostino-Pearson K^2 tests, kurtosis, Q-Q plots, histograms.

NF codebooks assume each block, divided by its absmax, looks like Gaussian samples. This module
captures a model's post-RoPE keys and values per layer, cuts them into blocks several ways and
tests every block with ``scipy.stats.normaltest`` (the NQKV paper's test):

* ``token``: one token's head_dim, blocks of ``block`` channels (``axis=-1``, what NQKV stores);
* ``channel``: ``block`` consecutive tokens of one channel (``axis=-2``, the KIVI key layout);
* ``token-centred``: per-token blocks after subtracting each channel's mean over the sequence;
* ``token-rot``: per-token blocks after the random-sign Hadamard rotation of head_dim;
* ``token-centred-rot``: centring, then the rotation (the NQKV key transform).

A block "passes" when its p-value exceeds ``alpha`` (normality is not rejected).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from nqkv_core.scheme import hadamard

CAPTURE_ATTN = "nqkv_capture"
BLOCKINGS = ("token", "channel", "token-centred", "token-rot", "token-centred-rot")


def _capturing_attention(captured: list, queries: bool):
    """An attention function that appends each call's post-RoPE ``(k, v)`` (and ``q`` if ``queries``)
    to ``captured``, in call order (one call per layer), and attends exactly."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        kv = (key.detach().float().cpu(), value.detach().float().cpu())
        captured.append(kv + (query.detach().float().cpu(),) if queries else kv)
        T = query.shape[2]
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=T > 1 and key.shape[2] == T, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    return attend


def register_capture(captured: list | None = None, queries: bool = False) -> str:
    """Register under :data:`CAPTURE_ATTN` an attention function that appends each layer's
    post-RoPE ``(k, v)`` (``(k, v, q)`` with ``queries``) to ``captured`` and attends exactly."""
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_ATTN, _capturing_attention([] if captured is None else captured, queries))
    return CAPTURE_ATTN


@torch.no_grad()
def capture_kv(model: torch.nn.Module, ids: torch.Tensor, queries: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Post-RoPE ``(k, v)`` of every layer for one ``(1, n)`` sequence, each ``(1, kv_heads, n, head_dim)``;
    with ``queries``, ``(k, v, q)`` with ``q`` ``(1, q_heads, n, head_dim)``.

    Switches the model to the capturing attention for the call and restores its previous one.
    """
    prev = model.config._attn_implementation
    captured: list = []
    model.set_attn_implementation(register_capture(captured, queries))
    try:
        model(ids)
        return captured
    finally:
        model.set_attn_implementation(prev)


def blocks_of(x: torch.Tensor, blocking: str, block: int = 64, skip: int = 4) -> torch.Tensor:
    """Blocks ``(n_blocks, block)`` of ``x`` ``(batch, heads, tokens, head_dim)`` for a blocking.

    The first ``skip`` tokens (attention sinks, kept exact by the schemes) are left out.
    """
    if blocking not in BLOCKINGS:
        raise ValueError(f"blocking must be one of {BLOCKINGS}, got {blocking!r}")
    if x.shape[-1] % block and blocking != "channel":
        raise ValueError(f"blocks of {block} do not divide head_dim {x.shape[-1]}; pass a --block that does")
    x = x[..., skip:, :].float()
    if "centred" in blocking:
        x = x - x.mean(dim=-2, keepdim=True)
    if blocking.endswith("rot"):
        x = x @ hadamard(x.shape[-1], device=x.device)
    if blocking == "channel":
        n = x.shape[-2] - x.shape[-2] % block
        x = x[..., :n, :].transpose(-1, -2)
    return x.reshape(-1, block)


@dataclass
class NormalityRow:
    """Summary of one (tensor, blocking): blocks tested, share passing, kurtosis statistics."""

    tensor: str
    blocking: str
    blocks: int
    pass_frac: float
    median_p: float
    mean_excess_kurtosis: float
    median_excess_kurtosis: float
    absmax_over_std: float


def block_stats(blocks: torch.Tensor, alpha: float = 0.05) -> dict:
    """K^2 p-values and excess kurtosis of each block (rows); blocks with zero spread are dropped."""
    b = blocks.double().numpy()
    b = b[b.std(axis=1) > 0]
    _, p = stats.normaltest(b, axis=1)
    kurt = stats.kurtosis(b, axis=1, fisher=True)
    ratio = np.abs(b - b.mean(axis=1, keepdims=True)).max(axis=1) / b.std(axis=1)
    return {"p": p, "kurtosis": kurt, "pass": p > alpha, "absmax_over_std": ratio}


def normality_table(
    kv: list[tuple[torch.Tensor, torch.Tensor]], block: int = 64, alpha: float = 0.05, skip: int = 4
) -> list[NormalityRow]:
    """One :class:`NormalityRow` per (K or V, blocking), pooled over layers and heads."""
    rows = []
    for name, idx in (("K", 0), ("V", 1)):
        for blocking in BLOCKINGS:
            blocks = torch.cat([blocks_of(layer[idx], blocking, block, skip) for layer in kv])
            s = block_stats(blocks, alpha)
            rows.append(
                NormalityRow(
                    name, blocking, int(len(s["p"])), float(s["pass"].mean()), float(np.median(s["p"])),
                    float(s["kurtosis"].mean()), float(np.median(s["kurtosis"])),
                    float(np.mean(s["absmax_over_std"])),
                )
            )
    return rows


def layer_pass_fractions(kv, blocking: str, block: int = 64, alpha: float = 0.05, skip: int = 4) -> np.ndarray:
    """``(layers, 2)`` share of K and V blocks passing, per layer."""
    out = np.zeros((len(kv), 2))
    for i, layer in enumerate(kv):
        for j in (0, 1):
            out[i, j] = block_stats(blocks_of(layer[j], blocking, block, skip), alpha)["pass"].mean()
    return out


def markdown(rows: list[NormalityRow]) -> str:
    lines = [
        "| tensor | blocking | blocks | pass K² (α=0.05) | median p | mean excess kurtosis | median excess kurtosis | absmax/std |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tensor} | {r.blocking} | {r.blocks} | {100 * r.pass_frac:.1f}% | {r.median_p:.3g} |"
            f" {r.mean_excess_kurtosis:.2f} | {r.median_excess_kurtosis:.2f} | {r.absmax_over_std:.2f} |"
        )
    return "\n".join(lines)


def plot_qq_hist(kv, path: str | Path, layers: list[int] | None = None, block: int = 64, skip: int = 4) -> Path:
    """Q-Q plots against N(0,1) and histograms of standardised block values, saved as one PNG.

    Each block is standardised (zero mean, unit variance) and the values of the chosen ``layers`` are
    pooled; one column per blocking, rows: K Q-Q, K histogram, V Q-Q, V histogram.
    """
    from matplotlib.figure import Figure  # drawn by its own Agg canvas: pyplot's backend is left alone

    layers = layers if layers is not None else sorted({0, len(kv) // 2, len(kv) - 1})
    fig = Figure(figsize=(3.2 * len(BLOCKINGS), 11))
    axes = fig.subplots(4, len(BLOCKINGS))
    grid = np.linspace(-5, 5, 200)
    probs = (np.arange(1, 2001) - 0.5) / 2000
    for c, blocking in enumerate(BLOCKINGS):
        for r, (name, idx) in enumerate((("K", 0), ("V", 1))):
            ax_qq, ax_h = axes[2 * r, c], axes[2 * r + 1, c]
            for li in layers:
                b = blocks_of(kv[li][idx], blocking, block, skip).double()
                b = b[b.std(dim=1) > 0]
                z = ((b - b.mean(1, keepdim=True)) / b.std(1, keepdim=True)).flatten().numpy()
                ax_qq.plot(stats.norm.ppf(probs), np.quantile(z, probs), ".", ms=2, label=f"layer {li}")
                ax_h.hist(np.clip(z, -6, 6), bins=120, density=True, histtype="step", label=f"layer {li}")
            ax_qq.plot([-4, 4], [-4, 4], "k--", lw=0.8)
            ax_qq.set_title(f"{name}: {blocking}", fontsize=9)
            ax_qq.set_xlabel("N(0,1) quantile", fontsize=8)
            ax_qq.set_ylabel("block-standardised quantile", fontsize=8)
            ax_h.plot(grid, stats.norm.pdf(grid), "k--", lw=0.8, label="N(0,1)")
            ax_h.set_yscale("log")
            ax_h.set_ylim(1e-4, 1)
            ax_h.set_title(f"{name}: {blocking} histogram", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def analyze(model: torch.nn.Module, windows: torch.Tensor, block: int = 64, alpha: float = 0.05, skip: int = 4):
    """Capture K/V on each window; returns ``(rows, kv)`` with each layer's windows stacked on the batch axis.

    Centring and blocks stay within one window; the first ``skip`` tokens of each window are left out.
    """
    from tqdm.auto import tqdm

    per_window = [capture_kv(model, w[None]) for w in tqdm(windows, desc="capture K/V", unit="win")]
    kv = [
        (torch.cat([pw[li][0] for pw in per_window]), torch.cat([pw[li][1] for pw in per_window]))
        for li in range(len(per_window[0]))
    ]
    return normality_table(kv, block, alpha, skip), kv


def rows_as_dicts(rows: list[NormalityRow]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()} for r in rows]
