"""What compiling a decode step costs: graph size and cold compile time, NQKV vs StaticCache.

For each cache (``NQKV compiled``, ``NQKV compiled traced``, ``StaticCache compiled``; see
``bench_compiled_decode.py``) a prompt fills it eagerly, then ``torch.compile(step, fullgraph=True)``
of the one-token step:

* graph nodes: the FX graph dynamo captures (a counting backend, no inductor), split by where
  each node comes from (``nqkv_core`` code vs the model's own);
* cold compile: the first call with inductor and an empty inductor cache (a fresh
  ``TORCHINDUCTOR_CACHE_DIR``).

A compiled step of a 30-layer model is one graph: its size, not the kernels, is what inductor
spends minutes on. With the cache step as one op per layer (``NQKV compiled``) the graph is the
model's own plus a node per layer; traced, it carries the step's torch ops.

    python benchmarks/compile_cost.py --context 256
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402

from bench_compiled_decode import make_cache  # noqa: E402
from nqkv_core.cache import enable  # noqa: E402
from nqkv_core.lab.models import DEFAULT_MODEL, cache_keyword, load_model  # noqa: E402

CACHE = cache_keyword()  # cache= from transformers 5.24 on, past_key_values= before


def node_origins(gm: torch.fx.GraphModule) -> collections.Counter:
    """Nodes that compute (not placeholders / outputs) by origin: ``nqkv_core`` or the model."""
    out = collections.Counter()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        frames = re.findall(r'File "([^"]+)"', node.meta.get("stack_trace", "") or "")
        out["nqkv_core" if any("nqkv_core" in f for f in frames) else "model"] += 1
    return out


def prefilled(model, nq, name: str, context: int):
    cache = make_cache(model, nq, name, context + 8)
    prompt = torch.randint(100, 20000, (1, context), generator=torch.Generator().manual_seed(0))
    model(prompt, use_cache=True, **{CACHE: cache})
    return cache


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model id, local path or .gguf file")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before the compiled step")
    ap.add_argument("--variants", nargs="+", default=["NQKV compiled", "NQKV compiled traced", "StaticCache compiled"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).model
    nq = enable(model, bits=4)
    tok = torch.randint(100, 20000, (1, 1), generator=torch.Generator().manual_seed(1))

    def step(t, c):
        return model(t, use_cache=True, **{CACHE: c}).logits

    rows = []
    for name in args.variants:
        graphs = []

        def counting(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(step, fullgraph=True, backend=counting)(tok, prefilled(model, nq, name, args.context))
        origins = node_origins(graphs[0])
        torch._dynamo.reset()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nqkv_inductor_")
        cache = prefilled(model, nq, name, args.context)
        compiled = torch.compile(step, fullgraph=True)
        t0 = time.perf_counter()
        compiled(tok, cache)
        seconds = time.perf_counter() - t0
        rows.append((name, sum(origins.values()), origins["nqkv_core"], origins["model"], seconds))
        print(f"{name}: {sum(origins.values())} nodes ({origins['nqkv_core']} from nqkv_core), cold compile"
              f" {seconds:.1f} s", flush=True)
    print(f"\n{args.model}, step after a {args.context}-token prompt, torch {torch.__version__},"
          f" {args.threads} threads\n")
    print("| cache | graph nodes | from nqkv_core | from the model | cold compile s |")
    print("|---|---:|---:|---:|---:|")
    for name, total, ours, theirs, seconds in rows:
        print(f"| {name} | {total:,} | {ours:,} | {theirs:,} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
