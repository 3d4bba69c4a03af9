"""Left-padded batches: each row of a batch that transformers pads on the left (an attention mask
with leading zeros) is cached and attended as that row alone would be: its own first tokens as
sinks, its transform fitted on its own tokens, its RoPE-aware key centre at its own positions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nqkv_core._hf import leading_pads, transformers_version  # noqa: E402
from nqkv_core.cache import NQKVCache, enable  # noqa: E402
from nqkv_core.scheme import KVScheme  # noqa: E402

NEW = 12
# the fit period, sinks + stats_tokens = 6 (10 with query rounding): the prompts below are shorter (4)
# and longer (9, 14); sinks + window = 6
SCHEMES = {
    "rope-centre": KVScheme("r", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True,
                            k_centre_rope=True, v_centre=True, sinks=2, window=4, stats_tokens=4, unbiased=True),
    "plain-centre-qk": KVScheme("p", k_block=8, v_block=16, k_centre=True, k_equalize="qk", v_centre=True,
                                v_equalize=True, sinks=2, window=4, stats_tokens=4),
    "query-rounding": KVScheme("q", k_bits=4, v_bits=4, k_block=16, v_block=16, k_rotate=True, v_rotate=True,
                               k_centre=True, k_centre_rope=True, v_centre=True, sinks=2, window=4,
                               stats_tokens=4, k_rounding="query", v_fit_scale=True, unbiased=True),
}
LENGTHS = (4, 9, 14)


def tiny(seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with a key-projection bias (a constant key offset, so that the RoPE-aware
    centre matters) and larger K/V than its init gives (quantization shows in the logits)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      attention_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # a row alone would stop there, the batch feeds it padding
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.k_proj.weight.mul_(4)
            attn.q_proj.weight.mul_(4)
            for proj in (attn.q_proj, attn.v_proj, attn.o_proj):
                proj.bias.zero_()
            attn.k_proj.bias.copy_(3.0 * torch.randn(attn.k_proj.bias.shape))
    return model


def prompts(lengths=LENGTHS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (n,), generator=g) for n in lengths]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of ``rows`` padded on the left with token 0."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions transformers' generate gives a left-padded batch (each row's first token at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def generate(model, ids, cache, mask=None):
    """Greedy tokens (new ones only) and per-step logits."""
    key = "cache" if transformers_version() >= (5, 24) else "past_key_values"
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0)
    if mask is not None:
        kw["attention_mask"] = mask
    out = model.generate(ids, **{key: cache}, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def assert_rows_as_alone(model, nq, rows: list[torch.Tensor]):
    """Generate ``rows`` as one left-padded batch; each row's tokens and logits must be those of the
    row generated alone with a cache of the same settings. Returns the batch's cache."""
    ids, mask = left_padded(rows)
    cache = nq.new_cache()
    seq, logits = generate(model, ids, cache, mask)
    for i, row in enumerate(rows):
        alone_seq, alone_logits = generate(model, row[None], nq.new_cache())
        assert torch.equal(seq[i], alone_seq[0]), i
        torch.testing.assert_close(logits[i], alone_logits[0], rtol=0, atol=2e-4)
    return cache


@pytest.mark.parametrize("decode", ["reference", "ops", "folded", "native"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_row_generates_as_alone(name, decode):
    model, rows = tiny(), prompts()
    nq = enable(model, scheme=SCHEMES[name], decode=decode)
    cache = assert_rows_as_alone(model, nq, rows)
    assert all(layer.starts.tolist() == [max(LENGTHS) - n for n in LENGTHS] for layer in cache.layers)


@pytest.mark.parametrize("decode", ["reference", "auto"])
def test_prompt_within_sinks_and_window_rows_as_alone(decode):
    # a prompt of at most sinks + window tokens attends to itself exactly (no body yet): the rows'
    # own sinks are stored after it, some of a one-token row's sinks only by the decode steps
    model, rows = tiny(), prompts((1, 5, 6))
    nq = enable(model, scheme=SCHEMES["rope-centre"], decode=decode)
    assert_rows_as_alone(model, nq, rows)


@pytest.mark.parametrize("name", ["ministral", "gemma2", "gpt_oss"])
def test_sliding_window_models_rows_as_alone(name):
    # sliding layers (a ring of codes: prompts longer than the sliding window of 16), soft-capped
    # logits (Gemma 2) and learned sink logits (GPT-OSS): each row as alone
    from test_models import scheme4, tiny as model_of

    model = model_of(name)
    model.generation_config.eos_token_id = None
    rows = prompts((6, 20, 27))
    nq = enable(model, scheme=scheme4(model, 4).replace(sinks=2, stats_tokens=4))
    cache = assert_rows_as_alone(model, nq, rows)
    assert any(layer.is_sliding for layer in cache.layers)
    assert all(layer.starts.tolist() == [21, 7, 0] for layer in cache.layers)


def test_unpadded_batch_keeps_no_starts():
    # a mask without padding (and no mask) is the plain batch: no per-row state, the shared fast paths
    model = tiny()
    nq = enable(model, scheme=SCHEMES["rope-centre"])
    ids = torch.stack(prompts((9, 9)))
    for mask in (None, torch.ones_like(ids)):
        cache = nq.new_cache()
        generate(model, ids, cache, mask)
        assert all(layer.starts is None for layer in cache.layers)


def test_a_padded_rows_sinks_and_transform_are_its_own():
    # After the prompt, row 1's sinks hold its first tokens (not padding) and its transform is the
    # one fitted on its own tokens; its RoPE-aware key centre is kept rotated back by its start.
    model, rows = tiny(), prompts((14, 10))  # both past the fit period (10 tokens)
    scheme = SCHEMES["query-rounding"]
    nq = enable(model, scheme=scheme)
    ids, mask = left_padded(rows)
    batch, alone = nq.new_cache(), nq.new_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=batch, use_cache=True)
        model(rows[1][None], past_key_values=alone, use_cache=True)
    for a, b in zip(batch.layers, alone.layers):
        torch.testing.assert_close(a.v_sink[1:, :, : scheme.sinks], b.v_sink[:, :, : scheme.sinks], rtol=0, atol=1e-5)
        torch.testing.assert_close(a.k_sink[1:, :, : scheme.sinks], b.k_sink[:, :, : scheme.sinks], rtol=0, atol=1e-5)
        assert a.starts.tolist() == [0, 4]
        t, u = a.transform, b.transform
        for x, y in ((t.mu_v, u.mu_v), (t.k_metric_iso, u.k_metric_iso), (t.k_feedback, u.k_feedback),
                     (t.k_metric.mT @ t.k_metric, u.k_metric.mT @ u.k_metric)):  # (eigenvectors up to sign)
            torch.testing.assert_close(x[1:], y, rtol=1e-4, atol=1e-5)
        # R(4) (R(-4) mu) = mu: the centre at the row's slot 4 is its own at position 0
        torch.testing.assert_close(t.key_centre(1, 4)[1:], u.key_centre(1, 0), rtol=0, atol=1e-5)


def test_leading_pads_from_masks():
    T = 6
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    starts = torch.tensor([0, 2, 5])
    real = torch.arange(T)[None, :] >= starts[:, None]  # (b, T)
    full = (causal & real[:, None, :])[:, None]  # transformers' padded causal mask
    assert leading_pads(full, T, 3).tolist() == [0, 2, 5]
    sliding = full & ~torch.ones(T, T, dtype=torch.bool).tril(-3)  # a window of 3: hides old keys too
    assert leading_pads(sliding, T, 3).tolist() == [0, 2, 5]
    # older transformers unmask the rows of padding queries entirely
    unmasked = full | ~full.any(-1, keepdim=True)
    assert leading_pads(unmasked, T, 3).tolist() == [0, 2, 5]
    # additive, with columns beyond the prompt (a preallocated cache)
    wide = torch.zeros(3, 1, T, T + 4, dtype=torch.bool)
    wide[..., :T] = full
    additive = torch.zeros(wide.shape).masked_fill(~wide, torch.finfo(torch.float32).min)
    assert leading_pads(additive, T, 3).tolist() == [0, 2, 5]
    assert leading_pads(full[:1], T, 4).tolist() == [0] * 4  # one mask for the whole batch


def test_save_load_in_the_fit_period_keeps_each_rows_own(tmp_path):
    # rows of 4, 9 and 14 tokens, fit_tokens 6: saved while the first is in its fit period (all
    # tokens exact in the file), loaded, the rows go on as in the original cache
    model, rows = tiny(), prompts()
    scheme = SCHEMES["query-rounding"]
    nq = enable(model, scheme=scheme)
    ids, mask = left_padded(rows)
    cache = nq.new_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache, use_cache=True)
        assert cache.layers[0].prefix is not None
        cache.save(tmp_path / "p.safetensors")
        loaded = NQKVCache.load(tmp_path / "p.safetensors", scheme, config=model.config)
        nxt = torch.tensor([[5], [6], [7]])
        for _ in range(8):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            pos = positions(mask)[:, -1:]
            a = model(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
            b = model(nxt, attention_mask=mask, position_ids=pos, past_key_values=loaded, use_cache=True).logits
            torch.testing.assert_close(b, a, rtol=0, atol=0)
            nxt = a[:, -1:].argmax(-1)
    assert loaded.layers[0].prefix is None and torch.equal(loaded.layers[0].starts, cache.layers[0].starts)


def test_save_load_keeps_starts(tmp_path):
    model, rows = tiny(), prompts((7, 9, 14))  # every row past the fit period (6 tokens)
    scheme = SCHEMES["rope-centre"]
    nq = enable(model, scheme=scheme)
    ids, mask = left_padded(rows)
    cache = nq.new_cache()
    nxt = torch.tensor([[5], [6], [7]])
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache, use_cache=True)
        cache.save(tmp_path / "c.safetensors")
        loaded = NQKVCache.load(tmp_path / "c.safetensors", scheme, config=model.config)
        assert torch.equal(loaded.layers[0].starts, cache.layers[0].starts)
        step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        pos = positions(step_mask)[:, -1:]
        a = model(nxt, attention_mask=step_mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
        b = model(nxt, attention_mask=step_mask, position_ids=pos, past_key_values=loaded, use_cache=True).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    # a file without starts is a batch without padding; starts out of [0, length] are refused
    from safetensors.torch import load_file, save_file

    from nqkv_core.cache import io

    tensors = load_file(tmp_path / "c.safetensors")
    for bad, match in ((None, None), (torch.tensor([0, -1, 3]), "starts"), (torch.tensor([0, 99, 3]), "starts")):
        changed = {k: v for k, v in tensors.items() if not k.endswith(".starts")}
        if bad is not None:
            changed.update({k: bad.clone() for k in tensors if k.endswith(".starts")})
        meta = io.cache_meta(cache)
        meta["sha256"] = io._digest(changed, meta)
        save_file(changed, tmp_path / "d.safetensors", metadata=meta)
        if match is None:
            assert all(layer.starts is None for layer in
                       NQKVCache.load(tmp_path / "d.safetensors", scheme, config=model.config).layers)
        else:
            with pytest.raises(ValueError, match=match):
                NQKVCache.load(tmp_path / "d.safetensors", scheme, config=model.config)


def test_beam_search_rows_as_alone():
    # beams of a padded row are reordered with their starts (reorder_cache / batch_select_indices)
    model, rows = tiny(), prompts((4, 9))
    nq = enable(model, scheme=SCHEMES["rope-centre"])
    ids, mask = left_padded(rows)
    kw = dict(max_new_tokens=NEW, do_sample=False, num_beams=3, pad_token_id=0)
    key = "cache" if transformers_version() >= (5, 24) else "past_key_values"
    out = model.generate(ids, attention_mask=mask, **{key: nq.new_cache()}, **kw)[:, ids.shape[1]:]
    for i, row in enumerate(rows):
        alone = model.generate(row[None], **{key: nq.new_cache()}, **kw)[:, len(row):]
        assert torch.equal(out[i], alone[0]), i


def test_crop_and_batch_ops_follow_the_rows():
    # teacher-forced steps, a crop back into the crop margin and more steps: each row's logits as
    # alone; then the batch operations of beam search take the rows' starts along
    model, rows = tiny(), prompts((4, 9))
    nq = enable(model, scheme=SCHEMES["rope-centre"], crop_margin=4)
    ids, mask = left_padded(rows)
    steps = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(5))

    @torch.no_grad()
    def run(ids, mask, steps, cache):
        out = [model(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache,
                     use_cache=True).logits[:, -1:]]
        for j in range(steps.shape[1]):
            if j == 4:
                cache.crop(-2)
                mask = mask[:, :-2]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out.append(model(steps[:, j : j + 1], attention_mask=mask, position_ids=positions(mask)[:, -1:],
                             past_key_values=cache, use_cache=True).logits)
        return torch.cat(out, dim=1)

    cache = nq.new_cache()
    batch = run(ids, mask, steps, cache)
    for i, row in enumerate(rows):
        alone = run(row[None], torch.ones(1, len(row), dtype=torch.long), steps[i : i + 1], nq.new_cache())
        torch.testing.assert_close(batch[i], alone[0], rtol=0, atol=2e-4)
    layer = cache.layers[0]
    layer.batch_repeat_interleave(2)
    assert layer.starts.tolist() == [5, 5, 0, 0]
    layer.batch_select_indices(torch.tensor([1, 2]))
    assert layer.starts.tolist() == [5, 0] and layer.k_sink.shape[0] == 2
    layer.reorder_cache(torch.tensor([1, 0]))
    assert layer.starts.tolist() == [0, 5]
    layer.reset()
    assert layer.starts is None


@pytest.mark.parametrize("name", ["cohere", "stablelm"])
def test_rope_layouts_rows_as_alone(name):
    # interleaved (Cohere) and partial (StableLM) RoPE: the row's centre, folded back by its start,
    # is taken in the layout's channel order
    from test_rope_layouts import ROPE, tiny_model

    model = tiny_model(name)
    model.generation_config.eos_token_id = None
    rows = prompts()
    nq = enable(model, scheme=ROPE.replace(stats_tokens=4))
    assert_rows_as_alone(model, nq, rows)
