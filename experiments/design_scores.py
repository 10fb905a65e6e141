"""Controllability scores of every linear map of MiniLM on an SST-2 batch, and the greedy LoRA placement.

For each linear map W of role r in block l (roles of the bert family: q, k, v, o, ffn_in,
ffn_out), taken as a full-rank control ``ΔW`` at the pretrained weights (classification head
at its seeded initialisation):

* ``gramian``: readout-weighted controllability-Gramian trace ``tr(Cᵀ H C)/S``
  (:func:`controltune.design.gramian.module_gramian_scores`, Hutchinson, reverse mode), as the
  mean of ``n_probes`` one-probe estimates with different seeds, so the standard error of the
  estimate is recorded too;
* ``costate``: co-state energy ``‖∇_W H‖_F² = ‖∂J/∂W‖_F²`` (:func:`costate_energy`);
* per block, ``‖p_{l+1}‖²``, the co-state energy of an additive per-token control on the
  block's output (:func:`layer_costate_energy`).

Each score then places rank-``rank`` LoRA modules greedily by score per parameter under the
budget of LoRA rank ``rank`` on q and v of every layer
(:func:`controltune.design.placement.greedy_allocate`, as ``gramian_lora`` does).

    nice -n 10 python experiments/design_scores.py     # -> experiments/results/design_scores.json (~2.5 min, 1 thread)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import controltune as ct
from controltune.controllers.base import resolve_targets
from controltune.design.gramian import costate_energy, layer_costate_energy, module_gramian_scores
from controltune.design.linearize import design_batch
from controltune.design.placement import allocation_cost, greedy_allocate
from controltune.families.base import linear_io
from controltune.results import stamp, write_json

if TYPE_CHECKING:
    from controltune.system import ResidualSystem

RESULTS = Path(__file__).parent / "results"


def site_key(layer: int, role: str) -> str:
    return f"{layer}.{role}"


def gramian_with_error(system: ResidualSystem, batch: dict, weights: dict[str, torch.Tensor], n_probes: int,
                       seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard error over ``n_probes`` one-probe Hutchinson estimates (seeds ``seed..seed+n-1``)."""
    if n_probes < 2:
        raise ValueError(f"a standard error needs n_probes >= 2, got {n_probes}")
    draws = [module_gramian_scores(system, batch, weights, n_probes=1, method="vjp", seed=seed + i)
             for i in range(n_probes)]
    mean, se = {}, {}
    for k in weights:
        v = torch.tensor([d[k] for d in draws], dtype=torch.float64)
        mean[k], se[k] = float(v.mean()), float(v.std() / n_probes ** 0.5)
    return mean, se


def allocate(scores: dict[str, float], costs: dict[str, int], rank: int, budget: int) -> dict[str, int]:
    """LoRA rank per site: ``rank`` where the density greedy takes the site, else 0."""
    units = greedy_allocate({k: [v] for k, v in scores.items()}, costs, budget)
    return {k: rank * u for k, u in units.items()}


def design_scores(system: ResidualSystem, batch: dict, rank: int = 8, n_probes: int = 16,
                  seed: int = 0) -> dict[str, Any]:
    """Scores of every linear role of every block and both allocations (module docstring).

    Returns ``{"roles", "n_layers", "sites": [{layer, role, d_in, d_out, cost, gramian, gramian_se,
    costate, rank_gramian, rank_costate}], "layer_energy": [L floats], "budget", "used_gramian",
    "used_costate"}``.
    """
    roles = list(system.family.linear_roles)
    sites = resolve_targets(system, roles, None)
    weights = {site_key(s.layer, s.role): s.module.weight for s in sites}
    costs = {site_key(s.layer, s.role): rank * sum(linear_io(s.module)) for s in sites}
    budget = sum(costs[site_key(s.layer, s.role)] for s in sites if s.role in ("q", "v"))
    gram, gram_se = gramian_with_error(system, batch, weights, n_probes, seed)
    energy = costate_energy(system, batch, weights)
    alloc = {"gramian": allocate(gram, costs, rank, budget), "costate": allocate(energy, costs, rank, budget)}
    rows = []
    for s in sites:
        k = site_key(s.layer, s.role)
        d_in, d_out = linear_io(s.module)
        rows.append({"layer": s.layer, "role": s.role, "d_in": d_in, "d_out": d_out, "cost": costs[k],
                     "gramian": gram[k], "gramian_se": gram_se[k], "costate": energy[k],
                     "rank_gramian": alloc["gramian"][k], "rank_costate": alloc["costate"][k]})
    units = {name: {k: r // rank for k, r in a.items()} for name, a in alloc.items()}
    return {"roles": roles, "n_layers": system.n_layers, "sites": rows,
            "layer_energy": layer_costate_energy(system, batch), "budget": budget,
            "used_gramian": allocation_cost(units["gramian"], costs),
            "used_costate": allocation_cost(units["costate"], costs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--n-batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--n-probes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "design_scores.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = {"model": args.model, "task": "sst2", "split": "train", "dtype": "float32", "n_batch": args.n_batch,
           "max_length": args.max_length, "rank": args.rank, "n_probes": args.n_probes, "seed": args.seed,
           "hutchinson": "vjp (reverse mode), Gauss-Newton weighted, mean of n_probes one-probe estimates",
           "budget": "LoRA rank `rank` on q and v of every layer"}
    loaded = ct.load_model(args.model, seed=args.seed)
    system = ct.ResidualSystem(loaded, seed=args.seed)
    system.eval()
    batch = design_batch(system, "sst2", args.n_batch, args.seed, args.max_length)
    res = design_scores(system, batch, args.rank, args.n_probes, args.seed)
    write_json(args.out, {**stamp(json.loads(json.dumps(cfg))), **res})
    for score in ("gramian", "costate"):
        top = sorted(res["sites"], key=lambda r: -r[score])[:6]
        chosen = [f"{r['layer']}.{r['role']}" for r in res["sites"] if r[f"rank_{score}"]]
        print(f"{score}: top " + ", ".join(f"{r['layer']}.{r['role']} {r[score]:.3g}" for r in top)
              + f"; chosen ({res[f'used_{score}']}/{res['budget']} params): {', '.join(chosen)}")
    print("layer energy |p_{l+1}|^2:", ", ".join(f"{e:.3g}" for e in res["layer_energy"]))


if __name__ == "__main__":
    main()
