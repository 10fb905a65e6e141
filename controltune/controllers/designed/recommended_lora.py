"""``recommended_lora`` — LoRA whose targets, ranks and initial value come from the co-state.

On a design batch of training rows, split in a *score* half and a held-out *search* half:

1. **Scores.**  For every candidate linear map W (all of the family's linear roles by default)
   the map-level co-state product ``G_W = ∇_W H = −∂J/∂W`` (one reverse pass for all maps) and
   its singular values ``σ_1 ≥ σ_2 ≥ …``.  A rank-r delta ``ΔW = η·trunc_r(G_W)`` lowers J by
   ``η Σ_{i≤r} σ_i²`` to first order at ``‖ΔW‖_F = η (Σ_{i≤r} σ_i²)^{1/2}``: under one norm
   budget over all maps the first-order decrease is ``Δ·(Σ_selected σ²)^{1/2}``, so the best
   use of parameters takes the singular triplets with the largest ``σ_i²`` per parameter.
2. **Ranks.**  :func:`~controltune.design.placement.greedy_allocate` with unit i of map W
   worth ``σ_i²`` at ``d_in + d_out`` parameters (one rank), at most ``max_rank`` per map, under
   the parameter ``budget`` (default: LoRA rank 8 on q and v of every layer).  Maps that get
   rank 0 carry no delta.  Each map's ``α = alpha_per_rank · r`` (LoRA's scale ``α/r`` the same
   everywhere).
3. **Initial value** (``init="costate"``).  ``s·B A = η·trunc_r(G_W)`` on every chosen map,
   split as in ``costate_lora``, with η from a trust region on the search half
   (:func:`~controltune.design.trust_region.trust_region_radius`: the largest radius
   ``Δ ∈ {radius·‖W_chosen‖_F·2^{−k}, k = 0..16}`` whose held-out decrease is at least a quarter of the
   predicted one).
   When no radius qualifies, or with ``init="standard"``, the factors are LoRA's own start
   (``B = 0``, ``A`` Kaiming-uniform).  The base weights are not compensated: the model starts one
   accepted step away from the pretrained one.

``report`` records the scores, the ranks, the budget used and the trust-region trials;
:func:`controltune.peft_export.to_peft` writes the result as a peft LoRA folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ...design.gramian import weight_costate_products
from ...design.placement import allocation_cost, greedy_allocate
from ...design.trust_region import trust_region_radius
from ...families.base import dense_weight, linear_io, to_dense
from ..base import UnsupportedMethodError, positive_float, positive_int, register, resolve_targets, target_names
from .designed_lora import _design_batch, _DesignedLoRA, _half, truncated_svd

if TYPE_CHECKING:
    from ...system import ResidualSystem
    from ..base import Site

INITS = ("costate", "standard")
TRUST_STEPS = 16
"""Radii tried below the largest, halving each time (down to 2^-16 of it): on SmolLM2 the co-state step raised the
held-out cost at every radius down to 2^-8 of 5 % of the weights' norm (massive activations)."""


@register
class RecommendedLoRA(_DesignedLoRA):
    """LoRA on the maps and at the ranks that the co-state's singular values recommend, started by a trust region."""

    method = "recommended_lora"
    form = ("W x -> W x + (alpha_W/r_W) B A x, r_W from the singular values of G_W = -dJ/dW per parameter, "
            "(alpha/r) B A = eta * top-r SVD of G_W with eta from a trust region")

    def __init__(self, budget: int | None = None, max_rank: int = 16, alpha_per_rank: float = 2.0,
                 targets: Sequence[str] | str | None = None, layers: Sequence[int] | None = None,
                 init: str = "costate", radius: float = 0.05, task: str = "sst2", n_design: int = 64,
                 design_seed: int = 0, max_length: int = 64, design_batch: dict | None = None, seed: int = 0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self._init_common(max_rank, alpha_per_rank * max_rank, layers, task, n_design, design_seed, max_length,
                          design_batch, seed)
        self.max_rank = self.rank
        self.alpha_per_rank = positive_float(alpha_per_rank, "alpha_per_rank", self.method)
        self.budget = None if budget is None else positive_int(budget, "budget", self.method)
        self.targets = None if targets is None else target_names(targets, self.method)
        if init not in INITS:
            raise ValueError(f"recommended_lora: init {init!r} is not one of {', '.join(INITS)}")
        self.init = init
        self.radius = positive_float(radius, "radius", self.method)

    def default_budget(self, system: ResidualSystem) -> int:
        """Trainable parameters of LoRA rank 8 on q and v of every layer."""
        sites = resolve_targets(system, system.family.expand_targets(("q", "v")), None)
        return sum(8 * sum(linear_io(s.module)) for s in sites)

    def attach(self, system: ResidualSystem) -> None:
        targets = self.targets or system.family.linear_roles
        if not targets:
            raise UnsupportedMethodError(f"recommended_lora: family {system.family.name!r} lists no linear roles; "
                                         "pass targets=")
        sites = resolve_targets(system, system.family.expand_targets(targets), self.layers)
        batch = _design_batch(self, system)
        if batch["input_ids"].shape[0] < 2:
            raise ValueError("recommended_lora needs a design batch of >= 2 sequences (a score and a search half)")
        budget = self.default_budget(system) if self.budget is None else self.budget
        svds = self.singular_triplets(system, _half(batch, True), sites)
        gains = {k: (S ** 2).tolist() for k, (_, S, _) in svds.items()}
        costs = {s.key: sum(linear_io(s.module)) for s in sites}
        ranks = greedy_allocate(gains, costs, budget)
        if not any(ranks.values()):
            raise ValueError(f"recommended_lora: a budget of {budget} parameters does not fit one rank of any "
                             f"target (the smallest costs {min(costs.values())})")
        self._attach_lora(system, sites, ranks)
        for delta in self.deltas.values():
            delta.scale = self.alpha_per_rank  # α_W / r_W with α_W = alpha_per_rank · r_W
        self.report = {"budget": budget, "used": allocation_cost(ranks, costs), "ranks": dict(self.ranks),
                       "scores": {k: float(sum(g)) for k, g in gains.items()},
                       "top_sigma2": {k: g[:4] for k, g in gains.items()}, "init": self.init}
        if self.init == "costate":
            self.start(system, {k: (U[:, :r], S[:r], Vh[:r]) for k, (U, S, Vh) in svds.items()
                                if (r := self.ranks.get(k, 0))}, _half(batch, False))

    def singular_triplets(self, system: ResidualSystem, batch: dict,
                          sites: Sequence[Site]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per site key, the top-``max_rank`` SVD of ``G_W = −∂J/∂W`` (dense d_out×d_in)."""
        grads = weight_costate_products(system, batch, {s.key: s.module.weight for s in sites})
        return {s.key: truncated_svd(to_dense(s.module, grads[s.key]), self.max_rank) for s in sites}

    @torch.no_grad()
    def set_step(self, svds: dict, eta: float) -> None:
        """Factors with ``s·B A = η·U_r Σ_r V_rᵀ`` on every chosen site."""
        for key, (U, S, Vh) in svds.items():
            d = self.deltas[key]
            root = (eta * S / d.scale).sqrt()
            d.B.copy_((U * root).to(d.B))
            d.A.copy_((root[:, None] * Vh).to(d.A))

    @torch.no_grad()
    def start(self, system: ResidualSystem, svds: dict, search: dict) -> None:
        """The trust-region start (module docstring, step 3); LoRA's own start when no radius is accepted."""
        standard = {k: (d.A.detach().clone(), d.B.detach().clone()) for k, d in self.deltas.items()}
        norm_d = math.sqrt(sum(float((S ** 2).sum()) for _, S, _ in svds.values()))
        w_norm = math.sqrt(sum(float(dense_weight(s.module).pow(2).sum()) for s in self.sites))

        def cost(eta: float) -> float:
            self.set_step(svds, eta)
            return float(system.cost(search))

        step = trust_region_radius(cost, norm_d, self.radius * w_norm, steps=TRUST_STEPS)
        if step.radius > 0:
            self.set_step(svds, step.eta)
        else:
            for k, (a, b) in standard.items():
                self.deltas[k].A.copy_(a)
                self.deltas[k].B.copy_(b)
        self.report["trust_region"] = {"radius": step.radius, "eta": step.eta, "j0": step.j0, "trials": step.trials,
                                       "radius0": self.radius * w_norm, "direction_norm": norm_d,
                                       "accepted": step.radius > 0}
