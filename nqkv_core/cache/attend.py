"""Attention of new queries over a layer's stored tokens: ``[quantized body | full-precision tokens]``.

:func:`attend` is the one place that reads the quantized body; the fast paths go through
:func:`nqkv_core.ops.packed_attention` (the ``torch.ops.nqkv`` attention ops), the reference path
through SDPA over the dequantized body, and attention with soft-capped logits or learned sinks
(which neither implements) through :func:`softmax_attention` over the dequantized body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nqkv_core._hf import bool_mask
from nqkv_core.cache.format import KeyBias, SideFormat, read_body
from nqkv_core.ops import packed_attention
from nqkv_core.transform import output_transform


def attend(
    query: torch.Tensor,
    k_body: tuple[torch.Tensor, ...],
    v_body: tuple[torch.Tensor, ...],
    k_fmt: SideFormat,
    v_fmt: SideFormat,
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    key_bias: KeyBias | None = None,
    fused: bool = True,
    logits: "Logits | None" = None,
    output: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over a quantized body followed by full-precision keys/values.

    Args:
        query: ``(b, hq, T, d)`` in the storage basis.
        k_body, v_body: ``(codes, absmax)`` of ``N`` body tokens, ``(b, hkv, N, ...)`` (or a
            one-tuple with a plain ``(b, hkv, N, d)`` tensor for a 16-bit side).
        k_fmt, v_fmt: their storage formats.
        k_fp, v_fp: ``(b, hkv, M, d)`` full-precision keys/values (sinks, window, new tokens).
        mask: boolean ``(b or 1, 1, T, N + M)``, True = attend, or an additive float mask
            broadcastable to ``(b, hq, T, N + M)`` (``-inf`` = masked); every row attends to at least
            one key. None: every query attends to every key.
        scale: softmax scale.
        key_bias: a score offset added to every key's score (a RoPE-centred cache's), or None.
        fused: read the packed codes with :func:`~nqkv_core.ops.packed_attention`; False: fp32 SDPA over
            the dequantized body (the reference, the arithmetic of fake quantization).
        logits: soft-capping and learned sink logits (:class:`Logits`), which the fused ops do not
            implement: with them attention is :func:`softmax_attention` over the dequantized body.
        output: ``(rot_v, mu_v)`` (either may be None) to return the output in the model's basis,
            ``out @ rot_v.T + mu_v`` (:func:`~nqkv_core.transform.output_transform`; the grouped
            decode kernel applies it in its merge), or None for the storage basis.

    Returns:
        ``(b, hq, T, d)`` in ``query.dtype``.
    """
    if output is not None and (not fused or (logits is not None and logits.active) or not k_body[0].shape[2]
                               or not (k_fmt.quantized and v_fmt.quantized)):
        out = attend(query, k_body, v_body, k_fmt, v_fmt, k_fp, v_fp, mask, scale, key_bias, fused, logits)
        return output_transform(out, *output)
    if logits is not None and logits.active:
        k = torch.cat([read_body(k_body, k_fmt, torch.float32), k_fp.float()], dim=2)
        v = torch.cat([read_body(v_body, v_fmt, torch.float32), v_fp.float()], dim=2)
        bias = key_bias.dense() if key_bias is not None else None
        return softmax_attention(query, k, v, mask, scale, logits, bias)
    if fused and k_fmt.quantized and v_fmt.quantized and k_body[0].shape[2]:
        # The packed codes read in place (Triton on GPU; native or chunked torch decode on CPU, the
        # key bias inside the decode kernel where it takes it), without the dispatcher when eager.
        bias = () if key_bias is None else (key_bias.parts, key_bias.dense)
        return packed_attention(query, k_fmt.packed(k_body), v_fmt.packed(v_body), k_fp.to(query.dtype),
                                v_fp.to(query.dtype), mask, scale, False, *bias, out_transform=output)
    if key_bias is not None:
        bias = key_bias.dense()
        mask = bias if mask is None else bias.masked_fill(~mask, -math.inf)
    if k_body[0].shape[2] == 0:
        # Nothing quantized yet (a prompt on an empty cache): torch's own fused SDPA over the exact
        # tokens; the op's chunked path would only add its bookkeeping.
        return sdpa(query, k_fp.to(query.dtype), v_fp.to(query.dtype), attn_mask=mask, scale=scale)
    # A 16-bit side (or the reference path): SDPA over the dequantized body and the exact tokens.
    k = torch.cat([read_body(k_body, k_fmt, query.dtype), k_fp.to(query.dtype)], dim=2)
    v = torch.cat([read_body(v_body, v_fmt, query.dtype), v_fp.to(query.dtype)], dim=2)
    return sdpa(query, k, v, attn_mask=mask, scale=scale)


@dataclass(frozen=True)
class Logits:
    """What a model changes about attention logits beyond ``scale * q . k`` (None: nothing).

    ``softcap``: scores become ``softcap * tanh(score / softcap)`` before masking (Gemma 2).
    ``sinks``: one learned logit per query head ``(hq,)`` joins every softmax and takes its share of
    the probability without contributing a value (GPT-OSS); ``sink_value``: that value in the
    storage basis, ``(b, hkv, 1, d)`` (the transform of a zero vector), or None for zero.
    ``score_shift``: ``(b, hq, T, 1)`` added to every score of a query row: what a plain key centre
    takes from the scores (``scale * q . mu_k``), which the softmax alone ignores but soft-capping and
    sinks do not.
    """

    softcap: float | None = None
    sinks: torch.Tensor | None = None
    sink_value: torch.Tensor | None = None
    score_shift: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.softcap is not None or self.sinks is not None


def softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, logits: Logits, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with explicit fp32 scores, for what SDPA and the fused ops cannot express.

    Scores are ``scale * q . k + bias``, soft-capped, masked, then a softmax that includes the
    learned sink logits of ``logits`` (the arithmetic of transformers' eager Gemma 2 and GPT-OSS
    attention). ``query`` ``(b, hq, T, d)``; ``key`` / ``value`` ``(b, hkv, N, d)``; ``mask``: None,
    boolean ``(b or 1, 1, T, N)`` (True = attend) or additive float broadcastable to the scores;
    ``bias``: an additive ``(b, hq, T, N)`` score offset or None. Returns ``(b, hq, T, d)`` in
    ``query.dtype``.
    """
    group = query.shape[1] // key.shape[1]
    k, v = key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1)
    s = (query.float() @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if logits.score_shift is not None:
        s = s + logits.score_shift
    if logits.softcap is not None:
        s = torch.tanh(s / logits.softcap) * logits.softcap
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    if logits.sinks is None:
        return (torch.softmax(s, dim=-1) @ v).to(query.dtype)
    sink = logits.sinks.float().reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)
    out = p[..., :-1] @ v
    if logits.sink_value is not None:
        out = out + p[..., -1:] * logits.sink_value.float().repeat_interleave(group, 1)
    return out.to(query.dtype)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with fewer key/value heads than query heads (GQA).

    In fp32 on CUDA the key/value heads are repeated rather than passing ``enable_gqa``: with it torch
    sends fp32 to the math backend, which materialises the whole score matrix, while the
    memory-efficient backend takes fp32 with repeated heads.
    """
    group = query.shape[1] // key.shape[1]
    if query.is_cuda and query.dtype == torch.float32 and group > 1:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(query, key, value, **kwargs)
    return F.scaled_dot_product_attention(query, key, value, enable_gqa=True, **kwargs)


def prompt_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float,
    sliding_window: int | None = None, logits: Logits | None = None,
) -> torch.Tensor:
    """Causal attention, all exact, of ``T`` queries at the last ``T`` positions of ``N >= T`` keys
    (a prompt on an empty cache: ``N == T``; a layer's fit period: the tokens so far).

    ``attention_mask``: None or transformers' ``(b, 1, >= T, >= N)`` mask (bool, or additive) whose
    last ``T`` rows are these queries and first ``N`` columns these keys. Without padding it is the
    plain causal mask, and torch's SDPA runs with ``is_causal=True`` instead when ``N == T``: its
    fused CPU kernel then skips the masked half (prefill figures in docs/benchmarks.md, "Compiled
    decode"). ``sliding_window``: each query sees only the last that many positions (itself
    included); ``logits``: see :func:`softmax_attention`.
    """
    T, N = query.shape[2], key.shape[2]
    plain = torch.ones(T, N, dtype=torch.bool, device=query.device).tril(N - T)
    windowed = sliding_window is not None and sliding_window < N
    causal = plain & ~plain.tril(N - T - sliding_window) if windowed else plain
    mask = None
    if attention_mask is not None:
        mask = bool_mask(attention_mask[:, :, -T:, :N]) & causal
        # rows of padding queries see nothing; give them every token (finite, discarded outputs)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    elif windowed or N > T:
        mask = causal
    if logits is not None and logits.active:
        return softmax_attention(query, key, value, plain if mask is None else mask, scale, logits)
    if mask is not None and N == T and bool((mask == plain).all()):
        mask = None  # the plain causal mask: SDPA's causal kernel
    return sdpa(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask, is_causal=mask is None, scale=scale)

