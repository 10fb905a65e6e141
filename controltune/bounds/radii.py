"""The radii of an enclosed activation, the unit every rule of the certified enclosure passes on.

On the ball ``‖u − u*‖ ≤ ε`` of controls around the trained ones, an activation ``h(u)`` is enclosed per token
by three radii (:mod:`controltune.bounds.enclosure`): ``rho ≥ ‖h(u) − h(u*)‖``, ``a ≥ ‖∂h/∂u‖`` and
``b ≥ ‖∂²h/∂u²‖`` on the ball.  Its own module because both the block rules (``enclosure``) and the attention
rules (``attention_enclosure``, which ``enclosure`` imports) pass them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Radii:
    """``(rho, a, b)``: enclosure, first- and second-derivative radii per token (each ``S×T``)."""

    rho: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    @staticmethod
    def zeros(like: torch.Tensor) -> Radii:
        z = torch.zeros_like(like)
        return Radii(z, z.clone(), z.clone())

    def __add__(self, other: Radii) -> Radii:
        return Radii(self.rho + other.rho, self.a + other.a, self.b + other.b)

    def scale(self, k: float | torch.Tensor) -> Radii:
        return Radii(self.rho * k, self.a * k, self.b * k)

    def masked(self, mask: torch.Tensor) -> Radii:
        return Radii(self.rho * mask, self.a * mask, self.b * mask)


@dataclass
class State:
    """An enclosed activation: radii in its own space (``x``) and, for a LayerNorm output
    ``γ ⊙ n + β``, the radii of the normalised vector n (``z``) with ``gamma`` (γ)."""

    x: Radii
    z: Radii | None = None
    gamma: torch.Tensor | None = None
