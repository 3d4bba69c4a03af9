"""Which orthogonal rotation keeps NF quantization error low for a head_dim that is not a power of two.

Synthetic K/V heads: per-channel offsets, log-normal per-channel scales and a few outlier channels
(``--outlier-gain`` times larger, as in the keys of real models), centred per channel as the presets
do, rotated, quantized by the presets' blockwise NF codes (blocks of ``gcd(head_dim, 64)``, unbiased
levels), rotated back. Printed per rotation: the relative MSE ``|x_hat - x|^2 / |x - mean|^2`` and,
after the slash, the mean over channels of each channel's MSE over its variance (the error that
queries weighting every channel alike see: outlier channels make the first small and the second
large when they drown the small channels of their blocks).

Candidates: none; :func:`nqkv_core.scheme.rotation` (block-diagonal random-sign Sylvester
Hadamards of the largest powers of two, 96 = 64 + 32); a dense random-sign Hadamard of order
``head_dim = (q + 1) 2^k`` for a prime ``q = 3 (mod 4)`` (Paley's first construction times
Sylvester's; "-" where there is none); a seeded random orthogonal matrix (QR of a Gaussian).

``--phi3``: instead, logit fidelity (top-1 agreement and KL from full precision, fake-quantized
attention) of the 4- and 3-bit default schemes at head_dim 96 with each rotation, on a tiny random
Phi-3 (head_dim 96) whose key projections have a few outlier channels, over random tokens.

Usage: python benchmarks/rotation_any_head_dim.py [--dims 64 80 96 112 160] [--tokens 1024] [--phi3]
"""

from __future__ import annotations

import argparse
import math

import torch

from nqkv_core.scheme import quantize_roundtrip, rotation
from nqkv_core.transform import _sylvester as sylvester


def is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, math.isqrt(q) + 1))


def paley(n: int) -> torch.Tensor | None:
    """A (+-1) Hadamard matrix of order ``n = (q + 1) * 2**k`` for a prime ``q = 3 (mod 4)``: Paley's
    first construction of order ``q + 1`` (from the quadratic residues mod ``q``), Kronecker with
    the Sylvester matrix of order ``2**k``; float64. None if ``n`` has no such form."""
    k = 0
    while n % (2 << k) == 0 and not (is_prime(n // (1 << k) - 1) and (n // (1 << k) - 1) % 4 == 3):
        k += 1
    q = n // (1 << k) - 1
    if n % (1 << k) or not (is_prime(q) and q % 4 == 3):
        return None
    residues = {(i * i) % q for i in range(1, q)}
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q  # Jacobsthal matrix Q[i, j] = chi(j - i)
    jac = torch.tensor([0.0] + [1.0 if r in residues else -1.0 for r in range(1, q)], dtype=torch.float64)[diff]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return torch.kron(torch.eye(q + 1, dtype=torch.float64) + s, sylvester(1 << k))


def dense_hadamard(n: int, seed: int = 0) -> torch.Tensor | None:
    """A random-sign Paley x Sylvester Hadamard of order ``n`` (None if ``n`` has no such form)."""
    h = paley(n) if n & (n - 1) else sylvester(n)
    if h is None:
        return None
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h / math.sqrt(n)).float()


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """QR of a seeded Gaussian matrix, signs fixed so that R has a positive diagonal (Haar-distributed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def synthetic_heads(d: int, tokens: int, heads: int, outliers: int, gain: float, seed: int) -> torch.Tensor:
    """``(heads, tokens, d)``: offsets + log-normal channel scales, ``outliers`` channels ``gain`` x wider."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(heads, 1, d, generator=g) * 2
    scale = torch.exp(torch.randn(heads, 1, d, generator=g) * 0.5)
    for h in range(heads):
        scale[h, 0, torch.randperm(d, generator=g)[:outliers]] *= gain
    return offset + scale * torch.randn(heads, tokens, d, generator=g)


def errors(x: torch.Tensor, rot: torch.Tensor | None, bits: int) -> tuple[float, float]:
    """(relative MSE, mean over channels of each channel's MSE over its variance) of one round trip."""
    xc = x - x.mean(dim=-2, keepdim=True)
    y = xc @ rot if rot is not None else xc
    yq = quantize_roundtrip(y, bits, "nf", math.gcd(x.shape[-1], 64), "token", unbiased=True)
    err = (yq @ rot.T if rot is not None else yq) - xc
    per_channel = err.pow(2).mean(dim=-2) / xc.pow(2).mean(dim=-2)
    return float(err.pow(2).sum() / xc.pow(2).sum()), float(per_channel.mean())


def tiny_phi3(outliers: int, gain: float, seed: int = 0):
    """A random 4-layer Phi-3 with head_dim 96; queries and keys 4x the init, ``outliers`` key
    channels per kv head ``gain`` x wider (rows of the fused qkv projection)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=512, hidden_size=384, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0)
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(cfg).eval()
    d, h = 96, cfg.num_key_value_heads
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.qkv_proj.weight
            w[: 2 * h * d].mul_(4)
            for head in range(h):
                w[h * d + head * d + torch.randperm(d, generator=g)[:outliers]] *= gain
    return model


def phi3_fidelity(windows: int, length: int, outliers: int, gain: float) -> None:
    import nqkv_core.scheme as scheme_module
    from nqkv_core.lab import evaluate
    from nqkv_core.scheme import default_scheme

    model = tiny_phi3(outliers, gain)
    model.set_attn_implementation(evaluate.register_attention())
    ids = torch.randint(1, 512, (windows, length), generator=torch.Generator().manual_seed(1))
    builders = {"none": None, "rotation() (pow2 blocks)": rotation, "dense Hadamard": dense_hadamard,
                "random orthogonal": random_orthogonal}
    print("| rotation | bits | top-1 agreement | KL (nats) |")
    print("|---|---|---|---|")
    for label, build in builders.items():
        for bits in (4, 3):
            s = default_scheme(bits, 96)
            if build is None:
                s = s.replace(k_rotate=False, v_rotate=False)
            else:  # fit_transform takes its matrices from scheme.rotation(d, seed, device)
                scheme_module.rotation = lambda n, seed=0, device=None, b=build: b(n, seed=seed).to(device)
            try:
                (fid,) = evaluate.logit_fidelity(model, ids, [s])
            finally:
                scheme_module.rotation = rotation
            print(f"| {label} | {bits} | {fid.agree:.4f} | {fid.kl:.5f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 80, 96, 112, 160])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--outliers", type=int, default=4)
    p.add_argument("--outlier-gain", type=float, default=10.0)
    p.add_argument("--phi3", action="store_true", help="logit fidelity on a tiny random Phi-3 instead")
    args = p.parse_args()
    if args.phi3:
        phi3_fidelity(windows=4, length=256, outliers=args.outliers, gain=args.outlier_gain)
        return
    print("| head_dim | block | outliers | bits | none | rotation() (pow2 blocks) | dense Hadamard"
          " | random orthogonal |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.dims:
        dense = dense_hadamard(d)
        cands = [None, rotation(d), False if dense is None else dense, random_orthogonal(d)]
        for outliers in (0, args.outliers):
            x = synthetic_heads(d, args.tokens, args.heads, outliers, args.outlier_gain, seed=d)
            for bits in (4, 3):
                errs = " | ".join("-" if r is False else "{:.4f} / {:.4f}".format(*errors(x, r, bits))
                                  for r in cands)
                print(f"| {d} | {math.gcd(d, 64)} | {outliers} | {bits} | {errs} |")


if __name__ == "__main__":
    main()
