"""nqkv: key-value cache quantization with per-block normal-quantile codebooks."""

from nqkv_core.codebook import get_codebook, lloyd_max_codebook, nf_codebook
from nqkv_core.packing import pack, unpack
from nqkv_core.quantize import bits_per_element, dequantize_blockwise, quantize_blockwise
from nqkv_core.tensor import NQTensor

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
