"""nqkv: key-value cache quantization with per-block normal-quantile codebooks."""

from nqkv_core.codebook import get_codebook, lloyd_max_codebook, nf_codebook
from nqkv_core.packing import pack, unpack
from nqkv_core.quantize import bits_per_element, dequantize_blockwise, quantize_blockwise
from nqkv_core.tensor import NQTensor

# Registers torch.ops.nqkv.* and routes F.scaled_dot_product_attention on NQTensor keys/values.
import nqkv_core.ops  # noqa: E402,F401  (after NQTensor: the op table is filled on import)

__all__ = [
    "NQTensor",
    "bits_per_element",
    "dequantize_blockwise",
    "get_codebook",
    "lloyd_max_codebook",
    "nf_codebook",
    "pack",
    "quantize_blockwise",
    "unpack",
]
__version__ = "0.1.0"
