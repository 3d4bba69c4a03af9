import io

import pytest
import torch

from nqkv_core import NQTensor


def kv(dtype=torch.float16, shape=(2, 3, 128, 64), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_roundtrip_metadata(dtype, axis, bits):
    x = kv(dtype)
    q = NQTensor.from_float(x, block=32, bits=bits, axis=axis)
    assert q.shape == x.shape and q.dtype == dtype and q.bits == bits and q.axis == axis % 4
    y = q.dequantize()
    assert y.dtype == dtype and y.shape == x.shape
    assert q.dequantize(torch.float32).dtype == torch.float32
    assert q.nbytes == x.numel() * bits // 8 + x.numel() // 32 * 2
    rel = ((y.float() - x.float()).norm() / x.float().norm()).item()
    assert rel < {2: 0.6, 3: 0.25, 4: 0.12}[bits]


def test_lloyd_and_tensor_codebooks():
    x = kv(torch.float32)
    a = NQTensor.from_float(x, bits=2, codebook="lloyd")
    b = NQTensor.from_float(x, bits=2, codebook=a.codebook)
    assert torch.equal(a.codes, b.codes)
    with pytest.raises(ValueError, match="levels but bits"):
        NQTensor.from_float(x, bits=4, codebook=a.codebook)


def test_unbiased_codebook_keeps_the_codes():
    from nqkv_core.codebook import get_codebook

    x = kv(torch.float32)
    plain = NQTensor.from_float(x, bits=3)
    unbiased = NQTensor.from_float(x, bits=3, unbiased=True)
    assert torch.equal(plain.codes, unbiased.codes) and torch.equal(plain.absmax, unbiased.absmax)
    assert torch.equal(unbiased.codebook, get_codebook("nf", 3, 64, unbiased=True))
    assert unbiased.codebook[-1] > 1
    # the decoded tensor is the plain one times the gain, so it is not shrunk on average
    gain = float(unbiased.codebook[-1])
    torch.testing.assert_close(unbiased.dequantize(), plain.dequantize() * gain)
    with pytest.raises(ValueError, match="codebook kind"):
        NQTensor.from_float(x, bits=3, codebook=plain.codebook, unbiased=True)


def test_fitted_scales_decode_each_block_unbiased():
    x = kv(torch.float32)
    fit = NQTensor.from_float(x, bits=3, fit_scale=True)
    assert torch.equal(fit.codebook, NQTensor.from_float(x, bits=3).codebook)  # plain levels
    xb, yb = x.reshape(-1, 64).double(), fit.dequantize().reshape(-1, 64).double()
    ratio = (xb * yb).sum(-1) / (xb * xb).sum(-1)
    assert torch.all((ratio - 1).abs() < 2**-10)
    with pytest.raises(ValueError, match="fit_scale"):
        NQTensor.from_float(x, bits=3, fit_scale=True, unbiased=True)  # one tensor: one or the other


def test_slice_select_cat_follow_dequantize():
    x = kv()
    for axis, step in ((-1, 1), (-2, 32)):
        q = NQTensor.from_float(x, block=32, axis=axis)
        full = q.dequantize()
        torch.testing.assert_close(q[:, :, 32:96].dequantize(), full[:, :, 32:96], rtol=0, atol=0)
        torch.testing.assert_close(q[1].dequantize(), full[1], rtol=0, atol=0)
        torch.testing.assert_close(q[:, 2].dequantize(), full[:, 2], rtol=0, atol=0)
        torch.testing.assert_close(q[:, :, -step:].dequantize(), full[:, :, -step:], rtol=0, atol=0)
        cat = torch.cat([q[:, :, :64], q[:, :, 64:]], dim=2)
        assert torch.equal(cat.codes, q.codes) and torch.equal(cat.absmax, q.absmax)
        assert torch.cat([q, q], dim=0).shape == (4, 3, 128, 64)


def test_detach_clone_to():
    q = NQTensor.from_float(kv())
    for other in (q.detach(), q.clone(), q.to("cpu"), q.to(torch.float32)):
        assert isinstance(other, NQTensor) and torch.equal(other.codes, q.codes)
    c = q.clone()
    assert c.codes.data_ptr() != q.codes.data_ptr()
    assert q.to(torch.float32).dequantize().dtype == torch.float32
    with pytest.raises(TypeError, match="floating point"):
        q.to(torch.int8)


def test_unsupported_ops_name_the_op():
    q = NQTensor.from_float(kv())
    with pytest.raises(NotImplementedError, match=r"aten\.add.*dequantize\(\)"):
        q + 1
    with pytest.raises(NotImplementedError, match=r"aten\.transpose"):
        q.transpose(-1, -2)
    with pytest.raises(NotImplementedError, match="last axis"):
        q[..., :32]
    with pytest.raises(NotImplementedError, match="whole blocks"):
        NQTensor.from_float(kv(), block=32, axis=-2)[:, :, 5:40]


def test_repr_does_not_dequantize():
    r = repr(NQTensor.from_float(kv(), bits=3, block=64))
    assert "bits=3" in r and "block=64" in r and "bits_per_element=3.250" in r
    r = repr(NQTensor.from_float(kv(), bits=4, block=64, scale_dtype=torch.uint8))
    assert "scale_dtype=E5M3 (torch.uint8)" in r and "bits_per_element=4.125" in r


def test_torch_save_load_weights_only():
    q = NQTensor.from_float(kv(torch.bfloat16), bits=3, axis=-2, block=32)
    buf = io.BytesIO()
    torch.save({"k": q}, buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=True)["k"]
    assert isinstance(r, NQTensor) and (r.block, r.axis, r.dtype, r.shape) == (q.block, q.axis, q.dtype, q.shape)
    for n in NQTensor.tensor_data_names:
        assert torch.equal(getattr(r, n), getattr(q, n))


def test_state_dict_safetensors_roundtrip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    q = NQTensor.from_float(kv(), bits=4, block=64)
    tensors, metadata = q.state_dict()
    path = tmp_path / "k.safetensors"
    safetensors.save_file(tensors, path, metadata=metadata)
    with safetensors.safe_open(path, "pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        r = NQTensor.from_state_dict(loaded, f.metadata())
    assert torch.equal(r.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="does not fit"):
        NQTensor.from_state_dict({**loaded, "absmax": loaded["absmax"][:1]}, metadata)
    with pytest.raises(ValueError, match="missing"):
        NQTensor.from_state_dict({"codes": loaded["codes"]}, metadata)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.uint8], ids=["fp16", "e5m3"])
def test_compile_fullgraph_quantize_dequantize(scale_dtype):
    torch._dynamo.reset()
    x = kv(torch.float32, shape=(1, 2, 64, 64))

    def roundtrip(t):
        q = NQTensor.from_float(t, block=32, bits=4, scale_dtype=scale_dtype)
        return q.dequantize() * 2

    compiled = torch.compile(roundtrip, fullgraph=True)  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled(x), roundtrip(x), rtol=0, atol=0)


def _pieces(q):
    return [getattr(q, n) for n in NQTensor.tensor_data_names]


class _Pickled:
    """Pickles as NQTensor does, with pieces of our choosing (a file claiming what its data is not)."""

    def __init__(self, *args):
        self.args = args

    def __reduce_ex__(self, protocol):
        from nqkv_core.tensor import _nqtensor_from_pieces

        return _nqtensor_from_pieces, self.args


def _forged(q):
    codes, absmax, codebook = _pieces(q)
    shape = tuple(q.shape)
    long = (*shape[:2], 2 * shape[2], shape[3])  # 80 tokens claimed over 40 tokens of data
    return [
        ((codes, absmax, codebook, q.block, q.axis, long, q.dtype), ValueError, "does not fit"),
        ((codes, absmax, codebook, q.block, q.axis, shape, torch.int32), ValueError, "dtype"),
        ((codes.view(torch.int8), absmax, codebook, q.block, q.axis, shape, q.dtype), ValueError, "uint8"),
        ((codes, absmax.to(torch.bfloat16), codebook, q.block, q.axis, shape, q.dtype), ValueError, "absmax"),
        ((codes, absmax, codebook[:8], q.block, q.axis, shape, q.dtype), ValueError, "does not fit"),
        ((codes, absmax, codebook[:15], q.block, q.axis, shape, q.dtype), ValueError, "levels"),
        ((codes, absmax, codebook, 16, q.axis, shape, q.dtype), ValueError, "does not fit"),
        ((codes, absmax, codebook, q.block, 1, shape, q.dtype), ValueError, "does not fit"),
        ((codes, absmax, codebook, q.block, 7, shape, q.dtype), ValueError, "out of range"),
        ((codes, absmax, codebook, 8.0, q.axis, shape, q.dtype), TypeError, "block must be an int"),
    ]


def test_rebuild_paths_check_the_pieces():
    q = NQTensor.from_float(kv(torch.float32, shape=(1, 2, 40, 64)), block=8, axis=-2)
    for args, error, match in _forged(q):
        codes, absmax, codebook, block, axis, shape, dtype = args
        buf = io.BytesIO()
        torch.save({"k": _Pickled(*args)}, buf)
        buf.seek(0)
        with pytest.raises(error, match=match):
            torch.load(buf, weights_only=True)
        with pytest.raises(error, match=match):
            NQTensor.__tensor_unflatten__(dict(zip(NQTensor.tensor_data_names, (codes, absmax, codebook))),
                                          (block, axis, dtype), torch.Size(shape), None)
        tensors, metadata = q.state_dict()
        metadata = {**metadata, "block": str(block), "axis": str(axis), "shape": ",".join(map(str, shape))}
        if match not in ("dtype", "block must be an int"):  # (metadata strings hold only ints and dtype names)
            with pytest.raises(error, match=match):
                NQTensor.from_state_dict(dict(zip(NQTensor.tensor_data_names, (codes, absmax, codebook))), metadata)
    # the honest pieces go through every path
    names, context = q.__tensor_flatten__()
    r = NQTensor.__tensor_unflatten__({n: getattr(q, n) for n in names}, context, q.shape, None)
    assert torch.equal(r.dequantize(), q.dequantize())


def test_dequantize_needs_a_floating_dtype():
    q = NQTensor.from_float(kv())
    for dtype in (torch.int32, torch.int8, torch.bool):
        with pytest.raises(TypeError, match="floating dtype"):
            q.dequantize(dtype)
    with pytest.raises(TypeError, match="floating point"):
        q.to(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (kv(torch.float32), {"block": 64.0}, TypeError, "block must be an int"),
        (kv(torch.float32), {"bits": 4.0}, TypeError, "bits must be an int"),
        (kv(torch.float32), {"bits": 5}, ValueError, "bits must be one of"),
        (kv(torch.float32), {"axis": 3.0}, TypeError, "axis must be an int"),
        (kv(torch.float32), {"block": 64, "codebook": "lloyd", "bits": True}, TypeError, "bits must be an int"),
        (kv(torch.float32), {"block": 0}, ValueError, "block"),
        (kv(torch.float32).numpy(), {}, TypeError, "expected a tensor"),
        (torch.full((1, 64), 1e300, dtype=torch.float64), {"scale_dtype": torch.float32}, ValueError, "float32 range"),
    ],
)
def test_from_float_bad_arguments(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        NQTensor.from_float(x, **kwargs)


def test_meta_tensors_quantize_to_shapes():
    x = torch.empty(2, 3, 128, 64, device="meta", dtype=torch.bfloat16)
    q = NQTensor.from_float(x, block=32, bits=3, axis=-2, unbiased=True)
    assert q.codes.is_meta and q.codes.shape == (2, 3, 128, 24) and q.absmax.shape == (2, 3, 4, 64)
    y = q[:, :, 32:].dequantize()
    assert y.is_meta and y.shape == (2, 3, 96, 64) and y.dtype == torch.bfloat16


_COMPILE_SCRIPT = r"""
import torch
from nqkv_core import NQTensor

x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(0))

def quantize(t):
    return NQTensor.from_float(t, block=32, bits=3, axis=-2, unbiased=True)

def pieces(q):
    return [q.codes, q.absmax, q.codebook, q.dequantize()]

def sliced(q):
    return q[:, :, 32:].dequantize()

def joined(a, b):
    return torch.cat([a, b], dim=2).dequantize()

# compiled first, in a process that has built no codebook: nothing cached hides a traced construction
eager_backend = [torch.compile(f, fullgraph=True, backend="eager") for f in (quantize, sliced, joined)]
q = eager_backend[0](x)
outs = [pieces(q), eager_backend[1](q), eager_backend[2](q, q[:, :, :32])]
other = NQTensor.from_float(x, block=32, bits=3, axis=-2)  # the plain levels: cat must refuse
try:
    eager_backend[2](q, other)
    raise SystemExit("compiled cat accepted a different codebook")
except ValueError as e:
    assert "same codebook" in str(e), e

def everything(t):
    q = NQTensor.from_float(t, block=32, bits=3, axis=-2, unbiased=True)
    return torch.cat([q[:, :, 32:], q[:, :, :32]], dim=2).dequantize()

torch._dynamo.reset()
inductor = torch.compile(everything, fullgraph=True)(x)

ref = quantize(x)
for got, want in zip(outs[0], pieces(ref)):
    assert torch.equal(got, want)
assert torch.equal(outs[1], sliced(ref)) and torch.equal(outs[2], joined(ref, ref[:, :, :32]))
assert torch.equal(inductor, everything(x))
print("hash", ref._stable_hash_for_caching())
"""


@pytest.mark.slow
def test_compile_fullgraph_fresh_process():
    # from_float, slicing and cat inside fullgraph=True graphs (eager backend, then Inductor once)
    # give the eager results; a fresh process, so the codebook builder is met while tracing
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the AOT cache key of an NQTensor is stable across processes and depends on layout, not values
    q = NQTensor.from_float(kv(torch.float32, shape=(1, 2, 64, 64)), block=32, bits=3, axis=-2, unbiased=True)
    assert proc.stdout.split("hash ")[1].strip() == q._stable_hash_for_caching()
    assert q._stable_hash_for_caching() == NQTensor.from_float(-q.dequantize(), block=32, bits=3, axis=-2,
                                                               unbiased=True)._stable_hash_for_caching()
    assert q._stable_hash_for_caching() != q[:, :, 32:]._stable_hash_for_caching()
