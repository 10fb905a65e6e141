"""Random projections for intrinsic-subspace tuning: dense Gaussian and Fastfood.

A projection maps one low-dimensional vector ``z ∈ R^D`` into a parameter
vector ``Δθ = P z ∈ R^N`` with ``N ≫ D``.  Both kinds here have (roughly) unit-norm
columns, so ``‖P z‖ ≈ ‖z‖`` whatever ``N`` is.

Fastfood (Le, Sarlós & Smola, 2013) replaces the dense ``N×D`` Gaussian by
``N/n`` stacked ``n×n`` blocks ``V_i = H G_i Π_i H B_i`` (``n = 2^k ≥ D``, ``z``
zero-padded to ``n``): ``B_i`` a random ±1 diagonal, ``Π_i`` a random
permutation, ``G_i`` a Gaussian diagonal and ``H`` the (unnormalised, Sylvester)
Walsh–Hadamard matrix.  Each block costs ``O(n log n)`` and stores ``O(n)``
numbers instead of ``n·D``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Fast Walsh–Hadamard transform ``x ↦ x Hᵀ = x H`` along the last axis, ``O(n log n)``.

    ``H`` is the unnormalised Sylvester Hadamard matrix of size ``n = x.shape[-1]``
    (a power of two), ``H = [[H', H'], [H', −H']]``, so ``H H = n I``.  Differentiable.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Walsh–Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        # Butterflies between entries i and i+h inside each block of 2h entries.
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def next_power_of_two(d: int) -> int:
    """Smallest ``2^k ≥ d``."""
    return 1 << max(0, math.ceil(math.log2(d)))


class FastfoodProjection(nn.Module):
    """``z ∈ R^D ↦ Δθ ∈ R^N``: ``m = ⌈N/n⌉`` stacked blocks ``c_i H G_i Π_i H B_i``, truncated to N.

    Args:
        n_out: N, the number of outputs.
        dim: D, the input dimension (``n = 2^⌈log2 D⌉`` is the block size).
        gen: seeded CPU generator for ``B, Π, G``.
        like: a tensor whose dtype/device the buffers take.

    ``c_i = 1/(‖G_i‖ √n)`` gives every block exactly unit-norm columns
    (``‖H G Π H B e_j‖ = √n ‖G‖`` since ``H B e_j`` has ±1 entries); a further
    global factor (:meth:`rescale`) divides by ``√(total number of blocks)`` so
    the whole stacked map has unit-norm columns up to the truncation of the last block.
    """

    def __init__(self, n_out: int, dim: int, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        n = next_power_of_two(dim)
        m = -(-n_out // n)
        self.n_out, self.dim, self.block = int(n_out), int(dim), n
        sign = torch.randint(0, 2, (m, n), generator=gen).to(torch.float64) * 2 - 1
        perm = torch.argsort(torch.rand(m, n, generator=gen, dtype=torch.float64), dim=-1)
        gauss = torch.randn(m, n, generator=gen, dtype=torch.float64)
        scale = 1.0 / (gauss.norm(dim=-1) * math.sqrt(n))
        self.register_buffer("sign", sign.to(like))
        self.register_buffer("perm", perm.to(like.device))
        self.register_buffer("gauss", gauss.to(like))
        self.register_buffer("scale", scale.to(like))

    @property
    def n_blocks(self) -> int:
        return self.sign.shape[0]

    def rescale(self, factor: float) -> None:
        """Multiply the whole map by ``factor`` (used to normalise columns across many projections)."""
        self.scale.mul_(factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``P z`` (N,) for ``z`` (D,)."""
        v = torch.nn.functional.pad(z, (0, self.block - self.dim)).expand(self.n_blocks, self.block)
        v = fwht(v * self.sign)
        v = torch.gather(v, -1, self.perm) * self.gauss
        v = fwht(v) * self.scale[:, None]
        return v.reshape(-1)[: self.n_out]

    def dense(self) -> torch.Tensor:
        """The explicit N×D matrix (for checks on small sizes)."""
        eye = torch.eye(self.dim, dtype=self.gauss.dtype, device=self.gauss.device)
        return torch.stack([self(e) for e in eye], dim=1)


class DenseProjection(nn.Module):
    """``z ↦ P z`` with a stored Gaussian ``P`` (N×D), columns normalised by :meth:`rescale`."""

    def __init__(self, n_out: int, dim: int, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        self.n_out, self.dim = int(n_out), int(dim)
        self.register_buffer("matrix", torch.randn(n_out, dim, generator=gen, dtype=torch.float64).to(like))

    def column_sq_norms(self) -> torch.Tensor:
        """``‖P e_j‖²`` for each column j (D,)."""
        return self.matrix.pow(2).sum(0)

    def rescale(self, factor: torch.Tensor | float) -> None:
        """Multiply column j by ``factor[j]`` (or every column by a scalar)."""
        self.matrix.mul_(factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.matrix @ z

    def dense(self) -> torch.Tensor:
        return self.matrix
