"""Traced compiled steps (``compiled_step="traced"``) attend over the tokens present.

The graph keeps the preallocated shapes (no recompiles as the cache grows), but its attention is
``nqkv::present_attention``, which reads only the body slots that hold tokens: the tests poison the
slots beyond them, compare with eager steps at two lengths under one preallocation, and look for
tensors of the preallocation's size in the graph. Where the length stays on the device (a GPU), a
one-token step runs the grouped Triton kernel with it: those tests run on a GPU, or in Triton's
interpreter in a child process.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from copy import deepcopy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from torch._inductor.utils import run_and_get_code  # noqa: E402

from nqkv_core.cache import NQKVCache, compiled  # noqa: E402
from nqkv_core.cache.format import RopeTable  # noqa: E402
from nqkv_core.codebook import get_codebook  # noqa: E402
from nqkv_core.ops.attention import key_bias_args  # noqa: E402
from nqkv_core.ops.cpu import table_rows  # noqa: E402
from nqkv_core.transform import CompactRope  # noqa: E402
from nqkv_core.quantize import dequantize_blockwise  # noqa: E402
from nqkv_core.scheme import KVScheme  # noqa: E402

CAPACITY = 4096
SCHEMES = {
    "nf4-rot-centre": KVScheme("a", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True,
                               v_centre=True, sinks=2, window=4),
    "nf4-rope-centre": KVScheme("d", k_block=16, v_block=16, k_rotate=True, v_rotate=True, k_centre=True,
                                k_centre_rope=True, v_centre=True, sinks=2, window=4, unbiased=True),
}


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=2 * CAPACITY)


def _kv(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return 3 * torch.randn(2, 2, n, 16, generator=gen), torch.randn(2, 2, n, 16, generator=gen)


def _step(cache: NQKVCache, q, k, v, mask):
    cache.update(k, v, 0)
    return cache.layers[0].attention(q, mask, 0.25)


def _poison_empty_slots(layer, n_body: int) -> None:
    """NaN scales in every body slot past the first ``n_body`` (the trash slot too): a step that
    reads one of them, even masked, gives NaN (``0 * NaN``)."""
    for x in (*layer.k_body, *layer.v_body):
        if x.dtype.is_floating_point:
            x[:, :, n_body:] = math.nan


def _capacity_sized(gm: torch.fx.GraphModule, capacity: int) -> list[str]:
    """Nodes of a dynamo graph that compute a tensor with an axis of at least half ``capacity``, other
    than the inputs themselves, views of them (the model's mask, read at a few columns) and in-place
    writes into them (the commit's ``index_copy_``)."""
    found = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if node.op == "placeholder" or not isinstance(value, torch.Tensor) or value._is_view():
            continue
        if node.op == "call_method" and node.target.endswith("_"):
            continue
        if max(value.shape, default=0) >= capacity // 2:
            found.append(f"{node.target} {tuple(value.shape)}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name,padded", [("nf4-rot-centre", False), ("nf4-rope-centre", True)])
def test_traced_step_reads_the_tokens_present(name, padded):
    """One preallocation, two lengths: one graph, the eager step's output, the body slots past the
    tokens present never read, and no tensor of the preallocation's size in the attention."""
    gen = torch.Generator().manual_seed(0)
    cache = NQKVCache(SCHEMES[name], config=_config(), max_cache_len=CAPACITY, compiled_step="traced")
    layer = cache.layers[0]
    mask = None
    if padded:  # the second sequence starts with 3 padding tokens
        mask = torch.ones(2, 1, 1, CAPACITY, dtype=torch.bool)
        mask[1, :, :, :3] = False
    graphs = []

    def backend(gm, example_inputs):  # inductor, keeping dynamo's graph to look at
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    step = torch.compile(_step, fullgraph=True, backend=backend)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for n in (100, 1000):
            cache.append(*_kv(n - int(layer.length), gen), 0)
            q = torch.randn(2, 4, 1, 16, generator=gen)
            k, v = _kv(1, gen)
            eager = deepcopy(cache)
            _poison_empty_slots(layer, layer._body_capacity(n))
            if n == 100:  # the first call compiles: keep inductor's code
                out, code = run_and_get_code(step, cache, q, k, v, mask)
            else:
                out = step(cache, q, k, v, mask)
            ref = _step(eager, q, k, v, mask)
            assert torch.isfinite(out).all(), f"{n} tokens: a body slot past them was read"
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
            assert int(layer.length) == n + 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert _capacity_sized(graphs[0], CAPACITY) == []
    # the commit writes the body in place: no loop of the compiled code runs over a whole body buffer
    whole = [str(x.numel()) for x in (*layer.k_body, *layer.v_body)]
    assert not [x for x in whole if re.search(rf"\b{x}L\b", "\n".join(code))]
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert sum("present_attention" in t for t in targets) == 1


# -- the op itself --------------------------------------------------------------------------------


def _packed(slots: int, gen: torch.Generator, d: int = 16, block: int = 16) -> list[torch.Tensor]:
    codes = torch.randint(0, 256, (2, 2, slots, d // 2), dtype=torch.uint8, generator=gen)
    return [codes, (torch.rand(2, 2, slots, d // block, generator=gen) + 0.5).half()]


def _read(body: list[torch.Tensor], codebook: torch.Tensor | None, n: int, block: int = 16) -> torch.Tensor:
    if codebook is None:  # a 16-bit side
        return body[0][:, :, :n].float()
    return dequantize_blockwise(*(x[:, :, :n] for x in body), codebook, block, axis=-1)


def _reference(q, k_body, v_body, codebook, n, k_tail, v_tail, tail_allowed, mask, S, scale, bias,
               k_codebook="same", block=16):
    """Plain-torch attention over the first ``n`` body slots (dequantized) and the tail, fp32
    (rows that see nothing excepted: the caller's tail mask gives every row a token)."""
    T, group = q.shape[2], q.shape[1] // k_tail.shape[1]
    k = torch.cat([_read(k_body, codebook if k_codebook == "same" else k_codebook, n, block), k_tail], 2)
    v = torch.cat([_read(v_body, codebook, n, block), v_tail], 2)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    # query t reads the slots quantized before it
    body = (torch.arange(n) < n - T + 1 + torch.arange(T)[:, None]).expand(2, 1, T, n)
    if mask is not None:
        body = body & mask[:, :, -T:, S : S + n]
    if bias is not None:
        w, table, tail_pos = bias
        s = s + w @ table_rows(table)[torch.cat([torch.arange(n) + S, tail_pos])].T
    s = s.masked_fill(~torch.cat([body, tail_allowed.expand(2, -1, -1, -1)], -1), -math.inf)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("T", [1, 3])
def test_present_attention_matches_plain_attention_over_the_present_slots(T, on_host, monkeypatch):
    """Host-read length (CPU: the body sliced to it) and device-only length (GPUs: the empty slots
    masked) against plain attention over the present slots; padding mask and key bias included."""
    monkeypatch.setattr(compiled, "reads_length", lambda body_len: on_host)
    gen = torch.Generator().manual_seed(T)
    S, slots, M, scale = 2, 64, 6, 0.25
    codebook = get_codebook("nf", 4, 16)
    k_body, v_body = _packed(slots + 1, gen), _packed(slots + 1, gen)
    q = torch.randn(2, 4, T, 16, generator=gen)
    k_tail, v_tail = torch.randn(2, 2, M, 16, generator=gen), torch.randn(2, 2, M, 16, generator=gen)
    tail_allowed = torch.rand(1, 1, T, M, generator=gen) < 0.7
    tail_allowed[..., -1] = True
    mask = torch.ones(2, 1, T, 128, dtype=torch.bool)
    mask[1, :, :, : S + 5] = False  # padding: the second row's sinks and first body slots
    w, table = torch.randn(2, 4, T, 16, generator=gen), torch.randn(128, 16, generator=gen)
    compact = CompactRope.of(8, 1e4 ** -(torch.arange(0, 16, 2).float() / 16))  # a CPU cache's table
    tail_pos = torch.randint(0, 128, (M,), generator=gen)
    for n in (0, 2, 37):
        if on_host:  # slots past n are never read
            for x in (k_body[1], v_body[1]):
                x[:, :, n:] = math.nan
        for bias, m, fused in [(None, None, True), (None, mask, True), ((w, table, tail_pos), None, True),
                               ((w, table, tail_pos), mask, True), ((w, table, tail_pos), mask, False),
                               ((w, compact, tail_pos), mask, True), ((w, compact, tail_pos), None, False)]:
            out = torch.ops.nqkv.present_attention(
                q, k_body, v_body, codebook, 16, codebook, 16, k_tail, v_tail, tail_allowed,
                torch.tensor(n), m, S, scale, fused, *(key_bias_args(bias) if bias else (None,) * 4),
            )
            ref = _reference(q, k_body, v_body, codebook, n, k_tail, v_tail, tail_allowed, m, S, scale, bias)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"n={n} {fused=}")
        for x in (k_body[1], v_body[1]):
            x.copy_(torch.rand(x.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("on_host", [True, False])
def test_present_attention_reads_a_16_bit_side(on_host, monkeypatch):
    monkeypatch.setattr(compiled, "reads_length", lambda body_len: on_host)
    gen = torch.Generator().manual_seed(7)
    codebook, n = get_codebook("nf", 4, 16), 21
    k_body, v_body = [torch.randn(2, 2, 33, 16, generator=gen)], _packed(33, gen)
    if on_host:  # slots past n are never read
        k_body[0][:, :, n:] = math.nan
        v_body[1][:, :, n:] = math.nan
    q, k_tail, v_tail = (torch.randn(2, h, 3, 16, generator=gen) for h in (4, 2, 2))
    q = q[:, :, :1]
    tail_allowed = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    out = torch.ops.nqkv.present_attention(q, k_body, v_body, None, 1, codebook, 16, k_tail, v_tail, tail_allowed,
                                           torch.tensor(n), None, 2, 0.25, True)
    ref = _reference(q, k_body, v_body, codebook, n, k_tail, v_tail, tail_allowed, None, 2, 0.25, None,
                     k_codebook=None)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_present_attention_opcheck():
    gen = torch.Generator().manual_seed(5)
    codebook = get_codebook("nf", 4, 16)
    args = (torch.randn(2, 4, 1, 16, generator=gen), _packed(33, gen), _packed(33, gen), codebook, 16, codebook, 16,
            torch.randn(2, 2, 3, 16, generator=gen), torch.randn(2, 2, 3, 16, generator=gen),
            torch.ones(1, 1, 1, 3, dtype=torch.bool), torch.tensor(20), None, 2, 0.25, True)
    torch.library.opcheck(torch.ops.nqkv.present_attention, args)
    compact = CompactRope.of(4, 1e4 ** -(torch.arange(0, 16, 2).float() / 16))
    bias = key_bias_args((torch.randn(2, 4, 1, 16, generator=gen), compact, torch.tensor([0, 1, 40])))
    rot, shift = torch.randn(16, 16, generator=gen), torch.randn(2, 2, 1, 16, generator=gen)
    torch.library.opcheck(torch.ops.nqkv.present_attention, (*args, *bias, rot, shift))


# -- the grouped kernel's path (Triton: on a GPU, or in its interpreter on CPU) ----------------------------

CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(CUDA or INTERPRETING, reason="runs the kernel path in this process")
def test_kernel_path_in_interpreter_process():
    """The kernel path's tests in a child process with ``TRITON_INTERPRET=1``, which Triton reads as it
    is first imported (this process has imported it already, for inductor)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "kernel_path"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def _kernel_test(fn):
    return pytest.mark.skipif(not (CUDA or INTERPRETING), reason="needs a GPU or Triton's interpreter")(fn)


def _poison_for_kernel(k_body: list[torch.Tensor], v_body: list[torch.Tensor], n: int) -> None:
    """Poison the body slots from ``n`` on for the grouped kernel: a huge key scale (the slot would take
    all the weight) and a NaN value scale (which then spreads). A NaN key scale would not do: it makes
    its split's log-sum-exp NaN, which the kernel's merge skips like a split with no keys."""
    for body, value in ((k_body, 1e4), (v_body, math.nan)):
        for x in body:
            if x.dtype.is_floating_point:
                x[:, :, n:] = value


def _kernel_inputs(group: int, slots: int, dev: str):
    """A layer's packed 4-bit body (head_dim 64, two blocks of 32 per row), query, tail with masked
    columns, a padding mask and the key bias (a RoPE table: the kernel's angle addition needs one)."""
    gen = torch.Generator().manual_seed(group)
    d, S, M = 64, 2, 6
    k_body, v_body = _packed(slots + 1, gen, d, 32), _packed(slots + 1, gen, d, 32)
    q = torch.randn(2, 2 * group, 1, d, generator=gen)
    k_tail, v_tail = torch.randn(2, 2, M, d, generator=gen), torch.randn(2, 2, M, d, generator=gen)
    tail_allowed = torch.tensor([True, True, False, True, False, True]).reshape(1, 1, 1, M)
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    mask[1, :, :, : S + 3] = False  # padding: the second row's sinks and first body slots
    rope = RopeTable(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    rope.ensure(64, "cpu")
    bias = (torch.randn(2, 2 * group, 1, d, generator=gen), rope.rows(), torch.tensor([0, 1, 40, 50, 3, 51]))
    to = lambda x: x.to(dev)  # noqa: E731
    return (to(q), [to(x) for x in k_body], [to(x) for x in v_body], to(k_tail), to(v_tail), to(tail_allowed),
            to(mask), tuple(map(to, bias)), S)


@_kernel_test
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("group", [1, 3])
def test_kernel_path_matches_the_whole_body_path(group, rope, monkeypatch):
    """One query token through the grouped kernel with the length on the device: the whole-body
    masked path's result and plain attention over the present slots, for one, some and every body
    slot, with and without a padding mask (and a tail mask per row); the slots past the tokens
    present hold NaN scales, which a read of them (even masked) would spread."""
    monkeypatch.setattr(compiled, "reads_length", lambda body_len: False)  # as on a GPU
    dev = "cuda" if CUDA else "cpu"
    slots, scale = 40, 0.125
    q, k_body, v_body, k_tail, v_tail, tail_allowed, mask, bias, S = _kernel_inputs(group, slots, dev)
    codebook = get_codebook("nf", 4, 16).to(dev)
    bias = bias if rope else (None, None, None)
    per_row = tail_allowed.expand(2, -1, -1, -1).clone()
    per_row[1, ..., 0] = False
    for n, m, allowed in [(1, None, tail_allowed), (17, mask, per_row), (17, None, per_row),
                          (slots, None, tail_allowed), (slots, mask, tail_allowed)]:
        args = (q, k_body, v_body, codebook, 32, codebook, 32, k_tail, v_tail, allowed,
                torch.tensor(n, device=dev), m, S, scale, True, *bias)
        assert compiled._kernel_args(*args[:7], args[10], True) is not None
        monkeypatch.setattr(compiled, "reads_with_kernel", lambda body_len: False)
        whole = torch.ops.nqkv.present_attention(*args)
        monkeypatch.setattr(compiled, "reads_with_kernel", lambda body_len: True)
        clean = [x[1].clone() for x in (k_body, v_body)]
        _poison_for_kernel(k_body, v_body, n)
        out = torch.ops.nqkv.present_attention(*args)
        k_body[1].copy_(clean[0])
        v_body[1].copy_(clean[1])
        ref = _reference(*(x.cpu() for x in (q,)), [x.cpu() for x in k_body], [x.cpu() for x in v_body],
                         codebook.cpu(), n, k_tail.cpu(), v_tail.cpu(), allowed.cpu(),
                         None if m is None else m.cpu(), S, scale,
                         None if not rope else (bias[0].cpu(), bias[1].cpu(), bias[2].cpu()), block=32)
        what = f"{n=} mask={m is not None} tail rows={allowed.shape[0]}"
        assert torch.isfinite(out).all(), f"{what}: a body slot past the tokens present was read"
        torch.testing.assert_close(out, whole, rtol=1e-4, atol=1e-4, msg=what)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4, msg=what)


@_kernel_test
def test_kernel_path_leaves_other_calls_to_the_whole_body_path(monkeypatch):
    """Several query tokens, a 16-bit side, the reference arithmetic, a layout the kernel does not take
    (16-element blocks), and a host-read length: no kernel path."""
    monkeypatch.setattr(compiled, "reads_length", lambda body_len: False)
    dev = "cuda" if CUDA else "cpu"
    q, k_body, v_body = _kernel_inputs(1, 8, dev)[:3]
    codebook, n = get_codebook("nf", 4, 16).to(dev), torch.tensor(3, device=dev)
    assert compiled._kernel_args(q, k_body, v_body, codebook, 32, codebook, 32, n, True) is not None
    assert compiled._kernel_args(q.expand(-1, -1, 2, -1), k_body, v_body, codebook, 32, codebook, 32, n, True) is None
    assert compiled._kernel_args(q, [k_body[1]], v_body, None, 1, codebook, 32, n, True) is None
    assert compiled._kernel_args(q, k_body, v_body, codebook, 32, codebook, 32, n, False) is None
    small = [x.to(dev) for x in _packed(9, torch.Generator().manual_seed(0), 64, 16)]
    assert compiled._kernel_args(q, small, small, codebook, 16, codebook, 16, n, True) is None
    monkeypatch.setattr(compiled, "reads_length", lambda body_len: True)
    assert compiled._kernel_args(q, k_body, v_body, codebook, 32, codebook, 32, n, True) is None


@_kernel_test
def test_kernel_path_opcheck(monkeypatch):
    monkeypatch.setattr(compiled, "reads_length", lambda body_len: False)
    dev = "cuda" if CUDA else "cpu"
    q, k_body, v_body, k_tail, v_tail, tail_allowed, mask, bias, S = _kernel_inputs(3, 8, dev)
    codebook = get_codebook("nf", 4, 16).to(dev)
    args = (q, k_body, v_body, codebook, 32, codebook, 32, k_tail, v_tail, tail_allowed, torch.tensor(5, device=dev),
            mask, S, 0.125, True, *bias)
    assert compiled._kernel_args(*args[:7], args[10], True) is not None
    torch.library.opcheck(torch.ops.nqkv.present_attention, args)


@_kernel_test
@pytest.mark.parametrize("name", ["nf4-rot-centre", "nf4-rope-centre"])
def test_kernel_path_in_a_traced_step(name, monkeypatch):
    """A traced step of a layout the grouped kernel takes (head_dim 64 in blocks of 32) attends through
    it, with the tail, positions and key bias the step builds: the eager step's output, the body
    slots past the tokens present never read, with and without the model's mask."""
    import dataclasses

    monkeypatch.setattr(compiled, "reads_length", lambda body_len: False)
    calls = []
    kernel_attention = compiled._kernel_attention
    monkeypatch.setattr(compiled, "_kernel_attention", lambda *a: calls.append(1) or kernel_attention(*a))
    dev = "cuda" if CUDA else "cpu"
    scheme = dataclasses.replace(SCHEMES[name], k_block=32, v_block=32)
    config = LlamaConfig(vocab_size=96, hidden_size=384, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    cache = NQKVCache(scheme, config=config, max_cache_len=256, compiled_step="traced")
    layer, gen = cache.layers[0], torch.Generator().manual_seed(1)

    def kv(n):
        return (3 * torch.randn(2, 2, n, 64, generator=gen)).to(dev), torch.randn(2, 2, n, 64, generator=gen).to(dev)

    step = torch.compile(_step, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    mask = torch.ones(2, 1, 1, 256, dtype=torch.bool, device=dev)
    with torch.no_grad():
        for n, m in ((20, None), (21, mask), (90, mask)):
            cache.append(*kv(n - int(layer.length)), 0)
            q = torch.randn(2, 6, 1, 64, generator=gen).to(dev)
            k, v = kv(1)
            eager = deepcopy(cache)
            _poison_for_kernel(layer.k_body, layer.v_body, layer._body_capacity(n))
            out, ref = step(cache, q, k, v, m), _step(eager, q, k, v, m)
            assert torch.isfinite(out).all(), f"{n} tokens: a body slot past them was read"
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == 3


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_path_captures_in_a_cuda_graph(masked, monkeypatch):
    """No host read on the kernel path: the op captures in a CUDA graph (with synchronising calls made
    errors), and replays after the device length changed give the whole-body path's result."""
    q, k_body, v_body, k_tail, v_tail, tail_allowed, mask, bias, S = _kernel_inputs(3, 40, "cuda")
    codebook, body_len = get_codebook("nf", 4, 16).cuda(), torch.tensor(5, device="cuda")
    args = (q.half(), k_body, v_body, codebook, 32, codebook, 32, k_tail, v_tail, tail_allowed, body_len,
            mask if masked else None, S, 0.125, True, *bias)
    assert compiled._kernel_args(*args[:7], body_len, True) is not None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the first call compiles the kernels
        torch.ops.nqkv.present_attention(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = torch.ops.nqkv.present_attention(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for n in (5, 33, 40):
        body_len.fill_(n)
        graph.replay()
        monkeypatch.setattr(compiled, "reads_with_kernel", lambda body_len: False)
        whole = torch.ops.nqkv.present_attention(*args)
        monkeypatch.setattr(compiled, "reads_with_kernel", lambda body_len: True)
        torch.testing.assert_close(out, whole, rtol=2e-2, atol=2e-2, msg=f"{n=}")
