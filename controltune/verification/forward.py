"""The forward-mode leg: directional derivatives of J by forward-mode AD, exact to rounding.

See :mod:`controltune.verification` (leg 2) for the directions and the error measure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.autograd import forward_ad as fwAD
from torch.func import jvp

from ..control import Control, ControlSystem
from ..pmp import CoStateSolution
from .reference import (
    Rollout,
    _all_wheres,
    _check_solution,
    _pmp_slope,
    batched,
    control_direction,
    cost_from,
    propagate,
    rollout,
    token_direction,
)
from .report import ZERO_SCALE, scalar_error

# --- forward-mode leg --------------------------------------------------------------------


def control_jvp(controls: Sequence[Control], tangents: Sequence[torch.Tensor], fn: Callable[[], Any]) -> Any:
    """Tangent of ``fn()`` (a tensor or tuple of tensors) when each control ``u_c`` moves along ``tangents[c]``.

    One forward-mode pass (``torch.autograd.forward_ad``): each control's parameter is made a dual
    tensor *in place* (its value copied onto itself with the tangent attached), so a controller
    that reaches its parameter through any reference sees the tangent; leaving the dual level
    drops the tangents and leaves the values bit for bit unchanged.
    """
    with torch.no_grad(), fwAD.dual_level():
        for c, t in zip(controls, tangents):
            c.param.copy_(fwAD.make_dual(c.param.detach().clone(), t.to(c.param)))
        out = fn()
        if isinstance(out, tuple):
            return tuple(_tangent(o) for o in out)
        return _tangent(out)


def _tangent(value: torch.Tensor) -> torch.Tensor:
    """The tangent of a dual tensor (zeros when ``value`` does not depend on the perturbed controls)."""
    tangent = fwAD.unpack_dual(value).tangent
    return torch.zeros_like(value) if tangent is None else tangent


def _block_tangents(system: ControlSystem, cached: Rollout, layer: int, tangents: torch.Tensor) -> torch.Tensor:
    """``∂f_l/∂x · t`` at the cached ``x_l`` for each stacked tangent t (K×S×T×d), by ``jvp``."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return jvp(lambda x: system.step(layer, x, cached.ctx), (cached.states[layer],), (t,))[1]

    return batched(one, tangents)


def _readout_tangents(system: ControlSystem, cached: Rollout, batch: dict, tangents: torch.Tensor) -> torch.Tensor:
    """``∂Φ̄/∂x_L · t`` for each stacked tangent t (K scalars), by ``jvp``."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return jvp(lambda x: system.terminal_cost(x, cached.ctx, batch), (cached.states[-1],), (t,))[1]

    return batched(one, tangents)


@dataclass
class ForwardReport:
    """What :func:`forward_mode_check` measured.

    Attributes:
        costate: per layer l, the largest ``rel(−⟨p_l, v⟩, JVP)`` over the state directions.
        controls: ``name -> rel(−⟨∇_u H, v⟩, dJ/dt(u + t v))``.
        joint: the same along one direction over all controls, from the embedding.
    """

    costate: list[float]
    controls: dict[str, float]
    joint: float


@torch.no_grad()
def forward_mode_check(system: ControlSystem, batch: dict, solution: CoStateSolution, n_state_directions: int = 2,
                       seed: int = 0, directions: dict[str, torch.Tensor] | None = None) -> ForwardReport:
    """The forward-mode leg (see the module docstring) on a float64 system.

    ``directions``: ``name -> v`` per control (default: :func:`control_direction`, seeded).
    Each initial control (layer control of block l) gets one JVP of the embedding (of block l)
    giving its tangent of ``x_0`` (of ``x_{l+1}``) and ``dR``; these tangents and the state
    directions of every ``x_l`` are then carried together through the blocks (:func:`propagate`).
    Shared and terminal controls get one JVP of the cost from where they first act.
    """
    _check_solution(system, solution)
    n = system.n_layers
    cached = rollout(system, batch)
    scale = ZERO_SCALE * abs(cached.cost)
    gen = torch.Generator().manual_seed(seed)
    controls = list(system.controls())
    if directions is None:
        directions = {c.name: control_direction(c.param, gen) for c in controls}
    slope: dict[str, float] = {}  # dJ/dt along each control's direction
    pushed = _direct_tangents(system, batch, cached, controls, directions, slope)
    state_dirs = [[token_direction(x, gen) for _ in range(n_state_directions)] for x in cached.states]
    entering = [[*dirs, *(w for _, w in tangents)] for dirs, tangents in zip(state_dirs, pushed)]
    values = iter(propagate(system, entering, partial(_block_tangents, system, cached),
                            partial(_readout_tangents, system, cached, batch)))

    costate_err = []
    for layer, dirs in enumerate(state_dirs):
        found = [next(values) for _ in dirs]
        for name, _ in pushed[layer]:
            slope[name] += next(values)
        p = solution.costates[layer]
        costate_err.append(0.0 if p is None else max(
            (scalar_error(-float((p.double() * v).sum()), d, scale) for v, d in zip(dirs, found)), default=0.0))
    for c in controls:  # shared and terminal: one JVP of the cost from where they first act
        if c.kind in ("shared", "term"):
            start, wheres = (n, ("term",)) if c.kind == "term" else (min(c.layers), tuple(c.layers))
            slope[c.name] = float(control_jvp([c], [directions[c.name]],
                                              partial(cost_from, system, cached, batch, start, wheres)))
    control_err = {c.name: scalar_error(_pmp_slope(solution, {c.name: directions[c.name]}), slope[c.name], scale)
                   for c in controls}
    joint = float(control_jvp(controls, [directions[c.name] for c in controls],
                              partial(cost_from, system, cached, batch, "embed", _all_wheres(system))))
    return ForwardReport(costate_err, control_err, scalar_error(_pmp_slope(solution, directions), joint, scale))


def _direct_tangents(system: ControlSystem, batch: dict, cached: Rollout, controls: Sequence[Control],
                     directions: dict[str, torch.Tensor], slope: dict[str, float]
                     ) -> list[list[tuple[str, torch.Tensor]]]:
    """Per state x_l, the tangents ``(name, w)`` the initial (l = 0) and layer (block l−1) controls give it.

    ``w = ∂x_0/∂u·v`` (one JVP of the embedding) or ``∂f_{l−1}/∂u·v`` (one JVP of block l−1);
    ``slope[name]`` is set to the running-cost part ``dR/dt`` of the same JVP.
    """
    pushed: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(system.n_layers + 1)]
    for c in controls:
        if c.kind == "init":
            fn, target = partial(_embed_and_cost, system, batch), 0
        elif c.kind == "layer":
            layer = c.layers[0]
            fn, target = partial(_block_and_cost, system, layer, cached.states[layer], cached.ctx), layer + 1
        else:
            continue
        w, r = control_jvp([c], [directions[c.name]], fn)
        pushed[target].append((c.name, w))
        slope[c.name] = float(r)
    return pushed


def _embed_and_cost(system: ControlSystem, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_0(u), R_init(u))``: what an initial control changes directly."""
    return system.embed(batch)[0], system.running_cost("init")


def _block_and_cost(system: ControlSystem, layer: int, x: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, ...]:
    """``(f_l(x, u), R_l(u))``: what a layer control of block l changes directly."""
    return system.step(layer, x, ctx), system.running_cost(layer)


def _phi_from(system: ControlSystem, cached: Rollout, batch: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
    """``Φ̄`` after running blocks ``layer..L−1`` from state ``x`` (running costs do not depend on x)."""
    for k in range(layer, system.n_layers):
        x = system.step(k, x, cached.ctx)
    return system.terminal_cost(x, cached.ctx, batch)
