"""What the library reads from transformers model configs and attention masks, in one place.

Only plain attribute access: importing this module does not import transformers.
"""

from __future__ import annotations

from typing import Any

import torch


def text_config(config: Any) -> Any:
    """The decoder's config (the text part of a multimodal config, else ``config`` itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim(config: Any) -> int:
    """Attention head dim: ``head_dim`` if the config sets one, else ``hidden_size / heads``."""
    text = text_config(config)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_heads(config: Any) -> int:
    """Key/value heads (``num_key_value_heads``, else one per query head)."""
    text = text_config(config)
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads


def num_layers(config: Any) -> int:
    """Decoder layers."""
    return text_config(config).num_hidden_layers


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """An attention mask as booleans, True = attend: a bool mask as it is, an additive float mask
    (``0`` / large negative) by its sign of ``value > min / 2``."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def leading_pads(mask: torch.Tensor, tokens: int, batch: int) -> torch.Tensor:
    """Leading padding slots of each row, ``(batch,)`` int64, from the attention mask of a first
    forward of ``tokens`` tokens on an empty cache (``(b or 1, heads, tokens, >= tokens)``, bool or
    additive; query ``i`` and key ``i`` are position ``i``).

    Key ``j`` is a real token if its own query attends to it (the diagonal): a padding key is seen
    by no query, under a full or a sliding-window mask alike. Rows of padding queries that a mask
    unmasks entirely (older transformers do, to avoid NaN) are not taken for real ones, except the
    last (a real token under left padding). A row of padding alone counts ``tokens - 1`` pads.
    """
    m = bool_mask(mask[:, 0, -tokens:, :tokens])
    real = m.diagonal(dim1=-2, dim2=-1).clone()
    whole = m.all(dim=-1)
    whole[:, -1] = False
    real &= ~whole
    pads = (~real).long().cumprod(dim=-1).sum(dim=-1).clamp(max=tokens - 1)
    return pads.expand(batch).contiguous() if pads.shape[0] == 1 else pads


def transformers_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed transformers."""
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
