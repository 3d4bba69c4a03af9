import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nqkv_core.codebook import expected_mse, get_codebook, max_rounding_error
from nqkv_core.packing import unpack
from nqkv_core.quantize import E5M3, bits_per_element, dequantize_blockwise, quantize_blockwise, scale_values

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def cases(draw, kinds=("nf", "lloyd")):
    bits = draw(st.sampled_from([2, 3, 4]))
    block = draw(st.sampled_from([8, 16, 32, 64]))
    axis = draw(st.sampled_from([-1, -2, 0]))
    lead = draw(st.integers(1, 3))
    shape = [lead, 8 * draw(st.integers(1, 4)), 8 * draw(st.integers(1, 4))]
    shape[axis] = block * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    kind = draw(st.sampled_from(kinds))
    return x.to(dtype), get_codebook(kind, bits, block), block, axis


def _block_absmax(absmax, block, axis, shape):
    return absmax.float().repeat_interleave(block, dim=axis).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_error_bound(case):
    x, cb, block, axis = case
    codes, absmax = quantize_blockwise(x, cb, block, axis)
    y = dequantize_blockwise(codes, absmax, cb, block, axis)
    bound = max_rounding_error(cb) * _block_absmax(absmax, block, axis, x.shape)
    err = (y - x.float()).abs()
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-30)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_fp8_scales_round_up_and_bound_the_error(case):
    # e4m3 scales (3 mantissa bits): rounded up, so codes never clip and the error bound holds
    # against the stored scale; in the normal range a scale is at most 1/8 above the block's absmax.
    x, cb, block, axis = case
    codes, absmax = quantize_blockwise(x, cb, block, axis, scale_dtype=torch.float8_e4m3fn)
    assert absmax.dtype == torch.float8_e4m3fn
    y = dequantize_blockwise(codes, absmax, cb, block, axis)
    s = _block_absmax(absmax, block, axis, x.shape)
    assert torch.all((y - x.float()).abs() <= max_rounding_error(cb) * s * (1 + 1e-5) + 1e-30)
    exact = _block_absmax(quantize_blockwise(x, cb, block, axis, scale_dtype=torch.float32)[1], block, axis, x.shape)
    normal = exact >= torch.finfo(torch.float8_e4m3fn).tiny
    assert torch.all(s >= exact) and torch.all(s[normal] <= exact[normal] * 1.125)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_unbiased_error_bound(case):
    # Codes chosen against the plain levels, decoded with the levels times the gain: each element
    # moves by at most |gain - 1| * |level| * s <= |gain - 1| * s more than with the plain levels.
    x, cb, block, axis = case
    kind = "nf" if cb[0] == -1 else "lloyd"
    unbiased = get_codebook(kind, cb.numel().bit_length() - 1, block, unbiased=True)
    gain = float(unbiased[-1] / cb[-1])
    codes, absmax = quantize_blockwise(x, cb, block, axis)
    y = dequantize_blockwise(codes, absmax, unbiased, block, axis)
    bound = (max_rounding_error(cb) + abs(gain - 1)) * _block_absmax(absmax, block, axis, x.shape)
    assert torch.all((y - x.float()).abs() <= bound * (1 + 1e-5) + 1e-30)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_fitted_scales_are_unbiased_and_beat_absmax_codes(case):
    # Fitted scales keep, per block, the clipped codes with the smallest squared error under the
    # scale t = sum(x^2) / sum(x * level). Against a plain reference: each decoded block is unbiased
    # (sum(x * xhat) = sum(x^2)) up to rounding t to fp16, and its error is at most that of the
    # absmax codes (ratio 1, one of the candidates) with their own t; rounding t by a relative d
    # changes an error e(t) = t^2 sum(level^2) - sum(x^2) by at most 2 d e(t) + d^2 t^2 sum(level^2).
    x, cb, block, axis = case
    codes, scale = quantize_blockwise(x, cb, block, axis, fit_scale=True)
    y = dequantize_blockwise(codes, scale, cb, block, axis)
    xb = x.double().movedim(axis, -1).reshape(*x.movedim(axis, -1).shape[:-1], -1, block)
    yb = y.double().movedim(axis, -1).reshape(xb.shape)
    xx, xy = (xb * xb).sum(-1), (xb * yb).sum(-1)
    d = 2.0**-11  # fp16 rounding, relative
    assert torch.all((xy - xx).abs() <= d * xx * 1.01 + 1e-30)
    absmax = xb.abs().amax(-1, keepdim=True)
    y0 = (xb / torch.where(absmax > 0, absmax, 1.0)).float().contiguous()
    q = cb.double()[torch.bucketize(y0, (cb[1:] + cb[:-1]) / 2)]
    xq, qq = (xb * q).sum(-1), (q * q).sum(-1)
    t = torch.where(xq > 0, xx / xq, 0.0)
    ref_err = xx - 2 * t * xq + t * t * qq
    err = ((yb - xb) ** 2).sum(-1)
    assert torch.all(err <= ref_err * (1 + 2.02 * d) + d * d * t * t * qq * 1.01 + 1e-12 * xx + 1e-30)


def test_fitted_scales_lower_the_error_of_gaussian_blocks():
    # against the other unbiased decoding: absmax codes decoded with the unbiased levels
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    for kind, bits in (("nf", 4), ("nf", 3), ("lloyd", 2)):
        cb = get_codebook(kind, bits, 64)
        fit = dequantize_blockwise(*quantize_blockwise(x, cb, 64, fit_scale=True), cb, 64)
        gain = dequantize_blockwise(*quantize_blockwise(x, cb, 64), get_codebook(kind, bits, 64, unbiased=True), 64)
        assert ((fit - x) ** 2).mean() < 0.97 * ((gain - x) ** 2).mean()
        assert (fit * x).sum() / (x * x).sum() == pytest.approx(1.0, abs=1e-3)  # not shrunk


def test_fitted_scale_errors():
    cb = get_codebook("nf", 4, 64)
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise(x, cb, 64, fit_scale=True)
    with pytest.raises(ValueError, match="float16 range"):
        quantize_blockwise(torch.full((1, 64), 7e4), cb, 64, fit_scale=True)
    zeros = torch.zeros(3, 64)
    codes, scale = quantize_blockwise(zeros, cb, 64, fit_scale=True)
    assert torch.equal(scale, torch.zeros_like(scale))
    assert torch.equal(dequantize_blockwise(codes, scale, cb, 64), zeros)


@settings(max_examples=40, deadline=None)
@given(cases(kinds=("nf",)))
def test_idempotent(case):
    # Codebooks with levels at ±1 reproduce each block's absmax, so requantizing is a fixed point.
    x, cb, block, axis = case
    codes, absmax = quantize_blockwise(x, cb, block, axis)
    y = dequantize_blockwise(codes, absmax, cb, block, axis)
    codes2, absmax2 = quantize_blockwise(y, cb, block, axis)
    assert torch.equal(codes, codes2) and torch.equal(absmax, absmax2)


@settings(max_examples=40, deadline=None)
@given(cases(), st.integers(-6, 6))
def test_positive_scaling(case, power):
    x, cb, block, axis = case
    c = 2.0**power  # exact in floating point, so the comparison is exact too
    codes, absmax = quantize_blockwise(x.float(), cb, block, axis, torch.float32)
    codes_c, absmax_c = quantize_blockwise(x.float() * c, cb, block, axis, torch.float32)
    assert torch.equal(codes, codes_c)
    assert torch.equal(absmax * c, absmax_c)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_sign_preserved(case):
    x, cb, block, axis = case
    y = dequantize_blockwise(*quantize_blockwise(x, cb, block, axis), cb, block, axis)
    xf = x.float()
    assert torch.all(y[xf > 0] >= 0) and torch.all(y[xf < 0] <= 0)


@settings(max_examples=30, deadline=None)
@given(cases())
def test_zero_blocks_are_exact(case):
    x, cb, block, axis = case
    x = x.clone()
    x.narrow(axis, 0, block).zero_()  # the first block of every row along axis
    y = dequantize_blockwise(*quantize_blockwise(x, cb, block, axis), cb, block, axis)
    assert torch.all(y.narrow(axis, 0, block) == 0)


@pytest.mark.parametrize("kind", ["nf", "lloyd"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block", [32, 64])
def test_mse_matches_codebook_theory(kind, bits, block):
    cb = get_codebook(kind, bits, block)
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(7))
    y = dequantize_blockwise(*quantize_blockwise(x, cb, block, scale_dtype=torch.float32), cb, block)
    assert ((x - y) ** 2).mean().item() == pytest.approx(expected_mse(cb, block), rel=0.02)


def test_deterministic_and_exact_sizes():
    x = torch.randn(4, 3, 256, 64, dtype=torch.bfloat16)
    cb = get_codebook("nf", 4)
    a = quantize_blockwise(x, cb, 64)
    b = quantize_blockwise(x.clone(), cb, 64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    nbytes = a[0].nbytes + a[1].nbytes
    assert 8 * nbytes / x.numel() == bits_per_element(4, 64) == 4.25
    assert bits_per_element(3, 32, torch.float32) == 4.0


def test_empty_input():
    cb = get_codebook("nf", 4)
    x = torch.empty(0, 3, 64)
    codes, absmax = quantize_blockwise(x, cb, 64)
    assert codes.shape == (0, 3, 32) and absmax.shape == (0, 3, 1)
    assert dequantize_blockwise(codes, absmax, cb, 64).shape == x.shape


def test_fp16_scale_rounds_up():
    cb = get_codebook("nf", 4)
    x = torch.full((1, 64), 1.0001)  # not representable in fp16; rounding down would clip
    codes, absmax = quantize_blockwise(x, cb, 64)
    assert absmax.dtype == torch.float16 and absmax.float().item() >= 1.0001


def _all_e5m3_values() -> torch.Tensor:
    """The value of every finite E5M3 byte, 0x00-0xF7, as fp32 (the fp16 with bits ``k << 7``)."""
    k = torch.arange(0xF8, dtype=torch.int32)
    return (k << 7).to(torch.int16).view(torch.float16).float()


def test_e5m3_bytes_decode_as_the_top_of_an_fp16():
    values = _all_e5m3_values()
    assert torch.equal(scale_values(torch.arange(0xF8, dtype=torch.uint8)), values)
    assert values[0] == 0 and values[1] == 2.0**-17 and values[-1] == 61440.0
    assert (values[1:] > values[:-1]).all()  # byte order is value order
    assert bits_per_element(4, 64, E5M3) == 4.125 and bits_per_element(4, 64) == 4.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_e5m3_scale_is_the_nearest_byte_and_codes_use_it(dtype):
    """Each block's stored byte is the one nearest its absmax (after rounding to fp16), from fp16's
    subnormals to its largest value (clamped to 0xF7), in the native and the torch encoder alike; the
    codes are those of the stored scale."""
    gen = torch.Generator().manual_seed(0)
    mags = torch.cat([torch.tensor([0.0, 2.0**-19, 2.0**-18, 3 * 2.0**-19, 1e-5, 1.0, 1.0625, 1.03125,
                                    61440.0, 63000.0, 65504.0 if dtype == torch.float32 else 65280.0]),
                      torch.exp2(torch.empty(200).uniform_(-20, 15.9, generator=gen))])
    x = torch.randn(mags.numel(), 64, generator=gen)
    x = (x / x.abs().amax(-1, keepdim=True) * mags[:, None]).to(dtype)
    cb = get_codebook("nf", 4, 64)
    codes, scales = quantize_blockwise(x, cb, 64, scale_dtype=E5M3)
    from nqkv_core import native

    with native.disabled():
        assert all(torch.equal(a, b) for a, b in zip((codes, scales), quantize_blockwise(x, cb, 64, scale_dtype=E5M3)))
    assert scales.dtype == torch.uint8 and scales.shape == (mags.numel(), 1)
    absmax16 = x.float().abs().amax(-1).to(torch.float16).float()  # the nearest fp16 first
    values = _all_e5m3_values()
    dist = (values[None, :] - absmax16[:, None]).abs()
    best = dist.min(-1).values
    chosen = values[scales[:, 0].long()]
    assert torch.equal((chosen - absmax16).abs(), best)  # the nearest (of the bytes a tie offers, one)
    s = chosen[:, None]
    ref = torch.bucketize(x.float() / torch.where(s > 0, s, 1.0), (cb[1:] + cb[:-1]) / 2)
    assert torch.equal(unpack(codes, 4).long(), ref)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.tensor([[1.0, float("nan")] * 32]), {}, ValueError, r"32 non-finite.*\(0, 1\)"),
        (torch.full((2, 64), float("inf")), {}, ValueError, "128 non-finite"),
        (torch.ones(2, 64, dtype=torch.int32), {}, TypeError, "floating-point"),
        (torch.ones(2, 64, dtype=torch.bool), {}, TypeError, "floating-point"),
        (torch.ones(2, 48), {"block": 32}, ValueError, r"divide.*Allowed blocks here: \[8, 12, 16, 24, 48\]"),
        (torch.ones(2, 64), {"block": 4}, ValueError, ">= 8"),
        (torch.ones(2, 64), {"axis": 2}, ValueError, "out of range"),
        (torch.full((1, 64), 1e6), {}, ValueError, "scale_dtype=torch.float32"),
        (torch.full((1, 64), 1e3), {"scale_dtype": torch.float8_e4m3fn}, ValueError, "float8_e4m3fn range"),
        (torch.ones(2, 64), {"scale_dtype": torch.bfloat16}, ValueError, "scale_dtype"),
        (torch.full((1, 64), 7e4), {"scale_dtype": E5M3}, ValueError, r"E5M3.*scale_dtype=torch.float32"),
        (torch.ones(2, 64), {"scale_dtype": E5M3, "fit_scale": True}, ValueError, "fit_scale=True stores"),
        (torch.ones(64, 12), {"axis": 0, "bits": 3}, ValueError, "multiple of 8"),
    ],
)
def test_bad_input(x, kwargs, error, match):
    bits = kwargs.pop("bits", 4)
    with pytest.raises(error, match=match):
        quantize_blockwise(x, get_codebook("nf", bits), **{"block": 64, **kwargs})


def test_bad_codebook():
    with pytest.raises(ValueError, match="levels"):
        quantize_blockwise(torch.ones(2, 64), torch.linspace(-1, 1, 5), 64)


def test_dequantize_shape_mismatch():
    cb = get_codebook("nf", 4)
    codes, absmax = quantize_blockwise(torch.randn(4, 64), cb, 32)
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blockwise(codes, absmax, cb, 64)


@pytest.mark.parametrize(
    "dtype, bits, scale_dtype, out_dtype",
    [
        (torch.float16, 4, torch.float16, torch.float16),  # unbiased levels past 1 at the fp16 limit
        (torch.bfloat16, 3, torch.float32, torch.bfloat16),  # past the float32 limit, native rows
        (torch.float32, 4, torch.float32, torch.float16),  # float32 scales decoded to float16
    ],
)
def test_decoding_saturates_at_the_output_range(dtype, bits, scale_dtype, out_dtype):
    top = torch.finfo(dtype).max
    x = (torch.linspace(-1, 1, 128, dtype=torch.float64) * top).to(dtype).view(2, 64)
    plain = get_codebook("nf", bits, 64)
    unbiased = get_codebook("nf", bits, 64, unbiased=True)
    codes, absmax = quantize_blockwise(x, plain, 64, scale_dtype=scale_dtype)
    exact = unbiased.double()[unpack(codes, bits).long()] * absmax.double().repeat_interleave(64, dim=-1)
    out_top = torch.finfo(out_dtype).max
    assert exact.abs().max() > out_top  # the case: some products are beyond the output range
    y = dequantize_blockwise(codes, absmax, unbiased, 64, dtype=out_dtype)
    assert y.dtype == out_dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), exact.clamp(-out_top, out_top), rtol=torch.finfo(out_dtype).eps, atol=0)
    # float64 output computes in float64: nothing to saturate, the products exactly
    assert torch.equal(dequantize_blockwise(codes, absmax, unbiased, 64, dtype=torch.float64), exact)


_NF4 = get_codebook("nf", 4)


@pytest.mark.parametrize(
    "codebook, error, match",
    [
        (_NF4.flip(0), ValueError, "ascending"),
        (torch.where(_NF4 == 1, float("nan"), _NF4), ValueError, "non-finite"),
        (torch.where(_NF4 == 1, float("inf"), _NF4), ValueError, "non-finite"),
        (torch.linspace(-1, 1, 15), ValueError, "levels"),
        (torch.linspace(-1, 1, 32), ValueError, "levels"),
        (torch.arange(-8, 8), ValueError, "floating"),
        (_NF4.view(4, 4), ValueError, "1-D"),
        (_NF4.tolist(), TypeError, "tensor"),
    ],
)
def test_bad_codebooks_are_named_at_every_entry(codebook, error, match):
    from nqkv_core import NQTensor

    x = torch.randn(2, 64)
    codes, absmax = quantize_blockwise(x, _NF4, 64)
    with pytest.raises(error, match=match):
        quantize_blockwise(x, codebook, 64)
    with pytest.raises(error, match=match):
        dequantize_blockwise(codes, absmax, codebook, 64)
    with pytest.raises(error, match=match):
        NQTensor.from_float(x, bits=4, codebook=codebook)


def test_codebook_changed_in_place_is_checked_again():
    cb = _NF4.clone()
    x = torch.randn(2, 64)
    quantize_blockwise(x, cb, 64)
    cb[3] = 2.0  # out of order now
    with pytest.raises(ValueError, match="ascending"):
        quantize_blockwise(x, cb, 64)


def test_decoding_needs_a_floating_dtype():
    codes, absmax = quantize_blockwise(torch.randn(2, 64), _NF4, 64)
    for dtype in (torch.int32, torch.uint8, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="floating dtype"):
            dequantize_blockwise(codes, absmax, _NF4, 64, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"block": 64.0}, TypeError, "block must be an int"),
        ({"block": True}, TypeError, "block must be an int"),
        ({"axis": -1.0}, TypeError, "axis must be an int"),
        ({"block": 0}, ValueError, "block must be at least 1"),
        ({"block": -64}, ValueError, "block must be at least 1"),
        ({"axis": 2}, ValueError, "out of range"),
    ],
)
def test_bad_layout_arguments_when_decoding(kwargs, error, match):
    codes, absmax = quantize_blockwise(torch.randn(2, 64), _NF4, 64)
    with pytest.raises(error, match=match):
        dequantize_blockwise(codes, absmax, _NF4, **{"block": 64, **kwargs})


def test_float64_input_beyond_float32():
    x = torch.full((1, 64), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        quantize_blockwise(x, _NF4, 64, scale_dtype=torch.float32)


def test_meta_tensors_give_shapes():
    x = torch.empty(2, 3, 128, 64, device="meta")
    for axis in (-1, -2):
        cb = get_codebook("nf", 3, device="meta")
        codes, absmax = quantize_blockwise(x, cb, 32, axis=axis)
        ref = quantize_blockwise(torch.zeros(x.shape), get_codebook("nf", 3), 32, axis=axis)
        assert codes.is_meta and (codes.shape, absmax.shape, absmax.dtype) == (ref[0].shape, ref[1].shape, ref[1].dtype)
        y = dequantize_blockwise(codes, absmax, cb, 32, axis=axis, dtype=torch.bfloat16)
        assert y.is_meta and y.shape == x.shape and y.dtype == torch.bfloat16
