"""The report's memory arithmetic and decode-speed measurement (the full run is benchmarks' job)."""

from __future__ import annotations

import pytest
import torch

from nqkv_core.lab.report import cache_bytes, decode_tokens_per_s, max_context, report_schemes
from nqkv_core.scheme import nqkv_preset

DIMS = (30, 3, 64)  # SmolLM2-135M: layers, kv heads, head_dim


def test_fp16_context_at_budget():
    per_token = 2 * 30 * 3 * 64 * 2  # K and V, fp16
    assert max_context(None, 1 << 30, DIMS) == (1 << 30) // per_token


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_nqkv_context_fits_and_is_maximal(bits):
    s = nqkv_preset(bits)
    n = max_context(s, 1 << 30, DIMS)
    assert cache_bytes(s.bits_per_element(n), n, DIMS) <= 1 << 30
    assert cache_bytes(s.bits_per_element(n + 1), n + 1, DIMS) > 1 << 30
    # Full-precision sinks and window amortise: at long context the cost tends to bits + 0.25 (+ means).
    assert n / max_context(None, 1 << 30, DIMS) == pytest.approx(16 / (bits + 0.25), rel=0.01)


def test_report_schemes_pair_nqkv_with_baselines():
    names = [s.name for s in report_schemes((4, 2), sinks=4, window=32)]
    assert names[0].startswith("NQKV-4") and names[1].startswith("kivi-int4")
    assert any(n.startswith("NQKV-2") for n in names) and any(n.startswith("int4") for n in names)
    names = [s.name for s in report_schemes((4, 3, 2), sinks=4, window=32)]
    assert "NQKV-K4V3" in names and "NQKV-K3V2" in names and "NQKV-K4V2" not in names


def test_decode_speed_runs_on_a_tiny_model():
    transformers = pytest.importorskip("transformers")
    from nqkv_core.cache import enable

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    scheme = nqkv_preset(4).replace(k_block=16, v_block=16)
    enable(model, scheme=scheme)
    for kind in ("dynamic", "nqkv", "none"):
        assert decode_tokens_per_s(model, kind, batch=2, context=128, steps=2, scheme=scheme) > 0
    with pytest.raises(ValueError, match="unknown cache kind"):
        decode_tokens_per_s(model, "paged", batch=1, context=8, steps=1, scheme=scheme)


def test_parse_bytes():
    from nqkv_core.lab.report import parse_bytes

    assert parse_bytes("1GiB") == 1 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("4096") == 4096
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_nqkv_bench_command_reaches_the_benchmark(monkeypatch):
    pytest.importorskip("transformers")
    from nqkv_core.lab import bench, cli

    seen = {}
    monkeypatch.setattr(bench, "run", lambda args: seen.update(vars(args)))
    cli.main(["bench", "--quick", "--budget", "256MiB", "--contexts", "512", "--threads", "1"])
    assert seen["quick"] and seen["budget"] == "256MiB" and seen["contexts"] == [512] and seen["batches"] == [1, 8]
