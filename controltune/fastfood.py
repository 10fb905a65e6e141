"""Random projections for intrinsic-subspace tuning: dense Gaussian and Fastfood.

A projection maps one low-dimensional vector ``z ∈ R^D`` into a parameter
vector ``Δθ = P z ∈ R^N`` with ``N ≫ D``.  Both kinds here have (roughly) unit-norm
columns, so ``‖P z‖ ≈ ‖z‖`` whatever ``N`` is.

Fastfood (Le, Sarlós & Smola, 2013) replaces the dense ``N×D`` Gaussian by
``N/n`` stacked ``n×n`` blocks ``V_i = H G_i Π_i H B_i`` (``n = 2^k ≥ D``, ``z``
zero-padded to ``n``): ``B_i`` a random ±1 diagonal, ``Π_i`` a random
permutation, ``G_i`` a Gaussian diagonal and ``H`` the (unnormalised, Sylvester)
Walsh–Hadamard matrix.  Each block costs ``O(n log n)`` (:func:`fwht`) and
stores ``O(n)`` numbers instead of ``n·D``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

MAX_RADIX = 128  # dense H_r blocks up to this size: one BLAS GEMM beats log2(r) memory-bound butterflies


def hadamard(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix ``H_n`` (n×n, n a power of two).

    ``H_1 = [1]``, ``H_{2m} = [[H_m, H_m], [H_m, −H_m]]``.
    """
    _check_power_of_two(n)
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _check_power_of_two(n: int) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Walsh–Hadamard transform needs a power-of-two length, got {n}")


def _fwht(x: torch.Tensor, max_radix: int = MAX_RADIX) -> torch.Tensor:
    """Mixed-radix fast transform.  ``H_n = H_{n/r} ⊗ H_r``, so with x viewed as X (n/r × r),
    ``x H_n = vec(H_{n/r} X H_r)``: one GEMM with the dense ``H_r``, then recurse on ``Xᵀ``.

    The ``⌈log n / log max_radix⌉`` levels use balanced radices ``r ≤ max_radix``; each level
    costs ``n·r``, so the transform is ``O(n log n)`` for a fixed ``max_radix`` while running on
    BLAS instead of ``log2 n`` memory-bound radix-2 butterflies.
    """
    n = x.shape[-1]
    if n <= max_radix:
        return x @ hadamard(n, x.dtype, x.device)
    k = n.bit_length() - 1
    levels = -(-k // (max_radix.bit_length() - 1))
    radix = 1 << -(-k // levels)
    lead = x.shape[:-1]
    y = x.reshape(*lead, n // radix, radix) @ hadamard(radix, x.dtype, x.device)
    return _fwht(y.transpose(-1, -2), max_radix).transpose(-1, -2).reshape(*lead, n)


class _WalshHadamard(torch.autograd.Function):
    """``x ↦ x H``.  H is symmetric, so the vector–Jacobian and Jacobian–vector products are the
    transform itself (no graph of the GEMMs and transposes is kept).

    The forward is plain torch operations on the last axis, so ``vmap`` batches it by the
    generated rule; without one, the verifier's batched block re-runs fall back to a loop
    that recomputes a subspace controller's projection once per perturbed state.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, max_radix: int) -> torch.Tensor:
        return _fwht(x, max_radix)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[torch.Tensor, int], output: torch.Tensor) -> None:
        ctx.max_radix = inputs[1]

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _WalshHadamard.apply(grad, ctx.max_radix), None

    @staticmethod
    def jvp(ctx: FunctionCtx, tangent: torch.Tensor, _: None) -> torch.Tensor:
        return _WalshHadamard.apply(tangent, ctx.max_radix)


def fwht(x: torch.Tensor, max_radix: int = MAX_RADIX) -> torch.Tensor:
    """Fast Walsh–Hadamard transform ``x ↦ x H`` along the last axis, ``O(n log n)``.

    ``H`` is the unnormalised Sylvester Hadamard matrix of size ``n = x.shape[-1]``
    (a power of two, :func:`hadamard`), so ``H H = n I``.  ``max_radix`` (a power of
    two ≥ 2) bounds the dense Hadamard blocks of the mixed-radix recursion; 2 gives
    the textbook butterfly.  Differentiable in reverse and forward mode, to any order.
    """
    _check_power_of_two(x.shape[-1])
    if max_radix < 2 or max_radix & (max_radix - 1):
        raise ValueError(f"max_radix must be a power of two >= 2, got {max_radix}")
    return _WalshHadamard.apply(x, int(max_radix))


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
        # Not saved in state dicts: the seed rebuilds them, and they are as large as θ.
        self.register_buffer("sign", sign.to(like), persistent=False)
        self.register_buffer("perm", perm.to(like.device), persistent=False)
        self.register_buffer("gauss", gauss.to(like), persistent=False)
        self.register_buffer("scale", scale.to(like), persistent=False)

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
        matrix = torch.randn(n_out, dim, generator=gen, dtype=torch.float64).to(like)
        self.register_buffer("matrix", matrix, persistent=False)  # rebuilt from the seed, not saved

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
