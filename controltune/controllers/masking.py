"""Masking (Zhao, Lin, Rothe & Schütze, 2020): learned binary masks over pretrained weights.

``W_eff = W ⊙ m`` with ``m = 1[s > τ]`` and real-valued scores ``s`` (one per
weight).  The threshold has zero derivative almost everywhere, so the backward
pass uses the straight-through estimator ``∂m/∂s := 1``: the gradient reaching
``s`` is ``∂J/∂W_eff ⊙ W``.  Scores start at ``init_score > τ`` (every mask
entry 1: the identity).  Running cost of block l:
``R_l = λ_s Σ σ(s − τ) + (λ/2)‖s‖²`` — ``σ(s − τ)`` is a smooth count of the
kept weights (½ at the threshold), so ``λ_s`` (``sparsity``) pushes scores below τ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Control, Controller, register, target_names
from .param_delta import ParamSite, SiteDelta, block_sites, control_of, target_parameters, wrap_owners

if TYPE_CHECKING:
    from ..system import ResidualSystem


def straight_through_mask(scores: torch.Tensor, threshold: float, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """``1[s > τ]`` in the forward pass, with gradient ``∂m/∂s = 1`` (straight through).

    With an ``anchor`` s₀ the mask is the estimator's linearisation
    ``m(s) = 1[s₀ > τ] + (s − s₀)``: equal to the binary mask at ``s = s₀`` and
    truly differentiable with ``∂m/∂s = 1`` everywhere, so finite differences of J
    along s measure exactly what the straight-through gradient claims.
    """
    if anchor is not None:
        return (anchor > threshold).to(scores.dtype) + (scores - anchor)
    hard = (scores > threshold).to(scores.dtype)
    # s − s.detach() is exactly 0, so the value is exactly the binary mask.
    return hard + (scores - scores.detach())


class MaskDelta(SiteDelta):
    """``W_eff = W ⊙ 1[s > τ]`` for the weight of one linear map (``s`` has the weight's storage shape)."""

    def __init__(self, site: ParamSite, threshold: float, init_score: float) -> None:
        super().__init__([site])
        self.name, self.threshold = site.name, float(threshold)
        self.scores = nn.Parameter(torch.full(site.param.shape, float(init_score), dtype=site.param.dtype,
                                              device=site.param.device))
        self.anchor: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        return straight_through_mask(self.scores, self.threshold, self.anchor)

    def apply(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.name: theta[self.name] * self.mask()}


@register
class Masking(Controller):
    """Learned binary masks on the weights of ``targets`` (default: every linear map of the blocks).

    Options: ``targets`` (roles, ``re:`` or suffixes; default the family's
    ``linear_roles``), ``layers``, ``threshold`` τ (5e-3), ``init_score``
    (1e-2 > τ), ``sparsity`` λ_s (0), ``weight_decay`` λ on the scores (0).
    """

    method = "masking"
    dense = True
    group = "specification"
    form = "W -> W ⊙ 1[s > τ] (straight-through gradient to s)"

    def __init__(self, targets: Sequence[str] | str | None = None, layers: Sequence[int] | None = None,
                 threshold: float = 5e-3, init_score: float = 1e-2, sparsity: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        if not init_score > threshold:
            raise ValueError(f"init_score ({init_score}) must exceed threshold ({threshold}) so the masks "
                             "start as all ones (the identity)")
        if sparsity < 0:
            raise ValueError(f"sparsity must be >= 0, got {sparsity}")
        self.targets = None if targets is None else target_names(targets, self.method)
        self.layers, self.threshold, self.init_score = layers, float(threshold), float(init_score)
        self.sparsity = float(sparsity)
        self.deltas = nn.ModuleDict()
        self._sites: list[ParamSite] = []

    def attach(self, system: ResidualSystem) -> None:
        if self._sites:
            raise RuntimeError("this masking controller is already attached; create a new one")
        targets = self.targets if self.targets is not None else system.family.linear_roles
        self._sites = target_parameters(system, targets, self.layers, names=("weight",))
        self.deltas.update(wrap_owners(self._sites, lambda owner, group: MaskDelta(group[0], self.threshold,
                                                                                    self.init_score)))
        self.sites = block_sites(self._sites)

    def controls(self) -> list[Control]:
        return [control_of(self.method, s, self.deltas[s.owner_key].scores, ".scores") for s in self._sites]

    def running_cost(self, where: int | str) -> torch.Tensor:
        """``R_l = λ_s Σ σ(s − τ) + (λ/2)‖s‖²`` over the masks of block ``where``."""
        total = super().running_cost(where)
        if self.sparsity and isinstance(where, int):
            for s in self._sites:
                if s.layer == where:
                    scores = self.deltas[s.owner_key].scores
                    total = total + self.sparsity * torch.sigmoid(scores - self.threshold).sum()
        return total

    @contextlib.contextmanager
    def straight_through_linearisation(self) -> Iterator[None]:
        """Masks become ``1[s₀ > τ] + (s − s₀)`` at the current scores s₀ (see :func:`straight_through_mask`)."""
        deltas = [self.deltas[s.owner_key] for s in self._sites]
        for d in deltas:
            d.anchor = d.scores.detach().clone()
        try:
            yield
        finally:
            for d in deltas:
                d.anchor = None

    @torch.no_grad()
    def density(self) -> float:
        """Fraction of masked weights that are kept (1 at init)."""
        kept = sum(int((self.deltas[s.owner_key].scores > self.threshold).sum()) for s in self._sites)
        return kept / max(1, sum(s.numel() for s in self._sites))
