"""E-MSA vs AdamW on real MiniLM with LoRA controls, SST-2, at equal iterations.

Each method trains LoRA (rank 4 on q, v) plus the classification head from the same
initialisation on the same sequence of mini-batches; the dev accuracy (a seeded
subsample of the SST-2 dev set) is scored every ``--eval-every`` iterations.

* ``adamw``:   one AdamW step on ``J`` per iteration;
* ``sgd_lr0.03``, ``sgd_lr0.3``: one plain SGD step (no momentum) per iteration, at two rates
  a decade apart (SGD's rate is not transferable from Adam's);
* ``emsa``:    E-MSA, ρ > 0 with the co-state penalty (double backward, eager attention);
* ``emsa_state``: E-MSA with the feasibility penalty only (no double backward);
* ``msa``:     basic MSA (ρ = 0).

An MSA iteration costs one co-state solve plus ``inner_steps`` optimiser steps on
the decoupled Hamiltonians, so ``seconds`` is recorded next to each point.

    nice -n 10 python experiments/msa_minilm.py   # -> experiments/results/msa_minilm.json (~15 min, 1 thread)

Resume-safe: every evaluation row is appended to ``msa_minilm.jsonl``; a run whose
final row exists is skipped, an interrupted run is restarted from scratch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

import controltune as ct
from controltune.batching import make_loader
from controltune.controllers import build
from controltune.data import load_split, resolve_task
from controltune.evaluation import evaluate
from controltune.msa import MSA, MSAConfig
from controltune.results import append_jsonl, read_jsonl, stamp, write_json

if TYPE_CHECKING:
    from controltune.data import Example, TaskSpec
    from controltune.system import ResidualSystem
    from controltune.zoo import LoadedModel

RESULTS = Path(__file__).parent / "results"
RUNS = {
    "adamw": {"lr": 1e-3},
    "emsa": {"lr": 1e-3, "rho": 0.1, "costate_penalty": True},
    "emsa_state": {"lr": 1e-3, "rho": 0.1, "costate_penalty": False},
    "msa": {"lr": 1e-3, "rho": 0.0, "costate_penalty": False},
    "sgd_lr0.03": {"lr": 0.03},
    "sgd_lr0.3": {"lr": 0.3},
}


def same_run(row: dict, cfg: dict, method: str) -> bool:
    """``row`` was written by ``method`` under ``cfg``: the shared settings and that method's own
    hyper-parameters match (adding a method to RUNS does not invalidate the others' rows)."""
    old = row.get("config") or {}
    shared = {k: v for k, v in cfg.items() if k != "runs"}
    return ({k: old.get(k) for k in shared} == shared and row.get("method") == method
            and method in RUNS and (old.get("runs") or {}).get(method) == RUNS[method])


def make_system(cfg: dict) -> tuple[LoadedModel, ResidualSystem]:
    loaded = ct.load_model("minilm", seed=cfg["seed"])
    system = ct.ResidualSystem(loaded, seed=cfg["seed"])
    build("lora", system, rank=cfg["rank"], targets=("q", "v"), seed=cfg["seed"])
    system.eval()
    return loaded, system


def run(method: str, cfg: dict, spec: TaskSpec, train: list[Example], dev: list[Example], jsonl: Path) -> None:
    torch.manual_seed(cfg["seed"])
    loaded, system = make_system(cfg)
    loader = make_loader(train, loaded.tokenizer, cfg["batch_size"], shuffle=True, seed=cfg["seed"],
                         max_length=cfg["max_length"])
    hp = RUNS[method]
    params = [c.param for c in system.controls()]
    if method == "adamw":
        opt, trainer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.0), None
    elif method.startswith("sgd"):
        opt, trainer = torch.optim.SGD(params, lr=hp["lr"]), None
    else:
        trainer = MSA(system, MSAConfig(rho=hp["rho"], inner_steps=cfg["inner_steps"], lr=hp["lr"],
                                        costate_penalty=hp["costate_penalty"]))

    def log(iteration: int, seconds: float, train_cost: float | None) -> None:
        scores = evaluate(system, dev, spec, loaded.tokenizer, max_length=cfg["max_length"])
        append_jsonl(jsonl, {"config": cfg, "method": method, "iteration": iteration, "seconds": seconds,
                             "train_cost": train_cost, "dev_accuracy": scores["accuracy"], "dev_loss": scores["loss"],
                             "final": iteration == cfg["iterations"]})

    log(0, 0.0, None)
    batches, elapsed, it = iter(loader), 0.0, 0
    for it in tqdm(range(1, cfg["iterations"] + 1), desc=method, leave=False):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        start = time.perf_counter()
        if trainer is None:
            opt.zero_grad(set_to_none=True)
            loss = system.cost(batch)
            loss.backward()
            opt.step()
            cost = float(loss.detach())
        else:
            cost = trainer.step(batch)["cost"]
        elapsed += time.perf_counter() - start
        if it % cfg["eval_every"] == 0 or it == cfg["iterations"]:
            log(it, elapsed, cost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--methods", default=",".join(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "msa_minilm.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = {"seed": args.seed, "iterations": args.iterations, "eval_every": args.eval_every, "rank": 4,
           "batch_size": 16, "max_length": 64, "train_size": 2000, "dev_size": 256, "inner_steps": 2,
           "runs": RUNS}
    spec = resolve_task("sst2")
    train = load_split(spec, "train", n=cfg["train_size"], seed=args.seed)
    dev = load_split(spec, "dev", n=cfg["dev_size"], seed=args.seed)
    jsonl = Path(args.out).with_suffix(".jsonl")
    for method in args.methods.split(","):
        rows = [r for r in read_jsonl(jsonl) if same_run(r, cfg, method)]
        if any(r["final"] for r in rows):
            continue
        run(method, cfg, spec, train, dev, jsonl)
    rows = [r for r in read_jsonl(jsonl) if same_run(r, cfg, r["method"])]
    # An interrupted run was restarted: keep the last row written for each (method, iteration).
    curves: dict[str, dict[int, dict]] = {}
    for r in rows:
        curves.setdefault(r["method"], {})[r["iteration"]] = r
    out = {m: [c[i] for i in sorted(c)] for m, c in curves.items()}
    summary = {m: {"final_dev_accuracy": c[-1]["dev_accuracy"], "best_dev_accuracy": max(r["dev_accuracy"] for r in c),
                   "seconds": c[-1]["seconds"], "iterations": c[-1]["iteration"]} for m, c in out.items()}
    write_json(args.out, {**stamp(cfg), "curves": {m: [{k: r[k] for k in ("iteration", "seconds", "train_cost",
                                                                           "dev_accuracy", "dev_loss")} for r in c]
                                                   for m, c in out.items()}, "summary": summary})
    for m, s in summary.items():
        print(f"{m:11s} dev acc final {s['final_dev_accuracy']:.3f} best {s['best_dev_accuracy']:.3f} "
              f"after {s['iterations']} iterations, {s['seconds']:.0f}s of training")


if __name__ == "__main__":
    main()
