"""The cache on a CUDA device: generate through the Triton kernels, and compiled decode steps under
CUDA graphs. Skipped without CUDA; ``test_triton_kernels.py`` runs the generate check in Triton's
interpreter on CPU (with the CPU-only shortcuts switched off, so the GPU's code path is followed).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("triton")

from test_cache import SCHEMES, assert_matches_reference, generate, positions, prefilled_pair, tiny_model  # noqa: E402

from nqkv_core.cache import enable  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cache_matches_reference(name: str, device: str) -> None:
    """Generate with the cache on ``device``; logits within half the quantization effect of the
    fake-quantized reference computed on CPU (the criterion of the CPU fused-op test)."""
    model, scheme = tiny_model(), SCHEMES[name]
    ids = torch.randint(1, 96, (2, scheme.window), generator=torch.Generator().manual_seed(1))
    _, ref_logits = generate(model, ids, scheme)
    _, fp_logits = generate(model, ids, None)
    model.to(device)
    nq = enable(model, scheme=scheme)
    _, logits = generate(model, ids.to(device), cache=nq.generate_kwargs())
    assert logits.device.type == torch.device(device).type
    assert_matches_reference(logits.cpu(), ref_logits, fp_logits)


@needs_cuda
@pytest.mark.parametrize("name", ["nf4-rope-centre", "k4v3-rope-centre", "nf3-query-vfit", "lloyd2-fit", "nf3-plain"])
def test_generate_on_cuda_matches_fake_quantization(name):
    cache_matches_reference(name, "cuda")


@needs_cuda
@pytest.mark.parametrize("name", ["nf4-rope-centre", "nf3-query-vfit"])
def test_compiled_decode_runs_under_cuda_graphs(name):
    """``mode="reduce-overhead"``: the preallocated buffers are static addresses, so inductor keeps
    the CUDA graph although the step writes into them; same logits as the eager step."""
    from torch._dynamo.utils import counters

    model, eager, graphed, nxt = prefilled_pair(name, "cuda")
    with torch.no_grad():

        def step(tok, cache):
            return model(tok, past_key_values=cache, use_cache=True, **positions(model, cache)).logits

        compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        torch._dynamo.reset()
        counters.clear()
        for _ in range(12):  # crosses the window: tokens get quantized inside the graph
            a = step(nxt, eager)
            torch.compiler.cudagraph_mark_step_begin()
            b = compiled(nxt, graphed).clone()
            torch.testing.assert_close(b, a, rtol=0, atol=2e-3)
            nxt = a[:, -1:].argmax(-1)
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor ran the step without CUDA graphs"
    assert int(graphed.layers[0].length) == int(eager.layers[0].length) == 6 + 12
