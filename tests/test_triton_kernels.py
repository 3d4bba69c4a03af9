"""Triton decode/prefill kernels against their plain-torch reference.

With CUDA the kernels run on the GPU. Without it they run in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` before ``triton`` itself is first imported (``triton.jit`` reads it when
decorating, Triton's own library included). Other test modules import triton earlier, so in a
normal run this file re-runs itself in a child process with the variable set.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
NEED_CHILD = not CUDA and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if CUDA else "cpu"

if not NEED_CHILD:
    import triton
    import triton.language as tl

    from nqkv_core.ops import triton_decode, triton_decode_grouped, triton_prefill, triton_quantize

    @triton.jit
    def _tables_kernel(cb_ptr, out_ptr, DT: tl.constexpr):  # the eight words of _byte_tables
        w0, w1, w2, w3, w4, w5, w6, w7 = triton_decode._byte_tables(cb_ptr, DT)
        tl.store(out_ptr + 0, w0)
        tl.store(out_ptr + 1, w1)
        tl.store(out_ptr + 2, w2)
        tl.store(out_ptr + 3, w3)
        tl.store(out_ptr + 4, w4)
        tl.store(out_ptr + 5, w5)
        tl.store(out_ptr + 6, w6)
        tl.store(out_ptr + 7, w7)
from nqkv_core import NQTensor  # noqa: E402


@pytest.mark.skipif(not NEED_CHILD, reason="runs the kernels in this process")
def test_kernels_in_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not NEED_CHILD, reason="runs the script in a child process of the parent run")
def test_gpu_decode_check_dry_run(tmp_path):
    """benchmarks/gpu_decode_check.py (the kernel stage of gpu_check.sh) on CPU: its correctness
    table comes out, as JSON and Markdown, and agrees with the reference."""
    import json

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_decode_check.py"), "--dry-run",
                          "--skip-timing", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_decode_check.json").read_text())
    assert report["correctness"] and all(r["ok"] for r in report["correctness"])
    assert "| max abs err |" in (tmp_path / "gpu_decode_check.md").read_text()


def _kernel_test(fn):
    return pytest.mark.skipif(NEED_CHILD, reason="run in the interpreter child process")(fn)


def make(b=1, hkv=2, g=2, tq=1, t=100, d=64, bits=4, k_axis=3, v_axis=3, block=32, tail=0, dtype=torch.float32,
         scale_dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    q = torch.randn(b, hkv * g, tq, d, generator=gen).to(DEVICE, dtype)
    K = NQTensor.from_float(k.to(DEVICE), block=block, bits=bits, axis=k_axis - 4, scale_dtype=scale_dtype)
    V = NQTensor.from_float(v.to(DEVICE), block=block, bits=bits, axis=v_axis - 4, scale_dtype=scale_dtype)
    kt = vt = None
    if tail:
        kt = torch.randn(b, hkv, tail, d, generator=gen).to(DEVICE, dtype)
        vt = torch.randn(b, hkv, tail, d, generator=gen).to(DEVICE, dtype)
    return q, K, V, kt, vt


def args_of(q, K, V, kt=None, vt=None, mask=None, scale=None, is_causal=False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q, K.codes, K.absmax, K.codebook, K.block, K.axis, V.codes, V.absmax, V.codebook, V.block,
            V.axis, kt, vt, mask, scale, is_causal)


def check(out, ref, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@_kernel_test
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k_axis,v_axis", [(3, 3), (2, 2), (2, 3)])
def test_decode_kernel(bits, k_axis, v_axis):
    # 200 tokens: several splits of the interpreter's short split length, a partial last tile
    q, K, V, kt, vt = make(tq=1, t=192, bits=bits, k_axis=k_axis, v_axis=v_axis, tail=5)
    a = args_of(q, K, V, kt, vt)
    check(triton_decode.flash_decode(*a), triton_decode.reference(*a), torch.float32)


@_kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_kernel_causal_masks_gqa(dtype):
    q, K, V, kt, vt = make(g=4, tq=3, t=100, tail=7, dtype=dtype)
    bool_mask = torch.rand(3, 107, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.3
    bool_mask[1] = False
    for mask in (None, bool_mask, torch.randn(1, 8, 3, 107, device=DEVICE).to(dtype)):
        a = args_of(q, K, V, kt, vt, mask=mask, is_causal=True)
        check(triton_decode.flash_decode(*a), triton_decode.reference(*a), dtype)


@_kernel_test
@pytest.mark.parametrize("d,block", [(64, 64), (128, 128), (128, 64), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lanes", [True, False])
def test_decode_kernel_lane_order(d, block, dtype, lanes, monkeypatch):
    """The presets' layout (4-bit, blocks along head_dim: one per row, as at head_dim 64, or
    several, as at 128): the lane-order path and the general one, with the fp tail, GQA, a causal
    multi-token query and each kind of mask."""
    monkeypatch.setitem(triton_decode.DECODE_CONFIG, "nibble_lanes", lanes)
    q, K, V, kt, vt = make(g=3, tq=2, t=150, d=d, block=block, tail=6, dtype=dtype)
    meta = triton_decode.kernel_args(*args_of(q, K, V, kt, vt)[:13], None)[2]
    assert triton_decode.nibble_lanes(meta, triton_decode.DECODE_CONFIG) == lanes
    gen = torch.Generator().manual_seed(3)
    bool_mask = (torch.rand(2, 156, generator=gen) > 0.2).to(DEVICE)
    for mask in (None, bool_mask, torch.randn(1, 6, 2, 156, generator=gen).to(DEVICE, dtype)):
        a = args_of(q, K, V, kt, vt, mask=mask, is_causal=True)
        check(triton_decode.flash_decode(*a), triton_decode.reference(*a), dtype)


@_kernel_test
@pytest.mark.parametrize("d,block", [(64, 64), (128, 64), (64, 16)])
def test_kernels_read_e5m3_scales(d, block, monkeypatch):
    """E5M3 scale bytes decode in every kernel path (split-K general and lane order, grouped) to
    what the same scales stored as fp16 give, and to the reference."""
    from nqkv_core.quantize import scale_values

    gen = torch.Generator().manual_seed(d + block)
    k, v = (torch.randn(1, 2, 150, d, generator=gen) * 3 for _ in range(2))
    q = torch.randn(1, 6, 1, d, generator=gen).to(DEVICE)
    K8, V8 = (NQTensor.from_float(x.to(DEVICE), block=block, bits=4, scale_dtype=torch.uint8) for x in (k, v))
    assert K8.absmax.dtype == torch.uint8
    K16, V16 = (t._rebuild(absmax=scale_values(t.absmax).half()) for t in (K8, V8))
    kt, vt = (torch.randn(1, 2, 5, d, generator=gen).to(DEVICE) for _ in range(2))
    for lanes in (True, False):
        monkeypatch.setitem(triton_decode.DECODE_CONFIG, "nibble_lanes", lanes)
        a8, a16 = args_of(q, K8, V8, kt, vt), args_of(q, K16, V16, kt, vt)
        check(triton_decode.flash_decode(*a8), triton_decode.flash_decode(*a16), torch.float32)
        check(triton_decode.flash_decode(*a8), triton_decode.reference(*a8), torch.float32)
    qh = q.half()
    a8, a16 = args_of(qh, K8, V8, kt.half(), vt.half()), args_of(qh, K16, V16, kt.half(), vt.half())
    if triton_decode_grouped.supports(qh, a8[1:6], a8[6:11]):
        check(triton_decode_grouped.grouped_decode(*a8), triton_decode_grouped.grouped_decode(*a16), torch.float32)
        check(triton_decode_grouped.grouped_decode(*a8), triton_decode.reference(*a8), torch.float16)


GROUPED_CASES = [  # (head_dim, block, group, tail, tokens, dtype): each head_dim, group, tail length and dtype
    (64, 64, 3, 0, 1000, torch.float32), (64, 64, 4, 1, 1, torch.float16), (64, 64, 3, 37, 1000, torch.bfloat16),
    (128, 64, 4, 0, 1, torch.bfloat16), (128, 64, 3, 1, 1000, torch.float32), (128, 64, 4, 37, 1000, torch.float16),
    (128, 128, 3, 37, 130, torch.float16), (64, 32, 4, 1, 200, torch.float32),
]


@_kernel_test
@pytest.mark.parametrize("d,block,g,tail,t,dtype", GROUPED_CASES)
def test_grouped_decode_kernel(d, block, g, tail, t, dtype):
    """The grouped split kernel against the reference: one or two scale blocks per row, GQA groups
    of 3 and 4 (rows padded to 16), fp tails of 0 / 1 / 37 tokens, 1 token (most splits empty) and
    1000 (several splits, a partial tile)."""
    q, K, V, kt, vt = make(b=2, g=g, t=t, d=d, block=block, tail=tail, dtype=dtype)
    a = args_of(q, K, V, kt, vt)
    assert triton_decode_grouped.supports(q, a[1:6], a[6:11])
    check(triton_decode_grouped.grouped_decode(*a), triton_decode.reference(*a), dtype)


def rope_key_bias(q, n_hist, n_tail, ring=False, scale=None):
    """A RoPE-centred cache's key bias for ``q``: weights from a random key centre
    (``rope_bias_weights``), the ``[cos | sin]`` table of head_dim's RoPE angles, and positions in
    the cache's slot order: the body one run after 4 sinks (or, with ``ring``, a run that wraps),
    then the sinks, then a shuffled window. Returns ``(w, table, positions, dense)`` with ``dense``
    the ``(b, hq, Tq, n_hist + n_tail)`` offsets computed in torch."""
    from nqkv_core.transform import rope_bias_weights

    gen = torch.Generator().manual_seed(5)
    b, hq, _, d = q.shape
    mu = 2 * torch.randn(b, hq, 1, d, generator=gen)
    w = rope_bias_weights(q.float().cpu(), mu, q.shape[-1] ** -0.5 if scale is None else scale)
    n_pos = n_hist + n_tail + 8
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2).float() / d)
    ang = torch.arange(n_pos).float()[:, None] * inv_freq[None, :]
    table = torch.cat([ang.cos(), ang.sin()], dim=-1)
    body = torch.arange(4, 4 + n_hist)
    if ring:
        body = body.roll(n_hist // 3)
    tail = torch.cat([torch.arange(4), 4 + n_hist + torch.randperm(n_pos - 4 - n_hist, generator=gen)])[:n_tail]
    positions = torch.cat([body, tail])
    dense = (w @ table.T).index_select(-1, positions)
    return w.to(DEVICE), table.to(DEVICE), positions.to(DEVICE), dense.to(DEVICE)


@_kernel_test
@pytest.mark.parametrize("d,block,g,tail,t,dtype", GROUPED_CASES)
def test_grouped_decode_key_bias(d, block, g, tail, t, dtype):
    """The RoPE-centre key bias computed in the kernel (from the weights, the table and the positions)
    against the reference given the same bias as a dense additive mask; a body that wraps (a ring)
    at 1000 tokens."""
    q, K, V, kt, vt = make(b=2, g=g, t=t, d=d, block=block, tail=tail, dtype=dtype)
    w, table, positions, dense = rope_key_bias(q, t, tail, ring=t == 1000 and d == 64)
    a = args_of(q, K, V, kt, vt)
    ref = triton_decode.reference(*args_of(q, K, V, kt, vt, mask=dense))
    if t + tail > 1:  # (one key takes all the weight, bias or not)
        assert (ref.float() - triton_decode.reference(*a).float()).abs().max() > 0.05  # the bias matters
    check(triton_decode_grouped.grouped_decode(*a, w, table, positions), ref, dtype)


@_kernel_test
def test_grouped_decode_key_bias_masks_lengths():
    """The key bias with a bool mask, a causal two-token query, and device lengths below the
    tensors' capacity (tail positions then follow the valid history: column ``T_hist + i``)."""
    q, K, V, kt, vt = make(b=1, g=3, tq=2, t=150, d=64, block=64, tail=6)
    w, table, positions, dense = rope_key_bias(q, 150, 6)
    mask = (torch.rand(2, 156, generator=torch.Generator().manual_seed(3)) > 0.2).to(DEVICE)
    a = args_of(q, K, V, kt, vt, mask=mask, is_causal=True)
    ref = triton_decode.reference(*args_of(q, K, V, kt, vt, mask=dense.masked_fill(~mask, float("-inf")),
                                           is_causal=True))
    check(triton_decode_grouped.grouped_decode(*a, w, table, positions), ref, torch.float32)
    th, tt = 100, 4
    cols = torch.cat([torch.arange(th), 150 + torch.arange(tt)]).to(DEVICE)
    res = triton_decode_grouped.launch(q, K.codes, K.absmax, K.codebook, 64, V.codes, V.absmax, V.codebook, kt, vt,
                                       None, 0.125, False, lengths=torch.tensor([[th, tt]], dtype=torch.int32),
                                       key_bias=(w, table, positions[cols]))
    ref = triton_decode.reference(q, K.codes[:, :, :th], K.absmax[:, :, :th], K.codebook, 64, 3, V.codes[:, :, :th],
                                  V.absmax[:, :, :th], V.codebook, 64, 3, kt[:, :, :tt], vt[:, :, :tt],
                                  dense[..., cols], 0.125, False)
    check(res, ref, torch.float32)


@_kernel_test
def test_grouped_decode_key_bias_checks():
    """A key bias of the wrong shape, dtype or device is refused with an error naming it."""
    q, K, V, kt, vt = make(g=3, t=40, d=64, block=64, tail=2)
    w, table, positions, _ = rope_key_bias(q, 40, 2)
    a = args_of(q, K, V, kt, vt)
    for bad, err in (((w[..., :32], table, positions), "bias_w"), ((w, table[:, :32], positions), "bias_table"),
                     ((w, table, positions[:41]), "bias_pos"), ((w.half(), table, positions), "float32"),
                     ((w, table, positions.float()), "bias_pos"), ((w, None, positions), "together")):
        with pytest.raises((ValueError, TypeError), match=err):
            triton_decode_grouped.grouped_decode(*a, *bad)


@_kernel_test
@pytest.mark.parametrize("d,block,b_shift,dtype", [(64, 64, 2, torch.float32), (128, 64, 1, torch.float16),
                                                    (64, 64, 2, torch.bfloat16)])
def test_grouped_decode_output_transform(d, block, b_shift, dtype):
    """The merge kernel's output transform (a value rotation and a centre per sequence and KV head,
    or one for all sequences) against the reference output taken back in fp32 by torch ops; with
    the key bias and a causal two-token query, each alone, and refused when malformed."""
    from nqkv_core.scheme import rotation
    from nqkv_core.transform import per_query_head

    q, K, V, kt, vt = make(b=2, g=3, tq=2, t=300, d=d, block=block, tail=5, dtype=dtype)
    w, table, positions, dense = rope_key_bias(q, 300, 5)
    rot = rotation(d).float().to(DEVICE) * 1.5  # (not orthogonal: a transposed product would show)
    shift = torch.randn(b_shift, 2, 1, d, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    a = args_of(q, K, V, kt, vt, is_causal=True)
    ref = triton_decode.reference(*args_of(q, K, V, kt, vt, mask=dense, is_causal=True)).float()
    for r, s in ((rot, shift), (rot, None), (None, shift)):
        expect = ref @ r.T if r is not None else ref
        expect = expect + per_query_head(s, 3) if s is not None else expect
        check(triton_decode_grouped.grouped_decode(*a, w, table, positions, r, s), expect.to(dtype), dtype)
    for bad, err in (((rot[:, :32], shift), "out_rot"), ((rot, shift[:, :1]), "out_shift"),
                     ((rot.double(), shift), "float32")):
        with pytest.raises((ValueError, TypeError), match=err):
            triton_decode_grouped.grouped_decode(*a, w, table, positions, *bad)


@_kernel_test
def test_grouped_decode_33k_tokens(monkeypatch):
    """A long cache (33k tokens, 37 tail tokens) over a few splits; large tiles keep the
    interpreter quick."""
    monkeypatch.setitem(triton_decode_grouped.GROUPED_CONFIG, "block_n", 2048)
    q, K, V, kt, vt = make(hkv=1, g=3, t=33_000, d=64, block=64, tail=37, dtype=torch.float16)
    a = args_of(q, K, V, kt, vt)
    check(triton_decode_grouped.launch(*a[:5], *a[6:9], *a[11:16], num_splits=3),
          triton_decode.reference(*a), torch.float16)


@_kernel_test
@pytest.mark.parametrize("d,block", [(64, 64), (128, 64)])
def test_grouped_decode_masks_causal(d, block):
    """Bool and additive masks over history and tail, a causal two-token query, and a row whose
    mask leaves nothing (zeros)."""
    q, K, V, kt, vt = make(g=3, tq=2, t=150, d=d, block=block, tail=6)
    gen = torch.Generator().manual_seed(3)
    bool_mask = (torch.rand(2, 156, generator=gen) > 0.2).to(DEVICE)
    bool_mask[1] = False
    for mask in (None, bool_mask, torch.randn(1, 6, 2, 156, generator=gen).to(DEVICE)):
        a = args_of(q, K, V, kt, vt, mask=mask, is_causal=True)
        check(triton_decode_grouped.grouped_decode(*a), triton_decode.reference(*a), torch.float32)


@_kernel_test
def test_grouped_decode_device_lengths_and_buffers():
    """Lengths from a device tensor (a different history and tail length per sequence, below the
    tensors' capacity) give attention over just those tokens; preallocated output and workspace
    are written in place."""
    q, K, V, kt, vt = make(b=2, g=3, t=300, d=64, block=64, tail=20)
    lengths = torch.tensor([[300, 20], [129, 3]], dtype=torch.int32, device=DEVICE)
    splits = 5
    out = torch.full_like(q, float("nan"))
    work = (torch.empty(2 * 2 * splits * 3 * 64, device=DEVICE), torch.empty(2 * 2 * splits * 3, device=DEVICE))
    res = triton_decode_grouped.launch(q, K.codes, K.absmax, K.codebook, 64, V.codes, V.absmax, V.codebook, kt, vt,
                                       None, 0.125, False, lengths=lengths, num_splits=splits, out=out,
                                       workspace=work)
    assert res is out
    for i, (th, tt) in enumerate(lengths.tolist()):
        one = lambda x, n: x[i:i + 1, :, :n]  # noqa: E731
        a = (q[i:i + 1], one(K.codes, th), one(K.absmax, th), K.codebook, 64, 3, one(V.codes, th),
             one(V.absmax, th), V.codebook, 64, 3, one(kt, tt), one(vt, tt), None, 0.125, False)
        check(out[i:i + 1], triton_decode.reference(*a), torch.float32)


@_kernel_test
def test_grouped_decode_supports():
    """Layouts the grouped kernel leaves to the split-K kernel."""
    q, K, V, _, _ = make(d=64, block=16)
    a = args_of(q, K, V)
    assert not triton_decode_grouped.supports(q, a[1:6], a[6:11])  # 16-element blocks
    q, K, V, _, _ = make(d=64, block=64, bits=3)
    a = args_of(q, K, V)
    assert not triton_decode_grouped.supports(q, a[1:6], a[6:11])  # 3-bit
    q, K, V, _, _ = make(d=64, block=50, k_axis=2, v_axis=2)
    a = args_of(q, K, V)
    assert not triton_decode_grouped.supports(q, a[1:6], a[6:11])  # token blocks


@_kernel_test
def test_grouped_decode_supports_fp32_queries(monkeypatch):
    """On a GPU fp32 queries take the grouped kernel only where GROUPED_CONFIG says so."""
    q, K, V, _, _ = make(d=64, block=64)
    k, v = args_of(q, K, V)[1:6], args_of(q, K, V)[6:11]
    monkeypatch.setattr(triton_decode_grouped, "_interpreting", lambda: False)
    assert triton_decode_grouped.supports(q.half(), k, v) and not triton_decode_grouped.supports(q, k, v)
    monkeypatch.setitem(triton_decode_grouped.GROUPED_CONFIG, "fp32_queries", True)
    assert triton_decode_grouped.supports(q, k, v)


@pytest.mark.skipif(not CUDA, reason="the register lookup is PTX: compiled for a GPU only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,block", [(64, 64), (128, 64)])
def test_decode_kernel_register_lut(dtype, d, block, monkeypatch):
    """The lane-order path with codes decoded by byte permutes (register_lut) against the reference."""
    monkeypatch.setitem(triton_decode.DECODE_CONFIG, "register_lut", True)
    q, K, V, kt, vt = make(g=3, tq=2, t=300, d=d, block=block, tail=6, dtype=dtype)
    meta = triton_decode.kernel_args(*args_of(q, K, V, kt, vt)[:13], None)[2]
    assert triton_decode.register_lut(meta, triton_decode.DECODE_CONFIG)
    for mask in (None, (torch.rand(2, 306, generator=torch.Generator().manual_seed(4)) > 0.2).to(DEVICE)):
        a = args_of(q, K, V, kt, vt, mask=mask, is_causal=True)
        check(triton_decode.flash_decode(*a), triton_decode.reference(*a), dtype)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: needs real jit functions")
@pytest.mark.skipif(CUDA, reason="with a GPU, test_decode_kernel_register_lut runs the lookup itself")
@pytest.mark.parametrize("d,block", [(64, 64), (128, 64)])
def test_register_lut_compiles_for_a_gpu(d, block):
    """The register lookup is PTX that no CPU run executes: compile the split kernel for sm_90 here
    (no GPU needed) and check that ptxas takes it and that the key loop decodes by byte permutes,
    with no gather from the codebook in memory left in it (4-byte LDGSTS: the asynchronous copies
    that Triton makes of those gathers; the codes themselves come in 8- or 16-byte ones)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import triton_sass

    launch = triton_sass.capture_split_launch(1, 3, 3, d, 4096, torch.float16, triton_sass.PATHS["lanes+lut"], block)
    assert launch[2]["LUT"] and launch[2]["NIBBLES"]
    try:
        compiled = triton_sass.compile_for(*launch, arch=90)
    except (ImportError, AttributeError) as e:  # Triton-internal API of another version
        pytest.skip(f"this Triton's compiler API: {e}")
    loop = triton_sass.key_loop(triton_sass.sass_of(compiled.asm["cubin"])[0])
    ops = [triton_sass._opcode(line) for line in loop]
    assert ops.count("HMMA") >= 4 and ops.count("PRMT") >= 64
    assert triton_sass.gathers(loop) == 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: needs real jit functions")
@pytest.mark.skipif(CUDA, reason="with a GPU, the grouped kernel tests run it")
@pytest.mark.parametrize("d,bias,dtype,scales", [(64, False, torch.bfloat16, torch.float16),
                                                 (128, False, torch.bfloat16, torch.uint8),
                                                 (64, True, torch.bfloat16, torch.uint8),
                                                 (128, True, torch.bfloat16, torch.float16),
                                                 (128, True, torch.float32, torch.uint8)])
def test_grouped_kernel_compiles_for_a_gpu(d, bias, dtype, scales):
    """Every feature of the grouped kernel at once (fp tail, bool mask, causal two-token query,
    device lengths, bf16 or fp32 queries (fp16 products), fp16 or E5M3 scales; with ``bias`` the
    RoPE-centre key bias too), compiled for sm_90 without a GPU: ptxas takes it, nothing spills without the bias, and the history loop decodes by byte
    permutes with no gather from the codebook (4-byte asynchronous copies beyond the two scale
    copies per tile and tensor); with the bias, the merge kernel with the output transform (a
    value rotation and centre) compiles without spills too."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import triton_sass

    from nqkv_core.ops import triton_decode_grouped

    q, K, V, kt, vt = make(g=3, tq=2, t=512, d=d, block=64, tail=7, dtype=dtype, scale_dtype=scales)
    mask = torch.ones(2, 519, dtype=torch.bool)
    lengths = torch.tensor([[500, 7]], dtype=torch.int32)
    key_bias = rope_key_bias(q, 512, 7)[:3] if bias else None
    out_transform = (torch.eye(d), torch.zeros(1, 2, 1, d)) if bias else None
    launches = triton_sass.capture_launches(triton_decode_grouped, lambda: triton_decode_grouped.launch(
        q, K.codes, K.absmax, K.codebook, 64, V.codes, V.absmax, V.codebook, kt, vt, mask, 0.125, True,
        lengths=lengths, key_bias=key_bias, out_transform=out_transform))
    kernel, args, kwargs = launches[0]
    assert kernel is triton_decode_grouped._grouped_split_kernel and kwargs["LUT"] and kwargs["HAS_TAIL"]
    assert kwargs["HAS_BIAS"] == bias and kwargs["HALF_DOTS"] == (dtype == torch.float32)
    try:
        compiled = triton_sass.compile_for(kernel, args, kwargs, arch=90)
    except (ImportError, AttributeError) as e:  # Triton-internal API of another version
        pytest.skip(f"this Triton's compiler API: {e}")
    lines, usage = triton_sass.sass_of(compiled.asm["cubin"])
    loop = triton_sass.key_loop(lines)
    ops = [triton_sass._opcode(line) for line in loop]
    assert bias or usage.get("STACK", 0) == 0
    assert ops.count("HMMA") + ops.count("HGMMA") >= 4 and ops.count("PRMT") >= 64  # (mma or wgmma)
    assert triton_sass.gathers(loop) <= 4
    merge, merge_args, merge_kwargs = launches[1]
    assert merge is triton_decode_grouped._grouped_merge_kernel
    assert merge_kwargs["HAS_ROT"] == merge_kwargs["HAS_SHIFT"] == bias
    assert triton_sass.sass_of(triton_sass.compile_for(merge, merge_args, merge_kwargs, arch=90).asm["cubin"])[1].get(
        "STACK", 0) == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: needs real jit functions")
@pytest.mark.skipif(CUDA, reason="with a GPU, the store kernel tests run it")
@pytest.mark.parametrize("bits,d,scales", [(4, 64, torch.uint8), (4, 128, torch.float16), (3, 128, torch.float16),
                                           (2, 256, torch.float16)])
def test_store_kernel_compiles_for_a_gpu(bits, d, scales):
    """The leaving tokens' kernel compiled for sm_90 without a GPU: ptxas takes it, nothing spills."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import triton_sass

    from nqkv_core.codebook import get_codebook
    from nqkv_core.ops import triton_store
    from nqkv_core.quantize import decision_thresholds

    ring = torch.randn(1, 3, 5, d, dtype=torch.bfloat16)
    th = decision_thresholds(get_codebook("nf", bits, 64))
    launches = triton_sass.capture_launches(triton_store, lambda: triton_store.store_rows(
        ring[:, :, 1:2], ring[:, :, 2:3], *_bodies(1, 3, 8, d, bits, 64, "cpu", scales), 4, th, bits, 64))
    kernel, args, kwargs = launches[0]
    try:
        compiled = triton_sass.compile_for(kernel, args, kwargs, arch=90)
    except (ImportError, AttributeError) as e:  # Triton-internal API of another version
        pytest.skip(f"this Triton's compiler API: {e}")
    assert triton_sass.sass_of(compiled.asm["cubin"])[1].get("STACK", 0) == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel: needs real jit functions")
@pytest.mark.skipif(CUDA, reason="with a GPU, the step kernel tests run it")
@pytest.mark.parametrize("d,group,dtype", [(64, 3, torch.bfloat16), (128, 4, torch.bfloat16), (128, 8, torch.float32)])
def test_step_inputs_kernel_compiles_for_a_gpu(d, group, dtype):
    """The step's inputs kernel with everything on (RoPE-aware centre, key order, both rotations)
    compiled for sm_90 without a GPU: ptxas takes it, nothing spills."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import triton_sass

    from nqkv_core.ops import triton_step_inputs

    q, kv = torch.randn(1, 3 * group, 1, d, dtype=dtype), torch.randn(1, 3, 1, d, dtype=dtype)
    mu, rot = torch.randn(1, 3, 1, d), torch.eye(d)
    launches = triton_sass.capture_launches(triton_step_inputs, lambda: triton_step_inputs.step_inputs(
        q, kv, kv, torch.arange(d), rot, rot, mu, mu, mu, torch.randn(d), 0.1, dtype))
    kernel, args, kwargs = launches[0]
    assert kwargs["CENTRE"] == triton_step_inputs.ROPE_CENTRE and kwargs["ORDER"] and kwargs["ROT_V"]
    try:
        compiled = triton_sass.compile_for(kernel, args, kwargs, arch=90)
    except (ImportError, AttributeError) as e:  # Triton-internal API of another version
        pytest.skip(f"this Triton's compiler API: {e}")
    assert triton_sass.sass_of(compiled.asm["cubin"])[1].get("STACK", 0) == 0


def _run_ptx(asm: str, operands: list) -> list:
    """The few PTX instructions of ``_LUT16_ASM`` on Python ints (32-bit registers): ``$i`` reads and
    writes ``operands[i]``. ``prmt.b32 d, a, b, c`` (default mode): result byte i is byte
    ``c[4i:4i+3] & 7`` of the 8 bytes {b:a}, or that byte's sign replicated when bit 4i+3 is set."""
    regs = {}

    def get(tok):
        if tok.startswith("$"):
            return operands[int(tok[1:])]
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.strip().strip("{}").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [t.strip() for t in args.split(",")]
        x = [get(t) for t in src]
        if op == "and.b32":
            val = x[0] & x[1]
        elif op == "or.b32":
            val = x[0] | x[1]
        elif op == "shr.u32":
            val = x[0] >> x[1]
        elif op == "prmt.b32":
            pool = (x[1] << 32 | x[0]).to_bytes(8, "little")
            val = 0
            for i in range(4):
                sel = (x[2] >> 4 * i) & 15
                byte = pool[sel & 7]
                if sel & 8:
                    byte = 0xFF if byte & 0x80 else 0
                val |= byte << 8 * i
        else:
            raise AssertionError(f"unexpected instruction {op}")
        val &= 0xFFFFFFFF
        if dst.startswith("$"):
            operands[int(dst[1:])] = val
        else:
            regs[dst] = val
    return operands


@_kernel_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_register_lut_decodes_like_a_gather(dtype):
    """The register lookup, as the kernel runs it: ``_byte_tables`` (in the interpreter) turns a
    codebook into the eight table words, and ``_LUT16_ASM`` (emulated instruction by instruction)
    turns four packed bytes into the levels of their eight codes, which must be the codebook's
    entries rounded to ``dtype``, even elements (low nibbles) and odd ones (high nibbles) apart."""
    import triton.language as tl

    from nqkv_core.codebook import get_codebook

    gen = torch.Generator().manual_seed(5)
    # levels exact in ``dtype``: rounding is not under test (the interpreter rounds to bf16 its own way)
    for cb in (get_codebook("nf", 4, 64).to(dtype), (torch.randn(16, generator=gen) * 3).to(dtype)):
        words = torch.zeros(8, dtype=torch.int32)
        _tables_kernel[(1,)](cb.float().contiguous(), words, DT=tl.float16 if dtype == torch.float16 else tl.bfloat16)
        bits = cb.view(torch.int16).int() & 0xFFFF
        table = [int(w) & 0xFFFFFFFF for w in words]
        for word in [0x76543210, 0xFEDCBA98, 0x0F1E2D3C] + torch.randint(0, 2**32, (200,), generator=gen).tolist():
            ops = _run_ptx(triton_decode._LUT16_ASM.value, [0] * 4 + [word] + [w for w in table for _ in range(4)])
            nibbles = [(word >> 4 * i) & 15 for i in range(8)]  # byte k holds codes 2k (low) and 2k+1
            level = [int(bits[n]) for n in nibbles]
            assert ops[0] == level[0] | level[2] << 16 and ops[1] == level[4] | level[6] << 16, hex(word)
            assert ops[2] == level[1] | level[3] << 16 and ops[3] == level[5] | level[7] << 16, hex(word)


@_kernel_test
@pytest.mark.parametrize("k_axis,v_axis", [(3, 3), (3, 2)])
def test_prefill_kernel(k_axis, v_axis):
    q, K, V, kt, vt = make(g=2, tq=37, t=32, bits=3, k_axis=k_axis, v_axis=v_axis, tail=5)
    for mask in (None, torch.randn(37, 37, device=DEVICE)):
        a = args_of(q, K, V, kt, vt, mask=mask, is_causal=True)
        check(triton_prefill.flash_prefill(*a), triton_prefill.reference(*a), torch.float32)


@_kernel_test
def test_single_token_128():
    q, K, V, _, _ = make(hkv=1, g=4, tq=1, t=1, d=128, block=64)
    a = args_of(q, K, V)
    check(triton_decode.flash_decode(*a), triton_decode.reference(*a), torch.float32)


@_kernel_test
def test_attention_op_dispatches_to_triton():
    q, K, V, kt, vt = make(g=2, tq=2, t=64, tail=3, dtype=torch.bfloat16 if CUDA else torch.float32)
    a = args_of(q, K, V, kt, vt, is_causal=True)
    out = torch.ops.nqkv.attention(*a)
    check(out, triton_decode.reference(*a), q.dtype)
    import nqkv_core.ops.cpu as cpu

    calls = []
    orig = cpu.attention_chunked
    cpu.attention_chunked = lambda *x, **y: calls.append(1) or orig(*x, **y)
    try:
        torch.ops.nqkv.attention(*a)
    finally:
        cpu.attention_chunked = orig
    assert not calls, "with TRITON_INTERPRET=1 or CUDA the op must run the Triton kernels"


@_kernel_test
@pytest.mark.parametrize("bits,grouped", [(4, True), (3, False)])
def test_attention_op_decode_dispatch(bits, grouped, monkeypatch):
    """Decode-sized calls of the op take the grouped kernel for the presets' 4-bit layout and the
    split-K kernel otherwise, with the reference's result either way."""
    q, K, V, kt, vt = make(g=3, tq=1, t=100, d=64, block=64, bits=bits, tail=4)
    a = args_of(q, K, V, kt, vt)
    calls = []
    real = triton_decode_grouped.launch
    monkeypatch.setattr(triton_decode_grouped, "launch", lambda *x, **y: calls.append(1) or real(*x, **y))
    check(torch.ops.nqkv.attention(*a), triton_decode.reference(*a), q.dtype)
    assert bool(calls) == grouped


@_kernel_test
def test_opcheck_kernels():
    q, K, V, kt, vt = make(tq=2, t=64, tail=3)
    a = args_of(q, K, V, kt, vt, is_causal=True)
    # the interpreter cannot run kernels on FakeTensors: fake and AOT checks only on a GPU
    tests = ("test_schema", "test_autograd_registration")
    if CUDA:
        tests += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.nqkv.flash_decode.default, a, test_utils=tests)
    torch.library.opcheck(torch.ops.nqkv.flash_prefill.default, a, test_utils=tests)
    q, K, V, kt, vt = make(g=3, t=100, d=64, block=64, tail=3, dtype=torch.float16 if CUDA else torch.float32)
    torch.library.opcheck(torch.ops.nqkv.grouped_decode.default, args_of(q, K, V, kt, vt), test_utils=tests)


@_kernel_test
@pytest.mark.parametrize("bits,block,d", [(3, 64, 64), (2, 16, 32)])
def test_feedback_codes_kernel_matches_torch(bits, block, d):
    from nqkv_core.codebook import get_codebook
    from nqkv_core.quantize import _midpoints, feedback_loop, feedback_matrix

    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 2, 3, d, generator=gen) * 3  # (the interpreter runs each row's loop in Python)
    x[0, 1, 2, :block] = 0
    scale = x.reshape(1, 2, 3, d // block, block).abs().amax(-1).repeat_interleave(block, -1)
    a = torch.randn(1, 2, d, d, generator=gen)
    u = feedback_matrix(a @ a.transpose(-1, -2) / d)
    cb = get_codebook("nf", bits, block)
    args = [t.to(DEVICE) for t in (x, scale, u, _midpoints(cb), cb)]
    codes = triton_quantize.launch(*args)
    ref = feedback_loop(*args)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    # the same fp32 operations; a GPU may fuse a multiply-add, which can move a tie (rarely)
    assert (codes != ref).float().mean() < 2e-2
    if CUDA:  # the op dispatches to the kernel
        assert torch.equal(torch.ops.nqkv.feedback_codes(*args), codes)


def _bodies(b, h, slots, d, bits, block, dev, scale_dtype=torch.float16):
    """Two zeroed ``(codes, scales)`` bodies of ``slots`` slots plus the trash slot."""
    return [(torch.zeros(b, h, slots + 1, d * bits // 8, dtype=torch.uint8, device=dev),
             torch.zeros(b, h, slots + 1, d // block, dtype=scale_dtype, device=dev)) for _ in range(2)]


@_kernel_test
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.uint8], ids=["fp16", "e5m3"])
@pytest.mark.parametrize("bits,d,block,dtype", [(4, 64, 64, torch.bfloat16), (4, 128, 32, torch.float32),
                                                (3, 128, 64, torch.float16), (2, 64, 16, torch.bfloat16),
                                                (4, 16, 16, torch.float32)])
def test_store_rows_matches_the_torch_encoder(bits, d, block, dtype, scale_dtype):
    """The leaving tokens' kernel writes, at their slots only, the codes and scales that
    quantize_blockwise computes, bitwise (fp16 scales, or E5M3 bytes): rows read in place from a
    ring (strided), blocks of zeros, scales down to fp16's subnormals and up to thousands."""
    from nqkv_core.codebook import get_codebook
    from nqkv_core.ops import triton_store
    from nqkv_core.quantize import decision_thresholds, quantize_blockwise

    gen = torch.Generator().manual_seed(bits * d + block)
    size = torch.tensor([1e-6, 3e-3, 1.0, 2e3]).reshape(1, 4, 1, 1)
    ring = (torch.randn(2, 4, 5, d, generator=gen) * size).to(dtype).to(DEVICE)
    ring[1, 2, 3, :block] = 0
    k, v = ring[:, :, 3:4], ring.flip(1)[:, :, 3:4]  # one token of each row, as the ring holds it
    kb, vb = _bodies(2, 4, 9, d, bits, block, DEVICE, scale_dtype)
    cb = get_codebook("nf", bits, block).to(DEVICE)
    bad = triton_store.store_rows(k, v, kb, vb, 6, decision_thresholds(cb), bits, block)
    assert not bad.any()
    for x, body in ((k, kb), (v, vb)):
        codes, scales = quantize_blockwise(x, cb, block, -1, scale_dtype)
        assert torch.equal(body[0][:, :, 6:7], codes) and torch.equal(body[1][:, :, 6:7], scales)
        others = torch.ones(10, dtype=torch.bool)
        others[6] = False
        assert not body[0][:, :, others].any() and not body[1][:, :, others].any()


@_kernel_test
def test_store_quantized_leaves_flagged_rows_to_torch():
    """A NaN or a block beyond fp16 is flagged, and the route answers False (the caller's torch
    encoder then words the error); rows it does not serve (8-bit codes, fp32 scales) too. At the
    edges (fp16's largest value, an fp32 subnormal block) it stores what the torch encoder stores."""
    from nqkv_core.codebook import get_codebook
    from nqkv_core.ops.fused_step import store_quantized
    from nqkv_core.quantize import quantize_blockwise

    cb = get_codebook("nf", 4, 64).to(DEVICE)
    x = torch.randn(1, 2, 1, 64, device=DEVICE)
    assert store_quantized(x, x, *_bodies(1, 2, 3, 64, 4, 64, DEVICE), 1, cb, 64)
    for bad in (math.nan, 7e4, math.inf):
        y = x.clone()
        y[0, 1, 0, 5] = bad
        assert not store_quantized(x, y, *_bodies(1, 2, 3, 64, 4, 64, DEVICE), 1, cb, 64)
    y = x.clone()
    y[0, 1, 0, 5] = 65504.0  # fp16's largest: stored, as the torch encoder stores it
    y[0, 0, 0, :] = 1e-40  # an fp32 subnormal block: the smallest fp16 spacing
    kb, vb = _bodies(1, 2, 3, 64, 4, 64, DEVICE)
    assert store_quantized(y, y, kb, vb, 1, cb, 64)
    codes, scales = quantize_blockwise(y, cb, 64, -1, torch.float16)
    assert torch.equal(kb[0][:, :, 1:2], codes) and torch.equal(kb[1][:, :, 1:2], scales)
    kb, vb = _bodies(1, 2, 3, 64, 4, 64, DEVICE, torch.uint8)  # E5M3: its largest byte, as torch stores it
    assert store_quantized(y, y, kb, vb, 1, cb, 64)
    codes, scales = quantize_blockwise(y, cb, 64, -1, torch.uint8)
    assert torch.equal(kb[0][:, :, 1:2], codes) and torch.equal(kb[1][:, :, 1:2], scales)
    assert scales[0, 1, 0, 0] == 0xF7
    y[0, 1, 0, 5] = 65504.01  # beyond it (in fp32): flagged
    assert not store_quantized(y, y, *_bodies(1, 2, 3, 64, 4, 64, DEVICE), 1, cb, 64)
    assert not store_quantized(y, y, *_bodies(1, 2, 3, 64, 4, 64, DEVICE, torch.uint8), 1, cb, 64)
    kb, vb = _bodies(1, 2, 3, 64, 4, 64, DEVICE)
    fp32_scales = (kb[0], kb[1].float()), (vb[0], vb[1].float())
    assert not store_quantized(x, x, *fp32_scales, 1, cb, 64)
    assert not store_quantized(x, x, *_bodies(1, 2, 3, 64, 8, 64, DEVICE), 1, get_codebook("nf", 8, 64), 64)


@_kernel_test
def test_cache_leaving_tokens_take_the_store_kernel(monkeypatch):
    """A 4-bit cache's one-token steps on the GPU's route quantize each leaving token with one
    launch of the store kernel, into the same bytes as the torch encoder; a NaN key raises the
    torch encoder's error and leaves the layer as it was."""
    from transformers import LlamaConfig

    from nqkv_core import native
    from nqkv_core.cache import NQKVCache, commit
    from nqkv_core.ops import cpu as cpu_ops
    from nqkv_core.ops import triton_store
    from nqkv_core.scheme import nqkv_preset

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(cpu_ops, "decode_fits", lambda *a, **k: False)
    launches = []
    real = triton_store.store_rows
    monkeypatch.setattr(triton_store, "store_rows", lambda *a: launches.append(1) or real(*a))
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                         head_dim=64, rope_theta=1e5)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).to(DEVICE)

    caches = [NQKVCache(nqkv_preset(4), config=config) for _ in range(2)]
    prompt = randn(1, 2, 100, 64), randn(1, 2, 100, 64)
    for c in caches:
        c.append(*prompt, 0)
    steps = [(randn(1, 4, 1, 64), randn(1, 2, 1, 64), randn(1, 2, 1, 64)) for _ in range(3)]
    def decode(layer):
        for q, k1, v1 in steps:
            layer.update(k1, v1)
            layer.attention(q, None, 0.125)

    decode(caches[0].layers[0])
    with monkeypatch.context() as m:
        m.setattr(commit, "store_quantized", lambda *a: False)
        decode(caches[1].layers[0])
    assert len(launches) == 3
    a, b = caches[0].layers[0], caches[1].layers[0]
    assert int(a.length) == int(b.length) == 103
    for x, y in zip(a.k_body + a.v_body, b.k_body + b.v_body):
        assert torch.equal(x, y)
    # a leaving key that is NaN (set in the ring, where it waits): the torch encoder's error, and
    # the layer keeps its length and its ring (the new token is not stored over the leaving one)
    slot = (int(a.length) - a.window + 1) % a.n_ring
    a.k_ring[0, 1, slot] = math.nan
    length, ring = int(a.length), a.k_ring.clone()
    q, k1, v1 = steps[0]
    a.update(k1, v1)
    with pytest.raises(ValueError, match="non-finite"):
        a.attention(q, None, 0.125)
    assert int(a.length) == length and torch.equal(a.k_ring.isnan(), ring.isnan())
    assert torch.equal(a.k_ring.nan_to_num(), ring.nan_to_num()) and len(launches) == 4


def _step_inputs_reference(query, k, v, order, rot_k, rot_v, mu_k, mu_k_half, mu_v, row, scaling):
    """The torch arithmetic of a folded step's inputs (``step._folded_inputs``), fp32."""
    from nqkv_core.scheme import per_query_head
    from nqkv_core.transform import rope_bias_weights

    d, group = query.shape[-1], query.shape[1] // k.shape[1]
    if order is not None:
        query, k = query[..., order], k[..., order]
    q, k, v = query.float(), k.float(), v.float()
    w = None
    if mu_k_half is not None:
        w = rope_bias_weights(query, per_query_head(mu_k, group), scaling)
        k = k - (mu_k * row[: d // 2].repeat(2) + mu_k_half * row[d // 2 :].repeat(2))
    elif mu_k is not None:
        k = k - mu_k
    if mu_v is not None:
        v = v - mu_v
    if rot_k is not None:
        q, k = q @ rot_k, k @ rot_k
    return q, w, k, v @ rot_v if rot_v is not None else v


@_kernel_test
@pytest.mark.parametrize("d,group,centre,order,rot,mu_b,dtype", [
    (64, 3, "rope", False, True, 2, torch.bfloat16), (128, 4, "rope", True, True, 1, torch.float32),
    (64, 1, "plain", False, True, 2, torch.float32), (32, 8, None, False, False, 1, torch.bfloat16),
    (128, 15, "rope", True, False, 2, torch.float16)])
def test_step_inputs_kernel_matches_torch(d, group, centre, order, rot, mu_b, dtype):
    """The step's queries, key bias weights, new key and value in the storage basis, against the
    torch ops of the folded step: RoPE-aware, plain and no centre, a key channel order, rotations
    on and off, centres per sequence or shared, 16-bit and fp32 outputs."""
    from nqkv_core.ops import triton_step_inputs
    from nqkv_core.scheme import rotate_half

    gen = torch.Generator().manual_seed(d + group)
    b, h = 2, 3

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    query, k, v = randn(b, h * group, 1, d).to(dtype), randn(b, h, 1, d).to(dtype), randn(b, h, 1, d).to(dtype)
    perm = torch.randperm(d, generator=gen).to(DEVICE) if order else None
    rot_k, rot_v = (torch.linalg.qr(randn(d, d))[0].contiguous() for _ in range(2)) if rot else (None, None)
    mu_k = randn(mu_b, h, 1, d) if centre else None
    mu_k_half = rotate_half(mu_k).contiguous() if centre == "rope" else None
    mu_v = randn(mu_b, h, 1, d) if centre else None
    ang = 37.0 * 1e4 ** (-torch.arange(0, d, 2).float() / d)
    row = torch.cat([ang.cos(), ang.sin()]).to(DEVICE) if centre == "rope" else None
    args = (query, k, v, perm, rot_k, rot_v, mu_k, mu_k_half, mu_v, row, 0.125)
    assert triton_step_inputs.takes(query, k, v, mu_k, mu_k_half, mu_v)
    got = triton_step_inputs.step_inputs(*args, dtype)
    ref = _step_inputs_reference(*args)
    for x, y in zip(got, ref):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape and x.dtype == (torch.float32 if x is got[1] else dtype)
            torch.testing.assert_close(x.float(), y.to(x.dtype).float(), atol=2e-5 if x.dtype == torch.float32
                                       else 1e-2, rtol=1e-2)


@_kernel_test
def test_step_inputs_route_declines():
    """The route answers None where the kernel does not serve: two query tokens, head_dim 256,
    centres of another batch size than each other."""
    from nqkv_core.ops import fused_step

    q, k = torch.randn(1, 4, 1, 64, device=DEVICE), torch.randn(1, 2, 1, 64, device=DEVICE)
    none = (None,) * 7
    assert fused_step.step_inputs(q, k, k, *none, 0.1, torch.float32) is not None
    assert fused_step.step_inputs(q.expand(1, 4, 2, 64), k, k, *none, 0.1, torch.float32) is None
    assert fused_step.step_inputs(torch.randn(1, 4, 1, 256, device=DEVICE), torch.randn(1, 2, 1, 256, device=DEVICE),
                                  torch.randn(1, 2, 1, 256, device=DEVICE), *none, 0.1, torch.float32) is None
    mu1, mu2 = torch.randn(1, 2, 1, 64, device=DEVICE), torch.randn(2, 2, 1, 64, device=DEVICE)
    q2, k2 = q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1)
    assert fused_step.step_inputs(q2, k2, k2, None, None, None, mu1, None, mu2, None, 0.1, torch.float32) is None


@_kernel_test
@pytest.mark.parametrize("name", ["qwen2", "gemma3", "cohere"])
def test_models_decode_through_the_step_kernels(name, monkeypatch):
    """Tiny models of other architectures (sliding layers and a key bias; a RoPE base per layer type;
    interleaved RoPE served in a key channel order) decode on the GPU's route, their one-token
    steps through the step's inputs and the leaving tokens' kernels: their logits follow the fake
    quantized reference as the CPU route's do (tests/test_models.py)."""
    from test_models import DIMS, PROMPT, decode_logits, eager_logits, fakequant_logits, ids_for, scheme4, tiny
    from transformers import CohereConfig, CohereForCausalLM

    from nqkv_core import native
    from nqkv_core.cache import enable
    from nqkv_core.ops import cpu as cpu_ops
    from nqkv_core.ops import triton_step_inputs, triton_store

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(cpu_ops, "decode_fits", lambda *a, **k: False)
    launches = []
    for module, fn in ((triton_step_inputs, "step_inputs"), (triton_store, "store_rows")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, _fn=fn: launches.append(_fn) or _real(*a))
    if name == "cohere":
        torch.manual_seed(0)
        model = CohereForCausalLM(CohereConfig(**DIMS)).eval()
    else:
        model = tiny(name)
    ids = ids_for(PROMPT + 6)
    scheme = scheme4(model, 4)
    ref = fakequant_logits(model, ids, scheme)
    quant_effect = (ref - eager_logits(model, ids)).abs().max()
    model.to(DEVICE)
    got = decode_logits(model, ids.to(DEVICE), enable(model, scheme=scheme).new_cache()).cpu()
    err = (got - ref).abs().max()
    assert err < max(0.5 * quant_effect, 2e-4), (err, quant_effect)
    assert {"step_inputs", "store_rows"} <= set(launches)
    if name == "cohere":
        assert enable(model, scheme=scheme).new_cache().rope.order is not None


@_kernel_test
def test_left_padded_rows_decode_as_alone_through_the_step_kernels(monkeypatch):
    """A left-padded batch on the GPU's route (each row's own transform, sinks and positions; the
    step kernels take per-row centres) generates each row as that row alone does."""
    from test_padded_batch import SCHEMES, assert_rows_as_alone, prompts, tiny

    from nqkv_core import native
    from nqkv_core.cache import enable
    from nqkv_core.ops import cpu as cpu_ops
    from nqkv_core.ops import triton_step_inputs, triton_store

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(cpu_ops, "decode_fits", lambda *a, **k: False)
    centres = []
    real_inputs, real_store = triton_step_inputs.step_inputs, triton_store.store_rows
    monkeypatch.setattr(triton_step_inputs, "step_inputs", lambda *a: centres.append(a[6].shape[0]) or real_inputs(*a))
    monkeypatch.setattr(triton_store, "store_rows", lambda *a: centres.append("store") or real_store(*a))
    model = tiny().to(DEVICE)
    rows = [r.to(DEVICE) for r in prompts()]
    cache = assert_rows_as_alone(model, enable(model, scheme=SCHEMES["rope-centre"]), rows)
    assert cache.layers[0].starts is not None
    assert 3 in centres and "store" in centres  # the batch's steps: a centre per row, leaving tokens stored


@_kernel_test
def test_step_kernels_this_triton_cannot_compile_leave_the_torch_ops(monkeypatch):
    """Where Triton fails to compile a step kernel (an older one may lack what it uses), its route
    warns once and declines from then on: the step runs its torch ops, no crash."""
    from triton.compiler.errors import CompilationError

    from nqkv_core.codebook import get_codebook
    from nqkv_core.ops import fused_step, triton_step_inputs, triton_store

    monkeypatch.setattr(fused_step, "_UNCOMPILED", set())
    calls = []

    def fails(*args):
        calls.append(1)
        raise CompilationError(None, None, "this Triton lacks what the kernel uses")

    monkeypatch.setattr(triton_step_inputs, "step_inputs", fails)
    monkeypatch.setattr(triton_store, "store_rows", fails)
    q, k = torch.randn(1, 4, 1, 64, device=DEVICE), torch.randn(1, 2, 1, 64, device=DEVICE)
    none = (None,) * 7
    with pytest.warns(RuntimeWarning, match="cannot compile triton_step_inputs"):
        assert fused_step.step_inputs(q, k, k, *none, 0.1, torch.float32) is None
    cb = get_codebook("nf", 4, 64).to(DEVICE)
    with pytest.warns(RuntimeWarning, match="cannot compile triton_store"):
        assert not fused_step.store_quantized(k, k, *_bodies(1, 2, 3, 64, 4, 64, DEVICE), 1, cb, 64)
    assert fused_step.step_inputs(q, k, k, *none, 0.1, torch.float32) is None
    assert not fused_step.store_quantized(k, k, *_bodies(1, 2, 3, 64, 4, 64, DEVICE), 1, cb, 64)
    assert len(calls) == 2  # each kernel tried once


@_kernel_test
def test_cache_generate_through_the_kernels(monkeypatch):
    """The cache's GPU code path end to end: on CPU (interpreter) the native decode step and the CPU
    op's key-bias shortcut are switched off, so every step takes the route it takes on CUDA (folded
    torch transform, dense key bias, the Triton decode kernel)."""
    from test_cuda import cache_matches_reference

    from nqkv_core import native
    from nqkv_core.ops import cpu as cpu_ops

    if not CUDA:
        monkeypatch.setattr(native, "available", lambda: False)
        monkeypatch.setattr(cpu_ops, "decode_fits", lambda *a, **k: False)
        calls = []
        real = triton_decode.flash_decode
        monkeypatch.setattr(triton_decode, "flash_decode", lambda *a: calls.append(1) or real(*a))
    # RoPE-aware centre, query-aware key rounding, fitted value scales, unbiased levels
    cache_matches_reference("nf3-query-vfit", DEVICE)
    if not CUDA:
        assert calls, "the decode steps did not reach the Triton kernel"


@_kernel_test
def test_bf16_model_step_takes_the_grouped_kernel_in_bf16(monkeypatch):
    """A bf16 model's one-token steps on the GPU's route (the native and CPU decode paths off) hand
    the grouped kernel bf16 storage-basis queries, the key bias and the output transform (fp32
    queries would go to the split-K kernel on a GPU), and match the reference strategy."""
    from transformers import LlamaConfig

    from nqkv_core import native
    from nqkv_core.cache import NQKVCache
    from nqkv_core.ops import cpu as cpu_ops
    from nqkv_core.scheme import nqkv_preset

    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(cpu_ops, "decode_fits", lambda *a, **k: False)
    calls = []
    real = triton_decode_grouped.launch
    monkeypatch.setattr(triton_decode_grouped, "launch", lambda *a, **k: calls.append(
        (a[0].dtype, k.get("key_bias") is not None, k.get("out_transform") is not None)) or real(*a, **k))
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=1,
                         head_dim=64, rope_theta=1e5)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    k, v = randn(1, 3, 200, 64), randn(1, 3, 200, 64)
    caches = [NQKVCache(nqkv_preset(4), config=config, decode=d) for d in ("auto", "reference")]
    for c in caches:
        c.append(k, v, 0)
    for _ in range(3):
        q, k1, v1 = randn(1, 9, 1, 64), randn(1, 3, 1, 64), randn(1, 3, 1, 64)
        outs = []
        for c in caches:
            c.layers[0].update(k1, v1)
            outs.append(c.layers[0].attention(q, None, 0.125))
        assert outs[0].dtype == torch.bfloat16
        torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2)
    assert calls == [(torch.bfloat16, True, True)] * 3


@_kernel_test
def test_cache_generate_with_the_key_bias_in_the_kernel(monkeypatch):
    """A 4-bit RoPE-centred cache whose decode steps take the grouped kernel with the key bias
    computed in it and the output taken back to the model's basis by its merge (on CPU: the
    interpreter, with the native and CPU decode paths switched off; fp32 storage-basis queries,
    which a GPU sends there only with ``fp32_queries``)."""
    import dataclasses

    from test_cache import SCHEMES, assert_matches_reference, generate, tiny_model

    from nqkv_core import native
    from nqkv_core.cache import enable
    from nqkv_core.ops import cpu as cpu_ops

    monkeypatch.setitem(triton_decode_grouped.GROUPED_CONFIG, "fp32_queries", True)
    calls = []
    real = triton_decode_grouped.launch
    monkeypatch.setattr(triton_decode_grouped, "launch",
                        lambda *a, **k: calls.append(k.get("key_bias") is not None
                                                     and k.get("out_transform") is not None) or real(*a, **k))
    if not CUDA:
        monkeypatch.setattr(native, "available", lambda: False)
        monkeypatch.setattr(cpu_ops, "decode_fits", lambda *a, **k: False)
    # head_dim 64 in blocks of 32 (two per row): a layout the grouped kernel takes
    model, scheme = tiny_model(head_dim=64), dataclasses.replace(SCHEMES["nf4-rope-centre"], k_block=32, v_block=32)
    ids = torch.randint(1, 96, (2, scheme.window), generator=torch.Generator().manual_seed(1))
    _, ref_logits = generate(model, ids, scheme)
    _, fp_logits = generate(model, ids, None)
    model.to(DEVICE)
    _, logits = generate(model, ids.to(DEVICE), cache=enable(model, scheme=scheme).generate_kwargs())
    assert_matches_reference(logits.cpu(), ref_logits, fp_logits)
    assert any(calls), "no decode step computed the key bias and the output transform in the grouped kernel"
