"""The RoPE table of a RoPE-centred cache (nqkv_core/cache/format.py): held once, compactly on a CPU
(one row per sixteen positions and a tile of offsets) and as rows elsewhere, and read back as rows,
one row, or the key bias of every position; its rows are those the keys' centre turns by."""

from __future__ import annotations

import pytest
import torch

from nqkv_core.cache.format import GROWTH_STEP, MIN_GROWTH_STEP, RopeTable, grown, growth_step
from nqkv_core.ops.cpu import key_bias_scores, table_rows
from nqkv_core.transform import CompactRope, centre_rows


def _rows(inv_freq: torch.Tensor, n: int) -> torch.Tensor:
    """The rows in fp64 angles: what the table's angle addition approximates to fp32 rounding."""
    ang = torch.arange(n).double()[:, None] * inv_freq.double()[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


INV_FREQ = 1e4 ** -(torch.arange(0, 64, 2).float() / 64)


@pytest.mark.parametrize("n", [1, 37, 64, 100])
def test_rope_table_is_compact_on_a_cpu_and_reads_back_its_rows(n):
    table = RopeTable(INV_FREQ)
    table.ensure(n, torch.device("cpu"))
    assert table.compact and table.positions >= n
    assert table.table.starts.shape == (table.positions // 16, 64) and table.table.offsets.shape == (64, 16)
    assert sum(t.numel() for t in table.tensors) == (table.positions // 16 + 16) * 64
    ref = _rows(INV_FREQ, table.positions)
    # (fp32 angles of up to ~200 rad are off by up to ~1e-5)
    torch.testing.assert_close(table.rows(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(table.rows(n), ref[:n], atol=1e-5, rtol=0)
    # the rows the keys' centre turns by, to fp32 rounding
    torch.testing.assert_close(table.rows(), centre_rows(torch.arange(table.positions), INV_FREQ), atol=1e-7, rtol=0)
    assert all(torch.equal(table.row(p), table.rows()[p]) for p in (0, n - 1, table.positions - 1))
    w = torch.randn(2, 3, 1, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(table.scores(w, n), w @ ref[:n].T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key_bias_scores(w, table.table), key_bias_scores(w, ref), atol=1e-5, rtol=1e-5)
    before = table.positions
    table.ensure(before + 1, torch.device("cpu"))  # grows by a growth step: only the new starts computed
    assert table.positions == grown(before + 1) > before
    fresh = RopeTable(INV_FREQ)
    fresh.ensure(table.positions, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(table.table, fresh.table))
    assert torch.equal(table.rows(before), fresh.rows(before))


def test_compact_rows_stay_accurate_at_long_positions():
    # Angle addition from fp32 tile starts: as accurate as the model's own fp32 angles, far out too.
    table = CompactRope.of(40_000 // 16, INV_FREQ)
    pos = torch.tensor([0, 15, 16, 4097, 20_011, 39_999])
    ang = pos.double()[:, None] * INV_FREQ.double()[None, :]
    exact = torch.cat([ang.cos(), ang.sin()], dim=-1)
    assert (table.rows(pos).double() - exact).abs().max() < 5e-3  # fp32 angles of ~40k rad: ~2e-3
    assert torch.equal(table.rows(pos), centre_rows(pos, INV_FREQ))


def test_rope_table_off_the_cpu_holds_rows_the_gpu_kernel_reads_in_place():
    # On other devices the table is rows, which the grouped decode kernel reads as they are
    # (table_rows gives the table itself: no copy per call).
    table = RopeTable(INV_FREQ)
    table.ensure(100, torch.device("meta"))
    assert not table.compact and table.table.shape == (table.positions, 64) and table.positions >= 100
    assert table.row(99).shape == (64,) and table.head(37).shape == (37, 64)
    assert table_rows(table.table) is table.table
    table.ensure(table.positions + 1, torch.device("meta"))  # grows by a step, still rows
    assert table.table.shape == (table.positions, 64) and table.positions == 112 + MIN_GROWTH_STEP


def test_growth_steps_follow_the_size():
    # 16 slots up to 4k (at most 15 empty where the exact tokens weigh most), then 1/128 of the
    # size up to GROWTH_STEP; every allocation holds what it must
    assert [growth_step(n) for n in (0, 1, 100, 2013, 4095, 4096, 8191, 8192, 10**6)] == [16] * 5 + [32] * 2 + [64] * 2
    assert GROWTH_STEP == 64
    for n in (0, 1, 15, 16, 17, 2013, 2016, 4097, 9000):
        assert n <= grown(n) < n + growth_step(n) and grown(n) % growth_step(n) == 0


def test_rope_table_without_frequencies_raises():
    with pytest.raises(ValueError, match="RoPE frequencies"):
        RopeTable().ensure(4, torch.device("cpu"))
