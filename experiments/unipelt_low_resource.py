"""UniPELT in low-resource settings (issue 15; Mao et al., ACL 2022): the gated combination against each of its parts
with K = 100, 500 and 1,000 training examples on SST-2, MRPC, RTE and CoLA, 3 seeds (MiniLM).

The paper's claim: UniPELT beats each of its parts (LoRA, prefix tuning, the adapter) in low-resource settings.
Parts as standalone methods with UniPELT's own configurations: LoRA r=8, α=16 on q,v; prefix 10 vectors
through Li & Liang's MLP reparameterisation (hidden 512), as in UniPELT, for its prefix part and the standalone
prefix alike (the GLUE selection chose 0.03–0.11 for a direct prefix on three of the four tasks, 15 to 220 times
UniPELT's rates: inside UniPELT a direct prefix would hardly move); the adapter after the FFN (``pfeiffer``,
bottleneck 64).  K seeded training rows (the same rows for every method and seed), 20 % of them held out as
validation rows (so 80, 400 and 800 are trained on), batch 16, max length 128, ``EPOCHS`` per K (about 100–250
steps), evaluation every ``EVAL_EVERY`` steps, the full dev sets; the rate of each (task, K, method) chosen on the
validation rows at seed 0 from ``GRID`` (continued at its edge), then seeds 1, 2.

``results/unipelt_low_resource.json``: per (task, K, method) the dev score (mean, std); per (task, K) UniPELT
against each part by the two-standard-error rule.

    .venv/bin/python experiments/unipelt_low_resource.py --plan
    nohup .venv/bin/python experiments/unipelt_low_resource.py > experiments/results/unipelt_low_resource.log 2>&1 &
    .venv/bin/python experiments/unipelt_low_resource.py --summary-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_model import (  # noqa: E402
    describe_hours,
    sweep_hours,
)
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    at_chosen_rates,
    choose_lrs,
    chosen_rows,
    diverged_at_chosen,
    diverged_everywhere,
    extended_spec,
    progress_echo,
    rate_at_edge,
    select_then_tabulate,
    sweep_settings,
)
from verdicts import (  # noqa: E402
    TOO_FEW_SEEDS,
    beats_level,
    early_verdict,
    glue_majority,
    grid_progress,
    judge,
    mean_std,
    near_one_class_seeds,
    one_class_seeds,
    required_levels,
    share_verdict,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SELECT_OUT, TABLE_OUT = RESULTS / "unipelt_select.jsonl", RESULTS / "unipelt_table.jsonl"
SUMMARY = RESULTS / "unipelt_low_resource.json"
TASKS = ("sst2", "mrpc", "rte", "cola")
KS = (100, 500, 1000)
METHODS = {"unipelt": {"prefix_reparam": True}, "lora": {"rank": 8, "alpha": 16, "targets": ["q", "v"]},
           "prefix": {"length": 10, "reparam": True}, "pfeiffer": {"bottleneck": 64}}
PARTS = ("lora", "prefix", "pfeiffer")
GRID = {"unipelt": [5.0e-4, 2.0e-3], "lora": [5.0e-4, 2.0e-3], "prefix": [5.0e-4, 2.0e-3],
        "pfeiffer": [5.0e-4, 2.0e-3]}
EPOCHS = {100: 20, 500: 10, 1000: 5}
EVAL_EVERY = {100: 10, 500: 25, 1000: 25}
HARNESS = {"dtype": "float32", "batch_size": 16, "eval_batch_size": 128, "max_length": 128, "warmup": 0.06,
           "schedule": "linear", "weight_decay": 0.0, "grad_clip": 1.0, "data_seed": 0, "val_seed": 0,
           "val_size": 0.2}


def pair_key(row: dict[str, Any]) -> tuple[str, int, str]:
    c = row["config"]
    return str(c["task"]), int(c["train_size"]), str(c["method"])


def pair_where(pair: tuple[str, int, str]) -> dict[str, Any]:
    return {"task": pair[0], "train_size": pair[1], "method": pair[2]}


def spec_data(tasks: Sequence[str], seeds: list[int], name: str, out: str) -> dict[str, Any]:
    per_method = {m: {"lr": GRID[m], **({"options": [o]} if o else {})} for m, o in METHODS.items()}
    overrides = [{"where": {"train_size": k}, "set": {"epochs": EPOCHS[k], "eval_every": EVAL_EVERY[k]}} for k in KS]
    return {"name": name, "out": out,
            "grid": {"model": "minilm", "task": list(tasks), "method": list(METHODS), "seed": seeds,
                     "train_size": list(KS)},
            "per_method": per_method, "train": HARNESS, "overrides": overrides}


def selection_spec(tasks: Sequence[str], rows: list[dict[str, Any]] | None) -> SweepSpec:
    return extended_spec(spec_data(tasks, [0], "unipelt_select", SELECT_OUT.name), rows or [], key=pair_key,
                         where=pair_where, folder=RESULTS)


def table_spec(tasks: Sequence[str], chosen: dict) -> SweepSpec:
    pairs = [(t, k, m) for t in tasks for k in KS for m in METHODS]
    data = spec_data(tasks, [0, 1, 2], "unipelt_table", TABLE_OUT.name)
    return parse_spec(at_chosen_rates(data, chosen, pairs, pair_where), "unipelt_table", RESULTS)


def summary(tasks: Sequence[str]) -> dict[str, Any]:
    cells = {}
    select_rows, table_rows = read_jsonl(SELECT_OUT), read_jsonl(TABLE_OUT)
    diverged = diverged_at_chosen(select_rows, table_rows, pair_key)
    chosen = choose_lrs(select_rows, pair_key)
    everywhere = diverged_everywhere(chosen)
    for pair, (lr, done) in chosen_rows(select_rows, table_rows, pair_key).items():
        scores = [r["score_at_best_val"] for r in done.values()]
        mean, std = mean_std(scores)
        cells[pair] = {"task": pair[0], "k": pair[1], "method": pair[2], "lr": lr, "mean": mean, "std": std,
                       "n_seeds": len(scores), "metric": next(iter(done.values()))["metric"] if done else None,
                       "one_class_seeds": one_class_seeds(done.values()),
                       "near_one_class_seeds": near_one_class_seeds(done.values()),
                       "diverged_seeds": diverged.get(pair, []),
                       "diverged_every_rate": pair in everywhere, "rate_at_edge": rate_at_edge(chosen[pair])}
    levels = required_levels(glue_majority(RESULTS), tasks)  # the same full dev sets
    comparisons = []
    for task in tasks:
        for k in KS:
            uni = cells.get((task, k, "unipelt"))
            for part in PARTS:
                other = cells.get((task, k, part))
                # not a test: both at the majority class, K rows taught neither anything
                verdict, diff = judge(other, uni, levels[task], {1: "win", -1: "loss", 0: "tie"})
                if verdict is None:
                    continue
                above = [beats_level(c, levels[task]) for c in (uni, other)]
                comparisons.append({"task": task, "k": k, "part": part, "unipelt_minus_part": diff,
                                    "majority": levels[task], "unipelt_above_majority": above[0],
                                    "part_above_majority": above[1], "verdict": verdict})
    kinds = ("win", "tie", "loss", "not a test", TOO_FEW_SEEDS)
    counts = {v: sum(1 for c in comparisons if c["verdict"] == v) for v in kinds}
    # the claim is about each K: UniPELT beats each of its parts at K = 100, at 500 and at 1000
    per_k = {}
    complete = grid_progress(list(cells.values()), len(TASKS) * len(KS) * len(METHODS))["complete"]
    for k in KS:
        verdicts = [c["verdict"] for c in comparisons if c["k"] == k]
        mine = {v: verdicts.count(v) for v in kinds}
        # before the grid is complete, decided only where no comparison still to run can change it (a loss: the
        # claim needs every test won); the planned comparisons: every task's UniPELT against each part
        holds = (share_verdict(mine["win"], mine["loss"], mine["tie"] + mine[TOO_FEW_SEEDS], 1.0) if complete
                 else early_verdict(verdicts, "win", "loss", "tie", len(TASKS) * len(PARTS), 1.0))
        per_k[str(k)] = {**mine, "holds": holds, "decided_early": not complete and holds is not None}
    payload = {**stamp({"tasks": list(tasks), "ks": list(KS), "methods": METHODS, "grid": GRID, "epochs": EPOCHS,
                        "harness": HARNESS, "command": "python experiments/unipelt_low_resource.py"}),
               "cells": list(cells.values()), "comparisons": comparisons, "counts": counts, "per_k": per_k,
               "progress": grid_progress(list(cells.values()), len(TASKS) * len(KS) * len(METHODS))}
    write_json_unless_same(SUMMARY, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    add_sweep_arguments(p, "runs/unipelt_low_resource")
    p.add_argument("--plan", action="store_true", help="print the cells; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if any(t not in TASKS for t in tasks):
        raise SystemExit(f"unknown task(s) in {tasks}; accepted: {', '.join(TASKS)}")
    if args.plan:
        cells = expand(selection_spec(tasks, read_jsonl(SELECT_OUT)))  # with its edge rates so far
        print(f"{len(cells)} selection cells (edge rates so far included), then "
              f"{2 * len(tasks) * len(KS) * len(METHODS)} table cells of seeds "
              "1 and 2")
        est = sweep_hours(cells, read_jsonl(SELECT_OUT) + read_jsonl(TABLE_OUT), seeds_after=2)
        print(describe_hours("cells", est))
        return {"hours": est}
    if args.summary_only:
        return summary(TASKS)

    select_then_tabulate(lambda rows: selection_spec(tasks, rows), SELECT_OUT,
                         lambda rows: table_spec(tasks, choose_lrs(rows, key=pair_key)), TABLE_OUT, RESULTS,
                         progress_echo(lambda: summary(TASKS)), sweep_settings(args))
    return summary(TASKS)


if __name__ == "__main__":
    main()
