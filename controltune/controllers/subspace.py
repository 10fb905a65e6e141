"""Intrinsic-subspace tuning (Li et al., 2018; Aghajanyan, Zettlemoyer & Gupta, 2021).

One vector ``z ∈ R^D`` (zero at init: the identity) drives every block parameter
through a fixed, seeded random projection: ``θ = θ₀ + P z``.  ``P`` is a dense
Gaussian with columns normalised to unit length when ``N·D`` is small, else the
structured Fastfood transform (``controltune.fastfood``), also with (nearly)
unit-norm columns, so ``‖Δθ‖ ≈ ‖z‖`` either way.

``z`` is a *shared* control of every block.  ``P`` is split by the module owning
each parameter and ``P_m z`` is computed inside that module's forward, i.e.
inside block l's ``f_l``: a vector–Jacobian product through block l alone gives
exactly block l's term ``P_lᵀ ∂J/∂θ_l`` of ``∂J/∂z = Σ_l P_lᵀ ∂J/∂θ_l``, so
``−∂J/∂z = Σ_l ∇_z H_l`` holds block by block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..fastfood import DenseProjection, FastfoodProjection
from .base import Control, Controller, positive_int, register, seeded_generator
from .param_delta import ParamSite, SiteDelta, block_parameters, block_sites, wrap_owners

if TYPE_CHECKING:
    from ..system import ResidualSystem

PROJECTIONS = ("auto", "dense", "fastfood")


class SubspaceDelta(SiteDelta):
    """``θ_m = θ₀_m + P_m z`` for the parameters of one module; ``z`` is the controller's shared vector."""

    def __init__(self, sites: Sequence[ParamSite], z: nn.Parameter, projection: nn.Module) -> None:
        super().__init__(sites)
        self.shapes = [s.param.shape for s in sites]
        self.sizes = [s.numel() for s in sites]
        self.projection = projection
        # A plain list, so z is not registered again under every module (it belongs to the controller).
        self._z = [z]

    def apply(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = self.projection(self._z[0]).split(self.sizes)
        return {n: theta[n] + d.view(shape) for n, d, shape in zip(self.param_names, parts, self.shapes)}


@register
class Subspace(Controller):
    """Intrinsic-subspace tuning of every parameter of the blocks in ``layers``.

    Options: ``dim`` D (100), ``which`` projection ``auto|dense|fastfood``,
    ``dense_limit`` (auto uses the dense matrix when ``N·D`` ≤ it, 2²⁴),
    ``layers``, ``seed``, ``weight_decay`` λ on ``z``.
    Control: ``subspace.z`` (D,), kind ``shared``, layers = every tuned block.
    """

    method = "subspace"
    dense = True
    group = "reparameterisation"
    form = "θ -> θ0 + P z, z ∈ R^D shared by every block, P a seeded random projection (dense or Fastfood)"

    def __init__(self, dim: int = 100, which: str = "auto", dense_limit: int = 2 ** 24,
                 layers: Sequence[int] | None = None, seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        if which not in PROJECTIONS:
            raise ValueError(f"{self.method}: which={which!r} is not a projection; accepted: {', '.join(PROJECTIONS)}")
        self.dim, self.which = positive_int(dim, "dim", self.method), which
        self.dense_limit = positive_int(dense_limit, "dense_limit", self.method)
        self.layers, self.seed = layers, int(seed)
        self.z: nn.Parameter | None = None
        self.deltas = nn.ModuleDict()
        self._sites: list[ParamSite] = []
        self.projection_kind = ""

    def attach(self, system: ResidualSystem) -> None:
        if self.z is not None:
            raise RuntimeError("this subspace controller is already attached; create a new one")
        self._sites = block_parameters(system, self.layers)
        n_total = sum(s.numel() for s in self._sites)
        if self.which == "auto":
            self.projection_kind = "dense" if n_total * self.dim <= self.dense_limit else "fastfood"
        else:
            self.projection_kind = self.which
        like = self._sites[0].param
        self.z = nn.Parameter(torch.zeros(self.dim, dtype=like.dtype, device=like.device))
        gen = seeded_generator(self.seed)
        cls = DenseProjection if self.projection_kind == "dense" else FastfoodProjection

        def make(owner: nn.Module, group: list[ParamSite]) -> SubspaceDelta:
            proj = cls(sum(s.numel() for s in group), self.dim, gen, like)
            return SubspaceDelta(group, self.z, proj)

        self.deltas.update(wrap_owners(self._sites, make))
        self._normalise_columns()
        self.sites = block_sites(self._sites)

    @torch.no_grad()
    def _normalise_columns(self) -> None:
        """Scale the split projection so the whole ``P`` (N×D) has unit-norm columns."""
        projections = [d.projection for d in self.deltas.values()]
        if self.projection_kind == "dense":
            norms = torch.stack([p.column_sq_norms() for p in projections]).sum(0).sqrt()
            for p in projections:
                p.rescale(1.0 / norms)
        else:
            # Each Fastfood block has exactly unit-norm columns; stacking m of them multiplies norms by √m.
            n_blocks = sum(p.n_blocks for p in projections)
            for p in projections:
                p.rescale(1.0 / math.sqrt(n_blocks))

    def controls(self) -> list[Control]:
        if self.z is None:
            return []
        layers = tuple(sorted({s.layer for s in self._sites}))
        return [Control("subspace.z", self.z, "shared", layers)]

    @torch.no_grad()
    def projection_matrix(self) -> torch.Tensor:
        """The explicit ``P`` (N×D), rows in :func:`block_parameters` order (small models only)."""
        return torch.cat([d.projection.dense() for d in self.deltas.values()])
