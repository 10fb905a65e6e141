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

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from design_table import BUDGETS, DESIGNS, pair_key  # noqa: E402
from design_table import SUMMARY as TABLE_SUMMARY  # noqa: E402
from design_variant import LABELS, SEEDS, judge, study_main, table_rates, variant_cells, variant_spec  # noqa: E402
from rate_selection import choose_lrs  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT, SUMMARY = RESULTS / "design_schedule.jsonl", RESULTS / "design_schedule.json"
TASKS = ("sst2", "cola")
FACTOR = 2
"""The longer schedule's epochs over the design table's (SST-2: 4 instead of 2, CoLA: 6 instead of 3)."""
__all__ = ["BUDGETS", "DESIGNS", "FACTOR", "LABELS", "SEEDS", "choose_lrs", "pair_key", "spec", "summary"]


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
    def longer(data: dict[str, Any]) -> dict[str, Any]:
        epochs = table_epochs(data, tasks)
        data["overrides"] = data["overrides"] + [{"where": {"task": t}, "set": {"epochs": FACTOR * epochs[t]}}
                                                 for t in tasks]
        return data

    return variant_spec(tasks, budgets, chosen, "design_schedule", OUT, longer)


def summary(tasks: Sequence[str] = TASKS, budgets: Sequence[str] = tuple(BUDGETS)) -> dict[str, Any]:
    """``design_schedule.json``: the cells, each design's verdict against LoRA at both schedules, and counts."""
    rows = read_jsonl(OUT) if OUT.is_file() else []
    cells, table = variant_cells(rows, TABLE_SUMMARY, tasks, budgets)
    payload = {**stamp({"tasks": list(tasks), "budgets": list(budgets), "labels": list(LABELS), "factor": FACTOR,
                        "seeds": SEEDS, "harness": "the design table's (experiments/glue_select.yaml settings)",
                        "command": "python experiments/design_schedule.py"}),
               "cells": list(cells.values()), **judge(cells, table)}
    write_json_unless_same(SUMMARY, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    what = (f"{len(LABELS)} methods (LoRA and the designs) x {len(BUDGETS)} budgets x {len(TASKS)} tasks x "
                f"{len(SEEDS)} seeds, {FACTOR} x the design table's epochs")
    return study_main(argv, doc=__doc__ or "", runs="runs/design_schedule", out=OUT, summary=summary, what=what,
                      sweep=lambda: spec(TASKS, tuple(BUDGETS), table_rates()))


if __name__ == "__main__":
    main()
