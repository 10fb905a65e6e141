"""Do the designs win once they design through a fitted head? (issue 18: the co-state ran through a random head)

Every design starts from the co-state ``p_L = −∂Φ/∂x_L`` of the pretrained system, and in the design table
``Φ``'s classifier head is the run's random, seeded one: each seed designs from a different terminal cost that
knows nothing of the task (CoLA's held-out J at the start: 0.647, 0.670, 0.696 for seeds 0–2; the co-state
line search's step 67× larger on seed 2 than on seed 0).  This study fits the head first, as a linear probe on
the run's training rows (:mod:`controltune.probe`; its L2 penalty chosen on the run's validation rows), so every
design runs through a head that separates the task, the same for every seed, and then trains as in the table.

Decided before any row ran:
- The fair baseline is LoRA started from the same fitted head (LP-FT, Kumar et al. 2022): ``rows`` judge each
  design against it by the table's two-standard-error rule, so the co-state's share is measured apart from the
  probe's.  ``against_table_lora`` also judges each design against the table's LoRA (random head), the baseline
  the issue names; a win there but not against LP-FT is the probe's, not the design's.
- LoRA and the six designs on SST-2 and CoLA at both budgets, seeds 0, 1, 2, each (task, budget, method) at the
  rate the design table's selection chose (not chosen again: the head changes the start, and a rate chosen for
  a random head may suit a fitted one less, for every method alike); the table's epochs and rows.
- ``gain``: every method against its own table cell (does the fitted head help it?).

    nohup .venv/bin/python experiments/design_probe.py > experiments/results/design_probe.log 2>&1 &
    .venv/bin/python experiments/design_probe.py --plan          # the cells and their estimated time
    .venv/bin/python experiments/design_probe.py --summary-only  # rewrite design_probe.json from the rows
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from design_table import BUDGETS, DESIGNS, costate_search, pair_key, verdict  # noqa: E402
from design_table import SUMMARY as TABLE_SUMMARY  # noqa: E402
from design_variant import LABELS, SEEDS, judge, study_main, table_rates, variant_cells, variant_spec  # noqa: E402
from rate_selection import choose_lrs  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT, SUMMARY = RESULTS / "design_probe.jsonl", RESULTS / "design_probe.json"
TASKS = ("sst2", "cola")
__all__ = ["BUDGETS", "DESIGNS", "LABELS", "SEEDS", "choose_lrs", "pair_key", "spec", "summary"]


def spec(tasks: Sequence[str], budgets: Sequence[str], chosen: dict) -> SweepSpec:
    """Seeds 0, 1, 2 of LoRA and the designs at the table's chosen rates, each head fitted first
    (``head_init: probe``)."""
    def probe(data: dict[str, Any]) -> dict[str, Any]:
        data["train"] = {**data["train"], "head_init": "probe"}
        return data

    return variant_spec(tasks, budgets, chosen, "design_probe", OUT, probe)


def probe_fits(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the linear probes the cells fitted (a probe depends on the rows only, so every cell of a task
    should report the same): the distinct L2 penalties chosen, the probe's held-out (validation-row) accuracy
    and training accuracy (min and max over cells), and how many fits reached stationarity."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        fit = r.get("head_fit")
        if r.get("status") != "done" or not fit:
            continue
        mine = out.setdefault(r["config"]["task"], {"cells": 0, "converged": 0, "l2": set(), "held_out": [],
                                                     "train": []})
        mine["cells"] += 1
        mine["converged"] += bool(fit["converged"])
        mine["l2"].add(fit["l2"])
        mine["held_out"].append(fit["held_out_accuracy"])
        mine["train"].append(fit["train_accuracy"])
    return {task: {"cells": m["cells"], "converged": m["converged"], "l2": sorted(m["l2"]),
                   "held_out_accuracy": [min(m["held_out"]), max(m["held_out"])],
                   "train_accuracy": [min(m["train"]), max(m["train"])]} for task, m in sorted(out.items())}


def against_table_lora(cells: dict, table: dict[str, Any]) -> list[dict[str, Any]]:
    """Each design with the fitted head against the table's LoRA (random head) at the same task and budget."""
    lora = {(c["task"], c["budget"]): c for c in table["cells"] if c["method"] == "lora"}
    out = []
    for (task, budget, label), d in cells.items():
        if label == "lora" or (task, budget) not in lora:
            continue
        v, diff, se = verdict(d, lora[(task, budget)])
        out.append({"task": task, "budget": budget, "design": label, "baseline": "lora (table, random head)",
                    "difference": diff, "se": se, "verdict": v})
    return out


def summary(tasks: Sequence[str] = TASKS, budgets: Sequence[str] = tuple(BUDGETS)) -> dict[str, Any]:
    """``design_probe.json``: the cells, each design against LoRA with the same fitted head (``rows``) and against
    the table's LoRA, every method's gain from the fitted head, the probes and the co-state line searches."""
    rows = read_jsonl(OUT) if OUT.is_file() else []
    cells, table = variant_cells(rows, TABLE_SUMMARY, tasks, budgets)
    versus_table = against_table_lora(cells, table)
    payload = {**stamp({"tasks": list(tasks), "budgets": list(budgets), "labels": list(LABELS), "seeds": SEEDS,
                        "head_init": "probe",
                        "harness": "the design table's (experiments/glue_select.yaml settings), head fitted first",
                        "command": "python experiments/design_probe.py"}),
               "cells": list(cells.values()), **judge(cells, table),
               "against_table_lora": versus_table,
               "wins_over_table_lora": sum(r["verdict"] == "win" for r in versus_table),
               "probe": probe_fits(rows),
               "costate_search": costate_search([r for r in rows if r["config"]["task"] in tasks])}
    write_json_unless_same(SUMMARY, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    what = (f"{len(LABELS)} methods (LoRA and the designs) x {len(BUDGETS)} budgets x {len(TASKS)} tasks x "
                f"{len(SEEDS)} seeds, each head fitted as a linear probe first")
    return study_main(argv, doc=__doc__ or "", runs="runs/design_probe", out=OUT, summary=summary, what=what,
                      sweep=lambda: spec(TASKS, tuple(BUDGETS), table_rates()))


if __name__ == "__main__":
    main()
