"""The RoPE table of a RoPE-centred cache (nqkv_core/cache/format.py): held once, in tiles of sixteen
positions on a CPU and as rows elsewhere, and read back as rows, one row, or the key bias of every
position."""

from __future__ import annotations

import pytest
import torch

from nqkv_core.cache.format import GROWTH_STEP, RopeTable
from nqkv_core.ops.cpu import key_bias_scores, tile_rows


def _rows(inv_freq: torch.Tensor, n: int) -> torch.Tensor:
    ang = torch.arange(n).float()[:, None] * inv_freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


@pytest.mark.parametrize("n", [1, 37, 64, 100])
def test_rope_table_holds_only_tiles_and_reads_back_its_rows(n):
    inv_freq = 1e4 ** -(torch.arange(0, 64, 2).float() / 64)
    table = RopeTable(inv_freq)
    table.ensure(n, torch.device("cpu"))
    assert table.table.shape == (table.positions // 16, 64, 16) and table.positions >= n
    assert [k for k, v in vars(table).items() if isinstance(v, torch.Tensor)] == ["inv_freq", "table"]
    ref = _rows(inv_freq, table.positions)
    torch.testing.assert_close(table.rows(), ref)
    torch.testing.assert_close(table.rows(n), ref[:n])
    assert all(torch.equal(table.row(p), ref[p]) for p in (0, n - 1, table.positions - 1))
    w = torch.randn(2, 3, 1, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(table.scores(w, n), w @ ref[:n].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key_bias_scores(w, table.table), key_bias_scores(w, ref), atol=1e-5, rtol=1e-5)
    before = table.positions
    table.ensure(before + 1, torch.device("cpu"))  # grows by a growth step: only the new rows computed
    assert table.positions == before + GROWTH_STEP
    fresh = RopeTable(inv_freq)
    fresh.ensure(table.positions, torch.device("cpu"))
    assert torch.equal(table.table, fresh.table) and torch.equal(table.rows(before), ref)


def test_rope_table_off_the_cpu_holds_rows_the_gpu_kernel_reads_in_place():
    # The tiles are the native CPU step's layout; on other devices the table is rows, which the
    # grouped decode kernel reads as they are (tile_rows gives the table itself: no copy per call).
    inv_freq = 1e4 ** -(torch.arange(0, 64, 2).float() / 64)
    table = RopeTable(inv_freq)
    table.ensure(100, torch.device("meta"))
    assert not table.tiled and table.table.shape == (table.positions, 64) and table.positions >= 100
    assert table.row(99).shape == (64,) and table.head(37).shape == (37, 64)
    assert tile_rows(table.table) is table.table
    table.ensure(table.positions + 1, torch.device("meta"))  # grows by a step, still rows
    assert table.table.shape == (table.positions, 64) and table.positions == 128 + GROWTH_STEP


def test_rope_table_without_frequencies_raises():
    with pytest.raises(ValueError, match="RoPE frequencies"):
        RopeTable().ensure(4, torch.device("cpu"))
