"""LoRA designed from the co-state: a one-step MSA initialisation and controllability-guided placement.

``costate_lora`` — same structure as LoRA (``W x -> W x + s·B A x``, s = α/r), different start.
One MSA step with running cost ``(λ/2)‖ΔW‖²`` maximises ``H`` in ``ΔW``:
``ΔW* = (1/λ) ∇_W H = (1/λ) G_W`` with the map-level co-state product

    G_W = −∂J/∂W = Σ_{s,t} g_{s,t} a_{s,t}ᵀ     (g: back-propagated signal at the map's output, a: its input).

Under the rank constraint ``rank ΔW ≤ r`` the best step is the truncated SVD (Eckart–Young):
``s·B A = η·U_r Σ_r V_rᵀ`` of ``G_W``, split as ``B = U_r (ηΣ_r/s)^{1/2}``, ``A = (ηΣ_r/s)^{1/2} V_rᵀ``.
**The base weight is not compensated**: the model starts exactly one MSA step away from the
pretrained one.  The step ``η = 1/λ`` is either given (``step=<float>``) or chosen by a line
search (``step="auto"``): ``G_W`` comes from the first half of the design batch and ``η`` minimises
J on the second half over ``η_0·2^{-j}``, j = 0..8, ``η_0`` the step changing the target weights by
10 % in Frobenius norm; when no grid step lowers the held-out J, the smallest one is kept (the
search is recorded in ``report``).  Standard LoRA instead starts at ``B = 0`` (the pretrained model) with a
random ``A``.

``gramian_lora`` — standard LoRA modules (rank r, B = 0) on the candidate linear maps chosen
greedily under a parameter budget (:func:`controltune.design.placement.greedy_allocate`) by their
readout-weighted controllability-Gramian trace (``score="gramian"``,
:func:`controltune.design.gramian.module_gramian_scores`) or their co-state energy
``‖∇_W H‖²`` (``score="costate"``).  Default budget: that of LoRA with the same rank on q and v of
every layer, so the two compare at equal trainable-parameter counts.

Both take a design batch like every control-designed controller: ``design_batch`` or ``n_design``
seeded *training* examples of ``task``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..design.gramian import costate_energy, hamiltonian_gradients, module_gramian_scores
from ..design.linearize import design_batch as load_design_batch
from ..design.placement import allocation_cost, greedy_allocate
from ..families.base import dense_weight, linear_io
from .base import (
    Control,
    Controller,
    Site,
    UnsupportedMethodError,
    positive_float,
    positive_int,
    register,
    resolve_targets,
    seeded_generator,
    target_names,
    wrap,
)
from .lora import LoRADelta, _key, lora_controls

SCORES = ("gramian", "costate")


def _gpt2_targets(system, targets: tuple[str, ...]) -> tuple[str, ...]:
    if system.family.name != "gpt2":
        return targets
    return tuple(dict.fromkeys("qkv" if t in ("q", "k", "v") else t for t in targets))


def _design_batch(ctrl, system) -> dict:
    if ctrl.design_batch is not None:
        return ctrl.design_batch
    return load_design_batch(system, ctrl.task, ctrl.n_design, ctrl.design_seed, ctrl.max_length)


def _half(batch: dict, first: bool) -> dict:
    s = batch["input_ids"].shape[0]
    cut = s // 2
    sl = slice(0, cut) if first else slice(cut, s)
    return {k: v[sl] for k, v in batch.items()}


def truncated_svd(G: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``(U_r d_out×r, σ_r r, V_rᵀ r×d_in)`` of ``G`` (computed in float64)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


class _DesignedLoRA(Controller):
    """Shared plumbing: LoRA deltas on resolved sites, controls named like LoRA's."""

    group = "reparameterisation"

    def _init_common(self, rank: int, alpha: float, layers, task: str, n_design: int, design_seed: int,
                     max_length: int, design_batch: dict | None, seed: int) -> None:
        self.rank = positive_int(rank, "rank", self.method)
        self.alpha = positive_float(alpha, "alpha", self.method)
        self.layers, self.seed = layers, int(seed)
        self.task, self.design_seed = task, int(design_seed)
        self.n_design = positive_int(n_design, "n_design", self.method)
        self.max_length = positive_int(max_length, "max_length", self.method)
        self.design_batch = design_batch
        self.deltas = nn.ModuleDict()
        self.ranks: dict[str, int] = {}
        self.report: dict = {}

    def _attach_lora(self, system, sites: list[Site], ranks: dict[str, int]) -> None:
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        for site in sites:
            r = ranks[_key(site)]
            if r < 1:
                continue
            d_in, d_out = linear_io(site.module)
            delta = LoRADelta(d_in, d_out, r, self.alpha / r, gen, like)
            self.deltas[_key(site)] = delta
            self.ranks[_key(site)] = r
            self.sites.append(site)
            wrap(system.base, site.path, delta)

    def controls(self) -> list[Control]:
        return lora_controls(self.method, self.sites, self.deltas)


@register
class CostateLoRA(_DesignedLoRA):
    """LoRA started one rank-r MSA step away: ``s·B A = η·trunc_r(−∂J/∂W)``."""

    method = "costate_lora"
    form = "W x -> W x + (alpha/r) B A x,  (alpha/r) B A = step * top-r SVD of G_W = -dJ/dW at init"

    def __init__(self, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | str = ("q", "v"),
                 layers: Sequence[int] | None = None, step: float | str = "auto", task: str = "sst2",
                 n_design: int = 32, design_seed: int = 0, max_length: int = 64, design_batch: dict | None = None,
                 seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self._init_common(rank, alpha, layers, task, n_design, design_seed, max_length, design_batch, seed)
        self.targets = target_names(targets, self.method)
        if not (step == "auto" or (isinstance(step, (int, float)) and step > 0)):
            raise ValueError(f"costate_lora: step must be 'auto' or a positive number, got {step!r}")
        self.step = step

    def attach(self, system) -> None:
        sites = resolve_targets(system, _gpt2_targets(system, self.targets), self.layers)
        batch = _design_batch(self, system)
        self._attach_lora(system, sites, {_key(s): self.rank for s in sites})
        self.calibrate(system, batch)

    def directions(self, system, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per site key, the top-r SVD of the map-level co-state ``G_W = −∂J/∂W`` (dense d_out×d_in)."""
        weights = {_key(s): s.module.weight for s in self.sites}
        with _bypassed(self):
            grads = hamiltonian_gradients(system, batch, weights)
        out = {}
        for site in self.sites:
            g = grads[_key(site)]
            g = g.T if type(site.module).__name__ == "Conv1D" else g
            out[_key(site)] = truncated_svd(g, self.ranks[_key(site)])
        return out

    @torch.no_grad()
    def set_step(self, svds: dict, step: float) -> None:
        """Factors with ``s·B A = step·U_r Σ_r V_rᵀ`` on every site."""
        for key, (U, S, Vh) in svds.items():
            d = self.deltas[key]
            root = (step * S / d.scale).sqrt()
            d.B.copy_((U * root).to(d.B))
            d.A.copy_((root[:, None] * Vh).to(d.A))

    def calibrate(self, system, batch: dict) -> None:
        """Set the factors from ``batch`` (module docstring); records the line search in ``report``."""
        s = batch["input_ids"].shape[0]
        auto = self.step == "auto"
        if auto and s < 2:
            raise ValueError("costate_lora with step='auto' needs a design batch of >= 2 sequences")
        grad_batch = _half(batch, True) if auto else batch
        svds = self.directions(system, grad_batch)
        if not auto:
            self.set_step(svds, float(self.step))
            self.report = {"step": float(self.step)}
            return
        w_norm = math.sqrt(sum(float(dense_weight(st.module).pow(2).sum()) for st in self.sites))
        d_norm = math.sqrt(sum(float(S.pow(2).sum()) for _, S, _ in svds.values()))
        if d_norm == 0.0:
            raise ValueError("costate_lora: −∂J/∂W is zero on the design batch; nothing to initialise from")
        eta0 = 0.1 * w_norm / d_norm
        search = _half(batch, False)
        trials = []
        with torch.no_grad():
            self.set_step(svds, 0.0)
            j0 = float(system.cost(search))
            for j in range(9):
                eta = eta0 * 2.0 ** -j
                self.set_step(svds, eta)
                trials.append((float(system.cost(search)), eta))
        best_j, best_eta = min(trials)
        if best_j >= j0:  # no decrease on held-out rows: take the smallest step of the grid
            best_j, best_eta = trials[-1]
        self.set_step(svds, best_eta)
        self.report = {"step": best_eta, "J0_search": j0, "J_search": best_j, "grid": trials,
                       "sigma_r": {k: S.tolist() for k, (_, S, _) in svds.items()}}


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

    def default_budget(self, system) -> int:
        """Trainable parameters of LoRA with this rank on q and v of every layer."""
        sites = resolve_targets(system, _gpt2_targets(system, ("q", "v")), None)
        return sum(self.rank * sum(linear_io(s.module)) for s in sites)

    def attach(self, system) -> None:
        targets = self.targets or system.family.linear_roles
        if not targets:
            raise UnsupportedMethodError(f"gramian_lora: family {system.family.name!r} lists no linear roles; "
                                         "pass targets=")
        sites = resolve_targets(system, targets, self.layers)
        budget = self.default_budget(system) if self.budget is None else int(self.budget)
        batch = _design_batch(self, system)
        scores = self.scores(system, batch, sites)
        costs = {_key(s): self.rank * sum(linear_io(s.module)) for s in sites}
        units = greedy_allocate({k: [v] for k, v in scores.items()}, costs, budget)
        self._attach_lora(system, sites, {k: self.rank * u for k, u in units.items()})
        self.report = {"budget": budget, "used": allocation_cost(units, costs), "scores": scores,
                       "chosen": sorted(k for k, u in units.items() if u)}

    def scores(self, system, batch: dict, sites: list[Site]) -> dict[str, float]:
        """Score of a full-rank ``ΔW`` control on each site (``score`` option)."""
        weights = {_key(s): s.module.weight for s in sites}
        if self.score == "costate":
            return costate_energy(system, batch, weights)
        return module_gramian_scores(system, batch, weights, self.n_probes, self.probe, self.seed)


class _bypassed:
    """Context: the controller's LoRA deltas contribute nothing (scale 0), restored on exit."""

    def __init__(self, ctrl: _DesignedLoRA) -> None:
        self.ctrl = ctrl
        self.saved: dict[str, float] = {}

    def __enter__(self) -> None:
        for k, d in self.ctrl.deltas.items():
            self.saved[k] = d.scale
            d.scale = 0.0

    def __exit__(self, *exc) -> None:
        for k, d in self.ctrl.deltas.items():
            d.scale = self.saved[k]
