"""The finite-difference leg: Richardson-extrapolated central differences along relative
directions (and the legacy one-difference-per-control check).

See :mod:`controltune.verification` (leg 3) for the steps, the resolution allowance and the
raw-error ceiling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..control import ControlSystem
from ..pmp import CoStateSolution
from .forward import _phi_from
from .reference import (
    ControlGroup,
    Rollout,
    _check_solution,
    _pmp_slope,
    _running,
    batched,
    control_direction,
    control_groups,
    cost_from,
    propagate,
    rollout,
    token_direction,
    total_cost,
)
from .report import _EPS, _TINY, FD_KINK_ULPS, FD_ROUNDING_ULPS, FD_STEP, FD_STEPS, TOLERANCES, ZERO_SCALE

# --- finite-difference leg ------------------------------------------------------------------


@dataclass
class Difference:
    """A Richardson-extrapolated central difference, its float64 resolution and its kink test.

    Attributes:
        value: ``D = (4 D(h/2) − D(h)) / 3``.
        coarse, fine: ``D(h)``, ``D(h/2)``.
        resolution: ``δ = 3·FD_ROUNDING_ULPS·ε·max|J| / h``, a bound on the rounding noise of
            ``D`` and of ``D(h) − D(h/2)``.
        step: h.
        refined: how many times the step was divided by ``FD_REFINE`` because the difference
            was not :meth:`smooth` (a kink, e.g. of a ReLU, within the step).
        kink: ``K = (4 S(h/2) − S(h)) / h`` with ``S(s) = J(s) − 2 J(0) + J(−s)``: 0 up to
            ``O(h³)`` for a smooth J, the jump of the slope for a kink at the point.
        kink_resolution: ``20·FD_KINK_ULPS·ε·max|J| / h``, the rounding allowance of K.
        right, left: one-sided Richardson slopes ``(4 J(h/2) − J(h) − 3 J(0)) / h`` and
            ``(J(−h) − 4 J(−h/2) + 3 J(0)) / h`` (``O(h²)`` from each side's derivative).
        kink_offset: the kink test failed at every step tried with a fourth difference that did
            not shrink with the step: an offset of J(0), set aside (see :func:`refined_difference`).
    """

    value: float
    coarse: float
    fine: float
    resolution: float
    step: float
    refined: int = 0
    kink: float = 0.0
    kink_resolution: float = 0.0
    right: float = 0.0
    left: float = 0.0
    kink_offset: bool = False

    def smooth(self, tol: float, scale: float) -> bool:
        """``|D(h) − D(h/2)| ≤ δ + tol·m`` and ``|K| ≤ δ_K + tol·m``, ``m = max(|D|, σ)``: J is smooth at this scale.

        For a smooth J, ``D(h) − D(h/2) = J‴h²/8 + O(h⁴)`` and ``K = O(h³)`` (far below ``tol``
        at the default step).  A slope jump a at ``t = c`` inside the step gives
        ``D(h) − D(h/2) = a|c|/2h`` and ``K = a(1 − 3|c|/h)`` for ``|c| < h/2``: the first test
        misses a kink at the point (both quotients take half the jump), the second one at
        ``|c| = h/3``; together they see at least ``a/6`` wherever the kink is.
        """
        return self.central_agree(tol, scale) and self.no_kink(tol, scale)

    def central_agree(self, tol: float, scale: float) -> bool:
        """``|D(h) − D(h/2)| ≤ δ + tol·max(|D|, σ)`` (no use of J(0))."""
        return abs(self.coarse - self.fine) <= self.resolution + tol * max(abs(self.value), scale)

    def no_kink(self, tol: float, scale: float) -> bool:
        """``|K| ≤ δ_K + tol·max(|D|, σ)``."""
        return abs(self.kink) <= self.kink_resolution + tol * max(abs(self.value), scale)

    @property
    def one_sided_resolution(self) -> float:
        """Rounding noise of :attr:`right` and :attr:`left`: ``8·FD_ROUNDING_ULPS·ε·max|J| / h``."""
        return self.resolution * 8 / 3


FD_REFINE = 10.0
"""Factor the step is divided by when the difference is not smooth (at most ``FD_REFINEMENTS`` times)."""

FD_REFINEMENTS = 3

RICHARDSON_POINTS = (1.0, -1.0, 0.5, -0.5, 0.0)
"""Where J is evaluated, in units of the step h (``J(0)`` for the kink test and the one-sided slopes)."""


def richardson(values: Sequence[float], h: float) -> Difference:
    """Richardson extrapolation at 0 from ``J(t)`` at ``t = h·RICHARDSON_POINTS``, with the kink test."""
    j_plus, j_minus, j_half_plus, j_half_minus, j_zero = values
    coarse = (j_plus - j_minus) / (2 * h)
    fine = (j_half_plus - j_half_minus) / h
    top = max(abs(v) for v in values)
    unit = FD_ROUNDING_ULPS * _EPS * top / h
    kink = (4 * (j_half_plus - 2 * j_zero + j_half_minus) - (j_plus - 2 * j_zero + j_minus)) / h
    kink_unit = FD_KINK_ULPS * _EPS * top / h
    return Difference((4 * fine - coarse) / 3, coarse, fine, 3 * unit, h, kink=kink, kink_resolution=20 * kink_unit,
                      right=(4 * j_half_plus - j_plus - 3 * j_zero) / h,
                      left=(j_minus - 4 * j_half_minus + 3 * j_zero) / h)


KINK_SHRINK = 0.3
"""A kink's fourth difference ``K·h`` shrinks with the step (``∝ h``); one that shrinks by less than this factor
over a refinement (``FD_REFINE`` = 10) is not a kink."""


def refined_difference(evaluate: Callable[[Sequence[float]], Sequence[float]], h: float, tol: float,
                       scale: float, first: Sequence[float] | None = None) -> Difference:
    """:func:`richardson` at h, redone at ``h / FD_REFINE`` while it is not :meth:`~Difference.smooth`.

    ``evaluate(ts) -> [J(t) for t in ts]``; ``first``: the values at step h when already known.
    The step is chosen from the differences alone, never from the value they are compared with.

    The kink test reads ``J(0)``, and ``K·h = −Δ⁴J`` (the fourth difference of the five values) is
    ``∝ h`` for a kink but constant for an offset of ``J(0)`` against its neighbours (rounding
    that is systematic at the unperturbed point: on SmolLM2 with ``costate_lora``, ``Δ⁴J ≈ 25 ulps``
    of J with one sign at every step from 1e-5 to 1e-8).  So when only the kink test failed and
    ``Δ⁴J`` did not shrink over a refinement (ratio above ``KINK_SHRINK``), the kink test is set
    aside and the largest step whose central differences agree is returned (they do not use J(0)).
    :attr:`~Difference.refined` of the result: how many times its step was divided.
    """
    diffs = [richardson(first if first is not None else evaluate([h * p for p in RICHARDSON_POINTS]), h)]
    while True:
        last = diffs[-1]
        if last.smooth(tol, scale):
            return last
        if len(diffs) > 1 and last.central_agree(tol, scale) and not _kink_shrank(diffs[-2], last):
            agreed = next(d for d in diffs if d.central_agree(tol, scale))
            agreed.kink_offset = True
            return agreed
        if len(diffs) > FD_REFINEMENTS:
            return last
        step = h / FD_REFINE ** len(diffs)
        diffs.append(richardson(evaluate([step * p for p in RICHARDSON_POINTS]), step))
        diffs[-1].refined = len(diffs) - 1


def _kink_shrank(coarse: Difference, fine: Difference) -> bool:
    """``|Δ⁴J|`` at the finer step is below ``KINK_SHRINK`` times that at the coarser one (``Δ⁴J = −K·h``)."""
    return abs(fine.kink * fine.step) < KINK_SHRINK * abs(coarse.kink * coarse.step)


def fd_errors(pmp: float, diff: Difference, scale: float, kinked: bool = False) -> tuple[float, float]:
    """``(max(|a − D| − δ, 0) / max(|D|, σ), |a − D| / max(|D|, σ))``: with and without the allowance δ.

    ``kinked`` (a kink at the point that no refinement moved out of the step): J has two
    one-sided slopes there and a derivative only if the kink is not exactly at 0, in which
    case it is one of them; a is compared with the nearer of :attr:`Difference.right` and
    :attr:`Difference.left` (resolution :attr:`Difference.one_sided_resolution`).
    """
    if kinked:
        reference = min((diff.right, diff.left), key=lambda d: abs(pmp - d))
        resolution = diff.one_sided_resolution
    else:
        reference, resolution = diff.value, diff.resolution
    gap = abs(pmp - reference)
    denominator = max(abs(reference), scale, _TINY)
    return max(gap - resolution, 0.0) / denominator, gap / denominator


@dataclass
class DifferenceReport:
    """What :func:`directional_differences` measured.

    Attributes:
        costate, costate_raw: per layer l, the largest FD error of ``−⟨p_l, v⟩`` with / without δ.
        directions, directions_raw: ``label -> FD error`` of each control group's direction.
        refined: labels (``p_<l>`` for states) whose step had to be refined (kinks).
        kinks: ``label -> slope jump K`` of the directions still kinked at the smallest step,
            checked against the one-sided slopes (see :func:`fd_errors`).
    """

    costate: list[float]
    costate_raw: list[float]
    directions: dict[str, float]
    directions_raw: dict[str, float]
    refined: list[str]
    kinks: dict[str, float]


@dataclass
class _Direction:
    """One FD check: its label, the PMP slope, the state it enters at (local checks) and its evaluator."""

    label: str
    pmp: float
    evaluate: Callable[[Sequence[float]], list[float]]
    entries: list[tuple[torch.Tensor, float]] | None = None  # local: (state entering at `level`, running cost)
    level: int = 0


@torch.no_grad()
def directional_differences(system: ControlSystem, batch: dict, solution: CoStateSolution,
                            n_state_directions: int = 1, step: float = FD_STEP, seed: int = 0,
                            tol: float = TOLERANCES[torch.float64]["fd"],
                            directions: dict[str, torch.Tensor] | None = None) -> DifferenceReport:
    """The finite-difference leg (see the module docstring) on a float64 system, no autograd.

    ``tol`` is the smoothness threshold of :func:`refined_difference` (the FD tolerance);
    ``directions``: ``name -> v`` per control (default: :func:`control_direction`, seeded), a
    group's direction being its controls' parts.  The perturbed states of the local checks
    (state directions, layer and initial groups) enter one batch carried through the blocks
    (:func:`propagate`); the joint, shared and terminal directions re-run the model per point.
    """
    _check_solution(system, solution)
    cached = rollout(system, batch)
    scale = ZERO_SCALE * abs(cached.cost)
    gen = torch.Generator().manual_seed(seed)
    controls = list(system.controls())
    if directions is None:
        directions = {c.name: control_direction(c.param, gen) for c in controls}
    points = [step * p for p in RICHARDSON_POINTS]
    checks = [_group_direction(system, cached, batch, solution, group, directions, points)
              for group in control_groups(system, controls)]
    for layer, x in enumerate(cached.states):
        p = solution.costates[layer]
        for _ in range(n_state_directions if p is not None else 0):
            v = token_direction(x, gen)
            checks.append(_Direction(f"p_{layer}", -float((p.double() * v).sum()),
                                     partial(_phis_displaced, system, cached, batch, layer, v),
                                     [(x + t * v.to(x), 0.0) for t in points], layer))
    values = _local_values(system, cached, batch, checks)
    report = DifferenceReport([0.0] * len(cached.states), [0.0] * len(cached.states), {}, {}, [], {})
    for check in checks:
        diff = refined_difference(check.evaluate, step, tol, scale, values.get(id(check)))
        kinked = not diff.smooth(tol, scale) and not diff.kink_offset
        err, raw = fd_errors(check.pmp, diff, scale, kinked)
        if diff.refined:
            report.refined.append(check.label)
        if kinked:
            report.kinks[check.label] = diff.kink
        if check.label.startswith("p_"):
            layer = int(check.label[2:])
            report.costate[layer] = max(report.costate[layer], err)
            report.costate_raw[layer] = max(report.costate_raw[layer], raw)
        else:
            report.directions[check.label], report.directions_raw[check.label] = err, raw
    return report


def _group_direction(system: ControlSystem, cached: Rollout, batch: dict, solution: CoStateSolution,
                     group: ControlGroup, directions: dict[str, torch.Tensor], points: Sequence[float]) -> _Direction:
    """The FD check of one control group; a local group's perturbed entry states are computed now."""
    v = [directions[c.name] for c in group.controls]
    check = _Direction(group.label, _pmp_slope(solution, {c.name: directions[c.name] for c in group.controls}),
                       partial(_costs_displaced, system, cached, batch, group, v))
    if group.local:
        check.entries = _with_displaced(group, v, points, partial(_local_entry, system, cached, batch, group))
        check.level = 0 if group.start == "embed" else int(group.start) + 1
    return check


def _local_values(system: ControlSystem, cached: Rollout, batch: dict, checks: Sequence[_Direction]
                  ) -> dict[int, list[float]]:
    """``id(check) -> [J(t) for the Richardson points]`` of every local check, from one :func:`propagate`.

    The point ``t = 0`` enters as the cached state of its level, once per level: every local
    check's unperturbed entry is that state (``x_l`` itself, or ``f_l(x_l, u) = x_{l+1}``).
    """
    local = [c for c in checks if c.entries is not None]
    centre = RICHARDSON_POINTS.index(0.0)
    entering: list[list[torch.Tensor]] = [[] for _ in cached.states]
    for level in range(len(entering)):
        at_level = [c for c in local if c.level == level]
        if at_level:
            entering[level].append(cached.states[level])
        for check in at_level:
            entering[level] += [x for i, (x, _) in enumerate(check.entries) if i != centre]
    phis = iter(propagate(system, entering, partial(_block_states, system, cached),
                          partial(_readout_states, system, cached, batch)))
    out = {}
    for level in range(len(entering)):
        at_level = [c for c in local if c.level == level]
        phi_centre = next(phis) if at_level else 0.0
        for check in at_level:
            out[id(check)] = [(phi_centre if i == centre else next(phis)) + r
                              for i, (_, r) in enumerate(check.entries)]
    return out


def _block_states(system: ControlSystem, cached: Rollout, layer: int, states: torch.Tensor) -> torch.Tensor:
    """Block l on each stacked state (K×S×T×d)."""
    return batched(lambda x: system.step(layer, x, cached.ctx), states)


def _readout_states(system: ControlSystem, cached: Rollout, batch: dict, states: torch.Tensor) -> torch.Tensor:
    """``Φ̄`` of each stacked final state (K scalars)."""
    return batched(lambda x: system.terminal_cost(x, cached.ctx, batch), states)


def _with_displaced(group: ControlGroup, directions: Sequence[torch.Tensor], ts: Sequence[float],
                    fn: Callable[[], Any]) -> list[Any]:
    """``[fn() with the group's controls at u + t v for t in ts]``.

    Each control is set to ``u + t v`` from a copy of u taken once, and restored bit for bit.
    """
    params = [c.param for c in group.controls]
    saved = [p.detach().clone() for p in params]
    out = []
    try:
        for t in ts:
            for p, u, v in zip(params, saved, directions):
                p.copy_(u).add_(v.to(u), alpha=t)
            out.append(fn())
    finally:
        for p, u in zip(params, saved):
            p.copy_(u)
    return out


def _costs_displaced(system: ControlSystem, cached: Rollout, batch: dict, group: ControlGroup,
                     directions: Sequence[torch.Tensor], ts: Sequence[float]) -> list[float]:
    """``[J(u + t v) for t in ts]`` moving the group's controls, re-run from the group's start."""
    if not group.local:
        return _with_displaced(group, directions, ts,
                               lambda: float(cost_from(system, cached, batch, group.start, group.wheres)))
    entries = _with_displaced(group, directions, ts, partial(_local_entry, system, cached, batch, group))
    first = 0 if group.start == "embed" else int(group.start) + 1
    phis = [float(v) for v in _readout_states(
        system, cached, batch, _carry(system, cached, first, torch.stack([x for x, _ in entries])))]
    return [phi + r for phi, (_, r) in zip(phis, entries)]


def _carry(system: ControlSystem, cached: Rollout, layer: int, states: torch.Tensor) -> torch.Tensor:
    """Blocks ``layer..L−1`` on each stacked state."""
    for k in range(layer, system.n_layers):
        states = _block_states(system, cached, k, states)
    return states


def _local_entry(system: ControlSystem, cached: Rollout, batch: dict, group: ControlGroup
                 ) -> tuple[torch.Tensor, float]:
    """``(x_0, R_init)`` or ``(x_{l+1} = f_l(x_l, u), R_l)`` at the system's current controls."""
    if group.start == "embed":
        x = system.embed(batch)[0]
    else:
        layer = int(group.start)
        x = system.step(layer, cached.states[layer], cached.ctx)
    return x, float(_running(system, group.wheres))


def _phis_displaced(system: ControlSystem, cached: Rollout, batch: dict, layer: int, v: torch.Tensor,
                    ts: Sequence[float]) -> list[float]:
    """``[Φ̄ from x_l + t v for t in ts]``."""
    x = cached.states[layer]
    xs = torch.stack([x + t * v.to(x) for t in ts])
    return [float(j) for j in _readout_states(system, cached, batch, _carry(system, cached, layer, xs))]


# --- legacy finite differences (one direction per control) ----------------------------------


def _unit(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(like.device)


@torch.no_grad()
def finite_differences(system: ControlSystem, batch: dict, solution: CoStateSolution, n_state_directions: int = 2,
                       steps: Sequence[float] = FD_STEPS, seed: int = 0) -> tuple[list[float], dict[str, float], float]:
    """Legacy check: a central difference per control along a random unit direction, on a step ladder.

    The step is ``h = step · max(‖u‖, 1)`` (resp. ``‖x_l‖`` for the state directions, scaled by
    the whole batch), the error the smallest over the ladder, beyond ``δ = ε·max|J|/h``.
    Returns ``(per-layer max error of −⟨p_l, v⟩, {name: error of −⟨∇_u H, v⟩}, raw max)``;
    ``raw max`` leaves out the resolution allowance δ.  Kept for comparison (``fd_mode="legacy"``):
    it costs 2·len(steps) forward passes per control.
    """
    _check_solution(system, solution)
    gen = torch.Generator().manual_seed(seed)
    control_err: dict[str, float] = {}
    raw = 0.0
    for c in system.controls():
        v = _unit(c.param, gen)
        pmp = -float((solution.control_grads[c.name].double() * v).sum())  # ⟨∂J/∂u, v⟩ = −⟨∇_u H, v⟩
        err, err_raw = _ladder(partial(_cost_along, system, batch, c.param, v), pmp, steps,
                               max(float(c.param.norm()), 1.0))
        control_err[c.name] = err
        raw = max(raw, err_raw)
    cached = rollout(system, batch)
    costate_err = []
    for layer, x_l in enumerate(cached.states):
        worst = 0.0
        for _ in range(n_state_directions):
            v = _unit(x_l, gen)
            pmp = -float((solution.costates[layer].double() * v).sum())
            err, err_raw = _ladder(partial(_phi_along, system, cached, batch, layer, v), pmp, steps,
                                   max(float(x_l.norm()), 1.0))
            worst = max(worst, err)
            raw = max(raw, err_raw)
        costate_err.append(worst)
    return costate_err, control_err, raw


def _ladder(cost: Callable[[float], float], pmp: float, steps: Sequence[float], scale: float) -> tuple[float, float]:
    """Smallest FD error (with and without the allowance δ) over the relative steps of the ladder."""
    errs, raws = [], []
    for step in steps:
        h = step * scale
        j_plus, j_minus = cost(h), cost(-h)
        resolution = _EPS * max(abs(j_plus), abs(j_minus)) / h
        fd = (j_plus - j_minus) / (2 * h)
        errs.append(max(abs(pmp - fd) - resolution, 0.0) / max(abs(fd), _TINY))
        raws.append(abs(pmp - fd) / max(abs(fd), resolution, _TINY))
    return min(errs), min(raws)


def _cost_along(system: ControlSystem, batch: dict, param: torch.Tensor, v: torch.Tensor, t: float) -> float:
    """``J(u + t v)`` with u restored afterwards (exactly: the saved tensor is copied back)."""
    saved = param.detach().clone()
    param.add_(v, alpha=t)
    try:
        return float(total_cost(system, batch))
    finally:
        param.copy_(saved)


def _phi_along(system: ControlSystem, cached: Rollout, batch: dict, layer: int, v: torch.Tensor, t: float) -> float:
    return float(_phi_from(system, cached, batch, layer, cached.states[layer] + t * v))
