import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nqkv_core.packing import pack, packed_row_bytes, unpack


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(0, 5), groups=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_roundtrip(bits, rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, 8 * groups), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_row_bytes(8 * groups, bits))
    assert torch.equal(unpack(packed, bits), codes)


def test_documented_layouts():
    codes = torch.arange(8, dtype=torch.uint8)
    # 4-bit: even code in the low nibble.
    assert pack(codes % 16, 4).tolist() == [0x10, 0x32, 0x54, 0x76]
    # 2-bit: code d at bit 2*(d % 4).
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit: a plane of low 2 bits (2-bit layout), then a plane of high bits.
    packed = pack(codes, 3)
    assert packed[:2].tolist() == pack(codes & 3, 2).tolist()
    assert packed[2].item() == 0b11110000


def test_bad_rows():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(2, 12, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(4, dtype=torch.int32), 4)


def test_bad_bits():
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    for fn in (pack, unpack):
        with pytest.raises(TypeError, match="bits must be an int"):
            fn(codes, 4.0)
        with pytest.raises(ValueError, match="bits must be one of"):
            fn(codes, 5)
