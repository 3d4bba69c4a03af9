"""The native CPU kernels (nqkv_core/csrc/cpu_kernels.cpp) against the plain-torch paths and references."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nqkv_core import native
from nqkv_core.codebook import get_codebook
from nqkv_core.ops import cpu
from nqkv_core.quantize import dequantize_blockwise, feedback_matrix, quantize_blockwise
from test_ops_attention import reference  # the dequantize-then-SDPA reference of the op's tests

pytestmark = pytest.mark.skipif(os.environ.get("NQKV_NATIVE") == "0", reason="native kernels disabled")


def test_builds_and_loads():
    # CI and the Makefile's machines have a C++ compiler: a failed build must fail here, not fall back quietly.
    assert native.available()
    with native.disabled():
        assert not native.available()
    assert native.available()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block,scale_dtype,fit_scale", [
    (block, scale_dtype, fit) for block, scale_dtype in ((64, torch.float16), (32, torch.float32), (16, torch.float16),
                                                         (64, torch.uint8), (16, torch.uint8))
    for fit in (False, True) if not (fit and scale_dtype == torch.uint8)  # (fitted scales: fp16 / fp32 only)
])
def test_quantize_dequantize_match_torch_bitwise(bits, dtype, block, scale_dtype, fit_scale):
    torch.manual_seed(bits * 7 + block)
    x = (torch.randn(5, 3, 128) * torch.rand(5, 3, 1) * 10).to(dtype)
    x[1, 2, :block] = 0  # an all-zero block
    x[2, 0, 5] = torch.finfo(dtype).max / 4 if scale_dtype == torch.float32 else 1000.0
    cb = get_codebook("nf", bits, block)
    codes, absmax = quantize_blockwise(x, cb, block, scale_dtype=scale_dtype, fit_scale=fit_scale)
    with native.disabled():
        ref_codes, ref_absmax = quantize_blockwise(x, cb, block, scale_dtype=scale_dtype, fit_scale=fit_scale)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_absmax)
    for out in (torch.float32, torch.bfloat16):
        y = dequantize_blockwise(codes, absmax, cb, block, dtype=out)
        with native.disabled():
            ref = dequantize_blockwise(codes, absmax, cb, block, dtype=out)
        assert torch.equal(y, ref)
    assert (dequantize_blockwise(codes, absmax, cb, block)[1, 2, :block] == 0).all()


@pytest.mark.parametrize("bits,block", [(3, 64), (4, 16), (2, 32)])
def test_feedback_quantize_matches_torch(bits, block):
    # Error-feedback rounding, one matrix per (batch, head) for its rows: the same fp32 operations
    # in the same order, so the same codes and scales.
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 40, 64, generator=gen) * torch.rand(2, 3, 40, 1, generator=gen) * 5
    x[0, 1, 3, :block] = 0
    a = torch.randn(2, 3, 64, 64, generator=gen)
    u = feedback_matrix(a @ a.transpose(-1, -2) / 64)
    cb = get_codebook("nf", bits, block)
    codes, absmax = quantize_blockwise(x, cb, block, feedback=u)
    with native.disabled():
        ref_codes, ref_absmax = quantize_blockwise(x, cb, block, feedback=u)
    assert torch.equal(absmax, ref_absmax)
    assert (codes != ref_codes).float().mean() < 1e-3  # (a rounding tie may fall either way, rarely)
    plain, _ = quantize_blockwise(x, cb, block)
    assert (codes != plain).any()


def test_quantize_errors_survive_the_native_path():
    cb = get_codebook("nf", 4, 64)
    x = torch.randn(4, 128)
    x[3, 70] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite value.*\(3, 70\)"):
        quantize_blockwise(x, cb, 64)
    x[3, 70] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise(x.bfloat16(), cb, 64)
    with pytest.raises(ValueError, match="float16 range"):
        quantize_blockwise(torch.full((2, 64), 1e5), cb, 64)


def _packed(b, hkv, t, d, bits, block, scale_dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cb = get_codebook("nf" if bits != 2 else "lloyd", bits, block)
    x = torch.randn(b, hkv, t, d, generator=g) * (1 + torch.arange(d) / d)
    codes, absmax = quantize_blockwise(x, cb, block, scale_dtype=scale_dtype)
    return (codes, absmax, cb, block, 3)


def _reference(q, k, v, k_tail, v_tail, mask, scale, causal):
    """fp32 SDPA over the dequantized history plus the tail, causal aligned bottom-right."""
    return reference(q.float(), *k, *v, k_tail, v_tail, mask, scale, causal)


CASES = [
    # b, hkv, g, tq, d, t_hist, t_tail, bits, block
    (1, 3, 3, 1, 64, 300, 5, 4, 64),  # SmolLM2-like decode step
    (2, 2, 4, 3, 128, 130, 0, 4, 64),
    (1, 2, 2, 2, 128, 77, 9, 4, 32),
    (1, 1, 5, 1, 64, 257, 36, 3, 64),  # R not a multiple of four
    (1, 2, 3, 2, 128, 90, 4, 3, 64),  # two groups of 64 codes per row (3-bit high plane of group 1)
    (2, 1, 2, 1, 64, 64, 1, 2, 64),
    (1, 2, 2, 1, 128, 70, 2, 2, 128),
    (1, 2, 1, 4, 32, 40, 3, 4, 16),  # portable path: head_dim 32, blocks of 16
    (1, 1, 2, 1, 64, 33, 2, 8, 64),
    (1, 2, 2, 1, 64, 0, 7, 4, 64),  # no history yet
    (1, 2, 4, 1, 64, 100, 3, 4, 32),  # four rows in registers, two scales per row (not factored out)
    (1, 3, 1, 1, 64, 70, 2, 3, 64),  # one row
    (1, 3, 3, 1, 64, 150, 5, 3, 32),  # 3-bit, two scales per row: one per lane half in the registers
    (1, 2, 2, 2, 128, 80, 3, 2, 16),  # 2-bit, four scales per group of 64
    (1, 2, 5, 1, 128, 90, 3, 4, 16),  # 4-bit, a scale per sixteen codes; five rows (four, then one)
    (1, 1, 2, 1, 128, 70, 2, 4, 128),  # one scale per row of 128
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}g{}q{}d{}t{}+{}b{}k{}".format(*c))
@pytest.mark.parametrize("variant", ["plain", "causal", "additive", "bool", "fp32-scales", "e5m3-scales"])
def test_attention_decode_matches_reference(case, variant):
    b, hkv, g, tq, d, th, tt, bits, block = case
    scale_dtype = {"fp32-scales": torch.float32, "e5m3-scales": torch.uint8}.get(variant, torch.float16)
    k = _packed(b, hkv, th, d, bits, block, scale_dtype, seed=1)
    v = _packed(b, hkv, th, d, bits, block, scale_dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, hkv * g, tq, d, generator=gen)
    k_tail = torch.randn(b, hkv, tt, d, generator=gen) if tt else None
    v_tail = torch.randn(b, hkv, tt, d, generator=gen) if tt else None
    tk = th + tt
    mask = None
    if variant == "additive":
        mask = torch.randn(1, hkv * g, tq, tk, generator=gen)  # broadcast over the batch
    elif variant == "bool":
        mask = torch.rand(b, 1, tq, tk, generator=gen) > 0.3
        mask[0, 0, 0] = False  # a row that sees nothing: zeros, as SDPA
    causal = variant == "causal"
    scale = d**-0.5
    assert native.attention_decode_supported(q, k, v, k_tail, v_tail, mask)
    out = native.attention_decode(q, k, v, k_tail, v_tail, mask, scale, causal)
    ref = _reference(q, k, v, k_tail, v_tail, mask, scale, causal).nan_to_num(0.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    with native.disabled():  # the torch path (bf16 products) agrees to its own tolerance
        torch_path = cpu.attention_decode(q, k, v, k_tail, v_tail, mask, scale, causal)
    torch.testing.assert_close(out, torch_path, atol=2e-2, rtol=2e-2)


def test_attention_decode_strided_cache_views_and_dtypes():
    # A preallocated cache hands the op views of its storage: tokens [0, T) of a longer buffer.
    b, hkv, g, d, cap, th = 2, 2, 3, 64, 512, 200
    kk = _packed(b, hkv, cap, d, 4, 64, seed=4)
    vv = _packed(b, hkv, cap, d, 4, 64, seed=5)
    k = (kk[0][:, :, :th], kk[1][:, :, :th], *kk[2:])
    v = (vv[0][:, :, :th], vv[1][:, :, :th], *vv[2:])
    assert not k[0].is_contiguous()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = torch.randn(b, hkv * g, 1, d).to(dtype)
        out = native.attention_decode(q, k, v, None, None, None, 0.125, False)
        assert out.dtype == dtype
        ref = _reference(q, k, v, None, None, None, 0.125, False)
        torch.testing.assert_close(out.float(), ref, atol=1e-2 if dtype != torch.float32 else 2e-5, rtol=1e-2)


def test_attention_decode_long_cache_softmax_is_exact():
    # Many chunks of work and one dominant key: the split softmax must merge exactly.
    k = _packed(1, 1, 3000, 64, 4, 64, seed=6)
    v = _packed(1, 1, 3000, 64, 4, 64, seed=7)
    q = dequantize_blockwise(*k[:4], axis=-1)[:, :, 2222:2223] * 3.0  # aligned with key 2222
    out = native.attention_decode(q, k, v, None, None, None, 1.0, False)
    ref = _reference(q, k, v, None, None, None, 1.0, False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert math.isfinite(float(out.abs().max()))


@pytest.mark.parametrize("d,g,tq", [(64, 3, 1), (128, 4, 2), (32, 2, 1)])
def test_attention_decode_key_bias_matches_dense_offset(d, g, tq):
    # The RoPE-centred cache's score offset w . table[pos[j]], added inside the kernel, equals the
    # same offset passed as an additive mask.
    b, hkv, th, tt, P = 2, 2, 150, 6, 400
    k = _packed(b, hkv, th, d, 4, 32 if d == 32 else 64, seed=8)
    v = _packed(b, hkv, th, d, 4, 32 if d == 32 else 64, seed=9)
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(b, hkv * g, tq, d, generator=gen)
    kt, vt = torch.randn(b, hkv, tt, d, generator=gen), torch.randn(b, hkv, tt, d, generator=gen)
    w = torch.randn(b, hkv * g, tq, d, generator=gen)
    table = torch.randn(P, d, generator=gen)
    pos = torch.randint(0, P, (th + tt,), generator=gen)
    allowed = torch.rand(b, 1, tq, th + tt, generator=gen) > 0.2
    out = native.attention_decode(q, k, v, kt, vt, allowed, 0.1, False, key_bias=(w, table, pos))
    dense = (w @ table.T)[..., pos].masked_fill(~allowed, -math.inf)
    ref = native.attention_decode(q, k, v, kt, vt, dense, 0.1, False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, _reference(q, k, v, kt, vt, dense, 0.1, False), atol=1e-4, rtol=1e-4)
    with native.disabled():  # the torch path materialises the same offset
        torch_path = cpu.attention_decode(q, k, v, kt, vt, allowed, 0.1, False, (w, table, pos))
    torch.testing.assert_close(out, torch_path, atol=2e-2, rtol=2e-2)
    # the opaque op that compiled graphs call: schema, fake implementation, same values
    args = (q, *k, *v, kt, vt, allowed, 0.1, False, w, table, pos)
    torch.library.opcheck(torch.ops.nqkv.attention_cpu_decode.default, args)
    torch.testing.assert_close(torch.ops.nqkv.attention_cpu_decode(*args), out)
    with pytest.raises(ValueError, match="positions must lie in"):
        native.attention_decode(q, k, v, kt, vt, None, 0.1, False, key_bias=(w, table, pos + P))


@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_attention_decode_key_bias_from_a_compact_table_matches_rows(consecutive, d):
    # A RoPE table held compactly (RopeTable's layout on a CPU) gives what its rows give: packed
    # tokens at consecutive positions turn the weights by each tile's start, every other key reads a
    # row composed from it.
    from nqkv_core.transform import CompactRope

    b, hkv, g, th, tt, P = 1, 2, 3, 150, 7, 352
    k, v = _packed(b, hkv, th, d, 4, 64, seed=15), _packed(b, hkv, th, d, 4, 64, seed=16)
    gen = torch.Generator().manual_seed(17)
    q, w = torch.randn(b, hkv * g, 1, d, generator=gen), torch.randn(b, hkv * g, 1, d, generator=gen)
    kt, vt = torch.randn(b, hkv, tt, d, generator=gen), torch.randn(b, hkv, tt, d, generator=gen)
    compact = CompactRope.of(P // 16, 1e4 ** -(torch.arange(0, d, 2).float() / d))
    table = compact.rows()
    body = torch.arange(5, 5 + th) if consecutive else torch.randint(0, P, (th,), generator=gen)
    pos = torch.cat([body, torch.randint(0, P, (tt,), generator=gen)])
    rows = native.attention_decode(q, k, v, kt, vt, None, 0.1, False, key_bias=(w, table, pos))
    out = native.attention_decode(q, k, v, kt, vt, None, 0.1, False, key_bias=(w, compact, pos))
    torch.testing.assert_close(out, rows, atol=1e-5, rtol=1e-5)
    with native.disabled():
        torch_path = cpu.attention_decode(q, k, v, kt, vt, None, 0.1, False, (w, compact, pos))
    torch.testing.assert_close(out, torch_path, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="positions must lie in"):
        native.attention_decode(q, k, v, kt, vt, None, 0.1, False, key_bias=(w, compact, pos + P))
    with pytest.raises(ValueError, match="key_bias shapes"):
        native.attention_decode(q, k, v, kt, vt, None, 0.1, False, key_bias=(w, compact._replace(
            offsets=compact.offsets[:, :8]), pos))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def test_vector_isa_is_the_one_built_for():
    # The kernels report the vector code they were compiled with: what this CPU has (native build)
    # or what NQKV_MARCH asked for (the builds of the next test).
    flags, march = _cpu_flags(), os.environ.get("NQKV_MARCH", "native")
    expected = {"x86-64": "scalar", "haswell": "AVX2"}.get(march)
    if expected is None:
        if not flags:
            pytest.skip("no /proc/cpuinfo to compare with")
        expected = "AVX-512" if "avx512f" in flags else "AVX2" if {"avx2", "fma"} <= flags else "scalar"
    assert native.vector_isa() == expected
    with native.disabled():
        assert native.vector_isa() == "none"


@pytest.mark.skipif(os.environ.get("NQKV_MARCH") is not None, reason="already a non-native build")
@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_builds_for_other_cpus(tmp_path, march):
    # The scalar loops (x86-64: what a CPU without AVX2 runs) and the AVX2 paths (haswell: a CPU
    # without AVX-512) pass this file's tests too, and the cache's native decode step against its
    # torch ops (tests/test_cache.py: "folded", and head_dim 64, which takes the register paths).
    import subprocess
    import sys

    flags = _cpu_flags()
    if march == "haswell" and not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("this CPU cannot run AVX2 code")
    if march == "haswell" and "avx512f" not in flags:
        pytest.skip("the native build is already the AVX2 one")
    env = {**os.environ, "NQKV_MARCH": march, "NQKV_CACHE_DIR": str(tmp_path)}
    cache = str(Path(__file__).with_name("test_cache.py"))
    cache_tests = [cache + "::test_decode_strategies_match_the_reference",
                   cache + "::test_native_step_at_head_dim_64_matches_the_torch_step"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           *cache_tests], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(tmp_path.iterdir())  # it built its own library


# -- non-finite numbers: what torch's softmax and product give, on both paths ---------------------


def _nonfinite_case(th, tt, tq=1, d=64, seed=11):
    b, hkv, g = 1, 2, 2
    k, v = _packed(b, hkv, th, d, 4, 64, seed=seed), _packed(b, hkv, th, d, 4, 64, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, tq, d, generator=gen)
    kt, vt = torch.randn(b, hkv, tt, d, generator=gen), torch.randn(b, hkv, tt, d, generator=gen)
    return q, k, v, kt, vt


def _both_paths(q, k, v, kt, vt, mask=None, causal=False, scale=0.125):
    out = native.attention_decode(q, k, v, kt, vt, mask, scale, causal)
    with native.disabled():
        torch_path = cpu.attention_decode(q, k, v, kt, vt, mask, scale, causal)
    return out, torch_path


def _sdpa_math(*args):
    # SDPA's math backend: the fused CPU kernel's online softmax skips a NaN score when it is the
    # first of a row (it zeroes a row whose only key scores NaN)
    with sdpa_kernel(SDPBackend.MATH):
        return _reference(*args)


def _assert_same_nonfinite(out, ref):
    # the same NaN and inf elements, the finite ones close (the torch path's products are bf16)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[out.isinf()], ref[ref.isinf()])
    torch.testing.assert_close(out.nan_to_num(0, 0, 0), ref.nan_to_num(0, 0, 0), atol=2e-2, rtol=2e-2)


# history length, tail length, tail position of the NaN: in the vector loops, in their scalar
# remainders, the only key
@pytest.mark.parametrize("th,tt,pos", [(0, 40, 5), (0, 40, 35), (100, 40, 3), (0, 1, 0), (300, 5, 4)])
def test_attention_decode_nan_score_makes_its_rows_nan(th, tt, pos):
    q, k, v, kt, vt = _nonfinite_case(th, tt)
    kt[0, 1, pos, 7] = math.nan  # every query row of KV head 1 sees it
    out, torch_path = _both_paths(q, k, v, kt, vt)
    assert out[:, 2:].isnan().all() and not out[:, :2].isnan().any()
    _assert_same_nonfinite(out, torch_path)
    _assert_same_nonfinite(out, _sdpa_math(q, k, v, kt, vt, None, 0.125, False))


@pytest.mark.parametrize("variant", ["bool", "additive", "causal"])
def test_attention_decode_nan_score_with_a_mask_matches_sdpa(variant):
    q, k, v, kt, vt = _nonfinite_case(10, 6, tq=2)  # 16 keys: the NaN in the vector loop
    kt[0, 0, 2, 3] = math.nan
    mask = {"bool": torch.ones(1, 1, 2, 16, dtype=torch.bool), "additive": torch.zeros(1, 4, 2, 16)}.get(variant)
    out = native.attention_decode(q, k, v, kt, vt, mask, 0.125, variant == "causal")
    assert out[:, :2].isnan().all() and not out[:, 2:].isnan().any()
    _assert_same_nonfinite(out, _sdpa_math(q, k, v, kt, vt, mask, 0.125, variant == "causal"))


def test_torch_path_nan_score_with_a_mask_agrees():
    q, k, v, kt, vt = _nonfinite_case(10, 6, tq=2)  # 16 keys: the NaN in the vector loop
    kt[0, 0, 2, 3] = math.nan
    _assert_same_nonfinite(*_both_paths(q, k, v, kt, vt, torch.ones(1, 1, 2, 16, dtype=torch.bool)))


def test_attention_decode_hidden_keys_do_not_count_whatever_they_hold():
    # A key hidden by causality or a boolean mask has weight 0 even if its score is NaN: the output
    # is that of the same key holding zeros, on both paths; a row that sees only it gives zeros.
    q, k, v, kt, vt = _nonfinite_case(70, 4, tq=2)
    mask = torch.ones(1, 4, 2, 74, dtype=torch.bool)
    mask[0, 1, :, 71] = False  # query head 1 does not see tail key 1 (of KV head 0)
    mask[0, 3, 0] = False
    mask[0, 3, 0, 72] = True  # query 0 of head 3 sees tail key 2 of KV head 1, and nothing else
    kt[0, 0, 1, 9] = math.nan
    kt[0, 1, 3, 9] = math.nan  # the last key: hidden from query 0 by causality
    kt[0, 1, 2, 9] = -math.inf  # a -inf score for query heads 2 and 3, whose q[9] is positive...
    q[0, 2:, :, 9] = q[0, 2:, :, 9].abs() + 0.5
    clean = kt.clone()
    clean[0, 0, 1], clean[0, 1, 3] = 0.0, 0.0
    out, torch_path = _both_paths(q, k, v, kt, vt, mask, causal=True)
    ref = native.attention_decode(q, k, v, clean, vt, mask, 0.125, True)
    assert not out[0, 1].isnan().any() and not out[0, 2:, 0].isnan().any()
    assert (out[0, 3, 0] == 0).all()  # ...so query 0 of head 3 sees no key: zeros
    _assert_same_nonfinite(out[0, 1], ref[0, 1])
    _assert_same_nonfinite(out[0, 2:, 0], ref[0, 2:, 0])
    _assert_same_nonfinite(out[0, 2:, 0], torch_path[0, 2:, 0])
    _assert_same_nonfinite(out[0, 1], torch_path[0, 1])


def test_attention_decode_infinite_keys_and_values():
    # A +inf score makes its row NaN (softmax's inf - inf), a -inf one hides the key; an infinite
    # value element makes its output column inf where its weight is positive and NaN where it is 0
    # (0 * inf): here query 0, from which causality hides the last key.
    q, k, v, kt, vt = _nonfinite_case(90, 5, tq=2)
    q[0, :2, :, 4] = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # KV head 0's query heads: + and -
    kt[0, 0, 2, 4] = math.inf
    out, torch_path = _both_paths(q, k, v, kt, vt)
    assert out[0, 0].isnan().all() and out[0, 1:].isfinite().all()
    _assert_same_nonfinite(out, torch_path)
    _assert_same_nonfinite(out, _sdpa_math(q, k, v, kt, vt, None, 0.125, False))

    kt[0, 0, 2, 4] = 0.0
    vt[0, 1, 4, 6] = math.inf
    out, torch_path = _both_paths(q, k, v, kt, vt, causal=True)
    assert out[0, 2:, 0, 6].isnan().all() and (out[0, 2:, 1, 6] == math.inf).all()
    assert out[..., :6].isfinite().all() and out[0, :2].isfinite().all()
    _assert_same_nonfinite(out, torch_path)
    _assert_same_nonfinite(out, _sdpa_math(q, k, v, kt, vt, None, 0.125, True))


def test_decode_step_nan_key_makes_its_rows_nan():
    # The fused step attends over [body | sinks | ring | new] with the same softmax: a NaN in the new
    # key gives NaN rows for its KV head's queries, as the torch path over the same tokens does.
    b, hkv, g, d, n_body, slots = 1, 2, 3, 64, 9, 4  # 16 keys: the new one in the vector loops
    kb, vb = _packed(b, hkv, 80, d, 4, 64, seed=12), _packed(b, hkv, 80, d, 4, 64, seed=13)
    gen = torch.Generator().manual_seed(14)
    sinks = (torch.randn(b, hkv, 2, d, generator=gen), torch.randn(b, hkv, 2, d, generator=gen))
    ring = (torch.randn(b, hkv, slots, d, generator=gen), torch.randn(b, hkv, slots, d, generator=gen))
    q = torch.randn(b, hkv * g, 1, d, generator=gen)
    k_new, v_new = torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen)
    k_new[0, 1, 0, 5] = math.nan
    thresholds = (torch.zeros(15), torch.zeros(15))
    step = native.DecodeStep(hkv * g, None, None, None, None, None, sinks, ring, kb[:4], vb[:4], thresholds,
                             65504.0, None)
    assert step.supported
    out = step(q, k_new, v_new, 2, slots, n_body, -1, -1, -1, -1, 2 + slots + n_body, d**-0.5)
    kt, vt = (torch.cat([s, r, n], 2) for s, r, n in zip(sinks, ring, (k_new, v_new)))
    body = [(c[:, :, :n_body], a[:, :, :n_body], *rest) for c, a, *rest in (kb, vb)]
    with native.disabled():
        ref = cpu.attention_decode(q, *body, kt, vt, None, d**-0.5, False)
    assert out[0, g:].isnan().all() and not out[0, :g].isnan().any()
    _assert_same_nonfinite(out, ref)
