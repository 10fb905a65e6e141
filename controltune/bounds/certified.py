"""A certified bound ``B(ε) ≥ sup_{‖d‖ ≤ ε} |J(u* + d) − J(u*)|`` over weight deltas d, computed around u*.

The control is the reference's :class:`~controltune.bounds.weight_deltas.DeltaWeights`
(``ΔW`` on the target maps), ``‖d‖`` the Frobenius norm over all of them.  Three routes,
each sound on its own; the certificate is their minimum:

* ``taylor``: ``φ(τ) = J(u* + τ d)``, ``|φ(1) − φ(0)| ≤ |φ'(0)| + ½ sup_τ |φ''(τ)|`` with
  ``|φ'(0)| ≤ ‖∇_u J‖ ε`` *exactly* from the co-states (``∇_u H = −∂J/∂u``) and
  ``|φ''| ≤ (1/S) Σ_s π_s (max_k ν_sk² A_s² + max_k ν_sk B_s) + λ ε²``, where, for the margins
  ``m_sk = z_sk − z_{s,y_s}`` of the classification head, ``|ṁ_sk| ≤ ν_sk A_s`` and
  ``|m̈_sk| ≤ ν_sk B_s`` (``A_s = Σ_t ω_st a_t``, ``B_s = Σ_t ω_st b_t`` the pooled derivative radii of
  the readout's LayerNorm output, ω the pooling weights, ``ν_sk = ‖P((w_k − w_y) ⊙ γ)‖``) and
  ``CE = log(1 + Σ_k e^{m_k})`` has ``|∂CE/∂m · m̈| ≤ π max|m̈_k|``, ``ṁᵀ∇²CE ṁ ≤ π max ṁ_k²`` with
  ``π = 1 − p_y ≤ 1 − e^{−CE_hi}`` on the enclosure;
* ``enclosure``: the margins lie in ``m_sk ± ν_sk Σ_t ω_st ζ_t`` (ζ the enclosure radii of the
  normalised readout input), intersected with the readout range below; CE is increasing in
  every margin, so ``J ∈ [mean CE(lo), mean CE(hi)]``;
* ``range``: a LayerNorm output ``γ ⊙ n + β`` has ``n ⟂ 1``, ``‖n‖ < √d`` whatever the control, so
  ``m_sk ∈ (w_k − w_y)·β + b_k − b_y ± √d ν_sk`` — the readout's own range.

Running cost ``R = (λ/2)‖u‖²``: ``|ΔR| ≤ λ (‖u*‖ ε + ε²/2)`` is added to the zeroth-order routes.
Every route is evaluated in float64 and inflated by a relative ``1e-9`` (+ ``1e-14``) for rounding.
The per-token radii are :mod:`controltune.bounds.enclosure`'s, valid for every site's
``‖d_site‖₂ ≤ ε`` (a superset of the ball).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..controllers.base import UnsupportedMethodError
from . import enclosure as enc
from .weight_deltas import delta_controller

if TYPE_CHECKING:
    from ..system import ResidualSystem
    from .attack import AttackResult
    from .reference import Reference

ROUTES = ("taylor", "enclosure", "range")
SAFETY = 1e-9
"""Relative inflation of every certified number (float64 rounding of the bound's own arithmetic)."""


def _safe(x: float) -> float:
    return x * (1.0 + SAFETY) + 1e-14 if math.isfinite(x) else math.inf


@dataclass
class Readout:
    """The classification readout at u*: pooling weights ω (S×T), margin rows and their scales.

    ``nu`` (S×C): ``‖P((w_k − w_y) ⊙ γ)‖`` (``‖w_k − w_y‖`` without a LayerNorm); ``centre`` (S×C)
    margins at u*; ``range_lo/hi`` (S×C): the readout range (±inf without a LayerNorm);
    ``final_norm``: the trace of the readout's own LayerNorm (pre-LN), else None.
    """

    omega: torch.Tensor
    nu: torch.Tensor
    centre: torch.Tensor
    range_lo: torch.Tensor
    range_hi: torch.Tensor
    final_norm: enc.LayerNormTrace | None
    phi: float


def _pool_weights(how: str, mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
    if how == "mean":
        return mask / mask.sum(1, keepdim=True).clamp_min(1.0)
    w = torch.zeros_like(mask)
    rows = torch.arange(mask.shape[0])
    idx = torch.full((mask.shape[0],), n_prompt) if how == "cls" else mask.sum(1).long() - 1
    w[rows, idx] = 1.0
    return w


def readout_trace(system: ResidualSystem, tr: enc.Trace, batch: dict) -> Readout:
    """Margins of the classification head at u* and the readout range."""
    ro = system.readout
    if getattr(ro, "kind", None) != "classification":
        raise UnsupportedMethodError("certified bounds are derived for the classification readout only")
    x = tr.final
    final = None
    if isinstance(ro.norm, nn.LayerNorm):
        final = enc.layernorm_trace(x, ro.norm.weight.detach(), ro.norm.bias.detach(), float(ro.norm.eps))
        y, gamma, beta = final.out, final.gamma, final.beta
    elif isinstance(ro.norm, nn.Identity):
        last = tr.blocks[-1].out_norm
        y = x
        gamma, beta = (last.gamma, last.beta) if last is not None else (None, None)
    else:
        raise UnsupportedMethodError(f"readout norm {type(ro.norm).__name__} is not a LayerNorm")
    omega = _pool_weights(ro.pooling, tr.real, 0)
    w, b = ro.head.weight.detach(), ro.head.bias.detach()
    labels = batch["labels"]
    diff = w[None] - w[labels][:, None]  # S×C×d: w_k − w_y
    logits = (omega[..., None] * y).sum(1) @ w.T + b
    centre = logits - logits.gather(1, labels[:, None])
    phi = float(torch.nn.functional.cross_entropy(logits, labels))
    if gamma is None:
        nu = diff.norm(dim=-1)
        lo = torch.full_like(nu, -math.inf)
        hi = torch.full_like(nu, math.inf)
    else:
        g = diff * gamma
        nu = (g - g.mean(-1, keepdim=True)).norm(dim=-1)
        const = diff @ beta + b[None] - b[labels][:, None]
        half = math.sqrt(gamma.numel()) * nu
        lo, hi = const - half, const + half
    own = torch.zeros_like(nu, dtype=torch.bool).scatter(1, labels[:, None], True)
    lo, hi = lo.masked_fill(own, 0.0), hi.masked_fill(own, 0.0)
    return Readout(omega, nu.masked_fill(own, 0.0), centre, lo, hi, final, phi)


def _ce_interval(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example ``[CE(lo), CE(hi)]`` for margins in ``[lo, hi]`` (the own class's margin is 0)."""
    return torch.logsumexp(lo, 1), torch.logsumexp(hi, 1)


@dataclass
class Certificate:
    """``B(ε)`` and its parts (each a sound bound on ``sup_{‖d‖≤ε} |J(u*+d) − J(u*)|``)."""

    epsilon: float
    certified: float
    route: str
    routes: dict[str, float]
    first_order: float
    curvature: float
    seconds: float
    gains: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "certified": self.certified, "route": self.route, "routes": self.routes,
                "first_order": self.first_order, "curvature": self.curvature, "seconds": self.seconds,
                "gains": self.gains}


@dataclass
class Anchor:
    """Everything at u* the certificates of all radii share: the trace, the readout, ``‖∇_u J‖``."""

    trace: enc.Trace
    readout: Readout
    grad_norm: float
    u_norm: float
    weight_decay: float
    cost: float
    gradient: dict[str, torch.Tensor]


def anchor(system: ResidualSystem, batch: dict) -> Anchor:
    """Trace the rollout at the current deltas u* and take ``‖∇_u J‖`` from the co-states."""
    from ..pmp import solve_costate

    dw = delta_controller(system)
    sol = solve_costate(system, batch, initial_costate=False)
    # ∂J/∂u = −∇_u H of each control ``delta.<layer>.<role>``, as dense d_out×d_in.
    gradient = {k: -dw.delta(k).as_dense(sol.control_grads[f"delta.{k}"]) for k in dw.values()}
    grad = math.sqrt(sum(float(g.pow(2).sum()) for g in gradient.values()))
    tr = enc.trace(system, batch)
    ro = readout_trace(system, tr, batch)
    u_norm = math.sqrt(sum(float(v.pow(2).sum()) for v in dw.values().values()))
    return Anchor(tr, ro, grad, u_norm, float(dw.weight_decay), sol.cost, gradient)


def certify(anc: Anchor, epsilon: float) -> Certificate:
    """:class:`Certificate` for the ball of radius ``epsilon`` around u*."""
    t0 = time.time()
    tr, ro = anc.trace, anc.readout
    state, gains = enc.propagate(tr, epsilon)
    if ro.final_norm is not None:
        fn = ro.final_norm
        state = enc.layernorm_radii(state.x, fn.sigma, fn.n_norm, fn.gamma, fn.eps)
    r = state.z if state.z is not None else state.x
    pooled = {k: (ro.omega * getattr(r, k)).sum(1, keepdim=True) for k in ("rho", "a", "b")}
    lam, running = anc.weight_decay, anc.weight_decay * (anc.u_norm * epsilon + 0.5 * epsilon ** 2)

    def zeroth(lo: torch.Tensor, hi: torch.Tensor) -> float:
        ce_lo, ce_hi = _ce_interval(lo, hi)
        return max(float(ce_hi.mean()) - ro.phi, ro.phi - float(ce_lo.mean()), 0.0) + running

    lo = torch.maximum(ro.centre - ro.nu * pooled["rho"], ro.range_lo)
    hi = torch.minimum(ro.centre + ro.nu * pooled["rho"], ro.range_hi)
    enclosure = zeroth(lo, hi)
    rng = zeroth(ro.range_lo, ro.range_hi)
    pi = -torch.expm1(-_ce_interval(lo, hi)[1])  # 1 − p_y at its largest on the enclosure
    nu_max = ro.nu.amax(1)
    second = pi * (nu_max.pow(2) * pooled["a"][:, 0].pow(2) + nu_max * pooled["b"][:, 0])
    curvature = float(second.mean()) + lam * epsilon ** 2
    first = anc.grad_norm * epsilon
    routes = {"taylor": _safe(first + 0.5 * curvature), "enclosure": _safe(enclosure), "range": _safe(rng)}
    # Ties go to the simplest explanation: the range, then the enclosure.
    route = min(reversed(ROUTES), key=lambda k: routes[k])
    return Certificate(epsilon, routes[route], route, routes, first, curvature, time.time() - t0, gains)


def _row(cert: Certificate, att: AttackResult, gap: float | None, seconds: float) -> dict[str, Any]:
    a = att.value
    return {"epsilon": cert.epsilon, "gap": gap, "attack": a, "certified": cert.certified, "route": cert.route,
            "seconds": seconds, "routes": cert.routes, "first_order": cert.first_order,
            "curvature": cert.curvature, "tightness_attack": cert.certified / a if a > 0 else None,
            "tightness_gap": cert.certified / gap if gap else None, "attack_detail": att.to_dict(),
            "gains": cert.gains}


def certified_sweep(ref: Reference, batch: dict, structure: str, sizes: Sequence[int], epsilons: Sequence[float] = (),
                    attack_steps: int = 10, attack_restarts: int = 2, seed: int = 0, grid: Sequence[float] = (),
                    progress: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Certificate, attack and measured gap for each projection of u* onto ``structure`` of the given sizes
    (``ε = ‖Πu* − u*‖``; the attack also starts from ``Πu* − u*``), for each radius of ``epsilons``
    (certificate and attack) and of ``grid`` (certificate only: cheap, to see where each route holds).

    Returns ``{"rows", "curve", "grid"}``: rows carry ``structure, size, epsilon, gap, attack, certified,
    route, seconds`` (and the routes, first-order term, curvature bound, tightness, attack details,
    per-block operation gains); curve rows the same without structure, size and gap; grid rows the
    :class:`Certificate` fields.
    """
    from tqdm.auto import tqdm

    from .attack import attack, value_and_grad
    from .projections import STRUCTURES, project

    if structure not in STRUCTURES:
        raise ValueError(f"structure {structure!r} is not one of {STRUCTURES}")
    system = ref.system
    anc = anchor(system, batch)
    # Every ball, projections and radii together, in increasing ε: the best point found for a smaller ball
    # lies in every larger one and warm-starts its attack (so the attack is non-decreasing in ε).
    tasks: list[dict[str, Any]] = []
    for size in sizes:
        projected = project(ref.values, structure, int(size), seed)
        d = {k: projected[k] - ref.values[k] for k in ref.values}
        tasks.append({"size": int(size), "d": d, "epsilon": math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))})
    tasks += [{"size": None, "d": None, "epsilon": float(eps)} for eps in epsilons]
    found: list[tuple[float, float, dict]] = []  # (ε, value, point) of every attack so far
    for task in tqdm(sorted(tasks, key=lambda t: t["epsilon"]), desc=f"certified {structure}", disable=not progress):
        t0, eps, d = time.time(), task["epsilon"], task["d"]
        gap = None
        if d is not None:
            j, _ = value_and_grad(system, batch, ref.values, d, grad=False)
            delta_controller(system).assign(ref.values)
            gap = abs(j - anc.cost)
        cert = certify(anc, eps)
        inside = [f for f in found if f[0] <= eps and f[2] is not None]
        warm = [(f"best at ε={f[0]:.3g}", f[2]) for f in [max(inside, key=lambda f: f[1])]] if inside else []
        att = attack(system, batch, eps, anc.gradient, [("projection", d)] if d is not None else [],
                     attack_restarts, attack_steps, seed, warm)
        found.append((eps, att.value, att.point))
        task["row"] = _row(cert, att, gap, time.time() - t0)
    rows = [{"structure": structure, "size": t["size"], **t["row"]} for t in tasks if t["d"] is not None]
    curve = []
    for t in sorted((t for t in tasks if t["d"] is None), key=lambda t: t["epsilon"]):
        row = t["row"]
        del row["gap"], row["tightness_gap"]
        curve.append(row)
    return {"rows": rows, "curve": curve, "grid": [certify(anc, float(eps)).to_dict() for eps in grid]}


__all__ = ["ROUTES", "SAFETY", "Anchor", "Certificate", "Readout", "anchor", "certified_sweep", "certify",
           "readout_trace"]
