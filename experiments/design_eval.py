"""Evaluate the control-designed delta structures against standard delta methods on MiniLM.

Designs: ``costate_lora`` (co-state / one-MSA-step LoRA initialisation), ``gramian_lora``
(controllability-guided module placement), ``riccati_lora`` (Riccati-designed residual state
feedback), ``closed_loop_prefix`` (state-feedback prefixes).  Baselines: ``lora``, ``adapter``,
``prefix``, ``bitfit``, ``full``.

Parameter budgets (``--budgets``): ``b74k`` sizes every LoRA-like method, adapter and prefix to
about the trainable count of LoRA r=8 on q,v (73,728 + the 770-scalar head); ``b18k`` to about
LoRA r=2 on q,v (18,432 + 770).  BitFit and full fine-tuning have their natural counts and run
at ``b74k`` only.

Protocol (every number is in the rows):

* data: per task a seeded subsample of the train split, ``--n-train`` rows for training plus
  ``--n-val`` *held-out* rows for validation (the subsample seed is the run seed); the full dev
  set scores the final model (``--n-dev`` subsamples it).  Design batches (co-states, Gramians,
  Riccati) are the first ``n_design`` training rows;
* learning rate: on the selection task (the first of ``--tasks``) at the first budget, seed 0 runs
  at every rate of the method's two-point grid; the rate with the best final *validation*
  accuracy (ties: lower validation loss) is chosen and used for every other seed, task and budget.
  Dev is never used for a choice; the table reports only runs at the chosen rate;
* training: AdamW, one epoch, batch ``--batch-size``, warm-up 10 % then linear decay, dropout off
  (the deterministic system of the PMP analysis), validation scored ``--curve-points`` times
  during training (the convergence curves);
* order: selection first, then the cells named by ``--first`` (in that order), then seed-major
  (every (budget, task, method) cell gets seed 0 before any gets seed 1), so a sweep cut short
  still covers every cell.

Rows are appended to ``experiments/results/design_eval.jsonl`` as they finish; a rerun skips
rows already there (resume).  A row has ``status: "done"`` with its scores, or ``"diverged"``
(non-finite loss or gradient) with the step and no score: a diverged job is not retried and
never chosen or tabled (rows without ``status`` predate the key and are done).
Each invocation's configuration is appended to ``design_eval.invocations.jsonl``.  One process runs
the jobs in order (the former ``--shard K/N`` file-sharing between processes is retired: parallel
runs go through ``controltune sweep``, as in ``experiments/design_table.py``, which supersedes this
script with the GLUE table's harness, peft's initialisations, the recommender and parallel control).

    nice -n 10 env PYTHONPATH=. .venv/bin/python experiments/design_eval.py --budget-min 600

The pilot of the previous session (384 training rows, 8-step selection) is kept in
``design_eval_pilot.jsonl``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from controltune import ResidualSystem, load_model
from controltune.batching import Collator
from controltune.controllers import REGISTRY, build
from controltune.data import load_split, resolve_task
from controltune.divergence import TrainingDiverged
from controltune.evaluation import evaluate
from controltune.results import append_jsonl, read_jsonl, row_done, stamp
from controltune.train import TrainConfig, train
from controltune.zoo import offline_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from controltune.data import Example, TaskSpec

OUT = Path(__file__).parent / "results" / "design_eval.jsonl"

BUDGETS: dict[str, dict[str, tuple[str, dict]]] = {
    "b74k": {
        "lora": ("lora", {"rank": 8, "targets": ["q", "v"]}),
        "costate_lora": ("costate_lora", {"rank": 8, "targets": ["q", "v"], "n_design": 32}),
        "gramian_lora": ("gramian_lora", {"rank": 8, "n_design": 16, "n_probes": 4}),
        "riccati_lora": ("riccati_feedback", {"rank": 16, "state_dim": 16, "n_design": 16}),
        "adapter": ("adapter", {"bottleneck": 8}),
        "prefix": ("prefix", {"length": 16}),
        "closed_loop_prefix": ("closed_loop_prefix", {"n_prefix": 8, "rank": 1}),
        "bitfit": ("bitfit", {}),
        "full": ("full", {}),
    },
    "b18k": {
        "lora": ("lora", {"rank": 2, "targets": ["q", "v"]}),
        "costate_lora": ("costate_lora", {"rank": 2, "targets": ["q", "v"], "n_design": 32}),
        "gramian_lora": ("gramian_lora", {"rank": 2, "n_design": 16, "n_probes": 4}),
        "riccati_lora": ("riccati_feedback", {"rank": 4, "state_dim": 4, "n_design": 16}),
        "adapter": ("adapter", {"bottleneck": 2}),
        "prefix": ("prefix", {"length": 4}),
        "closed_loop_prefix": ("closed_loop_prefix", {"n_prefix": 2, "rank": 1}),
    },
}
DESIGNED = ("costate_lora", "gramian_lora", "riccati_lora")  # take a design batch
LR_GRID = {"prefix": (3e-3, 1e-2), "closed_loop_prefix": (3e-3, 1e-2), "bitfit": (3e-3, 1e-2),
           "full": (3e-5, 1e-4)}
DEFAULT_GRID = (1e-3, 3e-3)
N_TRAIN = {"sst2": 5000, "cola": 2000, "mrpc": 1000, "rte": 1000}  # sized for a shared 2-core CPU


def split_train(task: str, n_train: int, n_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded train subsample -> (train rows, held-out validation rows)."""
    rows = load_split(task, "train", n=n_train + n_val, seed=seed)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[i] for i in order]
    return rows[:-n_val], rows[-n_val:]


def build_system(budget: str, method: str, task_spec: TaskSpec, seed: int, train_rows: list[Example],
                 tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[ResidualSystem, dict, float, dict]:
    """MiniLM with the method attached -> (system, options, design seconds, design report)."""
    loaded = load_model("minilm", seed=seed)
    system = ResidualSystem(loaded, num_labels=task_spec.num_labels, seed=seed)
    name, opts = BUDGETS[budget][method]
    opts = dict(opts)
    if method in DESIGNED:
        opts["design_batch"] = Collator(tokenizer, max_length)(train_rows[:opts["n_design"]])
    if "seed" in inspect.signature(REGISTRY[name]).parameters:
        opts["seed"] = seed
    t0 = time.perf_counter()
    ctrl = build(name, system, **opts)
    design_s = time.perf_counter() - t0
    report = {k: v for k, v in getattr(ctrl, "report", {}).items() if k not in ("grid", "sigma_r", "scores")}
    opts.pop("design_batch", None)
    return system, opts, design_s, report


def run_one(job: tuple, args: argparse.Namespace) -> dict:
    """Train one (budget, task, method, seed, lr) job; the row holds validation curve and dev score."""
    budget, task, method, seed, lr = job
    spec = resolve_task(task)
    train_rows, val_rows = split_train(task, args.n_train[spec.name], args.n_val, seed)
    tok = offline_tokenizer()
    system, opts, design_s, report = build_system(budget, method, spec, seed, train_rows, tok, args.max_length)
    steps = math.ceil(len(train_rows) / args.batch_size)
    cfg = TrainConfig(lr=lr, epochs=1.0, batch_size=args.batch_size, eval_batch_size=64,
                      max_length=args.max_length, eval_every=max(1, steps // args.curve_points), seed=seed,
                      progress=False, warmup=0.1)
    t0 = time.perf_counter()
    base = {"budget": budget, "task": spec.name, "method": method, "seed": seed, "lr": lr, "options": opts}
    try:
        result = train(system, train_rows, val_rows, spec, cfg, tokenizer=tok)
    except TrainingDiverged as err:  # a finished job without a score: recorded, never retried, never tabled
        result = err.result
        return {**base, "status": "diverged", "diverged": result["diverged"], "n_trainable": result["n_trainable"],
                "n_train": len(train_rows), "n_val": len(val_rows), "steps": result["step"], "design_s": design_s,
                "design_report": report, "val": None, "dev": None, "val_curve": result["curves"]["dev"],
                "train_loss": result["curves"]["train_loss"], "wall_s": time.perf_counter() - t0 + design_s}
    dev_rows = load_split(spec, "dev", n=args.n_dev, seed=0)
    row = {**base, "status": "done",
           "n_trainable": result["n_trainable"], "n_train": len(train_rows), "n_val": len(val_rows),
           "n_dev": len(dev_rows), "steps": result["step"], "design_s": design_s, "design_report": report,
           "val": result["final"], "val_curve": result["curves"]["dev"],
           "train_loss": result["curves"]["train_loss"],
           "dev": evaluate(system, dev_rows, spec, tok, 64, args.max_length)}
    row["wall_s"] = time.perf_counter() - t0 + design_s
    return row


def choose_lr(rows: list[dict], budget: str, task: str, method: str) -> float | None:
    """The grid rate with the best seed-0 validation accuracy (ties: lower loss).

    None while a grid rate has not run yet, or when every rate diverged; a diverged
    rate counts as run (it is not retried) but can never be chosen.
    """
    grid = LR_GRID.get(method, DEFAULT_GRID)
    cands = [r for r in rows if (r["budget"], r["task"], r["method"], r["seed"]) == (budget, task, method, 0)
             and r["lr"] in grid]
    if {r["lr"] for r in cands} != set(grid):
        return None
    scored = [r for r in cands if row_done(r)]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["val"]["accuracy"], -r["val"]["loss"]))["lr"]


def selection_jobs(args: argparse.Namespace) -> list[tuple]:
    budget, task = args.budgets[0], resolve_task(args.tasks[0]).name
    return [(budget, task, m, 0, lr) for m in args.methods if m in BUDGETS[budget]
            for lr in LR_GRID.get(m, DEFAULT_GRID)]


def main_jobs(args: argparse.Namespace, chosen: dict[str, float]) -> list[tuple]:
    """Seed-major list of the jobs after selection (the selection task's seed 0 is already done)."""
    sel_budget, sel_task = args.budgets[0], resolve_task(args.tasks[0]).name
    jobs = []
    for seed in range(args.seeds):
        for budget in args.budgets:
            tasks = args.tasks if budget == sel_budget else args.second_budget_tasks
            for task in tasks:
                task = resolve_task(task).name
                if (budget, task, seed) == (sel_budget, sel_task, 0):
                    continue
                jobs += [(budget, task, m, seed, chosen[m]) for m in args.methods
                         if m in BUDGETS[budget] and m in chosen]
    first = [tuple(cell.split(":")) for cell in args.first]
    rank = {(b, resolve_task(t).name, int(s)): i for i, (b, t, s) in enumerate(first)}
    return sorted(jobs, key=lambda job: rank.get((job[0], job[1], job[3]), len(rank)))  # stable: seed-major


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(BUDGETS["b74k"]), choices=list(BUDGETS["b74k"]))
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte", "mrpc", "cola"],
                    help="the first task selects the learning rates")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS),
                    help="the first budget is used for selection")
    ap.add_argument("--second-budget-tasks", nargs="+", default=["sst2", "rte"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", nargs="+", default=[f"{k}={v}" for k, v in N_TRAIN.items()], metavar="TASK=N")
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--n-dev", type=int, default=None, help="dev rows (default: the full dev set)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--curve-points", type=int, default=6)
    ap.add_argument("--budget-min", type=float, default=60.0, help="start no new job after this wall time")
    ap.add_argument("--first", nargs="*", default=[], metavar="BUDGET:TASK:SEED",
                    help="run these cells before the seed-major rest (e.g. to complete the seeds of one task)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    try:
        args.n_train = {resolve_task(k).name: int(v) for k, v in (item.split("=") for item in args.n_train)}
    except ValueError as err:
        raise SystemExit(f"--n-train expects TASK=N items, got {args.n_train}: {err}") from err
    missing = {resolve_task(t).name for t in args.tasks} - set(args.n_train)
    if missing:
        raise SystemExit(f"--n-train has no size for {sorted(missing)}")
    for cell in args.first:
        parts = cell.split(":")
        if len(parts) != 3 or parts[0] not in BUDGETS or not parts[2].isdigit():
            raise SystemExit(f"--first {cell!r}: expected BUDGET:TASK:SEED with BUDGET in {', '.join(BUDGETS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    append_jsonl(out.with_suffix(".invocations.jsonl"),
                 stamp({**vars(args), "budgets_config": BUDGETS,
                        "lr_grid": {m: LR_GRID.get(m, DEFAULT_GRID) for m in BUDGETS["b74k"]}}))
    t_start = time.perf_counter()

    def done() -> set[tuple]:
        return {(r["budget"], r["task"], r["method"], r["seed"], r["lr"]) for r in read_jsonl(out)}

    def work(jobs: list[tuple]) -> None:
        for job in jobs:
            if job in done():
                continue
            if time.perf_counter() - t_start > 60 * args.budget_min:
                print(f"time budget reached, not starting {job}", flush=True)
                return
            row = run_one(job, args)
            append_jsonl(out, row)
            if row_done(row):
                print(f"{job}: val={row['val']} dev={row['dev']} ({row['wall_s']:.0f}s)", flush=True)
            else:
                print(f"{job}: {row['status']} at step {row['diverged']['step']} ({row['diverged']['what']}), "
                      "no score", flush=True)

    selection = selection_jobs(args)
    work(selection)
    if not set(selection) <= done():  # stopped by the time budget before the selection finished
        return
    rows = read_jsonl(out)
    chosen = {m: choose_lr(rows, args.budgets[0], resolve_task(args.tasks[0]).name, m) for m in args.methods}
    print("chosen learning rates:", chosen, flush=True)
    work(main_jobs(args, {m: lr for m, lr in chosen.items() if lr is not None}))


if __name__ == "__main__":
    main()
