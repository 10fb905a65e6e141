"""Control-theoretic design of delta structures.

* :mod:`.linearize` — matrix-free ``A_l = ∂f_l/∂x`` products along the pretrained trajectory and the
  pooled per-sequence reduced linear-quadratic model;
* :mod:`.riccati` — finite-horizon time-varying LQR (``dlqr``, backward Riccati recursion);
* :mod:`.gramian` — readout-weighted controllability-Gramian scores (Hutchinson, JVP/VJP) and co-state energy;
* :mod:`.placement` — greedy allocation of a parameter budget over candidate sites;
* :mod:`.trust_region` — the largest step along a direction that held-out rows agree with.

The controllers built on them are ``riccati_lora``, ``costate_lora``, ``gramian_lora``,
``recommended_lora`` and ``closed_loop_prefix`` (:mod:`controltune.controllers`).  Every
control-designed controller takes its design data the same way: an explicit ``design_batch``
(collated batch dict) or ``n_design`` seeded rows of the *train* split of ``task``, drawn in ``attach``.
"""

from __future__ import annotations

from .gramian import costate_energy, layer_costate_energy, module_gramian_scores, weight_costate_products
from .linearize import ReducedModel, block_jvp, block_vjp, design_batch, eager_kernel, reduce
from .placement import allocation_cost, greedy_allocate
from .riccati import LQRSolution, dlqr, lqr_rollout
from .trust_region import TrustRegionStep, trust_region_radius

__all__ = ["LQRSolution", "ReducedModel", "allocation_cost", "block_jvp", "block_vjp", "costate_energy",
           "design_batch", "dlqr", "eager_kernel", "greedy_allocate", "weight_costate_products",
           "layer_costate_energy", "lqr_rollout", "module_gramian_scores", "reduce", "TrustRegionStep",
           "trust_region_radius"]
