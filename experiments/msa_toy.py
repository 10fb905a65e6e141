"""E-MSA vs SGD, Adagrad and Adam on the toy of Li, Chen, Tai & E (JMLR 2018).

A 20-layer residual tanh network of width 5, ``x_{l+1} = x_l + δ·tanh(W_l x_l + b_l)``
with zero-initialised controls, fits ``sin`` on ``[−π, π]`` (full batch of N training
points, test loss on an even grid).  Every optimiser sees the same data; each is run
at a few learning rates and the per-iteration train/test losses are written, so the
comparison per iteration is at each method's best rate (``best`` in the JSON).

    nice -n 10 python experiments/msa_toy.py            # -> experiments/results/msa_toy.json (~3 min, 1 thread)

Resume-safe: finished runs are appended to ``msa_toy.jsonl`` and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from controltune.msa import MSA, MSAConfig, ToyResidualNet, toy_batch
from controltune.results import append_jsonl, read_jsonl, stamp, write_json

RESULTS = Path(__file__).parent / "results"

GRID = {
    "sgd": [0.1, 0.3, 1.0],
    "adagrad": [0.03, 0.1, 0.3],
    "adam": [0.003, 0.01, 0.03],
    # E-MSA: inner Adam learning rate × penalty ρ (with the co-state penalty, i.e. double backward).
    "emsa": [(0.03, 0.1), (0.03, 1.0)],
    "msa": [(0.03, 0.0)],
}


def run_gradient(name: str, lr: float, train: dict, test: dict, iterations: int, cfg: dict) -> dict:
    net = ToyResidualNet(n_layers=cfg["layers"], width=cfg["width"], delta=cfg["delta"], seed=cfg["seed"])
    params = [c.param for c in net.controls()]
    opt = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}[name](params, lr=lr)
    train_loss, test_loss = [], []
    for _ in range(iterations):
        opt.zero_grad()
        loss = net.cost(train)
        loss.backward()
        opt.step()
        train_loss.append(float(loss.detach()))
        with torch.no_grad():
            test_loss.append(float(net.cost(test)))
    return {"train_loss": train_loss, "test_loss": test_loss}


def run_msa(lr: float, rho: float, train: dict, test: dict, iterations: int, cfg: dict) -> dict:
    net = ToyResidualNet(n_layers=cfg["layers"], width=cfg["width"], delta=cfg["delta"], seed=cfg["seed"])
    trainer = MSA(net, MSAConfig(rho=rho, inner_steps=cfg["inner_steps"], lr=lr, costate_penalty=True))
    train_loss, test_loss = [], []
    for _ in range(iterations):
        train_loss.append(trainer.step(train)["cost"])
        with torch.no_grad():
            test_loss.append(float(net.cost(test)))
    return {"train_loss": train_loss, "test_loss": test_loss}


def _mean_log(losses: list[float]) -> float:
    """Mean of log10 loss over iterations (inf if any is not finite: a diverged run)."""
    if not all(math.isfinite(v) for v in losses):
        return math.inf
    return sum(math.log10(max(v, 1e-300)) for v in losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "msa_toy.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = {"layers": 20, "width": 5, "delta": 0.25, "inner_steps": 5, "seed": args.seed,
           "iterations": args.iterations, "n_train": args.n_train, "n_test": 500,
           "grid": json.loads(json.dumps(GRID))}  # as it reads back from JSON, so resumed rows match
    train, test = toy_batch(args.n_train, seed=args.seed), toy_batch(500)
    jsonl = Path(args.out).with_suffix(".jsonl")
    done = {(r["method"], r["lr"], r.get("rho")) for r in read_jsonl(jsonl) if r.get("config") == cfg}
    jobs = [(m, lr, None) for m in ("sgd", "adagrad", "adam") for lr in GRID[m]]
    jobs += [(m, lr, rho) for m in ("msa", "emsa") for lr, rho in GRID[m]]
    for method, lr, rho in tqdm(jobs, desc="runs"):
        if (method, lr, rho) in done:
            continue
        start = time.perf_counter()
        curves = (run_msa(lr, rho, train, test, args.iterations, cfg) if method in ("msa", "emsa")
                  else run_gradient(method, lr, train, test, args.iterations, cfg))
        append_jsonl(jsonl, {"config": cfg, "method": method, "lr": lr, "rho": rho,
                             "seconds": time.perf_counter() - start, **curves})
    rows = [r for r in read_jsonl(jsonl) if r.get("config") == cfg]
    best = {}
    for method in GRID:
        runs = [r for r in rows if r["method"] == method]
        # Best rate by the mean log10 train loss over all iterations: the per-iteration comparison, not the last point.
        top = min(runs, key=lambda r: _mean_log(r["train_loss"]))
        best[method] = {"lr": top["lr"], "rho": top["rho"], "mean_log10_train_loss": _mean_log(top["train_loss"]),
                        "train_loss_at": {i: top["train_loss"][i - 1] for i in (10, 25, 50, 100, 200, args.iterations)
                                          if i <= args.iterations},
                        "min_train_loss": min(top["train_loss"]), "final_train_loss": top["train_loss"][-1],
                        "final_test_loss": top["test_loss"][-1], "seconds": top["seconds"],
                        "iterations_to_1e-2": next((i + 1 for i, v in enumerate(top["train_loss"]) if v < 1e-2), None)}
    write_json(args.out, {**stamp(cfg), "runs": rows, "best": best})
    for method, b in best.items():
        at = " ".join(f"{i}:{v:.1e}" for i, v in b["train_loss_at"].items())
        print(f"{method:8s} lr={b['lr']:<6} rho={b['rho']} train loss at {at}; final train {b['final_train_loss']:.2e} "
              f"test {b['final_test_loss']:.2e}  iters to 1e-2: {b['iterations_to_1e-2']}  ({b['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
