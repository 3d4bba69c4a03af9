"""Kernel launches of one eager decode step of a cache layer on the GPU's code path, counted on CPU.

Two SmolLM2-shaped layers (3 KV heads x 3 query heads, head_dim 64, a bf16 model) holding
``--tokens`` tokens take one-token steps (``update`` + ``attention``) the way they do on CUDA: Triton's
interpreter runs the Triton kernels on CPU tensors, and the native CPU step and the CPU decode op are
switched off. For the second layer of the last step (the first computes what all layers of a step
share, such as the slot positions) the script counts what a GPU would launch:

* ``torch ops``: every aten op except views, allocations and other metadata ops (each is a kernel
  launch on a GPU; ops that inductor fuses in a compiled step share one);
* ``Triton launches``: launches of the Triton kernels (the step's inputs in the storage basis, the
  grouped decode's split and merge, the leaving tokens' quantization);
* ``host reads``: reads of a device value by the host (``.item()``, ``int(t)``, ``bool(t)``): each is a
  synchronisation on a GPU.

The RoPE table is held as rows, as on a GPU (a CPU holds it compactly).

``--compiled`` also compiles one layer's traced step (``compiled_step="traced"``, what CUDA graphs
capture) with inductor on CPU and prints how many kernels inductor generates for it: the torch ops
around the attention op, fused. A GPU's inductor fuses differently; the figure is a proxy.

    python benchmarks/step_launches.py
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # (read by triton when it is first imported)

import argparse  # noqa: E402
import collections  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from nqkv_core import native  # noqa: E402
from nqkv_core.cache import NQKVCache  # noqa: E402
from nqkv_core.cache.format import RopeTable  # noqa: E402
from nqkv_core.ops import cpu as cpu_ops  # noqa: E402
from nqkv_core.ops import triton_decode_grouped, triton_step_inputs, triton_store  # noqa: E402
from nqkv_core.scheme import nqkv_preset  # noqa: E402

NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "alias", "_reshape_alias", "_unsafe_view", "set_", "resize_", "sym_size", "sym_stride", "sym_numel",
             "is_same_size"}


class Counter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel on a GPU, by name, and the host reads."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.host_reads += 1
        elif not func.is_view and name not in NO_LAUNCH and func.namespace != "nqkv":  # (its kernels: below)
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class TritonLaunches:
    """The Triton kernels' launchers (the grouped decode's ``launch``, the step's inputs'
    ``step_inputs``, the leaving tokens' ``store_rows``), run with the op counter paused (in the
    interpreter their kernels and their fp32 stand-ins for 16-bit tensors are torch ops that a GPU
    does not run), and the launches of their kernels counted."""

    LAUNCHERS = ((triton_decode_grouped, "launch"), (triton_store, "store_rows"), (triton_step_inputs, "step_inputs"))

    def __init__(self):
        self.count = 0
        self.saved = [(module, name, getattr(module, name), module.wrap_triton) for module, name in self.LAUNCHERS]

    def wrap(self, real_wrap):
        outer = self

        def wrap_triton(kernel):
            grid_launch = real_wrap(kernel)

            class Launch:
                def __getitem__(self, grid):
                    outer.count += 1
                    return grid_launch[grid]

            return Launch()

        return wrap_triton

    @staticmethod
    def paused(real):
        def call(*args, **kwargs):
            with _disable_current_modes():
                return real(*args, **kwargs)

        return call

    def __enter__(self):
        for module, name, real, real_wrap in self.saved:
            setattr(module, name, self.paused(real))
            module.wrap_triton = self.wrap(real_wrap)
        return self

    def __exit__(self, *exc):
        for module, name, real, real_wrap in self.saved:
            setattr(module, name, real)
            module.wrap_triton = real_wrap


def step_counts(scheme, tokens: int, kv_heads: int = 3, group: int = 3, d: int = 64,
                dtype: torch.dtype = torch.bfloat16) -> tuple[Counter, int]:
    """The op counter and the Triton launches of a step's second layer on the GPU's route."""
    saved = (RopeTable.__dict__["compact_on"], native.available, cpu_ops.decode_fits)
    RopeTable.compact_on = staticmethod(lambda device: False)  # rows, as on a GPU
    native.available = lambda: False
    cpu_ops.decode_fits = lambda *a, **k: False
    try:
        return _count_steps(scheme, tokens, kv_heads, group, d, dtype)
    finally:
        RopeTable.compact_on, native.available, cpu_ops.decode_fits = saved


def _count_steps(scheme, tokens: int, kv_heads: int, group: int, d: int, dtype: torch.dtype
                 ) -> tuple[Counter, int]:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=kv_heads * group * d, num_attention_heads=kv_heads * group,
                         num_key_value_heads=kv_heads, num_hidden_layers=2, head_dim=d, rope_theta=1e5)
    cache = NQKVCache(scheme, config=config)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    for i in range(2):
        cache.append(randn(1, kv_heads, tokens, d), randn(1, kv_heads, tokens, d), i,
                     randn(1, kv_heads * group, tokens, d))
    for _ in range(3):  # the first steps build what later ones reuse; the last is counted
        q = randn(1, kv_heads * group, 1, d)
        k, v = randn(1, kv_heads, 1, d), randn(1, kv_heads, 1, d)
        cache.layers[0].update(k, v)
        cache.layers[0].attention(q, None, d ** -0.5)
        with TritonLaunches() as launches, Counter() as counter:
            cache.layers[1].update(k, v)
            cache.layers[1].attention(q, None, d ** -0.5)
    return counter, launches.count


def compiled_kernels(scheme, tokens: int, kv_heads: int = 3, group: int = 3, d: int = 64,
                     dtype: torch.dtype = torch.bfloat16) -> int:
    """Kernels inductor generates (on CPU) for one layer's traced one-token step."""
    from torch._inductor import metrics
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=kv_heads * group * d, num_attention_heads=kv_heads * group,
                         num_key_value_heads=kv_heads, num_hidden_layers=1, head_dim=d, rope_theta=1e5)
    cache = NQKVCache(scheme, config=config, max_cache_len=tokens + 64, compiled_step="traced")
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cache.append(randn(1, kv_heads, tokens, d), randn(1, kv_heads, tokens, d), 0)

    def step(q, k, v):
        cache.update(k, v, 0)
        return cache.layers[0].attention(q, None, d ** -0.5)

    torch._dynamo.reset()
    metrics.reset()
    with torch.no_grad():
        torch.compile(step, fullgraph=True)(randn(1, kv_heads * group, 1, d), randn(1, kv_heads, 1, d),
                                            randn(1, kv_heads, 1, d))
    return metrics.generated_kernel_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=300, help="tokens in the layer before the counted steps")
    ap.add_argument("--ops", action="store_true", help="also list the torch ops by name")
    ap.add_argument("--compiled", action="store_true",
                    help="also count the kernels inductor generates (on CPU) for a traced step")
    args = ap.parse_args()
    print("| preset | torch ops | Triton launches | host reads |" + (" inductor kernels, traced step |"
                                                                   if args.compiled else ""))
    print("|---|---:|---:|---:|" + ("---:|" if args.compiled else ""))
    rows = []
    for name, scheme in (("NQKV-4 (RoPE-aware centre)", nqkv_preset(4)),
                         ("NQKV-4 plain-centre", nqkv_preset(4, rope_centre=False))):
        counter, triton_count = step_counts(scheme, args.tokens)
        row = f"| {name} | {sum(counter.ops.values())} | {triton_count} | {counter.host_reads} |"
        if args.compiled:
            row += f" {compiled_kernels(scheme, args.tokens)} |"
        print(row, flush=True)
        rows.append((name, counter))
    if args.ops:
        for name, counter in rows:
            print(f"\n{name}: " + ", ".join(f"{op} x{n}" for op, n in counter.ops.most_common()))


if __name__ == "__main__":
    main()
