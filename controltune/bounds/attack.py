"""An attack lower bound for ``sup_{‖d‖ ≤ ε} |J(u* + d) − J(u*)|``: projected gradient ascent over the ball.

Every point the ascent evaluates lies in the ball, so the largest ``|J(u* + d) − J(u*)|`` seen
is a lower bound of the supremum; ``certified / attack`` is the tightness of a certificate
(the standard measure in verification).  For each start ``(s, d₀)`` (``s = ±1``: ascend
``s·(J − J*)``) the ascent takes normalised steps
``d ← Π_ε(d + η ε s ∇J/‖∇J‖)`` with ``Π_ε`` the radial projection onto ``‖d‖ ≤ ε``; a step
that does not improve is undone and η halved, one that does grows η by 1.5 (at most 1).
Starts: ``±ε ∇J(u*)/‖∇J(u*)‖`` (the first-order maximiser), any given directions (e.g. the
projection ``Πu* − u*``), seeded random directions on the sphere and warm starts (points found
for smaller balls, which lie in this one: the attack is then non-decreasing in ε).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .weight_deltas import delta_controller

if TYPE_CHECKING:
    from ..system import ResidualSystem

Delta = dict[str, torch.Tensor]


def _norm(d: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))


def _scaled(d: Mapping[str, torch.Tensor], k: float) -> Delta:
    return {n: v * k for n, v in d.items()}


def value_and_grad(system: ResidualSystem, batch: dict, reference: Mapping[str, torch.Tensor], d: Mapping[str,
                   torch.Tensor],
                   grad: bool = True) -> tuple[float, Delta | None]:
    """``J(u* + d)`` and (optionally) ``∂J/∂u`` there as dense ``{"<layer>.<role>": tensor}``."""
    dw = delta_controller(system)
    dw.assign({k: reference[k] + d[k] for k in reference})
    params = {k: dw.delta(k).delta for k in reference}
    if not grad:
        with torch.no_grad():
            return float(system.cost(batch)), None
    with torch.enable_grad():
        j = system.cost(batch)
        gs = torch.autograd.grad(j, list(params.values()))
    return float(j.detach()), {k: dw.delta(k).as_dense(g) for k, g in zip(params, gs)}


@dataclass
class AttackResult:
    """The best ``|J(u*+d) − J(u*)|`` found (``value``) at ``point``, its signed change, the starts' values."""

    epsilon: float
    value: float
    signed: float
    evaluations: int
    seconds: float
    starts: list[dict[str, Any]] = field(default_factory=list)
    point: Delta | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "value": self.value, "signed": self.signed,
                "evaluations": self.evaluations, "seconds": self.seconds, "starts": self.starts}


def attack(system: ResidualSystem, batch: dict, epsilon: float, gradient: Mapping[str, torch.Tensor] | None = None,
           directions: Sequence[tuple[str, Mapping[str, torch.Tensor]]] = (), restarts: int = 2,
           steps: int = 10, seed: int = 0, warm: Sequence[tuple[str, Mapping[str, torch.Tensor]]] = ()
           ) -> AttackResult:
    """Projected gradient ascent of ``|J(u* + d) − J(u*)|`` over ``‖d‖ ≤ epsilon``.

    ``gradient``: ``∂J/∂u`` at u* (computed when omitted); ``directions``: named extra starts
    (scaled to the sphere; ascended in the direction of their own sign of ``J − J*``); ``warm``:
    named starting points taken as they are (pulled onto the sphere if outside the ball).
    The system's deltas are left at u* on return.
    """
    t0 = time.time()
    dw = delta_controller(system)
    ref = dw.values()
    zero = {k: torch.zeros_like(v) for k, v in ref.items()}
    j0, g0 = value_and_grad(system, batch, ref, zero, grad=gradient is None)
    g0 = dict(gradient) if gradient is not None else g0
    evals = 1
    best, best_signed, best_point = 0.0, 0.0, zero
    starts: list[tuple[str, int | None, Delta]] = []
    gn = _norm(g0)
    if gn > 0:
        starts += [("gradient", 1, _scaled(g0, epsilon / gn)), ("-gradient", -1, _scaled(g0, -epsilon / gn))]
    for name, d in directions:
        n = _norm(d)
        if n > 0:
            starts.append((name, None, _scaled(d, epsilon / n)))
    for name, d in warm:
        n = _norm(d)
        starts.append((name, None, _scaled(d, epsilon / n) if n > epsilon else dict(d)))
    gen = torch.Generator().manual_seed(seed)
    for i in range(restarts):
        r = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device) for k, v in ref.items()}
        starts.append((f"random{i}", 1, _scaled(r, epsilon / _norm(r))))
    report = []
    try:
        for name, sign, d in starts:
            j, g = value_and_grad(system, batch, ref, d)
            evals += 1
            s = sign if sign is not None else (1 if j >= j0 else -1)
            cur, eta, first = s * (j - j0), 0.5, j - j0
            run_best = cur
            if abs(j - j0) > best:
                best, best_signed, best_point = abs(j - j0), j - j0, d
            for _ in range(steps):
                gnorm = _norm(g)
                if gnorm == 0 or epsilon == 0:
                    break
                cand = {k: d[k] + (eta * epsilon * s / gnorm) * g[k] for k in d}
                n = _norm(cand)
                if n > epsilon:
                    cand = _scaled(cand, epsilon / n)
                jc, gc = value_and_grad(system, batch, ref, cand)
                evals += 1
                if abs(jc - j0) > best:
                    best, best_signed, best_point = abs(jc - j0), jc - j0, cand
                if s * (jc - j0) > cur:
                    d, g, cur, eta = cand, gc, s * (jc - j0), min(1.0, 1.5 * eta)
                    run_best = max(run_best, cur)
                else:
                    eta *= 0.5
            report.append({"start": name, "sign": s, "initial_change": first, "best_change": s * run_best})
    finally:
        dw.assign(ref)
    return AttackResult(epsilon, best, best_signed, evals, time.time() - t0, report, best_point)


__all__ = ["AttackResult", "attack", "value_and_grad"]
