"""Controllability scores of candidate delta sites: readout-weighted Gramians and co-state energy.

For a control ``u`` acting at a site of block l (a weight ``ΔW`` of a linear map, or an
additive per-token control on the block output), the linearised effect on the logits is
``δlogits = C u`` with ``C = G Φ_{L,l+1} B_l`` (``G`` the readout Jacobian, ``Φ`` the
state-transition product, ``B_l = ∂f_l/∂u``).  The finite-horizon controllability Gramian
of the site seen through the readout and weighted by the Gauss–Newton curvature of the
CE loss ``H = blockdiag_s(diag(π_s) − π_s π_sᵀ)`` is

    W = H^{1/2} C Cᵀ H^{1/2},      score = tr W / S = tr(Cᵀ H C) / S,

the mean curvature of the task loss reachable by unit-energy controls of the site.
It is estimated matrix-free with Hutchinson probes:

* ``method="jvp"``: ``v ~ N(0, I)`` in control space, one forward-mode JVP per probe and site:
  ``tr(CᵀHC) = E ‖H^{1/2} C v‖²``;
* ``method="vjp"``: ``w = H^{1/2} ξ``, ``ξ ~ N(0, I)`` in logit space, one backward pass per
  probe gives every site at once: ``tr(H^{1/2} C Cᵀ H^{1/2}) = E ‖Cᵀ w‖²``.

The co-state energy ``‖∇_u H_l‖² = ‖−∂J/∂u‖²`` (DESIGN.md §1) scores a site by the
first-order decrease of J available to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from .linearize import eager_kernel

if TYPE_CHECKING:
    from ..system import ResidualSystem

__all__ = ["control_set_scores", "costate_energy", "gn_sqrt", "weight_costate_products", "layer_costate_energy",
           "module_gramian_scores",
           "parameter_names"]


def parameter_names(system: ResidualSystem, weights: Sequence[torch.Tensor]) -> list[str]:
    """Names of ``weights`` (frozen base tensors) inside ``system`` (for ``functional_call``)."""
    by_id = {id(p): name for name, p in system.named_parameters()}
    missing = [i for i, w in enumerate(weights) if id(w) not in by_id]
    if missing:
        raise ValueError(f"weights {missing} are not parameters of the system (pass module.weight of its modules)")
    return [by_id[id(w)] for w in weights]


def gn_sqrt(logits: torch.Tensor) -> torch.Tensor:
    """``H_s^{1/2}`` of the CE Gauss–Newton curvature ``diag(π_s) − π_s π_sᵀ``: S×C -> S×C×C."""
    p = torch.softmax(logits.detach(), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    evals, evecs = torch.linalg.eigh(H)
    return evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.transpose(1, 2)


def module_gramian_scores(system: ResidualSystem, batch: dict, weights: Mapping[str, torch.Tensor], n_probes: int = 8,
                          method: str = "vjp", seed: int = 0, weight: str = "gn") -> dict[str, float]:
    """Hutchinson estimate of ``tr(CᵀHC)/S`` for a full-rank ``ΔW`` control on each weight.

    Args:
        weights: ``key -> weight tensor`` of linear maps of the system (frozen base weights).
        n_probes: Hutchinson probes (per site for ``jvp``, shared by all sites for ``vjp``).
        method: ``jvp`` (forward mode, eager kernel) or ``vjp`` (reverse mode).
        weight: ``gn`` (CE Gauss–Newton ``H``) or ``identity`` (``H = I``: plain output controllability).

    Returns:
        ``key -> score`` (float).
    """
    if method not in ("jvp", "vjp"):
        raise ValueError(f"Hutchinson method {method!r} is not one of ('jvp', 'vjp')")
    if weight not in ("gn", "identity"):
        raise ValueError(f"Gramian weighting {weight!r} is not one of ('gn', 'identity')")
    if int(n_probes) < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    keys = list(weights)
    names = parameter_names(system, [weights[k] for k in keys])
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        logits0 = system(batch)
    s, c = logits0.shape
    hs = gn_sqrt(logits0) if weight == "gn" else torch.eye(c, dtype=logits0.dtype).expand(s, c, c)
    hs = hs.to(logits0)
    totals = dict.fromkeys(keys, 0.0)
    if method == "vjp":
        for _ in range(int(n_probes)):
            xi = torch.randn(s, c, generator=gen, dtype=torch.float64).to(logits0)
            w = (hs @ xi.unsqueeze(-1)).squeeze(-1)
            leaves = {n: weights[k].detach().requires_grad_(True) for k, n in zip(keys, names)}
            with torch.enable_grad():
                out = functional_call(system, leaves, (batch,), strict=False)
                grads = torch.autograd.grad(out, list(leaves.values()), w, allow_unused=True)
            for k, g in zip(keys, grads):
                totals[k] += 0.0 if g is None else float(g.pow(2).sum())
    else:
        with eager_kernel(system), torch.no_grad():
            for k, n in zip(keys, names):
                w0 = weights[k].detach()
                for _ in range(int(n_probes)):
                    v = torch.randn(w0.shape, generator=gen, dtype=torch.float64).to(w0)
                    _, dl = torch.func.jvp(lambda w, n=n: functional_call(system, {n: w}, (batch,), strict=False),
                                           (w0,), (v,))
                    totals[k] += float((hs @ dl.unsqueeze(-1)).pow(2).sum())
    return {k: totals[k] / (int(n_probes) * s) for k in keys}


def weight_costate_products(system: ResidualSystem, batch: dict, weights: Mapping[str, torch.Tensor]) -> dict[str,
                            torch.Tensor]:
    """``∇_W H = −∂J/∂W`` for base weights ``W`` taken as (full-rank) controls, by reverse-mode autograd.

    By the PMP identity (DESIGN.md §1) this is the map-level co-state product
    ``Σ_{s,t} (∂f_l/∂(W a))ᵀ p_{l+1}  ⊗  a_{s,t}`` (a the map's input); one backward pass
    gives every weight.  Returned in the weight's stored shape.
    """
    if getattr(system.readout, "kind", "") != "classification":
        raise ValueError("weight_costate_products needs a classification readout (J = mean CE of S×C logits)")
    keys = list(weights)
    names = parameter_names(system, [weights[k] for k in keys])
    leaves = {n: weights[k].detach().requires_grad_(True) for k, n in zip(keys, names)}
    with torch.enable_grad():
        logits = functional_call(system, leaves, (batch,), strict=False)
        # The controllers' running costs do not depend on base weights, so J's W-gradient is the CE's.
        J = torch.nn.functional.cross_entropy(logits, batch["labels"])
        grads = torch.autograd.grad(J, list(leaves.values()), allow_unused=True)
    return {k: (torch.zeros_like(weights[k]) if g is None else -g) for k, g in zip(keys, grads)}


def costate_energy(system: ResidualSystem, batch: dict, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``‖∇_W H‖_F² = ‖∂J/∂W‖_F²`` per weight (the first-order gain of a unit-norm step)."""
    return {k: float(g.pow(2).sum()) for k, g in weight_costate_products(system, batch, weights).items()}


def layer_costate_energy(system: ResidualSystem, batch: dict) -> list[float]:
    """``‖p_{l+1}‖²`` for l = 0..L-1: the co-state energy ``‖∇_u H_l‖²`` of a per-token additive
    control on block l's output (uses :func:`controltune.pmp.solve_costate`)."""
    from ..pmp import solve_costate

    sol = solve_costate(system, batch)
    return [float(p.pow(2).sum()) for p in sol.costates[1:]]


def control_set_scores(system: ResidualSystem, batch: dict, n_probes: int = 8, seed: int = 0) -> dict[str, float]:
    """Scores of the set of controls a controller placed (every non-terminal control of ``system``), at their
    current value, on ``batch``:

    * ``costate_energy``: ``Σ_u ‖∇_u H‖² = Σ_u ‖∂J/∂u‖²`` (one backward pass);
    * ``gramian``: ``tr(CᵀHC)/S`` with ``C = ∂logits/∂u`` over all those controls jointly and ``H`` the CE
      Gauss–Newton curvature, by ``n_probes`` Hutchinson probes in logit space (``E ‖Cᵀ H^{1/2} ξ‖²``);
    * ``n``: the number of control scalars.

    Terminal controls (the head) are left out: they are the same for every placement being compared.
    """
    if getattr(system.readout, "kind", "") != "classification":
        raise ValueError("control_set_scores needs a classification readout (J = mean CE of S×C logits)")
    if int(n_probes) < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    params = [c.param for c in system.controls() if c.kind != "term"]
    if not params:
        raise ValueError("the system has no non-terminal controls to score")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.enable_grad():
        logits = system(batch)
        cost = torch.nn.functional.cross_entropy(logits, batch["labels"]) + system.total_running_cost()
        grads = torch.autograd.grad(cost, params, retain_graph=True, allow_unused=True)
        energy = sum(0.0 if g is None else float(g.pow(2).sum()) for g in grads)
        s, c = logits.shape
        hs = gn_sqrt(logits).to(logits)
        total = 0.0
        for i in range(int(n_probes)):
            xi = torch.randn(s, c, generator=gen, dtype=torch.float64).to(logits)
            w = (hs @ xi.unsqueeze(-1)).squeeze(-1)
            g = torch.autograd.grad(logits, params, w, retain_graph=i + 1 < int(n_probes), allow_unused=True)
            total += sum(0.0 if x is None else float(x.pow(2).sum()) for x in g)
    return {"costate_energy": energy, "gramian": total / (int(n_probes) * s), "n": sum(p.numel() for p in params)}
