"""``nqkv demo``: a real model's KV cache through the NQKV presets, with error and memory per width."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from nqkv_core.codebook import get_codebook
from nqkv_core.quantize import quantize_blockwise
from nqkv_core.scheme import KVScheme, default_scheme, fit_transform, rope_layout, roundtrip


def _stored_bytes(s: KVScheme, k: torch.Tensor, v: torch.Tensor, t) -> int:
    """Bytes one layer's K and V take under ``s``: codes and fp16 scales of the body, fp16 sink and
    window tokens, and two fp16 vectors (centre / equalisation) per head and side."""
    n = k.shape[-2]
    body = slice(s.sinks, n - s.window)
    nbytes = 0
    keys = lambda y: t.keys(y, start=s.sinks)  # noqa: E731 - positions of the stored tokens
    for x, fwd, quant, bits, blk in ((k, keys, s.k_quant, s.k_bits, s.k_block),
                                     (v, t.values, s.v_quant, s.v_bits, s.v_block)):
        codes, absmax = quantize_blockwise(fwd(x[..., body, :]), get_codebook(quant, bits, blk), block=blk)
        nbytes += codes.numel() + 2 * absmax.numel()
        nbytes += 2 * x[..., : s.sinks, :].numel() + 2 * x[..., n - s.window :, :].numel()  # exact fp16 tokens
        nbytes += 2 * 2 * x.shape[1] * x.shape[-1]  # two fp16 vectors per head
    return nbytes


@torch.no_grad()
def demo_rows(config, kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bits: list[int], sinks: int,
              window: int) -> Iterator[dict]:
    """One result per width in ``bits``, as it is measured: the relative error of K and V over the
    quantized tokens (mean over layers), the bytes stored and bits per element.

    Args:
        config: the model's config (RoPE frequencies for the key centre).
        kv: per layer ``(k, v, q)`` post-RoPE, ``(1, heads, n, head_dim)`` (``capture_kv(..., queries=True)``).
        bits: code widths; the scheme is :func:`~nqkv_core.scheme.default_scheme`, what ``enable`` uses.

    Raises:
        ValueError: if ``sinks + window`` leaves no token to quantize.
    """
    n, head_dim = kv[0][0].shape[-2], kv[0][0].shape[-1]
    if sinks + window >= n:
        raise ValueError(f"{sinks} sink and {window} window tokens keep all {n} tokens exact: nothing to quantize")
    fp16_bytes = sum(2 * (k.numel() + v.numel()) for k, v, _ in kv)
    with tqdm(total=len(bits) * len(kv), desc="demo", unit="layer") as bar:
        for b in bits:
            s = default_scheme(b, head_dim, sinks=sinks, window=window)
            inv_freq, order = rope_layout(config, head_dim) if s.k_centre_rope else (None, None)
            err_k = err_v = 0.0
            nbytes = 0
            body = slice(sinks, n - window)
            for k, v, q in kv:
                t = fit_transform(s, k, v, q, inv_freq, order)
                k_hat, v_hat = roundtrip(s, k, v, transform=t)
                err_k += float((k_hat - k)[..., body, :].norm() / k[..., body, :].norm()) / len(kv)
                err_v += float((v_hat - v)[..., body, :].norm() / v[..., body, :].norm()) / len(kv)
                nbytes += _stored_bytes(s, k, v, t)
                bar.update()
            yield {"scheme": s.name, "k_rel_error": err_k, "v_rel_error": err_v, "stored_bytes": nbytes,
                   "fp16_bytes": fp16_bytes, "x_smaller": fp16_bytes / nbytes,
                   "bits_per_element": s.bits_per_element(n)}


def demo_markdown(rows: list[dict]) -> str:
    """The rows of :func:`demo_rows` as a Markdown table."""
    lines = ["| scheme | K rel. error | V rel. error | stored MiB | x smaller than fp16 | bits/elem |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['k_rel_error']:.4f} | {r['v_rel_error']:.4f} |"
                     f" {r['stored_bytes'] / 2**20:.3f} | {r['x_smaller']:.2f} | {r['bits_per_element']:.3f} |")
    return "\n".join(lines)
