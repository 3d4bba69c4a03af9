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

Usage: python benchmarks/rotation_any_head_dim.py [--dims 64 80 96 112 160] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import math

import torch

from nqkv_core.scheme import _sylvester as sylvester, quantize_roundtrip, rotation


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 80, 96, 112, 160])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--outliers", type=int, default=4)
    p.add_argument("--outlier-gain", type=float, default=10.0)
    args = p.parse_args()
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
