"""Riccati-designed low-rank state feedback on the residual stream (``riccati_feedback``).

Formerly registered as ``riccati_lora`` (still accepted, deprecated): it is additive state
feedback around a block, not a low-rank weight delta.

Structure (a rank-m linear parallel branch around block l, a LoRA of the block's identity path):

    x_{l+1,t} = f_l(x_l)_t + U_l (c_l + F_l x_{l,t}),      U_l ∈ R^{d×m}, F_l ∈ R^{m×d}, c_l ∈ R^m.

Design (:meth:`RiccatiFeedback.calibrate`, on a batch of *training* examples):

1. nominal rollout and co-states ``p_l = −∂J/∂x_l`` (:func:`controltune.pmp.solve_costate`);
2. control directions ``U_l``: the top-m left singular vectors of the pooled co-states
   ``[Σ_t p_{l+1,s,t}]_s`` (the shifts of block l's output that change J fastest);
   state bases ``V_{l+1} = [U_l, top principal directions of the pooled states]`` (k columns);
3. the reduced per-sequence model ``z_{l+1,s} = A_{l,s} z_{l,s} + B_l u_{l,s}`` with the
   Gauss–Newton terminal cost (:func:`controltune.design.linearize.reduce`);
4. per sequence, the finite-horizon time-varying LQR (:func:`controltune.design.riccati.dlqr`,
   ``R = reg·I``) and its optimal plan ``u*_{l,s} = −K_{l,s} z*_{l,s} + k_{l,s}`` from ``z*_0 = 0``;
5. the plan depends on the label, the deployed controller cannot: a linear state-feedback law
   ``u_{l,s} ≈ b_l + W_l V_lᵀ(x̄_{l,s} − μ_l)`` is fitted to the plans by ridge regression on the
   pooled nominal states ``x̄_{l,s}``; it is realised per token, which gives the same pooled control
   because the law is affine.  Hence ``F_l = gain·W_l V_lᵀ``, ``c_l = gain·(b_l − W_l V_lᵀ μ_l)``.

``U_l``, ``F_l`` and ``c_l`` are then trained like any control.  Controls: ``2·d·m + m`` per layer.

Calibration convention (shared by the control-designed controllers): pass ``design_batch`` (a
collated batch dict) or let ``attach`` draw ``n_design`` seeded examples of the *train* split of
``task`` (:func:`controltune.design.linearize.design_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...design.linearize import design_batch as load_design_batch
from ...design.linearize import orthonormal_basis, pooled_costates, pooled_states, reduce
from ...design.riccati import dlqr, lqr_rollout
from ..base import Control, Controller, Site, UnsupportedMethodError, positive_int, register, wrap

if TYPE_CHECKING:
    from typing import Any

    from ...system import ResidualSystem


class ResidualFeedback(nn.Module):
    """``block(x, …) + (x Fᵀ + c) Uᵀ``: x S×T×d; F m×d, c m, U d×m."""

    def __init__(self, d: int, m: int, like: torch.Tensor) -> None:
        super().__init__()
        self.U = nn.Parameter(torch.zeros(d, m, dtype=like.dtype, device=like.device))
        self.F = nn.Parameter(torch.zeros(m, d, dtype=like.dtype, device=like.device))
        self.c = nn.Parameter(torch.zeros(m, dtype=like.dtype, device=like.device))

    def forward(self, block: nn.Module, *args, **kwargs) -> torch.Tensor | tuple[Any, ...]:
        x = args[0] if args else kwargs["hidden_states"]
        out = block(*args, **kwargs)
        delta = (x @ self.F.T + self.c) @ self.U.T
        if isinstance(out, tuple):  # blocks that still return (hidden, ...) tuples
            return (out[0] + delta, *out[1:])
        return out + delta


def complete_basis(first: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """``[first, extra]`` orthonormal, d×k: ``extra`` are the top directions of ``candidates`` (d×n)
    orthogonal to ``first`` (d×m, orthonormal)."""
    if first.shape[1] >= k:
        return first[:, :k]
    resid = candidates - first @ (first.T @ candidates)
    return torch.cat([first, orthonormal_basis(resid, k - first.shape[1])], dim=1)


def ridge_fit(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``targets ≈ b + features Wᵀ`` (features S×k centred or not, targets S×m): returns (W m×k, b m).

    The penalty is ``ridge·(mean squared feature norm)·‖W‖²`` so ``ridge`` is scale-free.
    """
    fm, tm = features.mean(0), targets.mean(0)
    f, t = features - fm, targets - tm
    rho = ridge * (f.pow(2).sum() / f.shape[0]).clamp_min(torch.finfo(f.dtype).tiny)
    gram = f.T @ f + rho * f.shape[0] * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    W = torch.linalg.solve(gram, f.T @ t).T
    return W, tm - W @ fm


@register
class RiccatiFeedback(Controller):
    """Rank-m residual-stream state feedback designed by the finite-horizon Riccati recursion."""

    method = "riccati_feedback"
    group = "addition"
    form = "x_{l+1} = f_l(x_l) + U_l (c_l + F_l x_l)   [U, F, c from a per-sequence LQR + ridge feedback fit]"

    def __init__(self, rank: int = 8, state_dim: int = 16, reg: float = 1e-2, ridge: float = 1e-1,
                 gain: float = 1.0, layers: Sequence[int] | None = None, task: str = "sst2", n_design: int = 16,
                 design_seed: int = 0, max_length: int = 64, design_batch: dict | None = None,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        rank = positive_int(rank, "rank", self.method)
        state_dim = positive_int(state_dim, "state_dim", self.method)
        if state_dim < rank:
            raise ValueError(f"{self.method} needs rank <= state_dim, got rank={rank}, state_dim={state_dim}")
        if reg <= 0 or ridge < 0:
            raise ValueError(f"riccati_feedback: reg must be > 0 and ridge >= 0, got reg={reg}, ridge={ridge}")
        self.rank, self.state_dim = int(rank), int(state_dim)
        self.reg, self.ridge, self.gain = float(reg), float(ridge), float(gain)
        self.layers = layers
        self.task, self.n_design = task, positive_int(n_design, "n_design", self.method)
        self.design_seed, self.max_length = int(design_seed), positive_int(max_length, "max_length", self.method)
        self.design_batch = design_batch
        self.deltas = nn.ModuleDict()
        self.report: dict = {}

    def attach(self, system: ResidualSystem) -> None:
        if getattr(system.readout, "kind", "") != "classification":
            raise UnsupportedMethodError("riccati_feedback designs against a classification readout (Gauss–Newton of "
                                         "the CE on pooled logits); this system's readout is "
                                         f"{getattr(system.readout, 'kind', '?')!r}")
        n = system.n_layers
        layers = list(range(n)) if self.layers is None else sorted({int(x) % n for x in self.layers})
        batch = self.design_batch
        if batch is None:
            batch = load_design_batch(system, self.task, self.n_design, self.design_seed, self.max_length)
        gains = self.calibrate(system, batch)
        like = next(system.model.parameters())
        for layer in layers:
            delta = ResidualFeedback(system.d_model, self.rank, like)
            U, F, c = gains[layer]
            with torch.no_grad():
                delta.U.copy_(U)
                delta.F.copy_(F)
                delta.c.copy_(c)
            self.deltas[str(layer)] = delta
            path = system.block_path(layer)
            self.sites.append(Site(layer, "block", path, system.blocks[layer]))
            wrap(system.base, path, delta)

    @torch.no_grad()
    def calibrate(self, system: ResidualSystem, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Design ``(U_l, F_l, c_l)`` for every layer from ``batch`` (module docstring, steps 1–5)."""
        n, m, k = system.n_layers, self.rank, self.state_dim
        _, pooled, _ = pooled_states(system, batch)
        with torch.enable_grad():
            costates = pooled_costates(system, batch)
        centred = [(p - p.mean(0)).double().T for p in pooled]                      # d×S each
        controls = [complete_basis(orthonormal_basis(costates[layer + 1].double().T, m), centred[layer + 1], m)
                    for layer in range(n)]
        short = [layer for layer, u in enumerate(controls) if u.shape[1] < m]
        if short:
            # U_l needs m independent directions: the pooled co-states and states of S sequences give at most 2S-1.
            raise ValueError(f"riccati_feedback: the design batch of {pooled[0].shape[0]} sequences spans fewer than "
                             f"rank={m} control directions at layer(s) {short[:5]}; use a larger design batch "
                             f"(n_design >= {m}) or a smaller rank")
        bases = [orthonormal_basis(centred[0], k)]
        bases += [complete_basis(controls[layer], centred[layer + 1], k) for layer in range(n)]
        model = reduce(system, batch, bases, controls)
        sol = dlqr(model.A, [b.expand(model.Q.shape[0], -1, -1) for b in model.B], None, self.reg, model.Q, model.q)
        z0 = torch.zeros_like(model.features[0])
        zs, plan = lqr_rollout(sol, model.A, [b.expand(model.Q.shape[0], -1, -1) for b in model.B], z0)
        # Predicted change of the quadratic model J along the plan (negative = improvement).
        zL = zs[-1]
        predicted = (model.q * zL).sum() + 0.5 * (zL.unsqueeze(-2) @ model.Q @ zL.unsqueeze(-1)).sum() \
            + 0.5 * self.reg * sum(u.pow(2).sum() for u in plan)
        out = []
        like = next(system.model.parameters())
        fit_err = []
        for layer in range(n):
            W, b = ridge_fit(model.features[layer], plan[layer], self.ridge)
            V, mu = model.bases[layer], model.means[layer]
            F = self.gain * W @ V.T
            c = self.gain * b - F @ mu
            resid = plan[layer] - (b + model.features[layer] @ W.T)
            fit_err.append(float(resid.pow(2).sum() / plan[layer].pow(2).sum().clamp_min(1e-300)))
            out.append((controls[layer].to(like), F.to(like), c.to(like)))
        self.report = {"predicted_dJ": float(predicted), "plan_norm": [float(u.norm()) for u in plan],
                       "feedback_fit_relative_error": fit_err, "n_design": int(batch["input_ids"].shape[0])}
        return out

    def controls(self) -> list[Control]:
        out = []
        for site in self.sites:
            d = self.deltas[str(site.layer)]
            out += [Control(f"riccati.{site.layer}.{name}", getattr(d, name), "layer", (site.layer,))
                    for name in ("U", "F", "c")]
        return out
