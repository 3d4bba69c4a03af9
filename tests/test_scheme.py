"""KVScheme: storage accounting, exactness of the transforms, round-trip error."""

import math

import pytest
import torch

from nqkv_core.codebook import nf_codebook
from nqkv_core.quantize import dequantize_blockwise, quantize_blockwise
from nqkv_core.scheme import (
    FULL_PRECISION, KVScheme, apply_rope, default_scheme, fit_transform, hadamard, kivi, nqkv_preset,
    quantize_roundtrip, rotation, roundtrip, uniform,
)

INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)


def key_offset(t, n: int, start: int = 0):
    """What attention adds to stored keys (in the stored basis) at positions ``[start, start + n)``:
    None for a plain mean (a constant shift cancels in the softmax), ``((R(p) mu_k) * a_k) @ rot_k``
    for a RoPE-aware centre, so that a score is ``queries(q) . (dequantized key + key_offset)``."""
    if t.mu_k is None or t.inv_freq is None:
        return None
    c = t.key_centre(n, start)
    if t.a_k is not None:
        c = c * t.a_k
    return c @ t.rot_k if t.rot_k is not None else c


def _kvq(b=1, hkv=2, g=2, t=96, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, d, generator=gen) + torch.linspace(-3, 3, d)  # per-channel offsets
    v = torch.randn(b, hkv, t, d, generator=gen)
    q = torch.randn(b, hkv * g, t, d, generator=gen)
    return k, v, q


def test_hadamard_orthogonal():
    h = hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rotation"):
        hadamard(48)


@pytest.mark.parametrize("n", [1, 2, 3, 48, 64, 80, 96, 100, 112, 128, 160, 257])
def test_rotation_is_orthogonal_and_fixed_for_every_head_dim(n):
    r = rotation(n)
    assert r.dtype == torch.float32 and r.shape == (n, n)
    eye = torch.eye(n)
    torch.testing.assert_close(r @ r.T, eye, atol=2e-6, rtol=0)  # fp32 rounding of the entries only
    torch.testing.assert_close(r.T @ r, eye, atol=2e-6, rtol=0)
    assert torch.equal(r, rotation(n))  # the same for every layer and every call
    assert torch.equal(rotation(n, seed=1), rotation(n, seed=1))
    assert n == 1 or not torch.equal(r, rotation(n, seed=1))
    if n & (n - 1) == 0:
        assert torch.equal(r, hadamard(n))
    # a channel is spread evenly over a power-of-two block: entries are 0 or +-1/sqrt(block size)
    block = r[r != 0].double().pow(-2)
    torch.testing.assert_close(block, 2 ** block.log2().round(), rtol=1e-5, atol=0)
    assert int((r != 0).sum()) == sum(4 ** i for i in range(12) if n >> i & 1)


def test_rotation_is_the_same_across_processes():
    import subprocess
    import sys

    code = "from nqkv_core.scheme import rotation; print(float((rotation(96) * torch.arange(96.)).sum()))"
    out = subprocess.run([sys.executable, "-c", "import torch;" + code], capture_output=True, text=True, check=True)
    assert float(out.stdout) == pytest.approx(float((rotation(96) * torch.arange(96.0)).sum()), abs=0, rel=0)


def test_rotation_blocks_are_powers_of_two_on_block_boundaries():
    r = rotation(96)
    assert r[:64, 64:].abs().max() == 0 and r[64:, :64].abs().max() == 0
    torch.testing.assert_close(r[:64, :64].abs(), torch.full((64, 64), 1 / 8))
    torch.testing.assert_close(r[64:, 64:].abs(), torch.full((32, 32), 32 ** -0.5))
    with pytest.raises(ValueError):
        rotation(0)


@pytest.mark.parametrize("head_dim", [32, 80, 96, 64, 128])
@pytest.mark.parametrize("bits,v_bits", [(4, 4), (4, 3), (3, 2), (2, 2)])
def test_fit_head_dim_adapts_blocks_and_keeps_everything_else(head_dim, bits, v_bits):
    preset = nqkv_preset(bits, v_bits=v_bits)
    fitted = preset.fit_head_dim(head_dim)
    block = math.gcd(64, head_dim)
    assert (fitted.k_block, fitted.v_block) == (block, block)
    assert fitted.replace(name=preset.name, k_block=64, v_block=64) == preset  # nothing else changes
    if block == 64:
        assert fitted is preset
    else:
        assert fitted.name == f"{preset.name} [head_dim {head_dim}: blocks 64->{block}]"
    # the fitted scheme round-trips keys and values of that head_dim (rotation included)
    k, v, q = _kvq(d=head_dim, t=40)
    t = fit_transform(fitted, k, v, q, 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert t.rot_k is not None and t.rot_k.shape == (head_dim, head_dim)
    k_hat, v_hat = roundtrip(fitted, k, v, q, t)
    assert (k_hat - k).pow(2).mean() < 0.5 * k.var() and (v_hat - v).pow(2).mean() < 0.5 * v.var()


def test_fit_head_dim_names_each_side_and_refuses_partial_bytes():
    s = KVScheme("x", k_block=64, v_block=16, v_axis="token")
    assert s.fit_head_dim(96).name == "x [head_dim 96: K blocks 64->32]" and s.fit_head_dim(96).v_block == 16
    chan = KVScheme("c", k_axis="channel", k_block=32, v_block=64)  # token groups do not depend on head_dim
    assert chan.fit_head_dim(80).k_block == 32 and chan.fit_head_dim(80).v_block == 16
    with pytest.raises(ValueError, match="head_dim % 8"):
        nqkv_preset(3).fit_head_dim(36)
    with pytest.raises(ValueError, match="3-bit"):
        nqkv_preset(4).replace(layer_bits=(4, 3)).fit_head_dim(20)
    assert nqkv_preset(8).fit_head_dim(36).k_block == 4
    with pytest.raises(ValueError, match="head_dim"):
        nqkv_preset(4).fit_head_dim(0)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_default_scheme_rotates_for_every_head_dim(head_dim):
    s = default_scheme(4, head_dim)
    assert s.k_rotate and s.v_rotate and s.k_block == math.gcd(head_dim, 64)
    assert s.name == f"NQKV-4 b{s.k_block} S4 W32"


def test_bits_per_element_charges_scales_and_fp_tokens():
    s = KVScheme("x", k_bits=4, v_bits=4, sinks=0, window=0)
    assert s.bits_per_element(1024) == pytest.approx(4 + 16 / 64)
    s = KVScheme("x", k_bits=4, v_bits=4, sinks=4, window=28)
    assert s.bits_per_element(1024) == pytest.approx(((1024 - 32) * 4.25 + 32 * 16) / 1024)
    # min-max baselines pay a scale and a zero-point per group
    assert kivi(2, group=32, sinks=0, window=0).bits_per_element(1024) == pytest.approx(3.0)
    assert FULL_PRECISION.bits_per_element(1024) == 16
    # centre vectors: 16 bits per channel, once per head
    c = KVScheme("c", k_centre=True)
    assert c.bits_per_element(1024) == pytest.approx(4.25 + 16 / 1024 / 2)
    assert nqkv_preset(4).bits_per_element(1 << 20) < 4.26


@pytest.mark.parametrize(
    "scheme",
    [
        KVScheme("c", k_centre=True, v_centre=True, k_rotate=True, v_rotate=True, stats_tokens=32),
        KVScheme("e", k_centre=True, k_equalize="qk", v_equalize=True, k_rotate=True),
        KVScheme("r", k_centre=True, k_centre_rope=True, k_rotate=True, v_centre=True, v_rotate=True),
    ],
    ids=["centre-rot", "equalize", "rope-centre"],
)
def test_transform_preserves_attention(scheme):
    k, v, q = _kvq()
    t = fit_transform(scheme, k, v, q, INV_FREQ)
    g = q.shape[1] // k.shape[1]
    ref = torch.softmax(q @ k.repeat_interleave(g, 1).transpose(-1, -2), -1) @ v.repeat_interleave(g, 1)
    kk = t.keys(k)
    off = key_offset(t, k.shape[-2])  # a RoPE'd centre is not shift-invariant: attention adds it back
    assert (off is None) == (not scheme.k_centre_rope)
    kk = kk + off if off is not None else kk
    scores = t.queries(q, g) @ kk.repeat_interleave(g, 1).transpose(-1, -2)
    out = t.output(torch.softmax(scores, -1) @ t.values(v).repeat_interleave(g, 1), g)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t.keys_back(t.keys(k)), k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t.values_back(t.values(v)), v, atol=1e-4, rtol=1e-4)


def test_rope_inverse():
    x = torch.randn(1, 2, 10, 16)
    pos = torch.arange(10)
    torch.testing.assert_close(apply_rope(apply_rope(x, pos, INV_FREQ), pos, INV_FREQ, inverse=True), x)


def test_scheme_rope_is_rotate_half_and_partial_with_fewer_frequencies():
    from nqkv_core.rope import rotate_half

    x = torch.randn(1, 2, 10, 16)
    pos = torch.arange(10) + 3
    ang = pos.float()[:, None] * INV_FREQ[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    torch.testing.assert_close(apply_rope(x, pos, INV_FREQ), x * cos + rotate_half(x) * sin, atol=0, rtol=0)
    # 4 frequencies rotate the first 8 channels (rotate-half among them); the other 8 pass through
    part = apply_rope(x, pos, INV_FREQ[:4])
    assert torch.equal(part[..., 8:], x[..., 8:])
    torch.testing.assert_close(part[..., :8], apply_rope(x[..., :8], pos, INV_FREQ[:4]))


def test_rope_inv_freq_reads_transformers_and_refuses_what_the_cache_cannot_serve():
    transformers = pytest.importorskip("transformers")
    from nqkv_core.rope import rope_spec
    from nqkv_core.scheme import rope_inv_freq, rope_layout

    small = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, vocab_size=32)
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    rope = ({"rope_parameters": {**params, "rope_theta": 500000.0}} if int(transformers.__version__.split(".")[0]) >= 5
            else {"rope_scaling": params, "rope_theta": 500000.0})  # transformers 4.x field names
    llama3 = transformers.LlamaConfig(**small, max_position_embeddings=256, **rope)
    assert torch.equal(rope_inv_freq(llama3, 32), rope_spec(llama3).inv_freq)
    with pytest.raises(ValueError, match="k_centre_rope=False"):
        rope_inv_freq(transformers.OPTConfig(**small), 32)
    # interleaved: the frequencies of the rotate-half order rope_layout gives with them
    cohere = transformers.CohereConfig(**small)
    inv_freq, order = rope_layout(cohere, 32)
    assert torch.equal(rope_inv_freq(cohere, 32), inv_freq) and torch.equal(inv_freq, rope_spec(cohere).inv_freq)
    assert order.tolist() == list(range(0, 32, 2)) + list(range(1, 32, 2))
    assert rope_layout(llama3, 32)[1] is None


def test_partial_rope_centre_preserves_attention():
    # a RoPE'd centre over the first 8 of 16 channels (GPT-NeoX-like); the rest are centred plainly
    scheme = KVScheme("r", k_centre=True, k_centre_rope=True, k_rotate=True, v_centre=True, v_rotate=True)
    k, v, q = _kvq()
    t = fit_transform(scheme, k, v, q, INV_FREQ[:4])
    g = q.shape[1] // k.shape[1]
    ref = torch.softmax(q @ k.repeat_interleave(g, 1).transpose(-1, -2), -1) @ v.repeat_interleave(g, 1)
    kk = t.keys(k) + key_offset(t, k.shape[-2])
    scores = t.queries(q, g) @ kk.repeat_interleave(g, 1).transpose(-1, -2)
    out = t.output(torch.softmax(scores, -1) @ t.values(v).repeat_interleave(g, 1), g)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the pass-through channels' centre is their plain mean, at every position
    centre = t.key_centre(k.shape[-2])
    torch.testing.assert_close(centre[..., 8:], k[..., :64, 8:].mean(-2, keepdim=True).expand_as(centre[..., 8:]))


def test_roundtrip_error_shrinks_with_bits_and_centring_helps():
    k, v, q = _kvq(t=128, d=64)
    errs = {}
    for bits in (2, 3, 4):
        s = KVScheme("s", k_bits=bits, v_bits=bits, k_quant="lloyd" if bits == 2 else "nf")
        k_hat, v_hat = roundtrip(s, k, v)
        errs[bits] = float((k_hat - k).norm() / k.norm())
        assert k_hat.shape == k.shape and v_hat.shape == v.shape
    assert errs[4] < errs[3] < errs[2]
    plain = roundtrip(KVScheme("p"), k, v)[0]
    centred = roundtrip(KVScheme("c", k_centre=True, k_rotate=True, stats_tokens=128), k, v)[0]
    assert (centred - k).norm() < (plain - k).norm()


def test_sinks_exact_and_channel_blocks():
    k, v, _ = _kvq(t=100, d=32)
    s = kivi(4, group=32, sinks=4)
    k_hat, v_hat = roundtrip(s, k, v)
    torch.testing.assert_close(k_hat[..., :4, :], k[..., :4, :])
    # 96 tokens after the sinks = 3 groups of 32; nothing left over here
    assert not torch.equal(k_hat[..., 4:, :], k[..., 4:, :])
    # a trailing partial group stays exact
    part = quantize_roundtrip(k[..., :40, :], 4, "int", 32, "channel")
    torch.testing.assert_close(part[..., 32:, :], k[..., 32:40, :])


def test_minmax_uniform_error_bound():
    x = torch.randn(2, 3, 8, 64)
    y = quantize_roundtrip(x, 4, "int", 64, "token", torch.float32)
    span = x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)
    assert bool(((y - x).abs() <= span / 15 / 2 + 1e-5).all())
    assert uniform(4).k_axis == "token"


def test_presets():
    for b in (4, 3, 2):
        p = nqkv_preset(b)
        assert p.k_bits == p.v_bits == b and p.k_axis == p.v_axis == "token" and p.k_rotate
    with pytest.raises(ValueError):
        nqkv_preset(5)
    # unequal widths: each side follows the rules of its own width
    p = nqkv_preset(3, v_bits=2)
    assert (p.name, p.k_bits, p.v_bits, p.k_quant, p.v_quant, p.v_centre) == ("NQKV-K3V2", 3, 2, "nf", "lloyd", False)
    assert nqkv_preset(4, v_bits=3).bits_per_element(1 << 20) == pytest.approx((4.25 + 3.25) / 2, abs=0.01)
    with pytest.raises(ValueError, match="got K4 V5"):
        nqkv_preset(4, v_bits=5)
    # another block size: both sides, named, scales charged (3 + 16 / 32 bits per body element)
    p = nqkv_preset(3, block=32)
    assert (p.name, p.k_block, p.v_block) == ("NQKV-3 b32", 32, 32)
    assert p.replace(name="NQKV-3", k_block=64, v_block=64) == nqkv_preset(3)
    assert p.bits_per_element(1 << 20) == pytest.approx(3.5, abs=0.01)


def test_presets_store_one_byte_scales_where_no_side_fits_its_scales():
    from nqkv_core.quantize import E5M3

    assert nqkv_preset(4).scale_dtype == E5M3
    assert nqkv_preset(4).bits_per_element(1 << 20) == pytest.approx(4.125, abs=0.01)
    assert all(nqkv_preset(b, v_bits=v).scale_dtype == torch.float16 for b, v in ((3, 3), (2, 2), (4, 3), (3, 2)))
    mixed = nqkv_preset(4).replace(layer_bits=(4, 3))  # each layer's width takes its rules
    assert [mixed.for_layer(i).scale_dtype for i in range(2)] == [E5M3, torch.float16]
    assert nqkv_preset(3).replace(layer_bits=(3, 4)).for_layer(1).scale_dtype == E5M3
    fp32 = nqkv_preset(3).replace(scale_dtype=torch.float32, layer_bits=(3, 4))
    assert fp32.for_layer(1).scale_dtype == torch.float32  # fp32 scales, chosen, stay
    for bad in ({"v_fit_scale": True}, {"k_quant": "int"}, {"v_quant": "signed"}):
        with pytest.raises(ValueError, match="E5M3"):
            nqkv_preset(4).replace(**bad)


def test_per_query_head_is_repeat_interleave():
    from nqkv_core.scheme import per_query_head

    x = torch.randn(2, 3, 1, 8)
    for g in (1, 3):
        assert torch.equal(per_query_head(x, g), x.repeat_interleave(g, dim=1))


def test_per_token_block_wider_than_head_dim_is_an_error_not_full_precision():
    from nqkv_core.scheme import quantize_roundtrip

    x = torch.randn(1, 2, 10, 64)
    with pytest.raises(ValueError, match="do not divide head_dim 64"):
        quantize_roundtrip(x, 3, "nf", 128, "token")
    # a partial group of tokens is legitimately kept exact (it fills as tokens arrive)
    assert torch.equal(quantize_roundtrip(x, 3, "nf", 32, "channel"), x)


def test_layer_bits_give_each_layer_its_width():
    base = nqkv_preset(3)
    s = base.replace(name="mixed", layer_bits=(3, 4, 2, 16))
    assert s.for_layer(0) == base.replace(name="mixed")
    assert (s.for_layer(1).k_bits, s.for_layer(1).v_bits, s.for_layer(1).k_quant) == (4, 4, "nf")
    two = s.for_layer(2)
    assert (two.k_bits, two.k_quant, two.v_quant, two.v_centre) == (2, "lloyd", "lloyd", False)
    assert two.k_centre_rope and two.window == base.window and not two.layer_bits
    assert s.for_layer(3).k_bits == s.for_layer(3).v_bits == 16
    per_layer = [base.bits_per_element(1024), nqkv_preset(4).bits_per_element(1024),
                 s.for_layer(2).bits_per_element(1024), 16.0]
    assert s.bits_per_element(1024) == pytest.approx(sum(per_layer) / 4)
    with pytest.raises(ValueError, match="no layer 4"):
        s.for_layer(4)
    with pytest.raises(ValueError, match="layer widths"):
        base.replace(layer_bits=(3, 5))
    with pytest.raises(ValueError, match="equal K and V"):
        nqkv_preset(4, v_bits=3).replace(layer_bits=(4, 4))


def test_fitted_scales_and_query_rounding_fields():
    s = nqkv_preset(3).replace(v_fit_scale=True, k_rounding="query")
    assert KVScheme.from_dict(s.to_dict()) == s
    k = torch.randn(1, 2, 40, 64)
    k_hat = quantize_roundtrip(k, 3, "nf", 64, "token", unbiased=True, fit_scale=True)  # fitted: plain levels
    assert torch.equal(k_hat, dequantize_blockwise(*quantize_blockwise(k, nf_codebook(3), 64, fit_scale=True),
                                                   nf_codebook(3), 64))
    with pytest.raises(ValueError, match="k_rounding"):
        s.replace(k_rounding="best")
    with pytest.raises(ValueError, match="k_fit_scale"):
        s.replace(k_fit_scale=True)
    with pytest.raises(ValueError, match="needs the queries"):
        fit_transform(s, k, k, inv_freq=torch.ones(32))


def test_query_rounding_lowers_the_score_error():
    # Keys coded by error feedback under E[q q^T] of the (stored-basis) queries: the mean square
    # score error q . (k - k_hat) over fresh queries from the same distribution falls below nearest
    # rounding's, though the plain squared error of the keys grows.
    gen = torch.Generator().manual_seed(0)
    d, n = 64, 512
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    q = (torch.randn(1, 4, 2 * n, d, generator=gen) * torch.logspace(0, -3, d)) @ basis.T  # a few directions lead
    k = torch.randn(1, 2, n, d, generator=gen)
    plain = KVScheme("p", k_bits=3, v_bits=16, sinks=0)
    query = plain.replace(k_rounding="query")
    t = fit_transform(query, k, k, q[:, :, :n])
    assert t.k_feedback.shape == (1, 2, d, d)
    k_near, _ = roundtrip(plain, k, k)
    k_query, _ = roundtrip(query, k, k, transform=t)
    fresh = q[:, :, n:].reshape(1, 2, -1, d)  # query heads 2h, 2h+1 belong to kv head h
    score_err = [((fresh @ (k - kh).transpose(-1, -2)) ** 2).mean() for kh in (k_near, k_query)]
    assert score_err[1] < 0.7 * score_err[0]
    assert ((k - k_query) ** 2).mean() > ((k - k_near) ** 2).mean()


def test_scheme_dict_round_trip():
    import json

    s = nqkv_preset(2, window=64).replace(name="plan", layer_bits=(2, 3, 16), scale_dtype=torch.float32)
    back = KVScheme.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.for_layer(1).k_bits == 3
    with pytest.raises(ValueError, match="not KVScheme fields"):
        KVScheme.from_dict({**s.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="scale_dtype"):
        KVScheme.from_dict({**s.to_dict(), "scale_dtype": "float99"})


def test_default_scheme_follows_the_models_rope():
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, vocab_size=32)
    llama = default_scheme(4, 32, config=transformers.LlamaConfig(**small))
    assert llama.k_centre and llama.k_centre_rope and llama.name == "NQKV-4 b32 S4 W32"
    opt = default_scheme(4, 32, config=transformers.OPTConfig(**small))  # no RoPE: a plain centre, named
    assert opt.k_centre and not opt.k_centre_rope and opt.name == "NQKV-4 plain-centre b32 S4 W32"
    neox = default_scheme(4, 32, config=transformers.GPTNeoXConfig(**small))  # partial rotary: served
    assert neox.k_centre_rope and "plain-centre" not in neox.name
    with pytest.warns(UserWarning, match="rotary_dim"):  # GPT-J's rotary_dim outside the rope parameters
        gptj = default_scheme(4, 32, config=transformers.GPTJConfig(n_embd=64, n_head=2, n_layer=1, rotary_dim=16))
    assert not gptj.k_centre_rope and "plain-centre" in gptj.name
