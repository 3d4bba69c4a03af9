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
# sinks + stats_tokens = 6: the prompts below are shorter (4) and longer (9, 14); sinks + window = 6
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


def generate(model, ids, cache, mask=None):
    """Greedy tokens (new ones only) and per-step logits."""
    key = "cache" if transformers_version() >= (5, 24) else "past_key_values"
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0)
    if mask is not None:
        kw["attention_mask"] = mask
    out = model.generate(ids, **{key: cache}, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("decode", ["reference", "ops", "folded", "native"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_row_generates_as_alone(name, decode):
    model, rows = tiny(), prompts()
    nq = enable(model, scheme=SCHEMES[name], decode=decode)
    ids, mask = left_padded(rows)
    cache = nq.new_cache()
    seq, logits = generate(model, ids, cache, mask)
    assert cache.layers[0].starts.tolist() == [max(LENGTHS) - n for n in LENGTHS]
    for i, row in enumerate(rows):
        alone_seq, alone_logits = generate(model, row[None], nq.new_cache())
        assert torch.equal(seq[i], alone_seq[0]), i
        torch.testing.assert_close(logits[i], alone_logits[0], rtol=0, atol=2e-4)
