"""Norms the bounds are stated in: spectral norms of (thin) matrices and real-position restrictions.

Every state norm of :mod:`controltune.bounds` is a Frobenius norm over the *real*
(non-padding) positions of an ``S×T×d`` state: padding positions never reach the
cost (keys at padding are masked, readouts pool real tokens).
"""

from __future__ import annotations

import math

import torch

from ..families.base import Context


def spectral(m: torch.Tensor) -> torch.Tensor:
    """Exact spectral norm(s) of a matrix or a batch of matrices (largest singular value, float64)."""
    return torch.linalg.matrix_norm(m.to(torch.float64), ord=2)


def spectral_norm(m: torch.Tensor) -> float:
    """``‖m‖₂`` from the largest eigenvalue of the Gram matrix of its smaller side (cheap for thin matrices)."""
    m = m.to(torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def spectral_norm_of_product(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖aᵀ b‖₂`` for thin ``a, b`` (k×n, k ≪ n) via ``aᵀ = Q_a R_a``: ``‖aᵀb‖ = ‖R_a R_bᵀ‖``."""
    ra = torch.linalg.qr(a.T.to(torch.float64), mode="r").R
    rb = torch.linalg.qr(b.T.to(torch.float64), mode="r").R
    return spectral_norm(ra @ rb.T)


def real_mask(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``S×T×1`` real-position mask of a state ``x`` (dtype of x)."""
    return ctx.attention_mask.to(x.dtype).unsqueeze(-1)


def real_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real-token rows (N×k) of an S×T×k activation (``mask`` S×T)."""
    return t[mask.bool()]


def least_norm_scale(rows: torch.Tensor, eps: float) -> float:
    """``min_t σ_t``, ``σ_t = sqrt(var(a_t) + eps)``: the least per-token scale a LayerNorm divides by (rows N×d)."""
    return float(torch.sqrt(rows.var(dim=-1, unbiased=False) + eps).min())


__all__ = ["least_norm_scale", "real_mask", "real_rows", "spectral_norm", "spectral_norm_of_product"]
