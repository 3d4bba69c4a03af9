"""Fused attention over quantized keys/values.

:func:`packed_attention` is the Python entry point (K and V as :class:`~nqkv_core.packed.Packed`).
Importing this package registers ``torch.ops.nqkv.attention`` and routes
``F.scaled_dot_product_attention`` with ``NQTensor`` key/value to it. The Triton kernels
(:mod:`~nqkv_core.ops.triton_decode`, :mod:`~nqkv_core.ops.triton_decode_grouped`,
:mod:`~nqkv_core.ops.triton_prefill`, and
:mod:`~nqkv_core.ops.triton_quantize` for the quantizer's ``nqkv::feedback_codes``) are imported here when
CUDA is available and otherwise on first use, so that ``TRITON_INTERPRET=1`` set before that use
takes effect.
"""

import torch

from nqkv_core.ops.attention import attention, packed_attention

if torch.cuda.is_available():
    try:
        from nqkv_core.ops import triton_decode, triton_prefill, triton_quantize  # noqa: F401  (registers ops)
    except ImportError:  # no triton: the torch path serves every device
        pass
    try:
        from nqkv_core.ops import triton_decode_grouped  # noqa: F401  (registers nqkv::grouped_decode)
    except (ImportError, AttributeError):  # a Triton without what it uses: the split-K kernel decodes
        pass

__all__ = ["attention", "packed_attention"]
