"""nqkv: key-value cache quantization with per-block normal-quantile codebooks."""

from nqkv_core.codebook import get_codebook, lloyd_max_codebook, nf_codebook, unbiased_gain
from nqkv_core.packed import Packed
from nqkv_core.packing import pack, unpack
from nqkv_core.quantize import (bits_per_element, dequantize_blockwise, dequantize_packed, quantize_blockwise,
                                quantize_packed)
from nqkv_core.tensor import NQTensor

# Registers torch.ops.nqkv.* and routes F.scaled_dot_product_attention on NQTensor keys/values.
import nqkv_core.ops  # noqa: E402,F401  (after NQTensor: the op table is filled on import)

__all__ = [
    "KVScheme",
    "NQKVCache",
    "NQTensor",
    "Packed",
    "disable",
    "enable",
    "nqkv_preset",
    "bits_per_element",
    "dequantize_blockwise",
    "dequantize_packed",
    "get_codebook",
    "lloyd_max_codebook",
    "nf_codebook",
    "pack",
    "quantize_blockwise",
    "quantize_packed",
    "unbiased_gain",
    "unpack",
]
__version__ = "0.1.0"

from nqkv_core.scheme import KVScheme, nqkv_preset  # noqa: E402

_NEEDS_TRANSFORMERS = {"NQKVCache", "enable", "disable"}


def __getattr__(name: str):
    # The cache needs transformers (the "eval" extra); import it only when asked for.
    if name in _NEEDS_TRANSFORMERS:
        from nqkv_core import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'nqkv_core' has no attribute {name!r}")
