import numpy as np
import pytest
import torch

from nqkv_core.codebook import (
    expected_mse,
    get_codebook,
    lloyd_max_codebook,
    max_rounding_error,
    nf_codebook,
    signed_codebook,
    unbiased_gain,
)
from nqkv_core.quantize import dequantize_blockwise, quantize_blockwise

# bitsandbytes' NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4")).
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_equals_bitsandbytes_table():
    torch.testing.assert_close(nf_codebook(4), torch.tensor(BNB_NF4), atol=1e-6, rtol=0)


def test_nf4_matches_bitsandbytes_constructor_if_installed():
    functional = pytest.importorskip("bitsandbytes.functional")
    ref = functional.create_normal_map(offset=0.9677083, use_extra_value=True)
    ref = ref[ref != 0]  # the 8-bit map pads with zeros; keep the 15 non-zero levels
    levels = nf_codebook(4)
    torch.testing.assert_close(levels[levels != 0], ref.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["nf", "lloyd"])
def test_codebooks_are_sorted_in_range(bits, kind):
    cb = get_codebook(kind, bits, 64)
    assert cb.shape == (2**bits,) and cb.dtype == torch.float32
    assert torch.all(cb[1:] > cb[:-1])
    assert cb.min() >= -1 and cb.max() <= 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_has_exact_zero_and_unit_ends(bits):
    cb = nf_codebook(bits)
    assert (cb == 0).sum() == 1 and cb[0] == -1 and cb[-1] == 1


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_lloyd_beats_nf_on_gaussian_blocks(bits, block):
    nf = expected_mse(nf_codebook(bits), block)
    lloyd = expected_mse(lloyd_max_codebook(bits, block), block)
    assert lloyd < nf


@pytest.mark.parametrize("bits", [2, 3])
def test_lloyd_is_a_local_optimum(bits):
    # Nudging any level must not lower the expected error (on samples other than the fitted ones).
    cb = lloyd_max_codebook(bits, 64)
    best = expected_mse(cb, 64, n=1 << 18)
    for i in range(cb.numel()):
        for delta in (-0.02, 0.02):
            moved = cb.clone()
            moved[i] += delta
            assert expected_mse(torch.sort(moved).values, 64, n=1 << 18) >= best * (1 - 1e-3)


def test_lloyd_is_symmetric_and_deterministic():
    a = lloyd_max_codebook(3, 64)
    torch.testing.assert_close(a, -a.flip(0), atol=1e-9, rtol=0)
    from nqkv_core import codebook as module

    module._lloyd_levels.cache_clear()
    assert torch.equal(a, lloyd_max_codebook(3, 64))


def test_get_codebook_is_cached_per_key():
    a = get_codebook("nf", 4)
    assert get_codebook("nf", 4) is a
    assert get_codebook("nf", 4, dtype=torch.float16) is not a
    assert get_codebook("lloyd", 4, 32) is not get_codebook("lloyd", 4, 64)


@pytest.mark.parametrize("kind,bits", [("nf", 4), ("nf", 3), ("lloyd", 3), ("lloyd", 2)])
def test_unbiased_codebook_removes_the_shrink(kind, bits):
    # Fresh Gaussian blocks coded against the plain levels: decoded with them, x shrinks on average
    # (E[x * xhat] < E[x^2]); decoded with the unbiased levels it does not, to sampling error.
    x = torch.randn(1 << 14, 64, generator=torch.Generator().manual_seed(5))
    plain = get_codebook(kind, bits, 64)
    unbiased = get_codebook(kind, bits, 64, unbiased=True)
    codes, absmax = quantize_blockwise(x, plain, block=64, scale_dtype=torch.float32)

    def slope(cb):
        return float((x * dequantize_blockwise(codes, absmax, cb, block=64)).sum() / (x * x).sum())

    assert slope(plain) < 0.997
    assert slope(unbiased) == pytest.approx(1.0, abs=2e-3)
    torch.testing.assert_close(unbiased, plain * unbiased_gain(plain, 64), atol=1e-6, rtol=0)


def test_unbiased_gain_grows_as_codes_narrow():
    gains = [unbiased_gain(get_codebook(k, b, 64), 64) for k, b in (("nf", 8), ("nf", 4), ("nf", 3), ("lloyd", 2))]
    assert 1 < gains[0] < gains[1] < gains[2] < gains[3] < 1.2
    assert get_codebook("nf", 4, unbiased=True) is not get_codebook("nf", 4)
    # larger blocks have a larger absmax relative to their spread, so coarser steps shrink more
    assert get_codebook("nf", 4, 32, unbiased=True)[-1] < get_codebook("nf", 4, 128, unbiased=True)[-1]
    with pytest.raises(ValueError, match="block"):
        unbiased_gain(nf_codebook(4), 1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_signed_levels_spend_no_level_on_minus_one(bits):
    cb = signed_codebook(bits, 64)
    assert cb.shape == (2**bits,) and torch.all(cb[1:] > cb[:-1])
    assert cb[-1] == 1 and -1 < cb[0] < -0.4  # the block's signed max is the top level
    unbiased = signed_codebook(bits, 64, unbiased=True)
    assert torch.all(unbiased / cb > 1)


def test_signed_roundtrip_keeps_each_blocks_max_exact():
    from nqkv_core.scheme import quantize_roundtrip

    x = torch.randn(4, 3, 16, 64, generator=torch.Generator().manual_seed(3))
    y = quantize_roundtrip(x, 3, "signed", 64, "token", torch.float32)
    i = x.abs().argmax(dim=-1, keepdim=True)
    assert torch.equal(torch.gather(y, -1, i), torch.gather(x, -1, i))
    # smaller error than NF3 with an absmax on the same Gaussian blocks
    assert (y - x).pow(2).mean() < (quantize_roundtrip(x, 3, "nf", 64, "token", torch.float32) - x).pow(2).mean()


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        nf_codebook(5)
    with pytest.raises(ValueError, match="kind"):
        get_codebook("uniform", 4)
    with pytest.raises(ValueError, match="block"):
        lloyd_max_codebook(4, 1)
    with pytest.raises(TypeError, match="bits must be an int"):
        nf_codebook(4.0)
    with pytest.raises(TypeError, match="block must be an int"):
        get_codebook("lloyd", 4, 64.0)
    with pytest.raises(TypeError, match="block must be an int"):
        signed_codebook(3, 64.0)
    with pytest.raises(ValueError, match="ascending"):
        unbiased_gain(nf_codebook(4).flip(0), 64)


def test_max_rounding_error():
    cb = torch.tensor([-0.5, 0.0, 0.25, 1.0])
    # half gaps 0.25, 0.125, 0.375; ends: 1 - 1.0 = 0, -0.5 + 1 = 0.5
    assert max_rounding_error(cb) == pytest.approx(0.5)
    assert max_rounding_error(nf_codebook(4)) == pytest.approx(
        float(np.max(np.diff(np.array(BNB_NF4)))) / 2, rel=1e-6
    )
