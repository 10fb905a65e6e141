"""Check the Pontryagin co-states and Hamiltonian gradients two independent ways.

For a system with controllers attached, :func:`verify` compares the output of
:func:`~controltune.pmp.solve_costate` with

1. **autograd**: one global reverse pass through a plain rollout
   (``x_{l+1} = f_l(x_l)`` chained in one graph), giving ``−∂J/∂x_l`` for every
   state and ``−∂J/∂u`` for every control: DESIGN.md §1 says ``p_l = −∂J/∂x_l``
   and ``∇_u H = −∂J/∂u`` exactly;
2. **central finite differences** of J in float64, with no autograd at all:
   ``⟨∂J/∂u, v⟩ ≈ (J(u + hv) − J(u − hv)) / 2h`` along one random unit direction
   v per control, and ``⟨∂J/∂x_l, v⟩`` along a few random unit directions per layer
   (x_l perturbed, blocks l..L-1 re-run).  The step is relative,
   ``h = step · max(‖u‖, 1)`` (resp. ``‖x_l‖``), on a ladder of steps
   (``1e-6`` and ``1e-5`` by default), and the error reported is the smallest over the
   ladder: on MiniLM in float64 a step of ``1e-6`` is rounding-limited for small
   directional derivatives, while ``1e-5`` crosses the kinks of ReLU adapters; a
   correct gradient agrees at some step, a wrong one at none.  A float32 system is checked
   by finite differences of a float64 copy of itself: the copy's own co-state solve
   is checked against its difference quotients (tolerance of float64), while the
   float32 solution is checked against float32 autograd (a float32 number
   compared with a float64 quotient would only measure float32 rounding, which
   dominates gradients that vanish in exact arithmetic).

Relative error vs autograd: ``rel(a, b) = ‖a − b‖ / max(‖b‖, tiny)`` with
Frobenius norms, ``a`` the PMP quantity, ``b`` the autograd gradient and ``tiny``
the smallest positive normal number of the dtype (two exact zeros agree).
Relative error vs finite differences, for the scalars ``a = ⟨∂J/∂·, v⟩`` (from
PMP) and ``b`` (the difference quotient): ``max(|a − b| − δ, 0) / max(|b|, tiny)``,
where ``δ = ε·max|J(·± hv)| / h`` is the resolution of the difference
quotient in float64 (ε the machine epsilon): a directional derivative that is
zero in exact arithmetic (e.g. a key bias under softmax) is not a failure because
its quotient is rounding noise.  Default tolerances: float64 ``1e-10`` vs autograd and ``1e-6`` vs finite
differences; float32 ``1e-4`` vs autograd (its finite-difference check runs on the
float64 copy, at float64's ``1e-6``).

Straight-through controls (masking: ``m = 1[s > τ]`` forward, ``∂m/∂s := 1``
backward) make J piecewise constant in s, so its finite differences are 0 while
the estimator's gradient is not: such controls are checked against finite
differences of the estimator's linearisation at the current control
(``Controller.straight_through_linearisation``), whose value equals J there and
whose true derivative is, by construction, the straight-through gradient.

Use a running cost with nonzero weight decay so the ``R`` terms are exercised.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from .controllers.base import Controller
from .pmp import ControlSystem, CoStateSolution, solve_costate

FD_STEPS = (1e-6, 1e-5)
"""Relative finite-difference steps tried (the smallest error counts)."""

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"autograd": 1e-10, "fd": 1e-6},
    torch.float32: {"autograd": 1e-4, "fd": 1e-6},  # FD always runs on the float64 copy
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / max(‖b‖, tiny)`` (Frobenius norms, computed in float64)."""
    a64, b64 = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    tiny = torch.finfo(torch.as_tensor(b).dtype if torch.as_tensor(b).is_floating_point() else torch.float64).tiny
    return float((a64 - b64).norm() / max(float(b64.norm()), tiny))


@dataclass
class Verification:
    """Per-layer and per-control relative errors of the PMP solution.

    Attributes:
        dtype: the system's dtype (``float32``/``float64``).
        n_layers, n_controls: sizes of the system checked.
        costate_autograd: ``rel(p_l, −∂J/∂x_l)`` for l = 0..L.
        control_autograd: ``name -> rel(∇_u H, −∂J/∂u)``.
        costate_fd: per layer l, the largest ``rel(−⟨p_l, v⟩, FD)`` over the state directions.
        control_fd: ``name -> rel(−⟨∇_u H, v⟩, FD)`` for one random direction v.
        tol_autograd, tol_fd: the tolerances the check used.
        fd_raw_max: the largest FD relative error *without* the resolution allowance δ,
            ``|a − b| / max(|b|, δ)`` (informative: how close the quotients came).
    """

    dtype: str
    n_layers: int
    n_controls: int
    costate_autograd: list[float]
    control_autograd: dict[str, float]
    costate_fd: list[float] = field(default_factory=list)
    control_fd: dict[str, float] = field(default_factory=dict)
    tol_autograd: float = 1e-10
    tol_fd: float = 1e-6
    fd_raw_max: float = 0.0

    @property
    def max_rel_err_costate(self) -> float:
        return max(self.costate_autograd, default=0.0)

    @property
    def max_rel_err_control_grad(self) -> float:
        return max(self.control_autograd.values(), default=0.0)

    @property
    def max_rel_err_fd(self) -> float:
        return max([*self.costate_fd, *self.control_fd.values()], default=0.0)

    def failures(self) -> list[str]:
        """Readable list of every check above its tolerance (empty when all pass)."""
        out = [f"p_{k} vs autograd: {e:.2e} > {self.tol_autograd:g}"
               for k, e in enumerate(self.costate_autograd) if not e <= self.tol_autograd]
        out += [f"grad_u H[{n}] vs autograd: {e:.2e} > {self.tol_autograd:g}"
                for n, e in self.control_autograd.items() if not e <= self.tol_autograd]
        out += [f"p_{k} vs finite differences: {e:.2e} > {self.tol_fd:g}"
                for k, e in enumerate(self.costate_fd) if not e <= self.tol_fd]
        out += [f"grad_u H[{n}] vs finite differences: {e:.2e} > {self.tol_fd:g}"
                for n, e in self.control_fd.items() if not e <= self.tol_fd]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(max_rel_err_costate=self.max_rel_err_costate,
                   max_rel_err_control_grad=self.max_rel_err_control_grad,
                   max_rel_err_fd=self.max_rel_err_fd, passed=self.passed, failures=self.failures())
        return out


# --- references ----------------------------------------------------------------------------


def total_cost(system: ControlSystem, batch: dict) -> torch.Tensor:
    """``J = Φ̄(x_L) + R_init + Σ_l R_l + R_term`` by a plain rollout (scalar)."""
    x, ctx = system.embed(batch)
    for layer in range(system.n_layers):
        x = system.step(layer, x, ctx)
    return system.terminal_cost(x, ctx, batch) + _running_total(system)


def _running_total(system: ControlSystem) -> torch.Tensor:
    return sum((system.running_cost(w) for w in (*range(system.n_layers), "init", "term")), torch.zeros(()))


def autograd_reference(system: ControlSystem, batch: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``(−∂J/∂x_l for l = 0..L, {name: −∂J/∂u})`` from one global reverse pass.

    The states of a plain chained rollout are differentiated as intermediate
    tensors of one graph (``autograd.grad`` with them as inputs, the functional
    form of ``retain_grad``), so nothing is layer-local as in the solver.
    """
    controls = system.controls()
    with torch.enable_grad():
        x, ctx = system.embed(batch)
        if not x.requires_grad:  # no initial control: make x_0 differentiable without changing the graph above
            x = x.detach().requires_grad_(True)
        states = [x]
        for layer in range(system.n_layers):
            x = system.step(layer, x, ctx)
            states.append(x)
        cost = system.terminal_cost(x, ctx, batch) + _running_total(system)
        grads = torch.autograd.grad(cost, [*states, *[c.param for c in controls]], allow_unused=True)
    n = len(states)
    neg = [torch.zeros_like(t) if g is None else -g for g, t in zip(grads, [*states, *[c.param for c in controls]])]
    return neg[:n], {c.name: g for c, g in zip(controls, neg[n:])}


def float64_twin(system: ControlSystem) -> ControlSystem:
    """The system itself if it is float64, else a float64 deep copy (for finite differences)."""
    param = next(iter(system.controls()), None)
    dtype = param.param.dtype if param is not None else next(system.parameters()).dtype  # type: ignore[attr-defined]
    if dtype == torch.float64:
        return system
    if not isinstance(system, torch.nn.Module):
        raise TypeError(f"cannot make a float64 copy of a {type(system).__name__}; pass a float64 system")
    try:
        return copy.deepcopy(system).to(torch.float64)
    except RuntimeError as err:
        raise RuntimeError(f"cannot deep-copy the system to float64 for finite differences ({err}); a controller "
                           "probably keeps a tensor of an earlier forward pass; build the copy before running it, "
                           "or verify a float64 system") from err


def _batch_to(batch: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def _unit(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(like.device)


@torch.no_grad()
def finite_differences(system: ControlSystem, batch: dict, solution: CoStateSolution, n_state_directions: int = 2,
                       steps: Sequence[float] = FD_STEPS, seed: int = 0) -> tuple[list[float], dict[str, float], float]:
    """Central-difference check of ``p_l`` and ``∇_u H`` along random unit directions (float64 system, no autograd).

    Returns ``(per-layer max rel. error of −⟨p_l, v⟩, {name: rel. error of −⟨∇_u H, v⟩}, raw max)``,
    errors as in the module docstring; ``raw max`` leaves out the resolution allowance δ.
    """
    twin = system
    if solution.states[0].dtype != torch.float64:
        raise TypeError("finite_differences needs a float64 system and its float64 solution "
                        "(use float64_twin(system) and solve_costate on it)")
    batch64 = _batch_to(batch, torch.float64)
    gen = torch.Generator().manual_seed(seed)
    control_err: dict[str, float] = {}
    raw = 0.0
    for c in twin.controls():
        if c.name not in solution.control_grads:
            raise KeyError(f"control {c.name!r} of the float64 copy is missing from the solution")
        v = _unit(c.param, gen)
        pmp = -float((solution.control_grads[c.name].double() * v).sum())  # ⟨∂J/∂u, v⟩ = −⟨∇_u H, v⟩
        err, err_raw = _ladder(partial(_cost_along, twin, batch64, c.param, v), pmp, steps,
                               max(float(c.param.norm()), 1.0))
        control_err[c.name] = err
        raw = max(raw, err_raw)

    x, ctx = twin.embed(batch64)
    states = [x]
    for layer in range(twin.n_layers):
        states.append(twin.step(layer, states[-1], ctx))
    costate_err = []
    for layer, x_l in enumerate(states):
        worst = 0.0
        for _ in range(n_state_directions):
            v = _unit(x_l, gen)
            pmp = -float((solution.costates[layer].double() * v).sum())
            err, err_raw = _ladder(lambda t: _phi_from(twin, layer, x_l + t * v, ctx, batch64),  # noqa: B023
                                   pmp, steps, max(float(x_l.norm()), 1.0))
            worst = max(worst, err)
            raw = max(raw, err_raw)
        costate_err.append(worst)
    return costate_err, control_err, raw


def _ladder(cost, pmp: float, steps: Sequence[float], scale: float) -> tuple[float, float]:
    """Smallest FD error (with and without the allowance δ) over the relative steps of the ladder."""
    errs, raws = [], []
    for step in steps:
        fd, resolution = _central_difference(cost, step * scale)
        errs.append(_rel_fd(pmp, fd, resolution))
        # Raw: no allowance, but a quotient below its own resolution is measured against
        # that resolution (relative to rounding noise, the ratio would be meaningless).
        raws.append(abs(pmp - fd) / max(abs(fd), resolution, torch.finfo(torch.float64).tiny))
    return min(errs), min(raws)


FD_ROUNDING_ULPS = 1.0
"""Rounding error of one cost evaluation, in units of ε·|J|, assumed by the FD resolution δ."""


def _central_difference(cost, h: float) -> tuple[float, float]:
    """``((J(+h) − J(−h)) / 2h, δ)`` with δ the quotient's float64 rounding resolution."""
    j_plus, j_minus = cost(h), cost(-h)
    resolution = FD_ROUNDING_ULPS * torch.finfo(torch.float64).eps * max(abs(j_plus), abs(j_minus)) / h
    return (j_plus - j_minus) / (2 * h), resolution


def _rel_fd(a: float, b: float, resolution: float) -> float:
    """``max(|a − b| − δ, 0) / max(|b|, tiny)``: the error beyond the FD resolution δ, relative to b."""
    return max(abs(a - b) - resolution, 0.0) / max(abs(b), torch.finfo(torch.float64).tiny)


def _cost_along(system: ControlSystem, batch: dict, param: torch.Tensor, v: torch.Tensor, t: float) -> float:
    """``J(u + t v)`` with u restored afterwards (exactly: the saved tensor is copied back)."""
    saved = param.detach().clone()
    param.add_(v, alpha=t)
    try:
        return float(total_cost(system, batch))
    finally:
        param.copy_(saved)


def _phi_from(system: ControlSystem, layer: int, x: torch.Tensor, ctx: Any, batch: dict) -> float:
    """``Φ̄`` after running blocks ``layer..L-1`` from state ``x`` (running costs do not depend on x)."""
    for k in range(layer, system.n_layers):
        x = system.step(k, x, ctx)
    return float(system.terminal_cost(x, ctx, batch))


# --- the check --------------------------------------------------------------------------


def verify(system: ControlSystem, batch: dict, solution: CoStateSolution | None = None, mode: str = "graph",
           fd: bool = True, n_state_directions: int = 2, fd_steps: Sequence[float] = FD_STEPS, seed: int = 0,
           tolerances: dict[str, float] | None = None) -> Verification:
    """Compare the PMP solution with autograd and (optionally) finite differences.

    Args:
        system: a system with controllers attached (put it in eval mode: dropout off).
        batch: the batch to check on (keep it small: FD re-runs the model 2× per control).
        solution: a precomputed :func:`solve_costate` result, else one is solved in ``mode``.
        fd: also run the finite-difference check.
        n_state_directions: random directions per state x_l.
        fd_steps: the ladder of relative finite-difference steps.
        tolerances: ``{"autograd": .., "fd": ..}``; defaults by dtype from :data:`TOLERANCES`.
    """
    # The float64 copy is made before any forward pass: controllers may cache graph tensors, which deepcopy refuses.
    twin = float64_twin(system) if fd else None
    if solution is None:
        solution = solve_costate(system, batch, mode=mode)
    dtype = solution.states[0].dtype
    tol = dict(TOLERANCES.get(dtype, TOLERANCES[torch.float32]))
    tol.update(tolerances or {})
    neg_dx, neg_du = autograd_reference(system, batch)
    costate_ag = [relative_error(p, r) for p, r in zip(solution.costates, neg_dx)]
    control_ag = {name: relative_error(solution.control_grads[name], ref) for name, ref in neg_du.items()}
    costate_fd: list[float] = []
    control_fd: dict[str, float] = {}
    raw = 0.0
    if twin is not None:
        batch64 = _batch_to(batch, torch.float64)
        try:
            twin_solution = solution if twin is system else solve_costate(twin, batch64, mode=mode)
        except RuntimeError as err:
            raise RuntimeError(f"the float64 copy for finite differences does not run ({err}); a controller "
                               "probably keeps tensors that Module.to(float64) does not convert (plain attributes "
                               "instead of parameters or buffers)") from err
        with contextlib.ExitStack() as stack:
            for module in twin.modules():
                if isinstance(module, Controller):
                    stack.enter_context(module.straight_through_linearisation())
            costate_fd, control_fd, raw = finite_differences(twin, batch64, twin_solution, n_state_directions,
                                                             fd_steps, seed)
        tol["fd"] = (tolerances or {}).get("fd", TOLERANCES[torch.float64]["fd"])
    return Verification(dtype=str(dtype).removeprefix("torch."), n_layers=solution.n_layers,
                        n_controls=len(solution.controls), costate_autograd=costate_ag, control_autograd=control_ag,
                        costate_fd=costate_fd, control_fd=control_fd, tol_autograd=tol["autograd"], tol_fd=tol["fd"],
                        fd_raw_max=raw)


__all__ = ["TOLERANCES", "Verification", "autograd_reference", "finite_differences", "float64_twin",
           "relative_error", "total_cost", "verify"]
