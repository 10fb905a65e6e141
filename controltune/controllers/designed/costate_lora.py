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

It takes a design batch like every control-designed controller: ``design_batch`` or ``n_design``
seeded *training* examples of ``task``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ...design.gramian import weight_costate_products
from ...families.base import dense_weight, to_dense
from ..base import register, resolve_targets, target_names
from .designed_lora import _bypassed, _design_batch, _DesignedLoRA, _half, truncated_svd

if TYPE_CHECKING:
    from ...system import ResidualSystem


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

    def attach(self, system: ResidualSystem) -> None:
        sites = resolve_targets(system, system.family.expand_targets(self.targets), self.layers)
        batch = _design_batch(self, system)
        self._attach_lora(system, sites, {s.key: self.rank for s in sites})
        self.calibrate(system, batch)

    def directions(self, system: ResidualSystem, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                   torch.Tensor]]:
        """Per site key, the top-r SVD of the map-level co-state ``G_W = −∂J/∂W`` (dense d_out×d_in)."""
        weights = {s.key: s.module.weight for s in self.sites}
        with _bypassed(self):
            grads = weight_costate_products(system, batch, weights)
        out = {}
        for site in self.sites:
            g = grads[site.key]
            g = to_dense(site.module, g)
            out[site.key] = truncated_svd(g, self.ranks[site.key])
        return out

    @torch.no_grad()
    def set_step(self, svds: dict, step: float) -> None:
        """Factors with ``s·B A = step·U_r Σ_r V_rᵀ`` on every site."""
        for key, (U, S, Vh) in svds.items():
            d = self.deltas[key]
            root = (step * S / d.scale).sqrt()
            d.B.copy_((U * root).to(d.B))
            d.A.copy_((root[:, None] * Vh).to(d.A))

    def calibrate(self, system: ResidualSystem, batch: dict) -> None:
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
