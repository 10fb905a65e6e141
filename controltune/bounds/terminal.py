"""Lipschitz constants of the terminal cost ``Φ̄(x_L) = (1/S) Σ_s Φ(x_{s,L}, y_s; u_term)`` in ``x_L``.

The certified constant composes the readout for the classification head:
``Φ = CE(W pool(norm(x_L)) + b, y)`` with ``‖∇_z CE‖₂ = ‖softmax(z) − e_y‖₂ ≤ sqrt(2)``,
mean pooling over ``n_s`` real tokens of norm ``1/sqrt(n_s)`` and the final norm's
LayerNorm constant ``‖γ‖_∞ / σ_min`` (pre-LN decoders; none for post-LN encoders).
The trajectory-local one is ``‖∂Φ̄/∂x_L‖`` at the data.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..controllers.base import UnsupportedMethodError
from ..families.base import Context
from .norms import least_norm_scale, real_mask, real_rows, spectral_norm

if TYPE_CHECKING:
    from ..system import ResidualSystem


def _pool_weights(system: ResidualSystem, ctx: Context) -> torch.Tensor:
    pooling = getattr(system.readout, "pooling", None)
    if pooling is None:
        raise UnsupportedMethodError("Lipschitz constants of Φ are derived for the classification readout only")
    n = ctx.attention_mask.sum(1).to(torch.float64)
    return n.rsqrt() if pooling == "mean" else torch.ones_like(n)


def final_norm_sigma(system: ResidualSystem, x_last: torch.Tensor, ctx: Context) -> float | None:
    """Least per-token σ of the final norm's input (pre-LN decoders), None without a final norm."""
    norm = system.readout.norm
    if isinstance(norm, nn.Identity):
        return None
    return least_norm_scale(real_rows(x_last.detach(), ctx.attention_mask), float(norm.eps))


def terminal_lipschitz(system: ResidualSystem, ctx: Context, sigma_min: float | None = None) -> float:
    """Certified Lipschitz constant of ``Φ̄ = (1/S) Σ_s CE(W pool(norm(x_{s,L})) + b, y_s)`` in x_L.

    ``‖∇_z CE‖₂ = ‖softmax(z) − e_y‖₂ ≤ sqrt(2)``; mean pooling over n_s tokens has
    norm ``1/sqrt(n_s)``; Cauchy–Schwarz over sequences gives
    ``sqrt(2)·‖W‖₂·L_norm·sqrt(Σ_s w_s²)/S``.  ``sigma_min`` is the final norm's
    domain (default ``sqrt(eps)``: global).
    """
    w = _pool_weights(system, ctx)
    head = system.readout.head.weight.detach()
    l_norm = 1.0
    norm = system.readout.norm
    if not isinstance(norm, nn.Identity):
        s = sigma_min if sigma_min is not None else math.sqrt(float(norm.eps))
        l_norm = float(norm.weight.detach().abs().max()) / s
    return math.sqrt(2.0) * spectral_norm(head) * l_norm * float(w.pow(2).sum().sqrt()) / w.numel()


def local_terminal_lipschitz(system: ResidualSystem, x_last: torch.Tensor, ctx: Context, batch: dict) -> float:
    """``‖∂Φ̄/∂x_L‖`` at ``x_L`` (the trajectory-local constant of the scalar terminal cost)."""
    x = x_last.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(system.terminal_cost(x, ctx, batch), x)
    return float((g * real_mask(g, ctx)).norm())


__all__ = ["final_norm_sigma", "local_terminal_lipschitz", "terminal_lipschitz"]
