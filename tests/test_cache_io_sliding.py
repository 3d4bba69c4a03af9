"""Saving and loading caches with sliding-window layers (Mistral, Gemma 2): bitwise round trips, and
every defect of a file (its metadata, its ring of codes, a model of other layers) a ``ValueError``
naming it, as :mod:`test_cache_io` checks for full layers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_cache_io import edited, forge, read  # noqa: E402

from nqkv_core.cache import NQKVCache, NQKVSlidingLayer, enable  # noqa: E402
from nqkv_core.scheme import KVScheme  # noqa: E402

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
# a sliding window of 8 over an exact window of 4: the layers quantize into a ring of codes
ROPE = KVScheme("rope", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True, k_centre_rope=True,
                v_centre=True, sinks=2, window=4, unbiased=True,
                stats_tokens=4)  # a fit period of 6 tokens: short sequences are mostly past it
CONFIGS = {
    "mistral": lambda window=8: transformers.MistralConfig(**SIZES, sliding_window=window),
    "gemma2": lambda window=8: transformers.Gemma2Config(**SIZES, sliding_window=window, query_pre_attn_scalar=16,
                                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def tiny(name: str, window: int = 8):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](window)).eval().float()
    with torch.no_grad():  # larger K/V than the tiny init gives, so that quantization shows in the logits
        for module in model.modules():
            if hasattr(module, "k_proj"):
                module.k_proj.weight.mul_(4)
                module.q_proj.weight.mul_(4)
    return model


@torch.no_grad()
def greedy(model, cache, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Feed ``ids``, then ``steps`` greedy one-token steps; the tokens fed in them and the logits
    after ``ids`` and after each of them."""
    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        tokens.append(int(tok))
        logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
        all_logits.append(logits)
    return tokens, all_logits


def prompt(n: int = 10) -> torch.Tensor:
    return torch.randint(1, 96, (1, n), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(model, path, cache)``: a Gemma 2 cache saved in the middle of generation (its rings wrapped)."""
    model = tiny("gemma2")
    cache = enable(model, scheme=ROPE).new_cache()
    greedy(model, cache, prompt(), 16)
    path = tmp_path_factory.mktemp("sliding") / "g.safetensors"
    cache.save(path)
    return model, path, cache


@pytest.mark.parametrize("name, scheme", [("mistral", ROPE), ("gemma2", ROPE),
                                          ("mistral", ROPE.replace(window=8))],  # no ring of codes
                         ids=["mistral", "gemma2", "mistral-window-covers"])
def test_saved_mid_generation_continues_like_the_uninterrupted_run(name, scheme, tmp_path):
    model, ids = tiny(name), prompt()
    nq = enable(model, scheme=scheme)
    whole = nq.new_cache()
    tokens, logits = greedy(model, whole, ids, 24)
    cache = nq.new_cache()
    first, first_logits = greedy(model, cache, ids, 12)
    assert any(isinstance(layer, NQKVSlidingLayer) for layer in cache.layers)
    assert all(layer.capacity == (8 if scheme.window < 8 else 0) for layer in cache.layers if layer.is_sliding)
    cache.save(tmp_path / "c.safetensors")
    loaded = NQKVCache.load(tmp_path / "c.safetensors", scheme, config=model.config)
    for a, b in zip(cache.layers, loaded.layers):
        assert type(a) is type(b) and a.capacity == b.capacity
        sa, sb = a.state(), b.state()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), a
    # the loaded cache goes on from the first run's next token, as the uninterrupted run did
    nxt = int(first_logits[-1].argmax())
    rest, rest_logits = greedy(model, loaded, torch.tensor([[nxt]]), 11)
    assert first + [nxt] + rest == tokens
    assert len(rest_logits) == len(logits[13:]) and all(torch.equal(x, y) for x, y in zip(rest_logits, logits[13:]))


def test_saved_in_the_fit_period_continues_like_the_uninterrupted_run(tmp_path):
    model, ids = tiny("gemma2"), prompt()
    scheme = ROPE.replace(stats_tokens=12)  # fit_tokens 14: saved after 12 tokens, in the fit period
    nq = enable(model, scheme=scheme)
    tokens, logits = greedy(model, nq.new_cache(), ids, 16)
    cache = nq.new_cache()
    first, first_logits = greedy(model, cache, ids, 2)
    assert all(layer.prefix is not None and layer.transform is None for layer in cache.layers)
    cache.save(tmp_path / "p.safetensors")
    loaded = NQKVCache.load(tmp_path / "p.safetensors", scheme, config=model.config)
    nxt = int(first_logits[-1].argmax())
    rest, rest_logits = greedy(model, loaded, torch.tensor([[nxt]]), 13)
    assert first + [nxt] + rest == tokens
    assert all(torch.equal(x, y) for x, y in zip(rest_logits, logits[3:], strict=True))


def test_file_must_name_the_models_sliding_layers(saved, tmp_path):
    model, path, _ = saved
    with pytest.raises(ValueError, match="holds sliding-window layers; load it with config=model.config"):
        NQKVCache.load(path, ROPE)
    with pytest.raises(ValueError, match=r"saved with sliding-window layers \[0\] \(window 8\); the model has \[0\]"
                                         r" \(window 12\)"):
        NQKVCache.load(path, ROPE, config=tiny("gemma2", window=12).config)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
    with pytest.raises(ValueError, match=r"sliding-window layers \[0\] \(window 8\); the model has \[\] "):
        NQKVCache.load(path, ROPE, config=llama.config)
    full = tmp_path / "full.safetensors"
    cache = enable(llama, scheme=ROPE).new_cache()
    greedy(llama, cache, prompt(), 2)
    cache.save(full)
    with pytest.raises(ValueError, match=r"saved with sliding-window layers \[\] \(window None\); the model has \[0\]"):
        NQKVCache.load(full, ROPE, config=model.config)


@pytest.mark.parametrize("meta, match", [
    ({"sliding_layers": "0,0"}, "distinct layers below 2"),
    ({"sliding_layers": "7"}, "distinct layers below 2"),
    ({"sliding_layers": "0;1"}, "must both be absent, or be layer indices"),
    ({"sliding_window": "-8"}, "positive window"),
    ({"sliding_window": "0"}, "positive window"),
    ({"sliding_window": ""}, "must both be absent"),
    ({"sliding_layers": "1"}, r"saved with sliding-window layers \[1\]"),
])
def test_bad_sliding_metadata_is_refused(saved, tmp_path, meta, match):
    model, path, _ = saved
    with pytest.raises(ValueError, match=match):
        NQKVCache.load(edited(path, tmp_path / "bad.safetensors", meta), ROPE, config=model.config)


@pytest.mark.parametrize("name, edit, match", [
    ("k_body0", lambda x: x[:, :, :3], r"k_body0 holds a ring of 3 code slots; .* holding 26 tokens needs 4"),
    ("v_body0", lambda x: x[:, :, :7], r"v_body0 is uint8 \(1, 2, 7, 8\), expected uint8 \(1, 2, 8, 8\)"),
    ("k_body1", lambda x: torch.cat([x, x[:, :, :1]], 2),
     r"k_body1 is float16 \(1, 2, 9, 1\), expected float16 \(1, 2, 8, 1\)"),
    ("k_body1", lambda x: x.fill_(float("nan")), "k_body1 holds non-finite"),
    ("k_ring", lambda x: torch.cat([x, x], 2), r"k_ring is float32 \(1, 2, 6, 16\), .*crop_margin"),
    ("k_sink", lambda x: x[..., :8], "cache has 2 kv heads of dim 8; the model has 2 kv heads of dim 16"),
    ("t_mu_k", lambda x: x.fill_(float("inf")), "t_mu_k holds non-finite"),
    ("t_k_order", torch.arange(16), "t_k_order differs from the channel order of the model's RoPE"),
    ("length", torch.tensor(-1), "length must be >= 0"),
])
def test_ring_of_codes_that_does_not_fit_is_refused(saved, tmp_path, name, edit, match):
    model, path, _ = saved
    bad = edited(path, tmp_path / "bad.safetensors", **{f"layer0__{name}": edit})
    with pytest.raises(ValueError, match=f"bad.safetensors: layer 0: {match}"):
        NQKVCache.load(bad, ROPE, config=model.config)


def test_window_that_covers_the_sliding_one_stores_no_codes_and_truncated_files_are_refused(saved, tmp_path):
    model, path, _ = saved
    # the exact window covers a sliding window of 4: the layer keeps no ring of codes, so a file whose
    # header claims one for it is refused
    narrow = tiny("gemma2", window=4)
    cache = enable(narrow, scheme=ROPE).new_cache()
    greedy(narrow, cache, prompt(), 6)
    cache.save(tmp_path / "n.safetensors")
    m, t = read(tmp_path / "n.safetensors")
    assert t["layer0.k_body0"].shape[2] == 0
    t["layer0.k_body0"], t["layer0.k_body1"] = t["layer1.k_body0"][:, :, :3], t["layer1.k_body1"][:, :, :3]
    with pytest.raises(ValueError, match="layer 0: k_body0 holds 3 code slots; a sliding layer of window 4 within"):
        NQKVCache.load(forge(tmp_path / "b.safetensors", m, t), ROPE, config=narrow.config)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="not a readable safetensors NQKV cache"):
        NQKVCache.load(tmp_path / "cut.safetensors", ROPE, config=model.config)
