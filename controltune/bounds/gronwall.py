"""Across-depth bounds: the discrete Grönwall inequality and the co-state estimate.

For two controls u, u' with trajectories x, x' (same x_0), the triangle inequality
``‖f_l(x_l,u_l) − f_l(x'_l,u'_l)‖ ≤ ‖f_l(x_l,u_l) − f_l(x'_l,u_l)‖ + ‖f_l(x'_l,u_l) − f_l(x'_l,u'_l)‖``
gives ``E_{l+1} ≤ A_l E_l + b_l ‖u_l − u'_l‖`` with ``E_0 = 0``, so

    ‖x_L(u) − x_L(u')‖ ≤ Σ_l (Π_{k>l} A_k) · b_l ‖u_l − u'_l‖

with ``A_k = 1 + a_k`` for pre-LN blocks (f = x + G, a_k a constant of G) and
``A_k = a_k`` for post-LN blocks (a_k a constant of the whole block; read from
``system.family.post_ln``).  Then

    |J(u) − J(u')| ≤ Lip(Φ̄) · ‖x_L(u) − x_L(u')‖ + Σ_l |R_l(u_l) − R_l(u'_l)|.

With certified per-block constants (valid on a domain containing the compared
points) this is a certificate; with trajectory-local ones (Jacobian norms) it is
a first-order estimate.  The co-state estimate is the first-order Taylor term
``J(u') − J(u) ≈ −Σ_l ⟨∇_{u_l} H_l, u'_l − u_l⟩`` (DESIGN.md: ``∇_u H = −∂J/∂u``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..system import ResidualSystem


def state_gains(a: Sequence[float], post_ln: bool) -> list[float]:
    """``A_k`` from per-block state constants: ``a_k`` (post-LN) or ``1 + a_k`` (pre-LN, a_k of G)."""
    bad = [x for x in a if not x >= 0.0]
    if bad:
        raise ValueError(f"state constants must be non-negative numbers, got {bad}")
    return [float(x) if post_ln else 1.0 + float(x) for x in a]


@dataclass
class GronwallBound:
    """Result of :func:`gronwall`.

    Attributes:
        state: bound on ``‖x_L(u) − x_L(u')‖``.
        contributions: per layer l, ``(Π_{k>l} A_k)·drive_l`` (they sum to ``state``).
        cost: bound on ``|J(u) − J(u')|`` (``lip_phi·state + running``), or None without ``lip_phi``.
        lip_phi: the terminal constant used.
        running: ``Σ_l |R_l(u_l) − R_l(u'_l)|`` added to the cost.
    """

    state: float
    contributions: list[float]
    cost: float | None
    lip_phi: float | None
    running: float

    def to_dict(self) -> dict:
        return {"state": self.state, "cost": self.cost, "lip_phi": self.lip_phi, "running": self.running,
                "contributions": self.contributions}


def gronwall(gains: Sequence[float], drive: Sequence[float], lip_phi: float | None = None,
             running: float = 0.0) -> GronwallBound:
    """``E_L ≤ Σ_l (Π_{k>l} A_k)·drive_l`` and the cost bound ``lip_phi·E_L + running``.

    Args:
        gains: ``A_0 .. A_{L-1}`` (see :func:`state_gains`).
        drive: per layer ``b_l ‖u_l − u'_l‖`` (or ``Σ_site b_site ‖Δ_site‖``).
        lip_phi: Lipschitz constant of the terminal cost in x_L (None: state bound only).
        running: ``Σ_l |R_l(u_l) − R_l(u'_l)|``.
    """
    if len(gains) != len(drive):
        raise ValueError(f"gains ({len(gains)}) and drive ({len(drive)}) need one entry per layer")
    n = len(gains)
    contributions = []
    for layer in range(n):
        amp = math.prod(float(g) for g in gains[layer + 1:])
        contributions.append(amp * float(drive[layer]))
    state = float(sum(contributions))
    cost = None if lip_phi is None else float(lip_phi) * state + float(running)
    return GronwallBound(state, contributions, cost, lip_phi, float(running))


def control_distance(u: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor]) -> float:
    """``‖u − v‖`` (Frobenius over all entries of the named tensors; names must match)."""
    if set(u) != set(v):
        raise ValueError(f"controls differ in names: {sorted(set(u) ^ set(v))}")
    return math.sqrt(sum(float((u[k] - v[k]).pow(2).sum()) for k in u))


def hamiltonian_gradients(system: ResidualSystem, batch: dict, use_pmp: bool = True
                          ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``∇_u H = −∂J/∂u`` for every control (name -> tensor) and the co-state norms ``‖p_l‖``, l = 0..L.

    Uses the co-state solver :func:`controltune.pmp.solve_costate` when available
    (``use_pmp``), otherwise reverse-mode autograd on J (identical by the theory:
    ``p_l = −∂J/∂x_l``).  Norms are over real positions.
    """
    mask = None
    if use_pmp:
        try:
            from ..pmp import solve_costate
        except ImportError:
            solve_costate = None
        if solve_costate is not None:
            sol = solve_costate(system, batch)
            mask = sol.ctx.attention_mask.unsqueeze(-1)
            return dict(sol.control_grads), [float("nan") if p is None else float((p * mask.to(p)).norm())
                                             for p in sol.costates]
    controls = system.controls()
    with torch.enable_grad():
        x, ctx = system.embed(batch)
        states = [x.detach().requires_grad_(True)]  # a leaf, so p_0 exists without initial controls
        for layer in range(system.n_layers):
            states.append(system.step(layer, states[-1], ctx))
        cost = system.terminal_cost(states[-1], ctx, batch) + system.total_running_cost()
        grads = torch.autograd.grad(cost, [c.param for c in controls] + states, allow_unused=True)
    mask = ctx.attention_mask.unsqueeze(-1)
    gu = {c.name: (torch.zeros_like(c.param) if g is None else -g.detach()) for c, g in zip(controls, grads)}
    norms = [0.0 if g is None else float((g * mask.to(g)).norm()) for g in grads[len(controls):]]
    return gu, norms


class _Rollout(torch.nn.Module):
    """``forward() = x_L`` of ``system`` on a fixed batch (for ``functional_call`` over its controls).

    Only the model is a submodule: controllers hold their deltas too, and ``functional_call``
    does not restore a parameter reachable by two paths correctly.
    """

    def __init__(self, system: ResidualSystem, batch: dict) -> None:
        super().__init__()
        self.model = system.model
        object.__setattr__(self, "_system", system)
        self.batch = batch

    def forward(self) -> torch.Tensor:
        return self._system.rollout(self.batch).final


def linearized_state_change(system: ResidualSystem, batch: dict, directions: Mapping[str, torch.Tensor]) -> float:
    """``‖δx_L‖`` with ``δx_L = (∂x_L/∂u)·δu`` (one forward-mode JVP through every block), real positions.

    ``directions`` maps control names to ``δu`` (the control's shape); other controls
    do not move.  Needs the eager attention kernel (forward mode).
    """
    if system.kernel != "eager":
        raise RuntimeError("the JVP through the rollout needs the eager attention kernel: run inside "
                           "`with system.using_kernel('eager'):`")
    controls = {c.name: c for c in system.controls()}
    unknown = sorted(set(directions) - set(controls))
    if unknown:
        raise KeyError(f"directions for unknown controls {unknown}")
    module = _Rollout(system, batch)
    ids = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    outside = [k for k in directions if id(controls[k].param) not in ids]
    if outside:
        raise ValueError(f"controls {outside} do not live inside the model's blocks (e.g. the readout head)")
    names = [ids[id(controls[k].param)] for k in directions]
    primals = tuple(controls[k].param.detach() for k in directions)
    tangents = tuple(directions[k].to(p) for k, p in zip(directions, primals))

    def f(*us: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, us)), (), strict=False)

    with torch.no_grad():
        _, dx = torch.func.jvp(f, primals, tangents)
    mask = batch.get("attention_mask")
    if mask is not None:
        dx = dx * mask.unsqueeze(-1).to(dx)
    return float(dx.norm())


def costate_estimate(grads: Mapping[str, torch.Tensor], u: Mapping[str, torch.Tensor],
                     v: Mapping[str, torch.Tensor]) -> float:
    """First-order prediction of ``J(v) − J(u)``: ``−Σ ⟨∇_u H, v − u⟩`` over the names of ``u``.

    ``grads`` are ``∇_u H`` at u (:func:`hamiltonian_gradients`); names of u missing
    from ``grads`` are an error.
    """
    missing = sorted(set(u) - set(grads))
    if missing:
        raise KeyError(f"no ∇_u H for controls {missing}")
    return -sum(float((grads[k].to(u[k]) * (v[k] - u[k])).sum()) for k in u)


__all__ = ["GronwallBound", "control_distance", "costate_estimate", "gronwall", "hamiltonian_gradients",
           "linearized_state_change", "state_gains"]
