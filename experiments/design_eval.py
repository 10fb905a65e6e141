"""Evaluate the control-designed delta structures against standard delta methods on MiniLM.

Designs: ``costate_lora`` (co-state / one-MSA-step LoRA initialisation), ``gramian_lora``
(controllability-guided module placement), ``riccati_lora`` (Riccati-designed residual state
feedback), ``closed_loop_prefix`` (state-feedback prefixes).  Baselines: ``lora``, ``adapter``,
``prefix``, ``bitfit``, ``full``.  LoRA-like methods, adapters and prefixes are sized to about the
trainable-parameter count of LoRA r=8 on q,v (73,728 + the 770-scalar head); BitFit and full
fine-tuning have their natural counts.

Protocol (sized for a 2-core machine shared by several jobs; every number is in the rows):

* data: a seeded subsample of the train split (``--n-train`` rows for training plus ``--n-val``
  *held-out* rows for validation; the subsample seed is the run seed); a fixed seeded
  subsample of ``--n-dev`` dev rows scores the final model.  Design batches (co-states,
  Gramians, Riccati) are the first rows of the training part;
* stage ``select`` (SST-2, seed 0): each method's learning rate from a two-point grid, chosen by
  validation accuracy after ``--select-steps`` steps (dev is never used for a choice);
* stage ``main``: every method with its chosen rate, ``--seeds`` seeds, one epoch over the training
  rows, validation accuracy every ``--eval-every`` steps (convergence curves), then the dev score;
* further tasks (``--tasks``, e.g. RTE) reuse the SST-2-selected rates;
* stage ``ablation`` (``--ablation METHOD:LR``): a method at a fixed rate, e.g. LoRA at the rate
  selected for co-state LoRA, so the two initialisations compare at one learning rate.

Rows are appended to ``experiments/results/design_eval.jsonl`` as they finish; a rerun skips
rows already there (resume); each invocation's configuration is appended to
``design_eval.invocations.jsonl``.  ``--budget-min`` stops starting new runs after that wall time.

    nice -n 10 env PYTHONPATH=. .venv/bin/python experiments/design_eval.py --budget-min 30
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from controltune import ResidualSystem, load_model
from controltune.controllers import build
from controltune.data import Collator, load_split, resolve_task
from controltune.results import append_jsonl, read_jsonl, stamp
from controltune.train import TrainConfig, evaluate, train

OUT = Path(__file__).parent / "results" / "design_eval.jsonl"

METHODS: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {"rank": 8, "targets": ["q", "v"]}),
    "costate_lora": ("costate_lora", {"rank": 8, "targets": ["q", "v"], "n_design": 32}),
    "gramian_lora": ("gramian_lora", {"rank": 8, "n_design": 16, "n_probes": 4}),
    "riccati_lora": ("riccati_lora", {"rank": 16, "state_dim": 16, "n_design": 16}),
    "adapter": ("adapter", {"bottleneck": 8}),
    "prefix": ("prefix", {"length": 16}),
    "closed_loop_prefix": ("closed_loop_prefix", {"n_prefix": 8, "rank": 1}),
    "bitfit": ("bitfit", {}),
    "full": ("full", {}),
}
DESIGNED = ("costate_lora", "gramian_lora", "riccati_lora")  # take a design batch
LR_GRID = {"prefix": (3e-3, 1e-2), "closed_loop_prefix": (3e-3, 1e-2), "full": (3e-5, 1e-4)}
DEFAULT_GRID = (1e-3, 3e-3)


def split_train(task: str, n_train: int, n_val: int, seed: int):
    """Seeded train subsample -> (train rows, held-out validation rows)."""
    rows = load_split(task, "train", n=n_train + n_val, seed=seed)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[i] for i in order]
    return rows[:n_train], rows[n_train:]


def build_system(method: str, task_spec, seed: int, train_rows, tokenizer, max_length: int):
    loaded = load_model("minilm", seed=seed)
    system = ResidualSystem(loaded, num_labels=task_spec.num_labels, seed=seed)
    name, opts = METHODS[method]
    opts = dict(opts)
    if method in DESIGNED:
        n = opts["n_design"]
        opts["design_batch"] = Collator(tokenizer, max_length)(train_rows[:n])
    if "seed" in _params(name):
        opts["seed"] = seed
    t0 = time.perf_counter()
    ctrl = build(name, system, **opts)
    design_s = time.perf_counter() - t0
    report = {k: v for k, v in getattr(ctrl, "report", {}).items() if k not in ("grid", "sigma_r", "scores")}
    opts.pop("design_batch", None)
    return system, loaded.tokenizer, opts, design_s, report


def _params(name: str) -> set[str]:
    import inspect

    from controltune.controllers import REGISTRY

    return set(inspect.signature(REGISTRY[name]).parameters)


def run_one(stage: str, task: str, method: str, seed: int, lr: float, args, steps: int | None) -> dict:
    spec = resolve_task(task)
    train_rows, val_rows = split_train(task, args.n_train, args.n_val, seed)
    from controltune.zoo import offline_tokenizer

    tok = offline_tokenizer()
    system, tok, opts, design_s, report = build_system(method, spec, seed, train_rows, tok, args.max_length)
    cfg = TrainConfig(lr=lr, steps=steps, epochs=None if steps else 1.0, batch_size=args.batch_size,
                      eval_batch_size=64, max_length=args.max_length,
                      eval_every=args.eval_every if stage != "select" else None, seed=seed, progress=False,
                      warmup=0.1)
    t0 = time.perf_counter()
    result = train(system, train_rows, val_rows, spec, cfg, tokenizer=tok)
    row = {"stage": stage, "task": spec.name, "method": method, "seed": seed, "lr": lr, "options": opts,
           "n_trainable": result["n_trainable"], "steps": result["step"], "design_s": design_s,
           "design_report": report, "val": result["final"], "val_curve": result["curves"]["dev"],
           "train_loss": result["curves"]["train_loss"]}
    if stage != "select":
        dev_rows = load_split(spec, "dev", n=args.n_dev, seed=args.dev_seed)
        row["dev"] = evaluate(system, dev_rows, spec, tok, 64, args.max_length)
    row["wall_s"] = time.perf_counter() - t0 + design_s
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="the first task is used for selection")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--extra-task-seeds", type=int, default=1, help="seeds for tasks after the first")
    ap.add_argument("--n-train", type=int, default=384)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--n-dev", type=int, default=256)
    ap.add_argument("--dev-seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--select-steps", type=int, default=12)
    ap.add_argument("--budget-min", type=float, default=30.0)
    ap.add_argument("--ablation", nargs="*", default=[], metavar="METHOD:LR",
                    help="extra runs of METHOD at a fixed LR on the first task (stage 'ablation'), e.g. to "
                         "compare two initialisations at the same learning rate")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    # One line per invocation (a resumed or extended sweep keeps the configuration of every part).
    append_jsonl(out.with_suffix(".invocations.jsonl"),
                 stamp({**vars(args), "methods_config": METHODS,
                        "lr_grid": {m: LR_GRID.get(m, DEFAULT_GRID) for m in METHODS}}))
    done = {(r["stage"], r["task"], r["method"], r["seed"], r["lr"]) for r in read_jsonl(out)}
    t_start = time.perf_counter()

    def go(stage, task, method, seed, lr, steps=None):
        key = (stage, resolve_task(task).name, method, seed, lr)
        if key in done:
            return
        if time.perf_counter() - t_start > 60 * args.budget_min:
            print(f"budget reached, skipping {key}")
            return
        row = run_one(stage, task, method, seed, lr, args, steps)
        append_jsonl(out, row)
        done.add(key)
        metric = row.get("dev", row["val"])
        print(f"{stage} {task} {method} seed={seed} lr={lr:g}: val={row['val']['accuracy']:.3f} "
              f"score={metric.get('accuracy', float('nan')):.3f} ({row['wall_s']:.0f}s)", flush=True)

    first = args.tasks[0]
    for method in args.methods:
        for lr in LR_GRID.get(method, DEFAULT_GRID):
            go("select", first, method, 0, lr, args.select_steps)
    rows = read_jsonl(out)
    chosen = {}
    for method in args.methods:
        cands = [r for r in rows if r["stage"] == "select" and r["method"] == method]
        if cands:
            chosen[method] = max(cands, key=lambda r: (r["val"]["accuracy"], -r["val"]["loss"]))["lr"]
    for task in args.tasks:
        n_seeds = args.seeds if task == first else args.extra_task_seeds
        for seed in range(n_seeds):
            for method in args.methods:
                if method in chosen:
                    go("main", task, method, seed, chosen[method])
    for item in args.ablation:
        method, _, lr = item.partition(":")
        if method not in METHODS or not lr:
            raise SystemExit(f"--ablation {item!r}: expected METHOD:LR with METHOD in {', '.join(METHODS)}")
        for seed in range(args.seeds):
            go("ablation", first, method, seed, float(lr))


if __name__ == "__main__":
    main()
