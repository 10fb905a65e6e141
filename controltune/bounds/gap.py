"""The measured gap ``|J(u*) − J(Πu*)|`` of an approximation against its bounds and the co-state estimate.

Theory: ``|J(u*) − J(Πu*)| ≤ Lip · dist(u*, Πu*)``.  For a reference u* held as
weight deltas (:mod:`controltune.bounds.reference`) and one projection Πu*
(:mod:`controltune.bounds.projections`), :func:`compare` evaluates the distances
(per layer), the Grönwall bounds (:mod:`controltune.bounds.gronwall`) with
certified (composed, on the probed domain), global (composed, valid everywhere),
trajectory-local (Jacobian norms) and sampled (lower-bound) constants, the
first-order bounds through the adjoint, the co-state estimate
``−Σ⟨∇_u H, Πu* − u*⟩``, the measured gap and the dev-score change; every bound's
tightness is ``bound / measured gap``.  :func:`sweep` does it for each size of a
structure.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import gronwall as gw
from .composed import composed_block_bound
from .domain import LayerDomain, global_domain, probe_block
from .lipschitz import (
    local_control_lipschitz,
    local_state_lipschitz,
    sampled_control_lipschitz,
    sampled_state_lipschitz,
)
from .projections import STRUCTURES, project
from .reference import Reference
from .terminal import final_norm_sigma, local_terminal_lipschitz, terminal_lipschitz
from .weight_deltas import delta_controller, key_layer, key_role, per_layer_distance
from .weights import BlockWeights, block_weights

if TYPE_CHECKING:
    from ..families.base import Context
    from ..system import ResidualSystem


@dataclass
class ReferenceConstants:
    """Per-layer constants at the reference u* (independent of the projection).

    ``local_a/local_b``: Jacobian spectral norms (state: of G for pre-LN); ``sampled_a/b``:
    sampled lower bounds; ``local_phi``: ``‖∂Φ̄/∂x_L‖``; ``grads``: ``∇_u H`` per delta key;
    ``costate_norms``: ``‖p_l‖`` for l = 0..L.
    """

    local_a: list[float]
    local_b: list[float]
    sampled_a: list[float]
    sampled_b: list[float]
    local_phi: float
    grads: dict[str, torch.Tensor]
    costate_norms: list[float]
    seconds: float
    power_converged: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"local_a": self.local_a, "local_b": self.local_b, "sampled_a": self.sampled_a,
                "sampled_b": self.sampled_b, "local_phi": self.local_phi, "costate_norms": self.costate_norms,
                "grad_norm_per_layer": self.grad_norm_per_layer(), "seconds": self.seconds,
                "power_converged": self.power_converged}

    def grad_norm_per_layer(self) -> list[float]:
        """``‖∇_{u_l} H_l‖`` per block."""
        n = len(self.local_a)
        return per_layer_distance(self.grads, {k: torch.zeros_like(v) for k, v in self.grads.items()}, n)


def reference_constants(system: ResidualSystem, batch: dict, iters: int = 20, tol: float = 1e-4, sampled_steps: int = 3,
                        sampled_radius: float = 1e-2, use_pmp: bool = True, progress: bool = False
                        ) -> ReferenceConstants:
    """Trajectory-local and sampled per-layer constants and ``∇_u H`` at the current deltas u*."""
    from tqdm.auto import tqdm

    t0 = time.time()
    dw = delta_controller(system)
    with system.using_kernel("eager"):
        with torch.no_grad():
            traj = system.rollout(batch)
        la, lb, sa, sb, conv = [], [], [], [], []
        for layer in tqdm(range(system.n_layers), desc="per-layer constants", disable=not progress):
            x = traj.states[layer]
            ra = local_state_lipschitz(system, layer, x, traj.ctx, iters=iters, tol=tol)
            rb = local_control_lipschitz(system, layer, x, traj.ctx, iters=iters, tol=tol)
            la.append(ra.sigma)
            lb.append(rb.sigma)
            conv.append(ra.converged and rb.converged)
            sa.append(sampled_state_lipschitz(system, layer, x, traj.ctx, radius=sampled_radius, samples=1,
                                              steps=sampled_steps))
            sb.append(sampled_control_lipschitz(system, layer, x, traj.ctx, radius=sampled_radius, samples=1,
                                                steps=sampled_steps))
        local_phi = local_terminal_lipschitz(system, traj.final, traj.ctx, batch)
    grads, costate_norms = gw.hamiltonian_gradients(system, batch, use_pmp=use_pmp)
    by_name = {c.name: k for c, k in zip(dw.controls(), dw.values())}
    dense = {}
    for c in dw.controls():
        key = by_name[c.name]
        dense[key] = dw.delta(key).as_dense(grads[c.name])
    return ReferenceConstants(la, lb, sa, sb, local_phi, dense, costate_norms, time.time() - t0, conv)


@dataclass
class _Endpoint:
    """The system evaluated at one control (u* or Πu*) on the batch."""

    traj: Any
    cost: float
    running: list[float]
    domains: list[LayerDomain]
    weights: list[BlockWeights]
    final_sigma: float | None


def _probe_all(system: ResidualSystem, states: Sequence[torch.Tensor], ctx: Context) -> list[LayerDomain]:
    return [probe_block(system, layer, states[layer], ctx) for layer in range(system.n_layers)]


@torch.no_grad()
def _evaluate(system: ResidualSystem, batch: dict) -> _Endpoint:
    """``J = Φ̄ + Σ_l R_l``, the probed domains and effective weights of every block at the current controls."""
    traj = system.rollout(batch)
    j = system.terminal_cost(traj.final, traj.ctx, batch)
    r = [float(system.running_cost(layer)) for layer in range(system.n_layers)]
    return _Endpoint(traj, float(j) + sum(r), r, _probe_all(system, traj.states, traj.ctx),
                     [block_weights(system, layer) for layer in range(system.n_layers)],
                     final_norm_sigma(system, traj.final, traj.ctx))


def _composed_bounds(system: ResidualSystem, ref: _Endpoint, proj: _Endpoint, mixed: list[LayerDomain],
                     site_dist: Mapping[str, float], running: float) -> dict[str, dict[str, Any]]:
    """Grönwall with composed per-block constants: ``certified`` on the probed domains (u*, Πu* and the
    mixed point merged), ``global`` on domains valid for every input."""
    post_ln = system.family.post_ln
    ctx = ref.traj.ctx
    bounds = {}
    for label in ("certified", "global"):
        gains, drive, domains = [], [], []
        for layer in range(system.n_layers):
            if label == "certified":
                dom = ref.domains[layer].merge(mixed[layer]).merge(proj.domains[layer])
            else:
                dom = global_domain(system, layer, ctx, ref.weights[layer], proj.weights[layer])
            cb = composed_block_bound(system, layer, dom, ref.weights[layer], proj.weights[layer])
            gains.append(cb.a)
            drive.append(sum(cb.b[key_role(k)] * d for k, d in site_dist.items() if key_layer(k) == layer))
            domains.append({"a": cb.a, "b": cb.b, **dom.to_dict()})
        if label == "certified":
            sig = [s for s in (proj.final_sigma, ref.final_sigma) if s is not None]
            phi = terminal_lipschitz(system, ctx, min(sig) if sig else None)
        else:
            phi = terminal_lipschitz(system, ctx)
        g = gw.gronwall(gw.state_gains(gains, post_ln), drive, phi, running)
        bounds[label] = {**g.to_dict(), "layers": domains}
    return bounds


def _first_order_bounds(system: ResidualSystem, batch: dict, constants: ReferenceConstants, direction: dict[str,
                        torch.Tensor],
                        dist: list[float], running: float) -> dict[str, dict[str, Any]]:
    """Grönwall with the trajectory-local and sampled constants, and bounds through the adjoint:
    ``|δJ| ≈ |Σ_l ⟨p_{l+1}, ∂f_l/∂u Δu_l⟩| ≤ Σ_l ‖p_{l+1}‖ b_l ‖Δu_l‖`` (``adjoint``),
    ``≤ Σ_l ‖∇_{u_l}H_l‖ ‖Δu_l‖`` (``costate_cs``) and ``‖∂Φ̄/∂x_L‖·‖δx_L‖`` with ``δx_L``
    the exact linearisation of the rollout in the direction ``Πu* − u*`` (``tangent``)."""
    post_ln = system.family.post_ln
    bounds = {}
    for label, a, b, phi in (("local", constants.local_a, constants.local_b, constants.local_phi),
                             ("sampled", constants.sampled_a, constants.sampled_b, constants.local_phi)):
        g = gw.gronwall(gw.state_gains(a, post_ln), [bl * d for bl, d in zip(b, dist)], phi, running)
        bounds[label] = g.to_dict()
    adj = [constants.costate_norms[layer + 1] * constants.local_b[layer] * dist[layer]
           for layer in range(system.n_layers)]
    bounds["adjoint"] = {"cost": sum(adj) + running, "contributions": adj, "running": running}
    cs = [g * d for g, d in zip(constants.grad_norm_per_layer(), dist)]
    bounds["costate_cs"] = {"cost": sum(cs) + running, "contributions": cs, "running": running}
    with system.using_kernel("eager"):
        dx = gw.linearized_state_change(system, batch, delta_controller(system).by_control(direction))
    bounds["tangent"] = {"cost": constants.local_phi * dx + running, "state": dx, "running": running}
    return bounds


def compare(system: ResidualSystem, batch: dict, reference: Mapping[str, torch.Tensor], projected: Mapping[str,
            torch.Tensor],
            constants: ReferenceConstants, dev: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """Every bound, the co-state estimate and the measured gap ``|J(u*) − J(Πu*)|`` for one projection.

    The system's :class:`DeltaWeights` is left at ``reference`` on return.
    ``dev`` (optional) scores the system at Πu* on the dev set.
    """
    dw = delta_controller(system)
    dw.assign(projected)
    proj = _evaluate(system, batch)
    dev_p = dev() if dev is not None else None  # scores of Πu* (the caller scores u* once)
    dw.assign(reference)
    ref = _evaluate(system, batch)
    mixed = _probe_all(system, proj.traj.states, ref.traj.ctx)  # f_l(x'_l, u*): the Grönwall mixed point

    dist = per_layer_distance(reference, projected, system.n_layers)
    site_dist = {k: float((reference[k] - projected[k]).norm()) for k in reference}
    running = sum(abs(a - b) for a, b in zip(ref.running, proj.running))
    gap = abs(ref.cost - proj.cost)
    direction = {k: projected[k] - reference[k] for k in reference}
    bounds = {**_composed_bounds(system, ref, proj, mixed, site_dist, running),
              **_first_order_bounds(system, batch, constants, direction, dist, running)}
    for v in bounds.values():
        v["tightness"] = v["cost"] / gap if gap > 0 else None  # undefined when Πu* = u* on the batch
    est = gw.costate_estimate(constants.grads, dict(reference), dict(projected))
    total = math.sqrt(sum(d * d for d in dist))
    row = {
        "distance": total, "distance_per_layer": dist,
        "relative_distance": total / max(math.sqrt(sum(float(v.pow(2).sum()) for v in reference.values())), 1e-300),
        "J_reference": ref.cost, "J_projected": proj.cost, "gap": gap, "signed_gap": proj.cost - ref.cost,
        "costate_estimate": est, "costate_tightness": abs(est) / gap if gap > 0 else None,
        "bounds": bounds, "certified_holds": bounds["certified"]["cost"] >= gap,
        "global_holds": bounds["global"]["cost"] >= gap,
    }
    if dev_p is not None:
        row["dev_projected"] = dev_p
    return row


def sweep(ref: Reference, batch: dict, constants: ReferenceConstants, structure: str, sizes: Sequence[int],
          dev: Callable[[], dict[str, float]] | None = None, seed: int = 0, done: set | None = None,
          on_row: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`compare` u* with its projection onto ``structure`` for each size (skipping ``done`` sizes)."""
    from tqdm.auto import tqdm

    if structure not in STRUCTURES:
        raise ValueError(f"structure {structure!r} is not one of {STRUCTURES}")
    rows = []
    for size in tqdm(list(sizes), desc=structure, disable=not progress):
        if done and (structure, int(size)) in done:
            continue
        t0 = time.time()
        projected = project(ref.values, structure, int(size), seed)
        row = {"structure": structure, "size": int(size),
               **compare(ref.system, batch, ref.values, projected, constants, dev), "seconds": time.time() - t0}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


__all__ = ["ReferenceConstants", "compare", "reference_constants", "sweep"]
