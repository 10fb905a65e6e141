"""LoRA (Hu et al., 2021): a low-rank additive delta on linear maps.

``G``: ``W x  ->  W x + (α/r) B A x``, ``A ∈ R^{r×d_in}``, ``B ∈ R^{d_out×r}``, with
``B = 0`` at initialisation (the model is unchanged) and ``A`` Kaiming-uniform.
Controls: ``(A, B)`` of each target in each layer (layer controls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..families.base import linear_io
from .base import (
    Control,
    Controller,
    positive_float,
    positive_int,
    register,
    resolve_targets,
    seeded_generator,
    target_names,
    wrap,
)

if TYPE_CHECKING:
    from ..system import ResidualSystem


class LoRADelta(nn.Module):
    """``y = base(x) + s·(x Aᵀ) Bᵀ`` for one linear map (x: ...×d_in, y: ...×d_out)."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, gen: torch.Generator,
                 like: torch.Tensor) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=√5) on an r×d_in matrix
        a = (torch.rand(rank, d_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(like))
        self.B = nn.Parameter(torch.zeros(d_out, rank, dtype=like.dtype, device=like.device))
        self.scale = scale

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s·B A`` (d_out×d_in)."""
        return self.scale * self.B @ self.A

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base(x) + self.scale * (x @ self.A.T) @ self.B.T


@register
class LoRA(Controller):
    """Low-rank adaptation of the ``targets`` linear maps in ``layers``."""

    method = "lora"
    group = "reparameterisation"
    form = "W x -> W x + (alpha/r) B A x"

    def __init__(self, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | str = ("q", "v"),
                 layers: Sequence[int] | None = None, seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.rank = positive_int(rank, "rank", self.method)
        # alpha = 0 makes (alpha/r) B A vanish for ever: the delta would never act.
        self.alpha = positive_float(alpha, "alpha", self.method)
        self.seed = int(seed)
        self.targets = target_names(targets, self.method)
        self.layers = layers
        self.deltas = nn.ModuleDict()

    def attach(self, system: ResidualSystem) -> None:
        # A fused q/k/v map (GPT-2) carries LoRA for any of q, k, v: the standard choice.
        self.sites = resolve_targets(system, system.family.expand_targets(self.targets), self.layers)
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        for site in self.sites:
            d_in, d_out = linear_io(site.module)
            delta = LoRADelta(d_in, d_out, self.rank, self.alpha / self.rank, gen, like)
            self.deltas[site.key] = delta
            wrap(system.base, site.path, delta)

    def controls(self) -> list[Control]:
        return lora_controls(self.method, self.sites, self.deltas)


def lora_controls(method: str, sites: list, deltas: nn.ModuleDict) -> list[Control]:
    """The layer controls ``(A, B)`` of each LoRA site, named ``<method>.<layer>.<role>.A|B``."""
    out = []
    for site in sites:
        d = deltas[site.key]
        out += [Control(f"{method}.{site.layer}.{site.role}.A", d.A, "layer", (site.layer,)),
                Control(f"{method}.{site.layer}.{site.role}.B", d.B, "layer", (site.layer,))]
    return out

