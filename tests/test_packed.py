"""The packed type: construction checks, derived fields, and agreement with NQTensor and the quantizer."""

import pytest
import torch

from nqkv_core.codebook import get_codebook
from nqkv_core.packed import Packed
from nqkv_core.quantize import dequantize_blockwise, dequantize_packed, quantize_blockwise, quantize_packed
from nqkv_core.tensor import NQTensor


def _packed(bits=4, axis=-1, block=16, shape=(1, 2, 32, 64)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(bits))
    return x, quantize_packed(x, get_codebook("nf", bits, block), block, axis)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", [-1, -2, 2, 3])
def test_quantize_packed_matches_blockwise(bits, axis):
    x, p = _packed(bits, axis)
    codes, absmax = quantize_blockwise(x, p.codebook, 16, axis)
    assert torch.equal(p.codes, codes) and torch.equal(p.absmax, absmax)
    assert p.axis == (axis if axis < 0 else axis - 4) and p.bits == bits and p.shape == x.shape
    assert p.per_token == (p.axis == -1)
    torch.testing.assert_close(dequantize_packed(p), dequantize_blockwise(codes, absmax, p.codebook, 16, axis))
    assert p.op_args()[4] == 4 + p.axis and p.op_args()[:4] == tuple(p)[:4]


def test_construction_checks():
    _, p = _packed()
    assert Packed.of(p) is p and Packed.of(tuple(p)[:4]) == p  # a 4-tuple takes the default axis -1
    with pytest.raises(ValueError, match="out of range"):
        Packed(p.codes, p.absmax, p.codebook, 16, 4)
    with pytest.raises(TypeError, match="axis"):
        Packed(p.codes, p.absmax, p.codebook, 16, -1.0)
    with pytest.raises(ValueError, match="block"):
        Packed(p.codes, p.absmax, p.codebook, 0)
    with pytest.raises(ValueError, match="levels"):
        Packed(p.codes, p.absmax, p.codebook[:5], 16)
    with pytest.raises(TypeError, match="tensor"):
        Packed(p.codes.tolist(), p.absmax, p.codebook, 16)
    with pytest.raises(TypeError, match="codebook"):
        Packed(p.codes, p.absmax, p.codebook.tolist(), 16)
    assert Packed(p.codes, p.absmax, p.codebook, torch.tensor(16).numpy()[()], 2).block == 16
    with pytest.raises(AttributeError):
        p.block = 32  # frozen
    assert p._replace(axis=2).axis == -2  # _replace constructs, so it checks and normalises
    with pytest.raises(ValueError, match="block"):
        p._replace(block=0)


@pytest.mark.parametrize("axis", [-1, -2])
def test_nqtensor_packed_round_trip(axis):
    x, p = _packed(3, axis)
    t = NQTensor.from_packed(p, torch.bfloat16)
    assert t.shape == x.shape and t.dtype == torch.bfloat16 and t.axis == 4 + axis and t.bits == 3
    assert t.packed == p
    torch.testing.assert_close(t.dequantize(torch.float32), dequantize_packed(p))
    with pytest.raises(ValueError, match="does not fit"):
        NQTensor.from_packed(p.replace(p.codes, p.absmax[:, :, :1]))


def test_packed_traces_without_graph_breaks():
    _, p = _packed()

    def f(codes, absmax):
        q = Packed(codes, absmax, p.codebook, 16, 3)
        return dequantize_packed(q) * q.bits + q.axis

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(p.codes, p.absmax), f(p.codes, p.absmax))
