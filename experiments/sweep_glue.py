"""GLUE dev scores of delta methods on MiniLM: lora, adapter, prefix, prompt, bitfit and full fine-tuning.

Tasks SST-2 (a seeded 5k-row training subsample), MRPC, RTE and CoLA; 3 seeds
per (method, task); each finished run appends one row to
``experiments/results/sweep_glue.jsonl`` and a re-run skips the rows already
there (resumable).  A row's ``status`` is ``done`` (with its score) or
``diverged`` (non-finite loss or gradient: the step, no score); a diverged run is
not retried and does not enter the table (rows without ``status`` are done).
``sweep_glue_table.json`` holds mean and std over seeds of each task's metrics
(accuracy; accuracy and F1 for MRPC; MCC for CoLA).

Every run uses ``controltune.train.train`` with AdamW, linear warm-up (6 %) and
decay, batch 32, 2 epochs, mean pooling + linear head, dropout off, and the
per-method learning rates of ``LR`` (recorded in every row).

The full sweep is 72 runs (hours on a laptop CPU).  ``--budget F`` trains on a
fraction F of each training set (and records it: rows of different budgets are
different runs); ``--time-limit MIN`` starts no new run after MIN minutes;
``--methods/--tasks/--seeds`` select a subset.

    nice -n 10 .venv/bin/python experiments/sweep_glue.py --time-limit 30
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from controltune import ResidualSystem, load_model
from controltune.controllers import REGISTRY, build
from controltune.data import load_split, resolve_task
from controltune.divergence import TrainingDiverged
from controltune.metrics import AUXILIARY_KEYS
from controltune.results import append_jsonl, read_jsonl, row_done, stamp, write_json
from controltune.train import TrainConfig, train

if TYPE_CHECKING:
    from controltune.zoo import LoadedModel

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "lora": {"rank": 8, "alpha": 16, "targets": ["q", "v"]},
    "adapter": {"bottleneck": 64},
    "prefix": {"length": 10},
    "prompt": {"n_tokens": 20},
    "bitfit": {},
    "full": {},
}
LR = {"full": 5e-5, "lora": 5e-4, "adapter": 5e-4, "bitfit": 5e-4, "prefix": 5e-3, "prompt": 5e-3}
"""Peak learning rates: the usual scale of each method (full FT ~1e-5..1e-4; low-rank, adapter and bias
tuning ~1e-4..1e-3; prefix/prompt vectors ~1e-3..1e-2)."""
TASKS = {  # training subsample (None: all rows) and max length (pairs are longer)
    "sst2": {"train_size": 5000, "max_length": 64},
    "mrpc": {"train_size": None, "max_length": 128},
    "rte": {"train_size": None, "max_length": 128},
    "cola": {"train_size": None, "max_length": 64},
}
SEEDS = (0, 1, 2)
EPOCHS = 2
BATCH = 32
WARMUP = 0.06
DATA_SEED = 0  # the SST-2 subsample is the same rows for every run


def run_key(row: dict) -> tuple:
    return row["method"], row["task"], row["seed"], row["budget"]


def run_one(loaded: LoadedModel, method: str, task: str, seed: int, budget: float, progress: bool) -> dict:
    """Train one (method, task, seed) and return its JSONL row."""
    spec = resolve_task(task)
    settings = TASKS[task]
    full_train = load_split(spec, "train", n=settings["train_size"], seed=DATA_SEED)
    n = max(BATCH, int(round(budget * len(full_train))))
    train_ex = full_train if n >= len(full_train) else load_split(spec, "train", n=n, seed=DATA_SEED)
    dev_ex = load_split(spec, "dev")
    torch.manual_seed(seed)
    system = ResidualSystem(copy.deepcopy(loaded), num_labels=spec.num_labels, seed=seed)
    options = dict(METHODS[method])
    takes_seed = "seed" in inspect.signature(REGISTRY[method]).parameters
    build(method, system, **({**options, "seed": seed} if takes_seed else options))
    config = TrainConfig(lr=LR[method], epochs=EPOCHS, batch_size=BATCH, max_length=settings["max_length"],
                         warmup=WARMUP, seed=seed, progress=progress,
                         extra={"model": "minilm", "method": method, "options": options, "task": task})
    try:
        result, status = train(system, train_ex, dev_ex, spec, config, tokenizer=loaded.tokenizer), "done"
    except TrainingDiverged as err:  # recorded as a finished run without a score: not retried, not tabled
        result, status = err.result, "diverged"
    row = {"method": method, "task": task, "seed": seed, "budget": budget, "lr": LR[method], "options": options,
           "status": status, "n_train": len(train_ex), "n_dev": len(dev_ex), "epochs": EPOCHS, "batch_size": BATCH,
           "max_length": settings["max_length"], "steps": result["total_steps"], "final": result["final"],
           "metric": spec.metric, "score": result["final"][spec.metric] if result["final"] else None,
           "dev_curve": result["curves"]["dev"],
           "n_trainable": result["n_trainable"], "trainable_fraction": result["trainable_fraction"],
           "wall_time_s": result["wall_time_s"], "peak_memory_mb": result["peak_memory_mb"],
           "versions": result["versions"]}
    if status == "diverged":
        row["diverged"] = result["diverged"]  # step and what was non-finite
    return row


def table(rows: list[dict]) -> dict:
    """Mean and std over seeds of every metric, per (method, task, budget); diverged runs have no score to enter.

    Each entry counts its diverged seeds (``diverged_seeds``) so a mean over fewer seeds is visible.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    failed: dict[tuple, list[int]] = defaultdict(list)
    for r in rows:
        key = (r["method"], r["task"], r["budget"])
        if row_done(r):
            groups[key].append(r)
        else:
            failed[key].append(r["seed"])
    out = []
    for (method, task, budget), rs in sorted(groups.items()):
        metrics = {}
        for name in rs[0]["final"]:
            if name in AUXILIARY_KEYS:
                continue
            vals = [r["final"][name] for r in rs]
            metrics[name] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None}
        out.append({"method": method, "task": task, "budget": budget, "seeds": sorted(r["seed"] for r in rs),
                    "n_train": rs[0]["n_train"], "lr": rs[0]["lr"], "metrics": metrics,
                    "n_trainable": rs[0]["n_trainable"], "trainable_fraction": rs[0]["trainable_fraction"],
                    "mean_wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs),
                    "diverged_seeds": sorted(failed.get((method, task, budget), []))})
    lost = [{"method": m, "task": t, "budget": b, "diverged_seeds": sorted(seeds)}
            for (m, t, b), seeds in sorted(failed.items()) if (m, t, b) not in groups]
    return {"rows": out, "all_diverged": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--budget", type=float, default=1.0, help="fraction of each training set (0 < F <= 1)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MIN", help="start no run after MIN minutes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep_glue.jsonl")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if not 0 < args.budget <= 1:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    torch.set_num_threads(args.threads)
    table_path = args.out.with_name(args.out.stem + "_table.json")
    config = {"methods": {m: METHODS[m] for m in args.methods}, "lr": {m: LR[m] for m in args.methods},
              "tasks": {t: TASKS[t] for t in args.tasks}, "seeds": args.seeds, "budget": args.budget,
              "epochs": EPOCHS, "batch_size": BATCH, "warmup": WARMUP, "data_seed": DATA_SEED, "model": "minilm",
              "pooling": "mean", "dropout": False, "threads": args.threads}
    done = {run_key(r) for r in read_jsonl(args.out)}
    # Seeds outermost: an interrupted sweep has every (method, task) at one seed before any at three.
    todo = [(m, t, s) for s in args.seeds for t in args.tasks for m in args.methods
            if (m, t, s, args.budget) not in done]
    loaded = load_model("minilm")
    start = time.monotonic()
    for method, task, seed in tqdm(todo, desc="sweep"):
        if args.time_limit is not None and time.monotonic() - start > 60 * args.time_limit:
            print(f"time limit reached; {len(todo)} runs were pending at start, stopping")
            break
        row = run_one(loaded, method, task, seed, args.budget, not args.no_progress)
        append_jsonl(args.out, row)
        outcome = (f"{row['metric']}={row['score']:.4f}" if row_done(row) else
                   f"DIVERGED at step {row['diverged']['step']} (non-finite {row['diverged']['what']}), no score")
        tqdm.write(f"{method:>8} {task:>5} seed {seed}: {outcome} ({row['wall_time_s']:.0f} s)")
        write_json(table_path, {**stamp(config), **table(read_jsonl(args.out))})
    write_json(table_path, {**stamp(config), **table(read_jsonl(args.out))})


if __name__ == "__main__":
    main()
