"""``gramian_lora`` — LoRA placed by controllability: standard LoRA modules (rank r, B = 0) on the
candidate linear maps chosen greedily under a parameter budget
(:func:`controltune.design.placement.greedy_allocate`) by their readout-weighted
controllability-Gramian trace (``score="gramian"``, :func:`controltune.design.gramian.module_gramian_scores`)
or their co-state energy ``‖∇_W H‖²`` (``score="costate"``).  Default budget: that of LoRA with the
same rank on q and v of every layer, so the two compare at equal trainable-parameter counts.

It takes a design batch like every control-designed controller: ``design_batch`` or ``n_design``
seeded *training* examples of ``task``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...design.gramian import costate_energy, module_gramian_scores
from ...design.placement import allocation_cost, greedy_allocate
from ...families.base import linear_io
from ..base import Site, UnsupportedMethodError, register, resolve_targets, target_names
from .designed_lora import _design_batch, _DesignedLoRA

if TYPE_CHECKING:
    from ...system import ResidualSystem

SCORES = ("gramian", "costate")


@register
class GramianLoRA(_DesignedLoRA):
    """Standard LoRA on the modules a greedy budget allocation picks by controllability scores."""

    method = "gramian_lora"
    form = "W x -> W x + (alpha/r) B A x on the modules with the largest readout-weighted Gramian trace per parameter"

    def __init__(self, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | str | None = None,
                 layers: Sequence[int] | None = None, budget: int | None = None, score: str = "gramian",
                 n_probes: int = 4, probe: str = "vjp", task: str = "sst2", n_design: int = 32, design_seed: int = 0,
                 max_length: int = 64, design_batch: dict | None = None, seed: int = 0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self._init_common(rank, alpha, layers, task, n_design, design_seed, max_length, design_batch, seed)
        if score not in SCORES:
            raise ValueError(f"gramian_lora: score {score!r} is not one of {SCORES}")
        self.targets = None if targets is None else target_names(targets, self.method)
        self.budget, self.score, self.n_probes, self.probe = budget, score, int(n_probes), probe

    def default_budget(self, system: ResidualSystem) -> int:
        """Trainable parameters of LoRA with this rank on q and v of every layer."""
        sites = resolve_targets(system, system.family.expand_targets(("q", "v")), None)
        return sum(self.rank * sum(linear_io(s.module)) for s in sites)

    def attach(self, system: ResidualSystem) -> None:
        targets = self.targets or system.family.linear_roles
        if not targets:
            raise UnsupportedMethodError(f"gramian_lora: family {system.family.name!r} lists no linear roles; "
                                         "pass targets=")
        sites = resolve_targets(system, targets, self.layers)
        budget = self.default_budget(system) if self.budget is None else int(self.budget)
        batch = _design_batch(self, system)
        scores = self.scores(system, batch, sites)
        costs = {s.key: self.rank * sum(linear_io(s.module)) for s in sites}
        units = greedy_allocate({k: [v] for k, v in scores.items()}, costs, budget)
        self._attach_lora(system, sites, {k: self.rank * u for k, u in units.items()})
        self.report = {"budget": budget, "used": allocation_cost(units, costs), "scores": scores,
                       "chosen": sorted(k for k, u in units.items() if u)}

    def scores(self, system: ResidualSystem, batch: dict, sites: list[Site]) -> dict[str, float]:
        """Score of a full-rank ``ΔW`` control on each site (``score`` option)."""
        weights = {s.key: s.module.weight for s in sites}
        if self.score == "costate":
            return costate_energy(system, batch, weights)
        return module_gramian_scores(system, batch, weights, self.n_probes, self.probe, self.seed)
