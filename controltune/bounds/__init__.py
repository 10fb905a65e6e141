"""Lipschitz bounds of the residual-stream dynamics and the error of low-dimensional delta approximations.

One module per piece of the mathematics:

* :mod:`~controltune.bounds.lipschitz` — per-block constants estimated at the data:
  Jacobian spectral norms by power iteration (local) and sampled lower bounds;
* :mod:`~controltune.bounds.weights`, :mod:`~controltune.bounds.domain`,
  :mod:`~controltune.bounds.composed` — a certified per-block bound composed operation
  by operation (effective weights, the input domain it holds on, the composition),
  driven by the family's :class:`~controltune.families.base.BlockAnatomy`;
* :mod:`~controltune.bounds.terminal` — constants of the terminal cost Φ̄ in x_L;
* :mod:`~controltune.bounds.gronwall` — across depth: the discrete Grönwall inequality
  and the first-order co-state estimate;
* :mod:`~controltune.bounds.weight_deltas` — a control written as weight deltas ``W -> W + ΔW``;
* :mod:`~controltune.bounds.projections` — projections Π onto rank / subspace / sparse / layer structures;
* :mod:`~controltune.bounds.reference` — the trained reference u* (a ``controltune train`` run);
* :mod:`~controltune.bounds.gap` — the measured gap ``|J(u*) − J(Πu*)|`` against every bound;
* :mod:`~controltune.bounds.enclosure`, :mod:`~controltune.bounds.attention_enclosure` — certified
  per-token enclosures of the rollout (and of its first two derivatives) over a ball of weight deltas,
  passing the radii of :mod:`~controltune.bounds.radii`;
* :mod:`~controltune.bounds.certified` — the certified bound ``B(ε) ≥ sup_{‖d‖≤ε} |J(u*+d) − J(u*)|``
  (Taylor, enclosure and readout-range routes), and :mod:`~controltune.bounds.attack` its attack lower bound.

The names below are re-exported here, except the function
:func:`controltune.bounds.gronwall.gronwall` (the module keeps its name).
"""

from __future__ import annotations

from .attack import AttackResult, attack
from .certified import Anchor, Certificate, anchor, certified_sweep, certify
from .composed import ComposedBound, activation_lipschitz, composed_block_bound
from .domain import LayerDomain, global_domain, probe_block
from .gap import ReferenceConstants, compare, reference_constants, sweep
from .gronwall import (
    GronwallBound,
    control_distance,
    costate_estimate,
    hamiltonian_gradients,
    linearized_state_change,
    state_gains,
)
from .lipschitz import (
    PowerResult,
    layer_controls,
    local_control_lipschitz,
    local_state_lipschitz,
    power_iteration,
    sampled_control_lipschitz,
    sampled_state_lipschitz,
)
from .projections import (
    PROJECTIONS,
    STRUCTURES,
    project,
    project_layers,
    project_rank,
    project_sparse,
    project_subspace,
)
from .reference import (
    NotATrainedRunError,
    Reference,
    as_reference,
    dev_scorer,
    evaluation_batch,
    load_reference,
    trained_deltas,
)
from .terminal import final_norm_sigma, local_terminal_lipschitz, terminal_lipschitz
from .weight_deltas import (
    DeltaWeights,
    WeightDelta,
    full_to_deltas,
    key_layer,
    key_role,
    lora_to_deltas,
    per_layer_distance,
)
from .weights import BlockWeights, block_weights, effective_linear

__all__ = [
    "Anchor", "AttackResult", "Certificate", "anchor", "attack", "certified_sweep", "certify",
    "PROJECTIONS", "STRUCTURES", "BlockWeights", "ComposedBound", "DeltaWeights", "GronwallBound", "LayerDomain",
    "NotATrainedRunError", "PowerResult", "Reference", "ReferenceConstants", "WeightDelta", "activation_lipschitz",
    "as_reference", "block_weights", "compare", "composed_block_bound", "control_distance", "costate_estimate",
    "dev_scorer", "effective_linear", "evaluation_batch", "final_norm_sigma", "full_to_deltas", "global_domain",
    "hamiltonian_gradients", "key_layer", "key_role", "layer_controls", "linearized_state_change", "load_reference",
    "local_control_lipschitz", "local_state_lipschitz", "local_terminal_lipschitz", "lora_to_deltas",
    "per_layer_distance", "power_iteration", "probe_block", "project", "project_layers", "project_rank",
    "project_sparse", "project_subspace", "reference_constants", "sampled_control_lipschitz",
    "sampled_state_lipschitz", "state_gains", "sweep", "terminal_lipschitz", "trained_deltas",
]
