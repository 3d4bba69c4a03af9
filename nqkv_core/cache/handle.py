"""What a cache layer's ``update`` returns in place of K/V tensors: a handle only the NQKV attention reads.

transformers hands whatever ``update`` returns to the model's attention function; an NQKV layer
attends inside that function (:func:`nqkv_core.cache.hf.nqkv_attention`), so it returns this handle,
which refuses, with what to do, any other use as a tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nqkv_core.cache.layer import NQKVLayer

ENABLE_HINT = "pass attn_implementation='nqkv' when loading the model, or call nqkv_core.enable(model)"


class Handle:
    """What ``update`` returns in place of K/V tensors: the layer, for the NQKV attention function."""

    __slots__ = ("layer",)

    def __init__(self, layer: "NQKVLayer"):
        self.layer = layer

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol lookups (copy, pickle) fall back to the defaults
            raise AttributeError(name)
        raise TypeError(
            f"an NQKVCache layer holds quantized K/V that only the 'nqkv' attention function can read"
            f" (something asked for .{name}); {ENABLE_HINT}"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # an attention function other than 'nqkv' handed the handle to a torch op as if it were K/V
        raise TypeError(
            f"an NQKVCache layer holds quantized K/V that only the 'nqkv' attention function can read"
            f" ({getattr(func, '__name__', func)} got it as a tensor); {ENABLE_HINT}"
        )

    def __repr__(self) -> str:
        return f"<NQKV layer handle: {self.layer!r}>"
