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
