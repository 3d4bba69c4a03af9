"""Normality analysis: block cutting, K^2 statistics, capture and plots on a tiny model."""

import numpy as np
import pytest
import torch

from nqkv_core.lab.analysis import (
    BLOCKINGS, block_stats, blocks_of, capture_kv, layer_pass_fractions, markdown, normality_table, plot_qq_hist,
)


def test_blocks_of_shapes():
    x = torch.randn(2, 3, 132, 64)
    for b in BLOCKINGS:
        blocks = blocks_of(x, b, block=64, skip=4)
        assert blocks.shape[1] == 64
    assert blocks_of(x, "token", 64, 4).shape[0] == 2 * 3 * 128
    assert blocks_of(x, "channel", 64, 4).shape[0] == 2 * 3 * 64 * 2
    with pytest.raises(ValueError):
        blocks_of(x, "nope")


def test_gaussian_passes_heavy_tail_fails():
    g = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    s = block_stats(g)
    assert 0.9 < s["pass"].mean() < 0.99 and abs(np.mean(s["kurtosis"])) < 0.3
    t = torch.distributions.StudentT(2.0).sample((2000, 64))
    assert block_stats(t)["pass"].mean() < 0.5


def test_centring_and_rotation_gaussianise_offset_channels():
    x = torch.randn(1, 1, 512, 64)
    x[..., 3] += 20  # one channel with a large offset: per-token blocks are far from normal
    kv = [(x, x.clone())]
    rows = {(r.tensor, r.blocking): r for r in normality_table(kv, skip=0)}
    assert rows[("K", "token-centred-rot")].pass_frac > rows[("K", "token")].pass_frac + 0.5
    assert "pass K²" in markdown(list(rows.values()))


def test_capture_and_plot(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 40))
    kv = capture_kv(model, ids)
    assert len(kv) == 2 and kv[0][0].shape == (1, 2, 40, 16)
    assert model.config._attn_implementation != "nqkv_capture"
    assert layer_pass_fractions(kv, "token", block=16).shape == (2, 2)
    png = plot_qq_hist(kv, tmp_path / "qq.png", block=16)
    assert png.stat().st_size > 1000


def test_plots_leave_the_process_backend_alone(tmp_path):
    # a program that chose its own matplotlib backend keeps it after the lab draws its PNGs
    import subprocess
    import sys

    code = f"""
import matplotlib, torch
matplotlib.use("svg")
from pathlib import Path
from nqkv_core.lab.analysis import plot_qq_hist
from nqkv_core.lab.evaluate import plot_layer_sensitivity
from nqkv_core.lab.report import _plot
from nqkv_core.scheme import nqkv_preset
out = Path({str(tmp_path)!r})
kv = [(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)) for _ in range(2)]
pngs = [plot_qq_hist(kv, out / "qq.png", block=16), plot_layer_sensitivity({{"a": [0.1, 0.3]}}, out / "s.png"),
        *_plot(out, (2, 2, 16), [nqkv_preset(4)], {{"x": {{512: 1.0, 1024: 2.0}}}}, 1 << 20)]
import sys
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, all(p.stat().st_size > 1000 for p in pngs))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False", "True"]
