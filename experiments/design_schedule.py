"""Do the design table's verdicts survive a longer schedule? (issue 18: its cells stop while their curves rise)

Most of the design table's cells end with their mean validation curve at its maximum (24 of 26 SST-2 cells, 16
of 26 CoLA cells: ``design_table_curves``' caption), so its verdicts could be those of runs stopped early.  This
study trains LoRA and the six designs again on SST-2 and CoLA at both budgets with :data:`FACTOR` times the
table's epochs (same training and validation rows, seeds 0, 1, 2, evaluation cadence and batch; the warm-up and
the linear decay stretch with the schedule), each (task, budget, method) at the rate the design table's
selection chose, and judges every design against LoRA by the table's two-standard-error rule, beside its verdict
at the table's schedule.

Decided before any row ran: the rates are not chosen again (a rate chosen for the shorter schedule may suit a
longer one less, for every method alike); the table's verdicts stand as the study's answer, this one says how
many of them change (``changed``) and whether training longer helps each method (``gain``: the long schedule's
mean against the table's by the same rule).  SST-2 and CoLA only: the two tasks complete first, and the two
with the most rising curves; ~8 core-hours by ``--plan`` (84 cells).

    nohup .venv/bin/python experiments/design_schedule.py > experiments/results/design_schedule.log 2>&1 &
    .venv/bin/python experiments/design_schedule.py --plan          # the cells and their estimated time
    .venv/bin/python experiments/design_schedule.py --summary-only  # rewrite design_schedule.json from the rows
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_model import describe_hours, sweep_hours  # noqa: E402
from design_table import (  # noqa: E402
    BUDGETS,
    DESIGNS,
    MIN_SEEDS,
    mean_curve,
    pair_key,
    pair_where,
    spec_data,
    verdict,
)
from design_table import SELECT_OUT as TABLE_SELECT  # noqa: E402
from design_table import SUMMARY as TABLE_SUMMARY  # noqa: E402
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    at_chosen_rates,
    choose_lrs,
    completed_rows,
    progress_echo,
    sweep_settings,
)
from verdicts import TOO_FEW_SEEDS, mean_std  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT, SUMMARY = RESULTS / "design_schedule.jsonl", RESULTS / "design_schedule.json"
TASKS = ("sst2", "cola")
LABELS = ("lora", *DESIGNS)
FACTOR = 2
"""The longer schedule's epochs over the design table's (SST-2: 4 instead of 2, CoLA: 6 instead of 3)."""
SEEDS = [0, 1, 2]


def pairs(tasks: Sequence[str], budgets: Sequence[str]) -> list[tuple[str, str, str]]:
    """Every (task, budget, label) the study trains: LoRA and the designs."""
    return [(t, b, label) for t in tasks for b in budgets for label in LABELS]


def table_epochs(data: dict[str, Any], tasks: Sequence[str]) -> dict[str, int]:
    """Each task's epochs in the design table's spec (the GLUE selection's per-task override)."""
    found = {o["where"]["task"]: o["set"]["epochs"] for o in data["overrides"]
             if set(o["where"]) == {"task"} and "epochs" in o["set"]}
    missing = [t for t in tasks if t not in found]
    if missing:
        raise SystemExit(f"glue_select.yaml sets no epochs for {missing}; the schedule cannot be doubled")
    return {t: int(found[t]) for t in tasks}


def spec(tasks: Sequence[str], budgets: Sequence[str], chosen: dict) -> SweepSpec:
    """Seeds 0, 1, 2 of LoRA and the designs at the table's chosen rates, with :data:`FACTOR` × its epochs."""
    data = spec_data(tuple(tasks), tuple(budgets), SEEDS, "design_schedule", OUT.name)
    methods = {BUDGETS[b][label][0] for b in budgets for label in LABELS}
    data["grid"]["method"] = sorted(methods)
    data["per_method"] = {m: v for m, v in data["per_method"].items() if m in methods}
    epochs = table_epochs(data, tasks)
    data["overrides"] = data["overrides"] + [{"where": {"task": t}, "set": {"epochs": FACTOR * epochs[t]}}
                                             for t in tasks]
    return parse_spec(at_chosen_rates(data, chosen, pairs(tasks, budgets), pair_where), "design_schedule", RESULTS)


def table_rates() -> dict:
    """The design table's chosen rate per pair (its selection rows)."""
    return choose_lrs(completed_rows(TABLE_SELECT), pair_key)


def _rises_at_end(curve: list[dict[str, float]] | None) -> bool | None:
    """Whether a mean validation curve is at its maximum at its last evaluation (None: no curve)."""
    if not curve or len(curve) < 2:
        return None
    return curve[-1]["mean"] >= max(p["mean"] for p in curve)


def cell(rows: list[dict[str, Any]], pair: tuple[str, str, str], standard: dict[str, Any] | None
         ) -> dict[str, Any]:
    """One (task, budget, label) at the long schedule, beside the design table's cell (``standard``)."""
    mine = [r for r in rows if pair_key(r) == pair]
    done = [r for r in mine if r.get("status") == "done"]
    mean, std = mean_std([r["score_at_best_val"] for r in done])
    metric = done[0]["metric"] if done else None
    curve = mean_curve(done, metric)
    out = {"task": pair[0], "budget": pair[1], "method": pair[2], "lr": done[0]["config"]["lr"] if done else None,
           "epochs": done[0]["config"]["epochs"] if done else None, "metric": metric, "mean": mean, "std": std,
           "n_seeds": len(done), "diverged_seeds": sorted(r["config"]["seed"] for r in mine
                                                          if r.get("status") == "diverged"),
           "rises_at_end": _rises_at_end(curve), "val_curve": curve}
    if standard is not None:
        out.update(standard_lr=standard["lr"], standard_mean=standard["mean"], standard_std=standard["std"],
                   standard_n_seeds=standard["n_seeds"])
        v, diff, _ = verdict({"mean": mean, "std": std, "n_seeds": len(done)}, standard)
        out["gain"] = diff
        out["gain_verdict"] = {"win": "better", "loss": "worse", "tie": "no change"}.get(v, v)
    return out


def summary(tasks: Sequence[str] = TASKS, budgets: Sequence[str] = tuple(BUDGETS)) -> dict[str, Any]:
    """``design_schedule.json``: the cells, each design's verdict against LoRA at both schedules, and counts."""
    rows = read_jsonl(OUT) if OUT.is_file() else []
    table = json.loads(TABLE_SUMMARY.read_text())
    standard = {(c["task"], c["budget"], c["method"]): c for c in table["cells"]}
    before = {(r["task"], r["budget"], r["design"]): r for r in table["rows"] if r["baseline"] == "lora"}
    cells = {p: cell(rows, p, standard.get(p)) for p in pairs(tasks, budgets)}
    out_rows = []
    for (task, budget, label), d in cells.items():
        if label == "lora":
            continue
        v, diff, se = verdict(d, cells[(task, budget, "lora")])
        t = before.get((task, budget, label)) or {}
        was = t.get("verdict")
        out_rows.append({"task": task, "budget": budget, "design": label, "baseline": "lora", "mean": d["mean"],
                         "std": d["std"], "n_seeds": d["n_seeds"], "difference": diff, "se": se, "verdict": v,
                         "table_difference": t.get("difference"), "table_se": t.get("se"), "table_verdict": was,
                         "changed": None if v is None or was is None else v != was})
    complete = all(c["n_seeds"] + len(c["diverged_seeds"]) >= MIN_SEEDS for c in cells.values())
    judged = [r for r in out_rows if r["changed"] is not None]
    payload = {**stamp({"tasks": list(tasks), "budgets": list(budgets), "labels": list(LABELS), "factor": FACTOR,
                        "seeds": SEEDS, "harness": "the design table's (experiments/glue_select.yaml settings)",
                        "command": "python experiments/design_schedule.py"}),
               "cells": list(cells.values()), "rows": out_rows, "complete": complete,
               "wins": sum(r["verdict"] == "win" for r in out_rows),
               "changed": [f"{r['task']}/{r['budget']} {r['design']}: {r['table_verdict']} -> {r['verdict']}"
                           for r in judged if r["changed"]],
               "judged": len(judged),
               "gains": {k: sum(c.get("gain_verdict") == k for c in cells.values())
                         for k in ("better", "no change", "worse", TOO_FEW_SEEDS)}}
    write_json_unless_same(SUMMARY, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, "runs/design_schedule")
    p.add_argument("--plan", action="store_true", help="print the cells and their estimated time; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    if args.summary_only:
        return summary()
    sweep = spec(TASKS, tuple(BUDGETS), table_rates())
    if args.plan:
        cells = expand(sweep)
        print(f"{len(cells)} cells: {len(LABELS)} methods (LoRA and the designs) x {len(BUDGETS)} budgets x "
              f"{len(TASKS)} tasks x {len(SEEDS)} seeds, {FACTOR} x the design table's epochs")
        print(describe_hours("cells", sweep_hours(cells, read_jsonl(OUT) if OUT.is_file() else [])))
        return {"cells": len(cells)}
    from controltune.sweep import run_sweep

    run_sweep(sweep, OUT, echo=progress_echo(summary), **sweep_settings(args))
    return summary()


if __name__ == "__main__":
    main()
