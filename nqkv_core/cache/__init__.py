"""``NQKVCache``: a transformers ``Cache`` that stores keys and values quantized, append-only.

Modules, in the order data flows through them:

=============  ===================================================================================
``format``     how each side is stored (:class:`SideFormat`), the RoPE table, the key bias
``attend``     attention of new queries over ``[quantized body | full-precision tokens]``
``commit``     storing new tokens: sinks, the full-precision ring, the quantized body
``compiled``   opaque ops of compiled steps (``nqkv::cache_step``, ``nqkv::present_attention``)
``step``       one attention step of a layer, with its decode strategies
``layer``      :class:`NQKVLayer`: one full-attention layer's buffers and transformers' layer interface
``sliding``    :class:`NQKVSlidingLayer`: a sliding-window layer (its quantized tokens in a ring)
``support``    which models the cache serves (layer types, support check, RoPE frequencies)
``io``         save / load (safetensors with a checksum, optional HMAC; every tensor checked on load)
``hf``         :class:`NQKVCache`, the ``"nqkv"`` attention function, :func:`enable`
=============  ===================================================================================
"""

from nqkv_core.cache.attend import Logits, attend, prompt_attention, sdpa, softmax_attention
from nqkv_core.cache.format import KeyBias, RopeTable, SideFormat, side_format
from nqkv_core.cache.hf import ATTN_NAME, NQKVCache, NQKVModel, disable, enable, nqkv_attention, register
from nqkv_core.cache.io import FORMAT_VERSION
from nqkv_core.cache.layer import CompiledStep, NQKVLayer
from nqkv_core.cache.sliding import NQKVSlidingLayer
from nqkv_core.cache.step import DECODE_STRATEGIES, Decode
from nqkv_core.cache.support import LAYER_TYPES, check_supported, layer_types, rope_inv_freqs, rope_layouts
from nqkv_core.scheme import default_scheme  # deprecated here: import it from nqkv_core.scheme
from nqkv_core.transform import rope_bias_weights

__all__ = [
    "ATTN_NAME", "DECODE_STRATEGIES", "FORMAT_VERSION", "LAYER_TYPES", "CompiledStep", "Decode", "KeyBias", "Logits",
    "NQKVCache", "NQKVLayer", "NQKVModel", "NQKVSlidingLayer", "RopeTable", "SideFormat", "attend", "check_supported",
    "default_scheme", "disable", "enable", "layer_types", "nqkv_attention", "prompt_attention", "register", "rope_bias_weights",
    "rope_inv_freqs", "rope_layouts", "sdpa", "side_format", "softmax_attention",
]
