"""The power of scale (issue 15; Ding et al. 2023): MiniLM (22.7M) against SmolLM2 (134.5M) for full fine-tuning,
LoRA, the adapter, prefix and prompt tuning, last-layer and selective-module tuning on SST-2 and MRPC, 3 seeds.

The paper's claims: every method improves with model size, prompt tuning most; last-layer and selective-module
tuning (random modules across layers) do well, selective better than last-layer.  One harness for both models,
cut to fit SmolLM2 on two CPU cores (``HARNESS``: 2,000 seeded training rows, 200 held out as validation rows, one
epoch of batch 16, max length 64, 500 SST-2 dev rows / all 408 MRPC dev rows, AdamW with warm-up and linear
decay); pooling per model (``rate_selection.POOLING``: MiniLM's mean, SmolLM2's last token).  Methods: LoRA
r=8 on q,v; adapter bottleneck 64; prefix 10; prompt 20; ``last_layer`` (every parameter of the last block);
``selective`` at the same budget (a fraction 1/L of the blocks' parameters: seeded random modules across layers,
as many as the last block holds).  The rate of each (model, task, method) is chosen on validation rows at seed 0
from ``GRID`` (continued up to ``EDGE_RATES`` steps past its edge), then seeds 1, 2.

``results/scale.json``: per (model, task, method) the dev score (mean, std); per (task, method) the gain of SmolLM2
over MiniLM (two-standard-error verdict), and selective against last-layer per model and task.

    .venv/bin/python experiments/scale.py --plan
    nohup .venv/bin/python experiments/scale.py > experiments/results/scale.log 2>&1 &
    .venv/bin/python experiments/scale.py --summary-only
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
    POOLING,
    add_sweep_arguments,
    at_chosen_rates,
    choose_lrs,
    chosen_rows,
    completed_rows,
    diverged_at_chosen,
    diverged_everywhere,
    extended_spec,
    progress_echo,
    rate_at_edge,
    select_then_tabulate,
    sweep_settings,
)
from verdicts import (  # noqa: E402
    early_verdict,
    grid_progress,
    judge,
    majority_level,
    mean_std,
    near_one_class_seeds,
    one_class_seeds,
    share_verdict,
    two_se,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SELECT_OUT, TABLE_OUT, SUMMARY = RESULTS / "scale_select.jsonl", RESULTS / "scale_table.jsonl", RESULTS / "scale.json"
MODELS = {"minilm": 6, "smollm2": 30}
"""Model -> number of blocks (selective's budget is 1/L of the blocks' parameters)."""
TASKS = ("sst2", "mrpc")
METHODS = {"full": {}, "lora": {"rank": 8, "alpha": 16, "targets": ["q", "v"]}, "adapter": {"bottleneck": 64},
           "prefix": {"length": 10}, "prompt": {"n_tokens": 20}, "last_layer": {"n_layers": 1}, "selective": {}}
GRID = {"full": [2.0e-5, 1.0e-4], "lora": [5.0e-4, 2.0e-3], "adapter": [5.0e-4, 2.0e-3], "prefix": [3.0e-3, 1.0e-2],
        "prompt": [1.0e-2, 5.0e-2], "last_layer": [2.0e-5, 1.0e-4], "selective": [2.0e-5, 1.0e-4]}
HARNESS = {"dtype": "float32", "batch_size": 16, "eval_batch_size": 64, "max_length": 64, "warmup": 0.06,
           "schedule": "linear", "weight_decay": 0.0, "grad_clip": 1.0, "data_seed": 0, "val_seed": 0,
           "train_size": 2000, "val_size": 200, "epochs": 1, "eval_every": 25}
DEV_SIZE = {"sst2": 500, "mrpc": None}
EDGE_RATES = 3
"""Steps a pair's grid may be continued past its edge (the other studies: ``rate_selection.MAX_EDGE_RATES``, 2).
Last-layer and selective tuning start from full fine-tuning's rates, which suit every parameter moving but not
one block's worth: on SmolLM2 SST-2 their validation scores still rose at the second step (2.5e-3: last-layer
0.775 → 0.825, selective 0.83 → 0.84), a gap to full fine-tuning that would be the grid's."""


def pair_key(row: dict[str, Any]) -> tuple[str, str, str]:
    c = row["config"]
    return str(c["model"]), str(c["task"]), str(c["method"])


def pair_where(pair: tuple[str, str, str]) -> dict[str, Any]:
    return {"model": pair[0], "task": pair[1], "method": pair[2]}


def spec_data(models: Sequence[str], tasks: Sequence[str], seeds: list[int], name: str, out: str) -> dict[str, Any]:
    per_method = {m: {"lr": GRID[m], **({"options": [o]} if o else {})} for m, o in METHODS.items()}
    overrides = [{"where": {"task": t}, "set": {"dev_size": DEV_SIZE[t]}} for t in tasks]
    overrides += [{"where": {"model": m}, "set": {"pooling": POOLING[m]}} for m in models if POOLING[m] != "mean"]
    overrides += [{"where": {"model": m, "method": "selective"}, "set": {"options": [{"budget": 1.0 / n}]}}
                  for m, n in MODELS.items() if m in models]
    return {"name": name, "out": out, "grid": {"model": list(models), "task": list(tasks), "method": list(METHODS),
                                               "seed": seeds},
            "per_method": per_method, "train": HARNESS, "overrides": overrides}


def selection_spec(models: Sequence[str], tasks: Sequence[str], rows: list[dict[str, Any]] | None) -> SweepSpec:
    return extended_spec(spec_data(models, tasks, [0], "scale_select", SELECT_OUT.name), rows or [], key=pair_key,
                         where=pair_where, folder=RESULTS, max_edge_rates=EDGE_RATES)


def table_spec(models: Sequence[str], tasks: Sequence[str], chosen: dict) -> SweepSpec:
    pairs = [(m, t, k) for m in models for t in tasks for k in METHODS]
    data = spec_data(models, tasks, [0, 1, 2], "scale_table", TABLE_OUT.name)
    return parse_spec(at_chosen_rates(data, chosen, pairs, pair_where), "scale_table", RESULTS)


def majority_levels(tasks: Sequence[str]) -> dict[str, float]:
    """Each task's majority-class score on the dev rows the cells score (SST-2: their seeded 500)."""
    return {t: majority_level(t, DEV_SIZE[t], HARNESS["data_seed"])[1] for t in tasks}


def prompt_against_others(gains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, prompt tuning's gain with scale against each other method's on the same task (one metric), by two
    standard errors of the difference of the two gains, ``se = (se_prompt² + se_other²)^{1/2}``; only gains that
    are tests (both models' cells with every seed, not both at chance)."""
    tested = {(g["task"], g["method"]): g for g in gains if g["verdict"] in ("improves", "worsens", "tie")}
    out = []
    for (task, method), g in sorted(tested.items()):
        p = tested.get((task, "prompt"))
        if method == "prompt" or p is None or p["se"] is None or g["se"] is None:
            continue
        diff, se = p["gain"] - g["gain"], (p["se"] ** 2 + g["se"] ** 2) ** 0.5
        verdict = "prompt larger" if diff > 2 * se else "other larger" if diff < -2 * se else "tie"
        out.append({"task": task, "method": method, "prompt_minus_other": diff, "se": se, "verdict": verdict})
    return out


def scale_claims(gains: list[dict[str, Any]], prompt_vs: list[dict[str, Any]], selective: list[dict[str, Any]],
                 do_well: list[dict[str, Any]]) -> dict[str, bool | None]:
    """The claims' verdicts (:func:`verdicts.share_verdict`: ties and cells with too few seeds are absence
    of evidence, never a verdict's):

    * every method improves with size: every tested (task, method) gain improves;
    * prompt tuning improves most: on every task, prompt's gain is itself an improvement and exceeds every other
      tested method's gain by 2 se; not held where some method's gain exceeds prompt's by 2 se; open otherwise
      (a tie with any method leaves "most" unshown, however many others prompt's gain exceeds);
    * selective-module tuning beats last-layer tuning in more than half of the (model, task) pairs;
    * last-layer and selective tuning do well: neither falls below full fine-tuning by 2 se anywhere."""
    def count(items: list[dict[str, Any]], yes: str, no: str) -> tuple[int, int, int]:
        v = [i["verdict"] for i in items if i["verdict"] != "not a test"]
        return v.count(yes), v.count(no), len(v) - v.count(yes) - v.count(no)

    per_task = {}
    prompt_improves = {g["task"] for g in gains if g["method"] == "prompt" and g["verdict"] == "improves"}
    for task in sorted({c["task"] for c in prompt_vs}):
        mine = [c["verdict"] for c in prompt_vs if c["task"] == task]
        per_task[task] = False if "other larger" in mine else (
            True if task in prompt_improves and all(v == "prompt larger" for v in mine) else None)
    most = None if not per_task else (False if False in per_task.values()
                                      else True if all(per_task.values()) else None)
    above, below, unsure = count(do_well, "above full FT", "below full FT")
    ties = sum(1 for i in do_well if i["verdict"] == "tie with full FT")
    return {"every_method_improves": share_verdict(*count(gains, "improves", "worsens"), 1.0),
            "prompt_improves_most": most, "prompt_most_per_task": per_task,
            "selective_beats_last_layer": share_verdict(*count(selective, "selective better", "last-layer better"),
                                                        0.5, more_than=True),
            "they_do_well": share_verdict(above + ties, below, unsure - ties, 1.0)}


def scale_claims_early(gains: list[dict[str, Any]], selective: list[dict[str, Any]], do_well: list[dict[str, Any]],
                       models: Sequence[str], tasks: Sequence[str]) -> dict[str, bool | None]:
    """The share claims of :func:`scale_claims` before the grid is complete (:func:`verdicts.early_verdict`):
    decided only where no comparison still to run (a cell short of its seeds, or not run) can change them; "prompt
    tuning improves most" waits for the whole grid (it compares gains that need four cells each)."""
    def early(items: list[dict[str, Any]], yes: str, no: str, planned: int, share: float,
              more_than: bool = False) -> bool | None:
        return early_verdict([i["verdict"] for i in items], yes, no, "tie", planned, share, more_than)

    above = [{**i, "verdict": "ok"} if i["verdict"] in ("above full FT", "tie with full FT") else i for i in do_well]
    return {"every_method_improves": early(gains, "improves", "worsens", len(tasks) * len(METHODS), 1.0),
            "prompt_improves_most": None,
            "selective_beats_last_layer": early(selective, "selective better", "last-layer better",
                                                len(models) * len(tasks), 0.5, more_than=True),
            "they_do_well": early(above, "ok", "below full FT", 2 * len(models) * len(tasks), 1.0)}


def summary(models: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    cells = {}
    select_rows, table_rows = completed_rows(SELECT_OUT), completed_rows(TABLE_OUT)  # old rows completed
    diverged = diverged_at_chosen(select_rows, table_rows, pair_key)
    chosen = choose_lrs(select_rows, pair_key)
    everywhere = diverged_everywhere(chosen)
    for pair, (lr, done) in chosen_rows(select_rows, table_rows, pair_key).items():
        scores = [r["score_at_best_val"] for r in done.values()]
        mean, std = mean_std(scores)
        cells[pair] = {"model": pair[0], "task": pair[1], "method": pair[2], "lr": lr, "mean": mean,
                       "std": std, "n_seeds": len(scores), "one_class_seeds": one_class_seeds(done.values()),
                       "near_one_class_seeds": near_one_class_seeds(done.values()),
                       "diverged_seeds": diverged.get(pair, []), "diverged_every_rate": pair in everywhere,
                       "rate_at_edge": rate_at_edge(chosen[pair]),
                       "trainable": next(iter(done.values()))["n_trainable"] if done else None}
    small, large = list(MODELS)[0], list(MODELS)[-1]
    levels = majority_levels(tasks)
    gains, selective, do_well = [], [], []
    for task in tasks:
        for method in METHODS:
            a, b = cells.get((small, task, method)), cells.get((large, task, method))
            verdict, diff = judge(a, b, levels[task], {1: "improves", -1: "worsens", 0: "tie"})
            if verdict is not None:
                gains.append({"task": task, "method": method, "gain": diff, "verdict": verdict,
                              "se": two_se(a, b)[2]})
        for model in models:
            verdict, diff = judge(cells.get((model, task, "last_layer")), cells.get((model, task, "selective")),
                                  levels[task], {1: "selective better", -1: "last-layer better", 0: "tie"})
            if verdict is not None:
                selective.append({"model": model, "task": task, "selective_minus_last_layer": diff,
                                  "verdict": verdict})
            for method in ("last_layer", "selective"):  # "do well": not below full fine-tuning
                verdict, diff = judge(cells.get((model, task, "full")), cells.get((model, task, method)),
                                      levels[task], {1: "above full FT", -1: "below full FT", 0: "tie with full FT"})
                if verdict is not None:
                    do_well.append({"model": model, "task": task, "method": method, "minus_full": diff,
                                    "verdict": verdict})
    prompt_vs = prompt_against_others(gains)
    progress = grid_progress(list(cells.values()), len(MODELS) * len(TASKS) * len(METHODS))
    early = None if progress["complete"] else scale_claims_early(gains, selective, do_well, models, tasks)
    claims = scale_claims(gains, prompt_vs, selective, do_well) if early is None else early
    payload = {**stamp({"models": list(models), "tasks": list(tasks), "methods": METHODS, "grid": GRID,
                        "harness": HARNESS, "dev_size": DEV_SIZE, "majority": levels,
                        "command": "python experiments/scale.py"}),
               "cells": list(cells.values()), "gains": gains, "prompt_vs_others": prompt_vs,
               "selective_vs_last_layer": selective, "against_full": do_well, "claims": claims,
               "decided_early": {k: early is not None and v is not None for k, v in claims.items()},
               "progress": progress}
    write_json_unless_same(SUMMARY, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tasks", default=",".join(TASKS))
    add_sweep_arguments(p, "runs/scale")
    p.add_argument("--plan", action="store_true", help="print the cells; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if any(m not in MODELS for m in models) or any(t not in TASKS for t in tasks):
        raise SystemExit(f"models must be among {list(MODELS)}, tasks among {TASKS}")
    if args.plan:
        cells = expand(selection_spec(models, tasks, read_jsonl(SELECT_OUT)))  # with its edge rates so far
        print(f"{len(cells)} selection cells (edge rates so far included), then "
              f"{2 * len(models) * len(tasks) * len(METHODS)} table cells of seeds "
              "1 and 2")
        est = sweep_hours(cells, read_jsonl(SELECT_OUT) + read_jsonl(TABLE_OUT), seeds_after=2)
        print(describe_hours("cells", est))
        return {"hours": est}
    if args.summary_only:
        return summary(tuple(MODELS), TASKS)

    select_then_tabulate(lambda rows: selection_spec(models, tasks, rows), SELECT_OUT,
                         lambda rows: table_spec(models, tasks, choose_lrs(rows, key=pair_key)), TABLE_OUT, RESULTS,
                         progress_echo(lambda: summary(tuple(MODELS), TASKS)), sweep_settings(args),
                         max_edge_rates=EDGE_RATES)
    return summary(tuple(MODELS), TASKS)


if __name__ == "__main__":
    main()
