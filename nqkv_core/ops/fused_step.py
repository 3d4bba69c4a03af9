"""One launch each for the small work of a cache layer's eager decode step on a GPU.

Around its attention, a one-token step takes the query and the new token into the storage basis
and quantizes the token that leaves the window: some forty small torch ops, each a launch on a GPU.
These are the routes to the kernels that do each in one launch, for tensors Triton runs on (CUDA,
or CPU tensors under ``TRITON_INTERPRET=1``) outside compiled graphs (where inductor fuses the
torch ops itself). Where a kernel does not serve a call, the route says so and the caller runs
the torch ops, which are the kernels' references; a kernel this Triton cannot compile closes its
route for the process, with a warning.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch
from torch import Tensor

from nqkv_core.quantize import decision_thresholds


# Kernels this Triton failed to compile (an older one may lack what they use): their routes decline.
_UNCOMPILED: set[str] = set()


def _kernels(x: Tensor, name: str):
    """The kernel module ``name`` where it serves ``x``'s device in eager code, else None."""
    if torch.compiler.is_compiling() or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return None if name in _UNCOMPILED else _module(name)


def _launch(module, name: str, fn: str, *args):
    """``module.fn(*args)``; None, with a warning and the kernel's route closed for the process,
    where this Triton cannot compile the kernel."""
    try:
        return getattr(module, fn)(*args)
    except module.CompilationError as e:
        _UNCOMPILED.add(name)
        warnings.warn(f"nqkv: this Triton cannot compile {name} ({type(e).__name__}: {str(e).strip()[:200]});"
                      " the cache's step runs its torch ops instead", RuntimeWarning, stacklevel=3)
        return None


@functools.cache
def _module(name: str):
    """``nqkv_core.ops.<name>``, or None without triton (remembered: a failed import searches the
    path again on every attempt, and the step asks twice per layer)."""
    try:
        return importlib.import_module(f"nqkv_core.ops.{name}")
    except ImportError:
        return None


def store_quantized(k: Tensor, v: Tensor, k_body: tuple[Tensor, ...], v_body: tuple[Tensor, ...], slot: int,
                    codebook: Tensor, block: int) -> bool:
    """Quantize ``k`` and ``v`` ``(b, h, n, d)`` (nearest codes of ``codebook``, absmax scales rounded up
    to fp16, blocks of ``block`` along head_dim) into slots ``[slot, slot + n)`` of the bodies
    ``(codes, scales)``. True when done; False where the kernel does not serve the call or flagged a
    row (NaN, or a scale beyond fp16): nothing the caller reads was written then, and the caller
    quantizes with torch."""
    triton_store = _kernels(k, "triton_store")
    if triton_store is None or len(k_body) != 2:
        return False
    bits = codebook.numel().bit_length() - 1
    (kc, ks), (vc, vs) = k_body, v_body
    if not (triton_store.supports(k, bits, block, ks.dtype) and k.stride() == v.stride() and k.shape == v.shape
            and all(t.is_contiguous() and t.device == k.device for t in (kc, ks, vc, vs))
            and kc.shape == vc.shape and ks.shape == vs.shape):
        return False
    bad = _launch(triton_store, "triton_store", "store_rows", k, v, k_body, v_body, slot,
                  decision_thresholds(codebook).to(k.device), bits, block)
    return bad is not None and not bool(bad.any())


def step_inputs(query: Tensor, k_new: Tensor, v_new: Tensor, order: Tensor | None, rot_k: Tensor | None,
                rot_v: Tensor | None, mu_k: Tensor | None, mu_k_half: Tensor | None, mu_v: Tensor | None,
                row: Tensor | None, scaling: float, dtype: torch.dtype) -> tuple | None:
    """A one-token step's ``(q, w, k, v)`` in the storage basis (see
    :func:`~nqkv_core.ops.triton_step_inputs.step_inputs`, the arguments' meaning), or None where the
    kernel does not serve the call."""
    kernel = _kernels(query, "triton_step_inputs")
    if kernel is None or not kernel.takes(query, k_new, v_new, mu_k, mu_k_half, mu_v):
        return None
    if any(x is not None and (x.device != query.device or not x.is_contiguous()) for x in (order, rot_k, rot_v, row)):
        return None
    return _launch(kernel, "triton_step_inputs", "step_inputs", query, k_new, v_new, order, rot_k, rot_v, mu_k,
                   mu_k_half, mu_v, row, scaling, dtype)
