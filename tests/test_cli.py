"""The ``nqkv`` command line: bad input ends in one line on stderr and exit status 2 (before any model
loads where no model is needed); the subcommands run end to end on a tiny local model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nqkv_core.lab import cli

pytest.importorskip("transformers")

VOCAB = 120


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (head_dim 64) and a word-level tokenizer of ``w0 .. w119``, saved the
    way ``--model <local directory>`` expects them."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                   max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture
def corpus(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (3000,), generator=g)))
    return str(path)


@pytest.fixture
def never_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    from nqkv_core.lab import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("cmd", ["eval", "analyze", "demo", "calibrate"])
def test_missing_corpus_says_to_pass_text_file(capsys, tmp_path, cmd, never_load):
    line = _error_line(capsys, [cmd, "--text-file", str(tmp_path / "nope.txt")])
    assert line.startswith(f"nqkv {cmd}: error:") and "--text-file" in line and "nope.txt" in line


def test_no_default_corpus_says_to_pass_text_file(capsys, tmp_path, monkeypatch, never_load):
    monkeypatch.delenv("NQKV_TEXT_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no shared/ here or above
    line = _error_line(capsys, ["eval"])
    assert "no default corpus found" in line and "--text-file" in line


@pytest.mark.parametrize("content, says", [(b"", "is empty"), (b" \n\t\n", "is empty"),
                                           (b"\xff\xfe\x00binary\x80", "not UTF-8")])
def test_empty_or_binary_corpus(capsys, tmp_path, content, says, never_load):
    path = tmp_path / "corpus.bin"
    path.write_bytes(content)
    line = _error_line(capsys, ["eval", "--text-file", str(path)])
    assert says in line and "--text-file" in line


@pytest.mark.parametrize("argv, says", [
    (["eval", "--windows", "0"], "--windows: must be at least 1, got 0"),
    (["demo", "--window-len", "0"], "--window-len: must be at least 1, got 0"),
    (["eval", "--bits", "7"], "--bits: invalid choice: 7"),
    (["report", "--bits", "4", "7"], "--bits: invalid choice: 7"),
    (["analyze", "--alpha", "1.5"], "--alpha: must be between 0 and 1"),
    (["bench", "--contexts", "-1"], "--contexts: must be at least 1"),
    (["eval", "--sinks", "-1"], "--sinks: must be at least 0"),
])
def test_argument_ranges_are_argparse_errors(capsys, argv, says):
    line = _error_line(capsys, argv)
    assert line.startswith(f"nqkv {argv[0]}: error:") and says in line


def test_bad_budget(capsys, never_load):
    line = _error_line(capsys, ["report", "--budget", "lots"])
    assert line.startswith("nqkv report: error:") and "lots" in line and "1GiB" in line


def test_demo_window_covering_everything(capsys, corpus, never_load):
    line = _error_line(capsys, ["demo", "--text-file", corpus, "--window-len", "32", "--fp-window", "32"])
    assert "nothing to quantize" in line and "--window-len" in line


def test_unknown_model_offline(capsys, corpus, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _error_line(capsys, ["eval", "--text-file", corpus, "--model", str(tmp_path / "no-such-model")])
    assert line.startswith("nqkv eval: error: could not load model") and "--model" in line


def test_corpus_shorter_than_a_window(capsys, tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4 w5")
    line = _error_line(capsys, ["eval", "--model", tiny_model_dir, "--text-file", str(short), "--window-len", "64"])
    assert "the corpus holds 5 tokens" in line and "--text-file" in line and "--window-len" in line


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    from nqkv_core.lab import models

    def broken(path):
        raise RuntimeError("a bug")

    monkeypatch.setattr(models, "load_text", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["eval"])


def test_version_and_defaults_in_help():
    out = subprocess.run([sys.executable, "-m", "nqkv_core.lab.cli", "--version"], capture_output=True, text=True)
    import nqkv_core

    assert out.returncode == 0 and out.stdout.strip() == f"nqkv {nqkv_core.__version__}"
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "(default: 1024)" in help_text and "(default: [4, 3, 2])" in help_text


def test_subprocess_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nqkv_core.lab.cli", "eval", "--text-file", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("nqkv eval: error: corpus file")


def test_demo_runs_every_default_width(capsys, tiny_model_dir, corpus, tmp_path):
    cli.main(["demo", "--model", tiny_model_dir, "--text-file", corpus, "--window-len", "256",
              "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert [r["scheme"].split()[0] for r in rows] == ["NQKV-4", "NQKV-3", "NQKV-2"]
    errors = [r["k_rel_error"] for r in rows]
    assert all(0 < e < 1 for e in errors) and errors == sorted(errors)  # fewer bits, more error
    assert all(r["x_smaller"] > 1 for r in rows) and "| NQKV-3" in out


def test_eval_writes_rows_as_it_goes(tiny_model_dir, corpus, tmp_path, monkeypatch):
    from nqkv_core.lab import evaluate

    saved = []
    real = evaluate.save_rows
    monkeypatch.setattr(evaluate, "save_rows", lambda rows, *a: saved.append(len(rows)) or real(rows, *a))
    cli.main(["eval", "--model", tiny_model_dir, "--text-file", corpus, "--windows", "2", "--window-len", "128",
              "--bits", "4", "--methods", "nqkv", "kivi", "--out", str(tmp_path)])
    assert saved[:3] == [1, 2, 3]  # after the full-precision row and after each scheme
    data = json.loads((tmp_path / "eval.json").read_text())
    assert len(data["rows"]) == 3
    assert data["meta"]["command"].startswith("nqkv eval --model ") and "--bits 4" in data["meta"]["command"]


def test_bench_writes_its_tables_as_it_goes(tiny_model_dir, corpus, tmp_path, monkeypatch):
    import transformers

    from nqkv_core.lab import bench, report

    # a DynamicCache stands in for quanto's (whose first use compiles an extension for minutes)
    stand_in = lambda model, bits=4: transformers.DynamicCache(config=model.config)  # noqa: E731
    monkeypatch.setattr(report, "quanto_cache", stand_in)
    monkeypatch.setattr(bench, "quanto_cache", stand_in)

    md = tmp_path / "bench.md"
    seen = []
    real = bench._Lines.add

    def add(self, *lines):
        real(self, *lines)
        seen.append(md.read_text().count("\n"))  # the file holds every line added so far

    monkeypatch.setattr(bench._Lines, "add", add)
    cli.main(["bench", "--model", tiny_model_dir, "--text-file", corpus, "--quick", "--contexts", "64",
              "--batches", "1", "--rounds", "1", "--steps", "1", "--budget", "16MiB", "--markdown", str(md)])
    text = md.read_text()
    assert len(seen) >= 6 and seen == sorted(seen)
    assert "command `nqkv bench --model" in text and "| 64 | 1 |" in text and "Greedy agreement" in text
    assert "MiB for a bf16 model" in text and "an fp32 model, exact tokens in fp32" in text  # the memory target
    assert "a 16-token window, bf16" in text


def test_analyze_runs_and_records_the_command(tiny_model_dir, corpus, tmp_path, capsys):
    cli.main(["analyze", "--model", tiny_model_dir, "--text-file", corpus, "--windows", "1", "--window-len", "256",
              "--out", str(tmp_path)])
    data = json.loads((tmp_path / "normality.json").read_text())
    assert data["meta"]["command"] == cli.shlex.join(["nqkv", "analyze", "--model", tiny_model_dir, "--text-file", corpus,
                                                       "--windows", "1", "--window-len", "256", "--out", str(tmp_path)])
    assert len(data["rows"]) == 10 and (tmp_path / "normality_qq.png").stat().st_size > 1000
    assert "capture K/V" in capsys.readouterr().err  # the progress bar


def test_analyze_block_that_does_not_divide_head_dim(tiny_model_dir, corpus, capsys):
    line = _error_line(capsys, ["analyze", "--model", tiny_model_dir, "--text-file", corpus, "--windows", "1",
                                "--window-len", "128", "--block", "48"])
    assert "blocks of 48 do not divide head_dim 64" in line and "--block" in line


def test_calibrate_saves_each_layer_as_measured(tiny_model_dir, corpus, tmp_path, monkeypatch):
    from nqkv_core.lab import evaluate
    from nqkv_core.scheme import KVScheme

    partial = []
    real = evaluate.perplexity

    def perplexity(model, windows, scheme, progress=None):
        path = tmp_path / "nqkv_scheme.json"
        if path.exists():
            partial.append(len(json.loads(path.read_text())["layer_sensitivity_pct"]))
        return real(model, windows, scheme, progress)

    monkeypatch.setattr(evaluate, "perplexity", perplexity)
    cli.main(["calibrate", "--model", tiny_model_dir, "--text-file", corpus, "--windows", "1", "--window-len", "128",
              "--wide-layers", "1", "--out", str(tmp_path)])
    assert partial == [1]  # before the second layer's pass, the first layer's value was on disk
    data = json.loads((tmp_path / "nqkv_scheme.json").read_text())
    assert data["complete"] and len(data["layer_sensitivity_pct"]) == 2
    assert sorted(KVScheme.from_dict(data["scheme"]).layer_bits) == [2, 3]


def test_command_line_is_recorded_as_typed(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_eval", lambda args: seen.append(args.command_line))
    cli.main(["eval", "--text-file", "my corpus.txt"])
    monkeypatch.setattr(sys, "argv", [cli.__file__, "eval", "--windows", "2"])
    cli.main()
    assert seen == ["nqkv eval --text-file 'my corpus.txt'", "python -m nqkv_core.lab.cli eval --windows 2"]


def test_unknown_random_model_type(capsys):
    line = _error_line(capsys, ["bench", "--model", "random:no-such-type", "--headline"])
    assert line.startswith("nqkv bench: error: --model random:no-such-type:") and "random:opt" in line


def test_bench_headline_on_a_random_model(capsys, tmp_path, monkeypatch):
    from nqkv_core.lab import bench

    from test_report import TINY_OPT

    load = bench.load_model
    monkeypatch.setattr(bench, "load_model", lambda name: load(name, config_overrides=TINY_OPT))
    md = tmp_path / "headline.md"
    cli.main(["bench", "--model", "random:opt", "--headline", "--batch-context", "128", "--steps", "1",
              "--rounds", "1", "--budget", "8MiB", "--markdown", str(md)])
    text = md.read_text()
    assert "random:opt (random weights)" in text and "| max batch at 8MiB, 128 tokens each |" in text
    assert "no KV cache (recompute)" in text and text.count("\n| ") == 6  # the header and five figures
