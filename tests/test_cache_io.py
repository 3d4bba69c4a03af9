"""Cache files and K/V as untrusted input: every defect a crafted file or a mismatched model can
carry is a ``ValueError`` naming it, never a crash or silent garbage.

A crafted file carries a digest recomputed over its edited contents (:func:`forge`): the plain
SHA-256 is no obstacle to anyone. Cases that crashed or misread in the native decode step, and the
fuzzing, run in one subprocess, so that a segfault fails tests instead of the run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nqkv_core.cache import NQKVCache, NQKVLayer, enable, io  # noqa: E402
from nqkv_core.scheme import KVScheme, nqkv_preset  # noqa: E402

TESTS = Path(__file__).resolve().parent
# RoPE-centred keys: decoded by the native step, which reads the shared (positions, head_dim) RoPE table
ROPE = KVScheme("rope", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True, k_centre_rope=True,
                v_centre=True, sinks=2, window=4, unbiased=True, stats_tokens=4)
# every saved transform field: centres, equalisation, rotations, the query metric, RoPE frequencies
FULL = KVScheme("full", k_bits=3, v_bits=4, k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True,
                k_centre_rope=True, v_centre=True, k_equalize="qk", v_equalize=True, sinks=2, window=4,
                k_rounding="query", stats_tokens=4)
# (a fit period of sinks + 4 tokens, 8 queries for FULL: the 12-token caches below are past it)


def tiny_model(head_dim: int = 16, layers: int = 2, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def saved_cache(model, scheme: KVScheme, path: Path, tokens: int = 12, batch: int = 1, pads: int = 0) -> NQKVCache:
    """A cache of ``scheme`` filled by one forward of ``tokens`` random tokens, saved to ``path``
    (the last row left-padded by ``pads`` tokens)."""
    cache = enable(model, scheme=scheme).new_cache()
    ids = torch.randint(1, 96, (batch, tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, :pads] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    cache.save(path)
    return cache


def read(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def forge(path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` with ``meta`` and a SHA-256 recomputed over them, as anyone can (an HMAC
    in ``meta`` is kept as it was: it cannot be recomputed without the key)."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path),
              metadata={**body, "sha256": io._digest(tensors, body)})
    return Path(path)


def edited(src, dst, meta: dict | None = None, **tensors) -> Path:
    """``src`` with metadata entries and tensors replaced (a tensor given as None is dropped), forged."""
    m, t = read(src)
    m.update(meta or {})
    for name, x in tensors.items():
        name = name.replace("__", ".")  # layer0__t_mu_k -> layer0.t_mu_k
        if x is None:
            t.pop(name)
        else:
            t[name] = x(t[name]) if callable(x) else x
    return forge(dst, m, t)


def decode_step(model, cache) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([[5]] * cache.layers[0].batch_size if cache.layers[0].is_initialized else [[5]])
        return model(ids, past_key_values=cache, use_cache=True).logits


def run_python(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this module as ``t`` (a crash is its exit code)."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_cache_io as t, torch\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS.parent, env=env)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """``(model, path)``: a two-layer cache of every transform field, saved."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("io") / "full.safetensors"
    saved_cache(model, FULL, path)
    return model, path


# -- the file: integrity and authentication --------------------------------------------------------


@pytest.mark.parametrize("scheme", [ROPE, FULL], ids=["rope", "fitted-on-queries"])
def test_cache_saved_in_its_fit_period_continues_as_the_original(scheme, tmp_path):
    # Fewer tokens than fit_tokens: the file holds them exact (and the queries a transform is fitted
    # on), no transform; the loaded cache fits at the same step, on the same tokens, as the original.
    model = tiny_model()
    cache = saved_cache(model, scheme, tmp_path / "p.safetensors", tokens=scheme.fit_tokens - 2, batch=2)
    assert all(layer.prefix is not None and layer.transform is None for layer in cache.layers)
    names = set(read(tmp_path / "p.safetensors")[1])
    assert "layer0.prefix_k" in names and ("layer0.prefix_q" in names) == (scheme is FULL)
    assert not any(".t_" in n or "_body" in n for n in names)
    loaded = NQKVCache.load(tmp_path / "p.safetensors", scheme, config=model.config)
    for _ in range(6):  # through the fit and past it
        torch.testing.assert_close(decode_step(model, loaded), decode_step(model, cache), rtol=0, atol=0)
    assert all(layer.prefix is None and layer.transform is not None for layer in loaded.layers)
    for a, b in zip(cache.layers, loaded.layers):
        sa, sb = a.state(), b.state()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("edit, match", [
    (dict(layer0__prefix_v=lambda x: x[:, :, :-1]), "prefix_v is"),
    (dict(layer0__length=torch.tensor(3)), "prefix_k is"),
    (dict(layer0__prefix_k=lambda x: x.to(torch.float16)), "prefix_k is"),
    (dict(layer0__prefix_q=None), "prefix_q must be"),
    (dict(layer0__prefix_q=lambda x: x[:, :3]), "prefix_q must be"),
    (dict(layer0__prefix_k=lambda x: x.index_fill(2, torch.tensor([1]), float("nan"))), "non-finite"),
    (dict(layer0__t_mu_v=torch.zeros(1, 2, 1, 16)), "unexpected"),
    (dict(layer0__length=torch.tensor(0)), "1 to"),
])
def test_crafted_fit_period_is_rejected(tmp_path, edit, match):
    model = tiny_model()
    saved_cache(model, FULL, tmp_path / "p.safetensors", tokens=5)
    bad = edited(tmp_path / "p.safetensors", tmp_path / "bad.safetensors", **edit)
    with pytest.raises(ValueError, match=match):
        NQKVCache.load(bad, FULL, config=model.config)


def test_fit_period_file_past_its_end_is_rejected(tmp_path):
    # as many exact tokens as fit_tokens in every row: such a cache is saved with its transform
    model = tiny_model()
    saved_cache(model, ROPE, tmp_path / "p.safetensors", tokens=5)
    k = torch.randn(1, 2, ROPE.fit_tokens, 16)
    bad = edited(tmp_path / "p.safetensors", tmp_path / "bad.safetensors", layer0__prefix_k=k, layer0__prefix_v=k,
                 layer0__length=torch.tensor(ROPE.fit_tokens))
    with pytest.raises(ValueError, match="past its fit period"):
        NQKVCache.load(bad, ROPE, config=model.config)


def test_round_trip_and_hmac_key(tmp_path):
    model = tiny_model()
    cache = saved_cache(model, ROPE, tmp_path / "plain.safetensors")
    cache.save(tmp_path / "keyed.safetensors", key=b"secret")
    loaded = NQKVCache.load(tmp_path / "keyed.safetensors", ROPE, config=model.config, key=b"secret")
    for a, b in zip(cache.layers, loaded.layers):
        sa, sb = a.state(), b.state()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(decode_step(model, cache), decode_step(model, loaded))
    NQKVCache.load(tmp_path / "keyed.safetensors", ROPE)  # the plain checksum is there too
    with pytest.raises(ValueError, match="HMAC"):
        NQKVCache.load(tmp_path / "keyed.safetensors", ROPE, key=b"other")
    with pytest.raises(ValueError, match="HMAC"):
        NQKVCache.load(tmp_path / "plain.safetensors", ROPE, key=b"secret")
    # a forger recomputes the SHA-256 but cannot recompute the HMAC
    forged = edited(tmp_path / "keyed.safetensors", tmp_path / "f.safetensors",
                    layer0__k_sink=lambda x: x + 1)
    NQKVCache.load(forged, ROPE)
    with pytest.raises(ValueError, match="HMAC"):
        NQKVCache.load(forged, ROPE, key=b"secret")


def test_bf16_model_cache_saves_its_exact_tokens_in_bf16_and_continues_bitwise(tmp_path):
    model = tiny_model(dtype=torch.bfloat16)
    cache = saved_cache(model, ROPE, tmp_path / "b.safetensors")
    tensors = read(tmp_path / "b.safetensors")[1]
    assert tensors["layer0.k_sink"].dtype == tensors["layer0.v_ring"].dtype == torch.bfloat16
    loaded = NQKVCache.load(tmp_path / "b.safetensors", ROPE, config=model.config)
    for _ in range(4):
        assert torch.equal(decode_step(model, loaded), decode_step(model, cache))


def test_reset_layer_loads_without_a_transform(tmp_path):
    # a layer that was filled and reset holds buffers but no transform: it is refitted on the next step
    model = tiny_model()
    cache = saved_cache(model, ROPE, tmp_path / "a.safetensors")
    cache.layers[1].reset()
    cache.save(tmp_path / "b.safetensors")
    loaded = NQKVCache.load(tmp_path / "b.safetensors", ROPE, config=model.config)
    assert loaded.layers[1].transform is None and not loaded.layers[1].is_initialized
    assert loaded.layers[0].transform is not None
    x, y = decode_step(model, cache), decode_step(model, loaded)
    assert torch.equal(x, y)


# -- the metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize("meta, match", [
    ({"num_layers": "1000000000"}, "num_layers"),
    ({"num_layers": "-1"}, "num_layers"),
    ({"num_layers": "2.0"}, "num_layers"),
    ({"num_layers": "3"}, "3 layers saved"),  # the model has 2
    ({"num_layers": "1"}, "unexpected tensor 'layer1"),
    ({"dtype": "float64"}, "dtype"),
    ({"dtype": "Tensor"}, "dtype"),
    ({"version": "0"}, "format version"),
])
def test_bad_metadata_fails_before_anything_is_built(full, tmp_path, monkeypatch, meta, match):
    model, path = full
    bad = edited(path, tmp_path / "bad.safetensors", meta)

    def no_layer(*args, **kwargs):
        raise AssertionError("a layer was built before the metadata was checked")

    monkeypatch.setattr(NQKVLayer, "__init__", no_layer)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        NQKVCache.load(bad, FULL, config=model.config if meta.get("num_layers") == "3" else None)
    assert time.perf_counter() - start < 1.0


# -- every tensor of a layer -----------------------------------------------------------------------


def _not_orthogonal(r):
    return r * 2


@pytest.mark.parametrize("name, edit, match", [
    ("t_mu_k", lambda x: x[..., :8], r"t_mu_k is float32 \(1, 2, 1, 8\), expected float32 \(1, 2, 1, 16\)"),
    ("t_mu_k", lambda x: x[0], "t_mu_k is float32"),
    ("t_rot_k", lambda x: x[:8], r"t_rot_k is float32 \(8, 16\), expected float32 \(16, 16\)"),
    ("t_rot_k", lambda x: x.double(), "t_rot_k is float64"),
    ("t_rot_k", _not_orthogonal, "t_rot_k is not orthogonal"),
    ("t_rot_v", lambda x: x.roll(1, 0) + 0.1, "t_rot_v is not orthogonal"),
    ("t_inv_freq", lambda x: x[:1], r"t_inv_freq is float32 \(1,\), expected float32 \(8,\)"),
    ("t_inv_freq", lambda x: x * 1.5, "RoPE frequencies"),
    ("t_a_k", lambda x: -x, "t_a_k must be positive"),
    ("t_b_v", lambda x: x.fill_(float("inf")), "t_b_v holds non-finite"),
    ("t_mu_v", lambda x: x.fill_(float("nan")), "t_mu_v holds non-finite"),
    ("t_k_metric", lambda x: x[:, :, :2], "t_k_metric is float32"),
    ("t_k_metric_iso", lambda x: -x - 1, "t_k_metric_iso must be >= 0"),
    ("t_k_metric_iso", None, r"missing \['t_k_metric_iso'\]"),
    ("t_k_metric", lambda x: x * 1e30, "do not make a"),
    ("t_k_feedback", torch.eye(16)[None, None], r"unexpected \['t_k_feedback'\]"),
    ("k_sink", lambda x: x.fill_(float("nan")), "k_sink holds non-finite"),
    ("v_ring", lambda x: x.half(), "v_ring is float16"),
    ("k_ring", lambda x: x[:, :, :1], "crop_margin"),
    ("k_body0", lambda x: x[..., :4], r"k_body0 is uint8 \(1, 2, 7, 4\), expected uint8 \(1, 2, 7, 6\)"),
    ("v_body1", lambda x: x.float(), "v_body1 is float32"),
    ("v_body1", lambda x: x.fill_(float("inf")), "v_body1 holds non-finite"),
    ("length", torch.tensor(20000), r"k_body0 is uint8 \(1, 2, 7, 6\), expected uint8 \(1, 2, 19995, 6\)"),
    ("length", torch.tensor(-3), "length must be >= 0"),
    ("length", torch.tensor([12]), "length must be an int64 scalar"),
    ("length", None, "length must be an int64 scalar"),
])
def test_tensor_that_does_not_fit_the_scheme_is_rejected(full, tmp_path, name, edit, match):
    model, path = full
    bad = edited(path, tmp_path / "bad.safetensors", **{f"layer1__{name}": edit})
    with pytest.raises(ValueError, match=f"bad.safetensors: layer 1: .*{match}"):
        NQKVCache.load(bad, FULL, config=model.config)


def test_e5m3_scale_bytes_beyond_the_finite_range_are_rejected(tmp_path):
    # the 4-bit preset's one-byte scales: 0xF8-0xFF would decode to fp16 infinities and NaNs
    model, scheme = tiny_model(), nqkv_preset(4, window=2, block=16).replace(sinks=1, stats_tokens=2)
    path = tmp_path / "e5m3.safetensors"
    saved_cache(model, scheme, path, tokens=12)
    assert read(path)[1]["layer1.k_body1"].dtype == torch.uint8
    NQKVCache.load(path, scheme, config=model.config)  # as saved: loads
    bad = edited(path, tmp_path / "bad.safetensors", layer1__k_body1=lambda x: x.index_fill(2, torch.tensor([0]), 0xF8))
    with pytest.raises(ValueError, match=r"bad.safetensors: layer 1: k_body1 holds E5M3 scale bytes above 0xf7"):
        NQKVCache.load(bad, scheme, config=model.config)


def test_singular_query_metric_is_rejected(full, tmp_path):
    model, path = full
    bad = edited(path, tmp_path / "bad.safetensors", layer0__t_k_metric=lambda x: x * 0,
                 layer0__t_k_metric_iso=lambda x: x * 0)
    with pytest.raises(ValueError, match="layer 0: t_k_metric and t_k_metric_iso do not make a positive definite"):
        NQKVCache.load(bad, FULL, config=model.config)


def test_layers_must_agree_and_fit_the_model(full, tmp_path):
    model, path = full
    _, t = read(path)
    # layer 1 with batch 2: every one of its tensors consistent, but not with layer 0
    two = edited(path, tmp_path / "b.safetensors", **{
        k.replace(".", "__"): (lambda x: torch.cat([x, x])) for k in t if k.startswith("layer1.") and t[k].dim() == 4
    })
    with pytest.raises(ValueError, match="layer 1: batch 2, the layers before have batch 1"):
        NQKVCache.load(two, FULL)
    # without config, the layers share one RoPE table: their frequencies must agree
    freq = edited(path, tmp_path / "f.safetensors", layer1__t_inv_freq=lambda x: x * 1.5)
    with pytest.raises(ValueError, match="layer 1: t_inv_freq differs"):
        NQKVCache.load(freq, FULL)
    with pytest.raises(ValueError, match="cache has 2 kv heads of dim 16; the model has 2 kv heads of dim 32"):
        NQKVCache.load(path, FULL, config=tiny_model(head_dim=32).config)
    with pytest.raises(ValueError, match="max_cache_len"):
        NQKVCache.load(path, FULL, max_cache_len=8)
    # an empty-looking layer of a huge batch (zero-length tensors cost no file bytes)
    m, t = read(path)
    t = {k: v for k, v in t.items() if not k.startswith("layer1.")}
    t["layer1.length"] = torch.tensor(0)
    for k in ("k_sink", "v_sink", "k_ring", "v_ring", "k_body0", "v_body0", "k_body1", "v_body1"):
        t[f"layer1.{k}"] = torch.zeros(10**6, 10**6, 0, 16)
    with pytest.raises(ValueError, match="batch 1000000, 1000000 kv heads"):
        NQKVCache.load(forge(tmp_path / "h.safetensors", m, t), FULL)
    # within the bounds, layers of no tokens and no data are left fresh: nothing is allocated for them
    t = {"layer0.length": torch.tensor(0), "layer1.length": torch.tensor(0)}
    for i in range(2):
        for k in ("k_sink", "v_sink", "k_ring", "v_ring"):
            t[f"layer{i}.{k}"] = torch.zeros(4096, 64, 0, 16)
        t |= {f"layer{i}.k_body0": torch.zeros(4096, 64, 0, 6, dtype=torch.uint8),
              f"layer{i}.v_body0": torch.zeros(4096, 64, 0, 8, dtype=torch.uint8),
              f"layer{i}.k_body1": torch.zeros(4096, 64, 0, 1, dtype=torch.float16),
              f"layer{i}.v_body1": torch.zeros(4096, 64, 0, 1, dtype=torch.float16)}
    m["scheme"] = io.scheme_json(FULL.replace(sinks=0, window=1))
    loaded = NQKVCache.load(forge(tmp_path / "e.safetensors", m, t), FULL.replace(sinks=0, window=1))
    assert not any(layer.is_initialized for layer in loaded.layers)


def test_step_inputs_must_match_the_buffers():
    model = tiny_model()
    cache = enable(model, scheme=ROPE).new_cache()
    k = torch.randn(1, 2, 5, 16)
    cache.update(k, k, 0)
    q = torch.randn(1, 4, 5, 16)
    cache.layers[0].attention(q, None, 0.25)
    for bad in (torch.randn(2, 2, 1, 16), torch.randn(1, 3, 1, 16), torch.randn(1, 2, 1, 32),
                torch.randn(1, 2, 1, 16, dtype=torch.float64), torch.randn(2, 16)):
        with pytest.raises(ValueError, match="NQKVCache was filled with batch 1, 2 kv heads of dim 16"):
            cache.update(bad, bad, 0)
    with pytest.raises(ValueError, match="got values of shape"):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 2, 16), 0)
    layer = cache.layers[0]
    for bad in (torch.randn(1, 3, 1, 16), torch.randn(1, 0, 1, 16), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 2, 16),
                torch.randn(2, 4, 1, 16), torch.randn(4, 1, 16)):
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        with pytest.raises(ValueError, match="a multiple of 2 heads"):
            layer.attention(bad, None, 0.25)


# -- in one subprocess: the cases that crashed or misread in the native decode step, then fuzzing ----
# (flipped and truncated bytes, edited headers, forged tensors). A case that kills the process
# fails its test and every test after it, instead of the whole run.

SUBPROCESS = r"""
import json, struct, traceback
from pathlib import Path
from hypothesis import HealthCheck, given, settings, strategies as st
from nqkv_core.cache import NQKVCache
tmp = Path(TMP)

def case(name, fn):
    print("CASE", name, flush=True)
    try:
        fn()
        print("RESULT", name, "no error", flush=True)
    except ValueError as e:
        print("RESULT", name, "ValueError:", str(e).replace("\n", " "), flush=True)
    except BaseException as e:
        traceback.print_exc()
        print("RESULT", name, type(e).__name__, str(e).replace("\n", " ")[:300], flush=True)

def inv_freq_cut():
    # a consistent 20k-token file whose RoPE frequencies are cut to one element, loaded without config
    model = t.tiny_model()
    cache = NQKVCache(t.ROPE, config=model.config)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        cache.append(torch.randn(1, 2, 20000, 16, generator=g), torch.randn(1, 2, 20000, 16, generator=g), i)
    cache.save(tmp / "long.safetensors")
    bad = t.edited(tmp / "long.safetensors", tmp / "cut.safetensors",
                   layer0__t_inv_freq=lambda x: x[:1], layer1__t_inv_freq=lambda x: x[:1])
    t.enable(model, scheme=t.ROPE)
    t.decode_step(model, NQKVCache.load(bad, t.ROPE))

def fed_by(model, batch=1):
    # a cache filled by a head_dim-16 float32 model of batch ``batch``, then a step of ``model``
    cache = t.saved_cache(t.tiny_model(), t.ROPE, tmp / "fed.safetensors", batch=batch)
    t.enable(model, scheme=t.ROPE)
    with torch.no_grad():
        model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)

case("inv_freq_cut", inv_freq_cut)
case("other_head_dim", lambda: fed_by(t.tiny_model(head_dim=32)))
case("other_dtype", lambda: fed_by(t.tiny_model(dtype=torch.bfloat16)))
case("other_batch", lambda: fed_by(t.tiny_model(), batch=2))

import test_cache_io_sliding as ts, test_rope_layouts as tr
# files of every layout a cache saves: full layers (RoPE-centred; every transform field), sliding
# layers with a ring of codes, a channel order (interleaved RoPE), a left-padded batch's starts
models = {"rope": t.tiny_model(), "full": t.tiny_model(), "sliding": ts.tiny("mistral"),
          "cohere": tr.tiny_model("cohere"), "padded": t.tiny_model(), "period": t.tiny_model()}
schemes = {"rope": t.ROPE, "full": t.FULL, "sliding": ts.ROPE, "cohere": tr.ROPE, "padded": t.ROPE,
           "period": t.FULL}
for name in ("rope", "full", "sliding", "cohere"):
    t.saved_cache(models[name], schemes[name], tmp / f"{name}.safetensors", tokens=20)
t.saved_cache(models["padded"], schemes["padded"], tmp / "padded.safetensors", tokens=12, batch=2, pads=5)
# a left-padded batch in its fit period: exact tokens and queries, no transform
t.saved_cache(models["period"], schemes["period"], tmp / "period.safetensors", tokens=6, batch=2, pads=2)
outcomes = {"rejected": 0, "loaded": 0, "decoded": 0, "fuzzed_by_file": {name: 0 for name in models}}
SPECIAL = [0.0, -1.0, 1e30, float("nan"), float("inf"), 65504.0]

def header_edit(raw, data):
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    key = data.draw(st.sampled_from(sorted(head)))
    if key == "__metadata__":
        field = data.draw(st.sampled_from(sorted(head[key])))
        head[key][field] = data.draw(st.sampled_from(["1000000000", "-1", "", "0", "1", "3", "float64", "x" * 100]))
    else:
        part = data.draw(st.sampled_from(["shape", "dtype", "data_offsets"]))
        if part == "dtype":
            head[key][part] = data.draw(st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "F64", "I8", "BOOL"]))
        else:
            head[key][part] = data.draw(st.lists(st.integers(0, 2**40), max_size=5))
    new = json.dumps(head).encode()
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]

def tensor_edit(src, dst, data):
    meta, tensors = t.read(src)
    name = data.draw(st.sampled_from(sorted(tensors)))
    x = tensors[name]
    op = data.draw(st.sampled_from(["slice", "reshape", "dtype", "value", "scale", "drop", "length", "meta"]))
    if op == "slice" and x.dim():
        dim = data.draw(st.integers(0, x.dim() - 1))
        tensors[name] = x.narrow(dim, 0, data.draw(st.integers(0, x.shape[dim])))
    elif op == "reshape" and x.dim() > 1:
        tensors[name] = x.reshape(-1)
    elif op == "dtype":
        tensors[name] = x.to(data.draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8])))
    elif op == "value" and x.numel():
        flat = x.clone().reshape(-1)
        i = data.draw(st.integers(0, flat.numel() - 1))
        flat[i] = data.draw(st.sampled_from(SPECIAL)) if x.is_floating_point() else data.draw(st.integers(0, 255))
        tensors[name] = flat.reshape(x.shape)
    elif op == "scale" and x.is_floating_point():
        tensors[name] = x * data.draw(st.sampled_from([0.0, -1.0, 1e-30, 1e30, 2.0]))
    elif op == "drop":
        tensors.pop(name)
    elif op == "length":
        tensors[name.split(".")[0] + ".length"] = torch.tensor(data.draw(st.integers(-5, 10**6)))
    elif op == "meta":
        field = data.draw(st.sampled_from(["num_layers", "dtype"]))
        meta[field] = data.draw(st.sampled_from(["0", "1", "3", "float16", "bfloat16"]))
    t.forge(dst, meta, tensors)

@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def fuzz(data):
    name = data.draw(st.sampled_from(sorted(models)))
    outcomes["fuzzed_by_file"][name] += 1
    src, dst = tmp / f"{name}.safetensors", tmp / "fuzzed.safetensors"
    # mostly forged tensors: the checks a file must pass after its digest
    kind = data.draw(st.sampled_from(["tensor", "tensor", "tensor", "flip", "truncate", "header"]))
    raw = src.read_bytes()
    if kind == "flip":  # half of the flips in the header: a flip in the data fails the checksum
        b, header_end = bytearray(raw), 8 + struct.unpack("<Q", raw[:8])[0]
        spots = st.integers(0, header_end - 1) | st.integers(0, len(b) - 1)
        for i in data.draw(st.lists(spots, min_size=1, max_size=4)):
            b[i] ^= data.draw(st.integers(1, 255))
        dst.write_bytes(bytes(b))
    elif kind == "truncate":
        dst.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "header":
        dst.write_bytes(header_edit(raw, data))
    else:
        tensor_edit(src, dst, data)
    config = models[name].config if data.draw(st.booleans()) else None
    try:
        cache = NQKVCache.load(dst, schemes[name], config=config)
    except ValueError:
        outcomes["rejected"] += 1
        return
    outcomes["loaded"] += 1
    try:
        t.decode_step(models[name], cache)
    except ValueError:  # e.g. a file naming another model dtype: a clear error at the first step
        return
    outcomes["decoded"] += 1

case("fuzz", fuzz)
print("FUZZ", json.dumps(outcomes), flush=True)
"""


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory) -> dict[str, str]:
    """Each case's outcome, from one subprocess; a case that killed it reads 'crashed ...'."""
    code = SUBPROCESS.replace("TMP", repr(str(tmp_path_factory.mktemp("sub")))).replace("EXAMPLES", "150")
    proc = run_python(code)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            results[line.split()[1]] = f"crashed (exit code {proc.returncode})"
        elif line.startswith(("RESULT ", "FUZZ ")):
            _, name, outcome = line.split(" ", 2) if line.startswith("RESULT") else ("", "outcomes", line[5:])
            results[name] = outcome
    results["stderr"] = proc.stderr[-3000:]
    return results


@pytest.mark.parametrize("case, match", [
    ("inv_freq_cut", r"ValueError: \S+cut.safetensors: layer 0: t_inv_freq is float32 \(1,\), expected float32 \(8,\)"),
    ("other_head_dim", r"ValueError: NQKVCache was filled with batch 1, 2 kv heads of dim 16, .* got keys of shape"
                       r" \(1, 2, 1, 32\)"),
    ("other_dtype", r"ValueError: NQKVCache was filled with .* torch.float32 .* torch.bfloat16"),
    ("other_batch", r"ValueError: NQKVCache was filled with batch 2, .* got keys of shape \(1, 2, 1, 16\)"),
])
def test_crash_case_is_a_value_error(subprocess_results, case, match):
    r = subprocess_results
    assert case in r, f"the subprocess never reached {case}: {r}"
    assert re.search(match, r[case]), f"{r[case]}\n{r['stderr']}"


def test_fuzzed_files_are_rejected_or_decode(subprocess_results):
    # every fuzzed file is rejected with a ValueError, or loads and decodes a step (the process lives)
    r = subprocess_results
    assert r.get("fuzz") == "no error", f"{r.get('fuzz', 'never reached')}\n{r['stderr']}"
    outcomes = json.loads(r["outcomes"])
    assert outcomes["rejected"] > 0 and outcomes["decoded"] > 0, outcomes
    assert all(outcomes["fuzzed_by_file"].values()), outcomes  # every layout's file was fuzzed
