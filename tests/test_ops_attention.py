"""nqkv::attention on CPU (the chunked torch path) and F.scaled_dot_product_attention with NQTensors."""

import math

import pytest
import torch
import torch.nn.functional as F

import nqkv_core.ops  # noqa: F401  (registers the op and the SDPA route)
from nqkv_core import NQTensor, native
from nqkv_core.ops import cpu, packed_attention


def reference(q, kc, ka, kcb, kblock, kaxis, vc, va, vcb, vblock, vaxis, kt=None, vt=None, mask=None,
              scale=None, is_causal=False):
    """Dequantize, append the tail, fp32 SDPA with the queries at the last positions."""
    k = NQTensor(kc, ka, kcb, kblock, kaxis, (*kc.shape[:3], q.shape[-1]), torch.float32).dequantize()
    v = NQTensor(vc, va, vcb, vblock, vaxis, k.shape, torch.float32).dequantize()
    if kt is not None:
        k, v = torch.cat([k, kt.float()], 2), torch.cat([v, vt.float()], 2)
    tq, tk = q.shape[2], k.shape[2]
    if is_causal:
        causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        mask = causal if mask is None else mask & causal
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale, enable_gqa=True).to(q.dtype)


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    # The Triton tests may set TRITON_INTERPRET in this process; these tests are about the torch path.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make(b=1, hkv=2, g=2, tq=1, t=96, d=64, bits=4, k_axis=3, v_axis=3, block=32, tail=0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, d, generator=gen)
    v = torch.randn(b, hkv, t, d, generator=gen)
    q = torch.randn(b, hkv * g, tq, d, generator=gen).to(dtype)
    K = NQTensor.from_float(k, block=block, bits=bits, axis=k_axis - 4)
    V = NQTensor.from_float(v, block=block, bits=bits, axis=v_axis - 4)
    kt = vt = None
    if tail:
        kt = torch.randn(b, hkv, tail, d, generator=gen).to(dtype)
        vt = torch.randn(b, hkv, tail, d, generator=gen).to(dtype)
    return q, K, V, kt, vt


def op_args(q, K, V, kt=None, vt=None, mask=None, scale=None, is_causal=False):
    return (q, K.codes, K.absmax, K.codebook, K.block, K.axis, V.codes, V.absmax, V.codebook, V.block,
            V.axis, kt, vt, mask, scale, is_causal)


def assert_close(out, ref, tol=2e-2):
    # bf16 products with fp32 accumulation on the CPU path
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k_axis,v_axis", [(3, 3), (2, 3), (3, 2), (2, 2)])
def test_decode_layouts_bits(bits, k_axis, v_axis):
    q, K, V, kt, vt = make(b=2, g=3, tq=1, t=96, bits=bits, k_axis=k_axis, v_axis=v_axis, tail=5)
    args = op_args(q, K, V, kt, vt)
    assert_close(torch.ops.nqkv.attention(*args), reference(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_causal_dtypes(dtype, d):
    q, K, V, _, _ = make(tq=70, t=70, d=d, block=d // 2 if d == 128 else 32, dtype=dtype)
    args = op_args(q, K, V, is_causal=True)
    assert_close(torch.ops.nqkv.attention(*args), reference(*args), tol=3e-2)


def test_causal_queries_are_last_positions_with_tail():
    # 3 queries at the last 3 of 96 + 7 positions; chunks, query blocks and key blocks all small
    q, K, V, kt, vt = make(tq=3, t=96, k_axis=2, v_axis=3, tail=7)
    args = op_args(q, K, V, kt, vt, is_causal=True)
    ref = reference(*args)
    old = (cpu.CHUNK_ELEMS, cpu.SCORE_ELEMS)
    try:
        cpu.CHUNK_ELEMS, cpu.SCORE_ELEMS = 64 * 2 * 64, 64 * 2 * 2 * 64
        assert_close(torch.ops.nqkv.attention(*args), ref)
    finally:
        cpu.CHUNK_ELEMS, cpu.SCORE_ELEMS = old


def test_long_prefill_many_blocks_odd_lengths():
    q, K, V, kt, vt = make(g=2, tq=150, t=160, k_axis=3, v_axis=2, tail=13)
    args = op_args(q, K, V, kt, vt, is_causal=True)
    old = cpu.CHUNK_ELEMS, cpu.SCORE_ELEMS
    try:
        cpu.CHUNK_ELEMS, cpu.SCORE_ELEMS = 64 * 2 * 64, 1 << 14
        assert_close(torch.ops.nqkv.attention(*args), reference(*args))
    finally:
        cpu.CHUNK_ELEMS, cpu.SCORE_ELEMS = old


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_and_fully_masked_row(kind):
    q, K, V, kt, vt = make(tq=4, t=100, bits=3, tail=3)
    mask = torch.rand(1, 4, 4, 103, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, :, 2] = False  # a row that sees nothing -> zeros, as torch's SDPA
    if kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, -math.inf) + 0.1 * torch.randn(mask.shape)
    args = op_args(q, K, V, kt, vt, mask=mask)
    out = torch.ops.nqkv.attention(*args)
    assert_close(out, reference(*args))
    assert torch.all(out[:, :, 2] == 0)


def test_single_token_and_gqa_8():
    q, K, V, _, _ = make(hkv=1, g=8, tq=1, t=1, bits=4, block=64)
    args = op_args(q, K, V, scale=0.3)
    assert_close(torch.ops.nqkv.attention(*args), reference(*args))


def test_plain_path_matches_reference():
    # the fp32 route taken under torch.compile, run eagerly: exact up to fp32 rounding
    q, K, V, kt, vt = make(tq=5, t=96, bits=3, k_axis=2, v_axis=3, tail=4)
    args = op_args(q, K, V, kt, vt, scale=0.125, is_causal=True)
    out = cpu.attention_chunked(q, args[1:6], args[6:11], kt, vt, None, 0.125, True, plain=True)
    torch.testing.assert_close(out, reference(*args), atol=1e-5, rtol=1e-5)


def test_opcheck():
    q, K, V, kt, vt = make(tq=2, t=64, tail=3)
    mask = torch.rand(2, 67) > 0.3
    torch.library.opcheck(torch.ops.nqkv.attention.default, op_args(q, K, V, kt, vt, mask=mask, is_causal=True))
    torch.library.opcheck(torch.ops.nqkv.attention.default, op_args(q, K, V))
    # the opaque CPU decode op that compiled graphs call (its fake implementation, schema, autograd)
    args = op_args(q, K, V, kt, vt, mask=mask, is_causal=True)
    args = args[:13] + (args[13], q.shape[-1] ** -0.5, True)
    torch.library.opcheck(torch.ops.nqkv.attention_cpu_decode.default, args)
    torch.testing.assert_close(torch.ops.nqkv.attention_cpu_decode(*args), torch.ops.nqkv.attention(*args))


# -- F.scaled_dot_product_attention ------------------------------------------------------------------


@pytest.mark.parametrize("tq,tk,is_causal", [(1, 97, False), (33, 33, True), (5, 40, True), (40, 8, True)])
def test_sdpa_route_matches_torch(tq, tk, is_causal):
    # Tq != Tk with is_causal follows torch (top-left triangle), unlike the op's cache semantics
    q, K, V, _, _ = make(g=2, tq=tq, t=tk if tk % 8 == 0 else tk, block=32)
    ref = F.scaled_dot_product_attention(q, K.dequantize(), V.dequantize(), is_causal=is_causal, enable_gqa=True)
    out = F.scaled_dot_product_attention(q, K, V, is_causal=is_causal, enable_gqa=True)
    assert_close(out, ref)


@pytest.mark.parametrize("k_axis,v_axis,tq,t,g", [(3, 3, 96, 96, 2), (2, 3, 96, 96, 2), (3, 2, 20, 64, 1)])
def test_fp32_queries_compute_in_fp32(k_axis, v_axis, tq, t, g):
    # a prompt chunk of fp32 queries (the chunked path; 20 rows per KV head take its folded mode)
    # matches fp32 SDPA over the dequantized K/V as one decoded token does, not to bf16 rounding
    q, K, V, _, _ = make(g=g, tq=tq, t=t, k_axis=k_axis, v_axis=v_axis)
    ref = F.scaled_dot_product_attention(q, K.dequantize(), V.dequantize(), is_causal=True, enable_gqa=True)
    out = F.scaled_dot_product_attention(q, K, V, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # without the native kernels the decode path is plain torch; fp32 queries stay fp32 there too
    args = op_args(q[:, :, -1:], K, V)
    with native.disabled():
        torch.testing.assert_close(torch.ops.nqkv.attention(*args), reference(*args), atol=1e-4, rtol=1e-4)


def test_sdpa_route_mask_scale_gqa():
    q, K, V, _, _ = make(hkv=2, g=4, tq=3, t=64, bits=2, k_axis=2, v_axis=2)
    mask = torch.randn(3, 64)
    ref = F.scaled_dot_product_attention(q, K.dequantize(), V.dequantize(), attn_mask=mask, scale=0.2, enable_gqa=True)
    assert_close(F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=0.2, enable_gqa=True), ref)


def test_sdpa_route_errors():
    q, K, V, _, _ = make(g=2)
    with pytest.raises(NotImplementedError, match="value"):
        F.scaled_dot_product_attention(q, K, V.dequantize(), enable_gqa=True)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        F.scaled_dot_product_attention(q, K, V, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        F.scaled_dot_product_attention(q, K, V)


def test_op_errors():
    q, K, V, _, _ = make()
    args = list(op_args(q, K, V))
    with pytest.raises(TypeError, match="k_codes"):
        torch.ops.nqkv.attention(*[a if i != 1 else K.codes.int() for i, a in enumerate(args)])
    with pytest.raises(NotImplementedError, match="v_axis"):
        torch.ops.nqkv.attention(*[a if i != 10 else 1 for i, a in enumerate(args)])
    with pytest.raises(ValueError, match="k_absmax"):
        torch.ops.nqkv.attention(*[a if i != 2 else K.absmax[:, :, :-1] for i, a in enumerate(args)])
    with pytest.raises(TypeError, match="q must be"):
        torch.ops.nqkv.attention(*[a if i != 0 else q.double() for i, a in enumerate(args)])
    with pytest.raises(ValueError, match="multiple"):
        torch.ops.nqkv.attention(*[a if i != 0 else q[:, :3] for i, a in enumerate(args)])
    with pytest.raises(ValueError, match="attn_mask"):
        torch.ops.nqkv.attention(*args[:13], torch.ones(5, 7, dtype=torch.bool), None, False)
    with pytest.raises(ValueError, match="together"):
        torch.ops.nqkv.attention(*args[:11], torch.randn(1, 2, 3, 64), None, None, None, False)


# -- torch.compile ----------------------------------------------------------------------------------


class _Attend(torch.nn.Module):
    def __init__(self, k, v):
        super().__init__()
        self.k, self.v = k, v

    def forward(self, q):
        return F.scaled_dot_product_attention(q, self.k, self.v, is_causal=False, enable_gqa=True)


@pytest.mark.slow
def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    q, K, V, _, _ = make(g=2, tq=1, t=64)
    mod = _Attend(K, V)
    compiled = torch.compile(mod, fullgraph=True, backend="inductor")
    out = compiled(q)
    ref = F.scaled_dot_product_attention(q, K.dequantize(), V.dequantize(), enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # the compiled route is fp32


# -- packed_attention, the Python entry point -------------------------------------------------------


@pytest.mark.parametrize("k_axis,v_axis,tq,dtype", [(3, 3, 1, torch.float32), (2, 3, 4, torch.bfloat16),
                                                    (3, 2, 40, torch.float32)])
def test_packed_attention_matches_the_op(k_axis, v_axis, tq, dtype):
    q, K, V, kt, vt = make(tq=tq, k_axis=k_axis, v_axis=v_axis, tail=5, dtype=dtype)
    out = packed_attention(q, K.packed, V.packed, kt, vt, None, 0.2, True)
    assert_close(out, torch.ops.nqkv.attention(*op_args(q, K, V, kt, vt, None, 0.2, True)), tol=1e-5)
    assert_close(out, reference(*op_args(q, K, V, kt, vt, None, 0.2, True)))


@pytest.mark.parametrize("tq", [1, 40])  # the decode path (the bias in its reduction), the chunk loop (a mask)
def test_packed_attention_key_bias_is_a_score_offset(tq):
    q, K, V, kt, vt = make(tq=tq, tail=3)
    gen = torch.Generator().manual_seed(1)
    w, table = torch.randn(q.shape, generator=gen), torch.randn(128, 64, generator=gen)
    pos = torch.randint(0, 128, (96 + 3,), generator=gen)
    allowed = torch.rand(1, 1, tq, 99, generator=gen) > 0.2
    dense = (w @ table.T)[..., pos].masked_fill(~allowed, -math.inf)
    ref = reference(*op_args(q, K, V, kt, vt, dense, 0.1))
    out = packed_attention(q, K.packed, V.packed, kt, vt, allowed, 0.1, key_bias=(w, table, pos))
    assert_close(out, ref, tol=1e-4)
    calls = []
    given = packed_attention(q, K.packed, V.packed, kt, vt, allowed, 0.1, key_bias=(w, table, pos),
                             dense_bias=lambda: calls.append(1) or (w @ table.T)[..., pos])
    assert_close(given, ref, tol=1e-4)
    assert calls == ([] if tq == 1 else [1])  # only a path that cannot take the bias asks for it dense


def test_packed_attention_errors():
    q, K, V, _, _ = make()
    with pytest.raises(NotImplementedError, match="k_axis"):
        packed_attention(q, K.packed._replace(axis=-3), V.packed)
    with pytest.raises(ValueError, match="v_absmax"):
        packed_attention(q, K.packed, V.packed.replace(V.codes, V.absmax[:, :, 1:]))


def test_without_triton_the_kernel_routes_fall_back_and_remember_it():
    """With no triton importable (here: blocked) and the interpreter asked for, attention and the
    cache step's kernel routes take the torch path, and the failed import is tried once, not on
    every call (a failed import searches the whole path again)."""
    import subprocess
    import sys

    code = """
import os, sys, importlib.abc
os.environ["TRITON_INTERPRET"] = "1"
tries = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton":
            tries.append(name)
            raise ImportError("no triton here")
sys.meta_path.insert(0, Block())
import torch
from nqkv_core import NQTensor
from nqkv_core.ops import fused_step, packed_attention
attention = sys.modules["nqkv_core.ops.attention"]  # (the package exports the op under that name)
q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 96, 64)
K = NQTensor.from_float(k, block=32, bits=4)
outs = [packed_attention(q, K.packed, K.packed, None, None, None, 0.1) for _ in range(3)]
none = (None,) * 7
assert all(fused_step.step_inputs(q, k[:, :, :1], k[:, :, :1], *none, 0.1, torch.float32) is None for _ in range(3))
assert attention._triton_kernels() is None and torch.isfinite(outs[0]).all()
print(len(tries))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) <= 2  # once per route (attention's kernels, the step's), not per call
