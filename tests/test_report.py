"""The report's memory arithmetic and decode-speed measurement (the full run is benchmarks' job)."""

from __future__ import annotations

import warnings

import pytest
import torch

from nqkv_core.lab.report import cache_bytes, decode_tokens_per_s, max_context, report_schemes
from nqkv_core.quantize import bits_per_element
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
    # Full-precision sinks and window amortise: at long context the cost tends to the body's bits per
    # element, the codes and a scale per block of 64 (one byte at 4 bits, fp16 at 2 and 3) (+ means).
    body = bits_per_element(bits, 64, s.scale_dtype)
    assert body == bits + (0.125 if bits == 4 else 0.25)
    assert n / max_context(None, 1 << 30, DIMS) == pytest.approx(16 / body, rel=0.01)


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
    with warnings.catch_warnings():  # the cache goes in under the argument name of this transformers
        warnings.simplefilter("error", FutureWarning)
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


def test_speed_figure_spread_and_flag():
    from nqkv_core.lab.report import SPREAD_LIMIT, speed_figure

    f = speed_figure([10.0, 10.4, 9.6])
    assert (f.median, f.low, f.high, f.rounds) == (10.0, 9.6, 10.4, 3)
    assert f.spread == pytest.approx(0.08) and not f.noisy
    assert f.cell() == "10.00 ±4%"
    assert f.cell(speed_figure([5.0, 5.0])) == "10.00 (2.00x) ±4%"
    wide = speed_figure([10.0, 10.0 * (1 + 1.1 * SPREAD_LIMIT)])  # range over median above the limit
    assert wide.noisy and wide.cell().endswith(" †")
    with pytest.raises(ValueError, match="positive"):
        speed_figure([])
    with pytest.raises(ValueError, match="positive"):
        speed_figure([1.0, 0.0])


class _Bar:
    def __init__(self, total):
        self.total, self.n = total, 0

    def update(self, k):
        self.n += k


def _scripted(timings: dict[str, list[float]]):
    """A measurement that returns each name's scripted tokens/s in turn, recording the call order."""
    calls = []

    def measure(name):
        calls.append(name)
        return timings[name][sum(c == name for c in calls) - 1]

    return measure, calls


def test_measure_speeds_interleaves_and_stops_when_rounds_agree():
    from nqkv_core.lab.report import measure_speeds

    measure, calls = _scripted({"a": [10.0, 10.5, 99.0], "b": [20.0, 19.5, 99.0]})
    bar = _Bar(4)
    figs = measure_speeds(measure, ["a", "b"], rounds=2, max_rounds=3, progress=bar)
    assert calls == ["a", "b", "a", "b"]  # the rounds agree within the limit: no third round
    assert figs["a"].median == pytest.approx(10.25) and figs["b"].rounds == 2
    assert bar.n == bar.total == 4


def test_measure_speeds_adds_rounds_while_they_disagree():
    from nqkv_core.lab.report import measure_speeds

    # "a" disagrees after two rounds (10 vs 14), a third round makes its median robust; "b" is stable
    measure, calls = _scripted({"a": [10.0, 14.0, 10.2, 10.1], "b": [20.0, 20.0, 20.0, 20.0]})
    bar = _Bar(4)
    figs = measure_speeds(measure, ["a", "b"], rounds=2, max_rounds=4, progress=bar)
    assert calls == ["a", "b"] * 4  # every name in every round; still noisy after 3, so a 4th (the bound)
    assert figs["a"].rounds == 4 and figs["a"].median == pytest.approx(10.15) and figs["a"].noisy
    assert not figs["b"].noisy and bar.n == bar.total == 8


def test_speed_table_and_report_files_carry_the_spread(tmp_path):
    import json

    from nqkv_core.lab.report import ReportRow, _write, speed_figure, speed_markdown

    speed = {"base": {512: speed_figure([10.0, 10.2]), 2048: speed_figure([5.0, 5.1])},
             "NQKV-4": {512: speed_figure([8.0, 8.1]), 2048: speed_figure([4.0, 6.0])}}
    table = speed_markdown(speed, "base")
    assert table[2] == "| 512 | 10.10 (1.00x) ±1% | 8.05 (0.80x) ±1% |"
    assert table[3].endswith("| 5.00 (0.99x) ±20% † |")
    rows = [ReportRow("full precision", 16.0, 10.0, 0.0, 1.0, 0.0, 1000, 1.0)]
    md = _write(tmp_path, "header", rows, speed, "base", 3, {"command": "nqkv report --quick"})
    assert "† marks figures" in md and (tmp_path / "report.md").read_text() == md
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["command"] == "nqkv report --quick"
    assert data["decode_rounds"]["NQKV-4"]["2048"]["noisy"] and data["decode_tokens_per_s"]["base"]["512"] == 10.1
    calm = {"base": {512: speed_figure([10.0, 10.2])}}
    assert "†" not in _write(tmp_path, "header", rows, calm, "base", 3, {})


# A random OPT small enough for seconds: head_dim 64 as in OPT-125m, bytes ids fit the vocabulary.
TINY_OPT = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, ffn_dim=128, word_embed_proj_dim=128,
                vocab_size=320, max_position_embeddings=512)


def test_random_model_is_seeded_in_eval_mode_and_reads_bytes():
    pytest.importorskip("transformers")
    from nqkv_core.lab.models import load_model

    a, b = (load_model("random:opt", config_overrides=TINY_OPT) for _ in range(2))
    assert a.model.config.model_type == "opt" and a.model.config.num_hidden_layers == 2
    assert not a.model.training and next(a.model.parameters()).dtype == torch.float32
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the same seed, the same weights
    ids = a.tokenizer("déjà vu", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, len("déjà vu".encode())) and int(ids.max()) < 320
    assert a.tokenizer.decode(ids[0]) == "déjà vu"
    assert a.model(ids).logits.shape == (1, ids.shape[1], 320)


@pytest.mark.parametrize("name, overrides, match", [
    ("random:no-such-type", None, "knows no model type 'no-such-type'"),
    ("random:vit", None, "no causal LM for model type 'vit'"),
    ("random:opt", dict(TINY_OPT, vocab_size=100), "too small for byte ids"),
    ("smollm2-135m", dict(num_hidden_layers=1), "random models only"),
])
def test_random_model_bad_input(name, overrides, match):
    pytest.importorskip("transformers")
    from nqkv_core.lab.models import load_model

    with pytest.raises(ValueError, match=match):
        load_model(name, config_overrides=overrides)


def test_headline_ratios_on_a_tiny_random_opt():
    pytest.importorskip("transformers")
    from nqkv_core.cache import enable
    from nqkv_core.lab.bench import PAPER, headline, headline_markdown
    from nqkv_core.lab.models import load_model

    model = load_model("random:opt", config_overrides=TINY_OPT).model
    scheme = enable(model, bits=4).scheme
    budget, context = 8 << 20, 128
    h = headline(model, scheme, budget, context, steps=1, rounds=1)
    fp16, nq = h["fits"]["DynamicCache fp16"], h["fits"]["NQKV"]
    fp16_token = 2 * 2 * 128 * 2  # K and V, layers, hidden, fp16 bytes
    assert fp16["max_batch_at"] == budget // (context * fp16_token) and fp16["max_context"] == budget // fp16_token
    ratios = h["ratios"]
    assert ratios["batch"] == nq["max_batch_at"] / fp16["max_batch_at"]
    assert ratios["context"] == nq["max_context"] / fp16["max_context"]
    # each short sequence carries NQKV's fixed full-precision sink and window tokens: a smaller gain
    assert 1 < ratios["batch"] < ratios["context"] < 4
    assert ratios["no_cache"] == h["speed"]["nqkv"].median / h["speed"]["none"].median > 0
    assert ratios["dynamic"] == h["speed"]["nqkv"].median / h["speed"]["dynamic"].median > 0
    assert ratios["max_batch"] == h["speed"]["nqkv max batch"].median / h["speed"]["dynamic max batch"].median > 0
    text = "\n".join(headline_markdown(h, "8MiB", context, scheme.name, 512))
    assert f"| {PAPER['no_cache']:g}x |" in text and "cannot run on it" in text  # max context > 512 positions
    with pytest.raises(ValueError, match="at most 510"):
        headline(model, scheme, budget, 511, steps=1, rounds=1)
    with pytest.raises(ValueError, match="raise --budget"):
        headline(model, scheme, 64 << 10, context, steps=1, rounds=1)
