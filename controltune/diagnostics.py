"""PMP diagnostics of trained controls: stationarity and the maximum condition.

* **Stationarity** (first-order PMP): at a local optimum ``∇_{u_l} H_l = 0`` for
  every layer.  :func:`stationarity` reports ``‖∇_{u_l} H_l‖`` per layer (over all
  controls acting in block l; a shared control contributes its layer-l part) and
  ``‖∇_u H‖`` per control.
* **Maximum condition** ``H_l(x*, p*, u*) ≥ H_l(x*, p*, u)``: it holds for convex
  problems, not for Transformer blocks, so it is *measured*, never assumed.
  :func:`maximum_condition_probe` perturbs the controls of one layer at a time,
  ``u_l = u*_l + ε v`` with random unit directions v (jointly over every control
  acting in block l) at several radii ε, with ``x*_l`` and ``p*_{l+1}`` fixed, and
  reports the fraction of probes in which ``H_l`` did not increase (u* is a local
  maximum along ±v at that radius), plus ``H_l`` along lines ``t ↦ u* + t v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from .control import Control
from .pmp import ControlSystem, CoStateSolution, controls_by_layer, displaced, hamiltonian, solve_costate


def stationarity(solution: CoStateSolution) -> dict[str, Any]:
    """``{"layer": [‖∇_{u_l} H_l‖ for l = 0..L-1], "control": {name: ‖∇_u H‖}, "init": .., "term": ..}``.

    A layer without controls reports 0.  ``init``/``term`` are the norms over the
    initial and terminal controls.
    """
    per_layer = [_norm(list(g.values())) for g in solution.layer_grads]
    by_kind = {kind: _norm([solution.control_grads[c.name] for c in solution.controls if c.kind == kind])
               for kind in ("init", "term")}
    return {"layer": per_layer, "control": {n: float(g.norm()) for n, g in solution.control_grads.items()},
            **by_kind, "total": _norm(list(solution.control_grads.values()))}


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64))))


@torch.no_grad()
def maximum_condition_probe(system: ControlSystem, batch: dict, solution: CoStateSolution | None = None,
                            n_directions: int = 8, radii: Sequence[float] = (1e-3, 1e-2, 1e-1),
                            line_points: int = 9, n_lines: int = 2, relative: bool = True,
                            seed: int = 0) -> dict[str, Any]:
    """Probe ``H_l(x*, p*, u* ± ε v) ≤ H_l(x*, p*, u*)`` layer by layer.

    Args:
        system, batch: the trained system and a batch; ``solution`` (x*, p*) is solved if not given.
        n_directions: random unit directions v per layer (v spans every control acting in block l,
            normalised jointly).
        radii: the ε probed (both signs); with ``relative`` they are fractions of ``‖u*_l‖``
            (or absolute when ``‖u*_l‖ = 0``).
        line_points, n_lines: ``H_l(u* + t v) − H_l(u*)`` at ``line_points`` values of t in
            ``[−max ε, max ε]`` for the first ``n_lines`` directions.

    Returns:
        ``{"layers": [{"layer", "norm_u", "fraction_local_max", "per_radius": {ε: fraction},
        "max_increase", "lines": [{"t": [...], "dH": [...]}]}], "fraction_local_max": overall}``.
        A probe counts as a local maximum when both ``ΔH(+εv)`` and ``ΔH(−εv)`` are ≤ 0.
    """
    sol = solution if solution is not None else solve_costate(system, batch)
    per_layer = controls_by_layer(sol.controls, system.n_layers)
    gen = torch.Generator().manual_seed(seed)
    layers, hits, total = [], 0, 0
    for layer, ctrl in enumerate(per_layer):
        if not ctrl:
            continue
        x, p_next, ctx = sol.states[layer], sol.costates[layer + 1], sol.ctx
        reference = system.step(layer, x, ctx)
        r_star = float(system.running_cost(layer))
        norm_u = _norm([c.param.detach() for c in ctrl])
        scale = norm_u if relative and norm_u > 0 else 1.0
        delta_h = partial(_delta_h, system, layer, ctrl, x, p_next, ctx, reference, r_star)

        per_radius = {float(eps): 0 for eps in radii}
        lines, max_increase = [], float("-inf")
        for k in range(n_directions):
            v = _unit_direction(ctrl, gen)
            for eps in radii:
                up, down = delta_h(v, eps * scale), delta_h(v, -eps * scale)
                per_radius[float(eps)] += int(up <= 0 and down <= 0)
                max_increase = max(max_increase, up, down)
            if k < n_lines:
                ts = torch.linspace(-max(radii), max(radii), line_points, dtype=torch.float64).tolist()
                lines.append({"t": ts, "dH": [delta_h(v, t * scale) for t in ts]})
        n_probes = n_directions * len(radii)
        n_max = sum(per_radius.values())
        hits, total = hits + n_max, total + n_probes
        layers.append({"layer": layer, "norm_u": norm_u, "fraction_local_max": n_max / n_probes,
                       "per_radius": {eps: c / n_directions for eps, c in per_radius.items()},
                       "max_increase": max_increase, "lines": lines})
    return {"layers": layers, "fraction_local_max": hits / total if total else float("nan"),
            "n_directions": n_directions, "radii": [float(r) for r in radii], "relative": relative}


def _delta_h(system: ControlSystem, layer: int, ctrl: Control, x: torch.Tensor, p_next: torch.Tensor, ctx: Any,
             reference: torch.Tensor, r_star: float, direction: list[torch.Tensor], t: float) -> float:
    """``H_l(u* + t v) − H_l(u*)`` with x*, p* fixed."""
    # Σ p·(f(u*+tv) − f(u*)) − (R(u*+tv) − R(u*)): differencing f avoids the cancellation of two large Σ p·f.
    with displaced(ctrl, direction, t):
        return float(hamiltonian(system, layer, x, p_next, ctx, reference=reference)) + r_star


def _unit_direction(controls: Sequence[Control], gen: torch.Generator) -> list[torch.Tensor]:
    """A random direction over several controls with joint unit norm."""
    parts = [torch.randn(c.param.shape, generator=gen, dtype=torch.float64) for c in controls]
    norm = _norm(parts)
    return [(q / norm).to(c.param) for q, c in zip(parts, controls)]


__all__ = ["maximum_condition_probe", "stationarity"]
