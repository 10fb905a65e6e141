"""Where does the recommender's score come from: its placement or its start? (issue 18)

``recommended_lora`` is two designs in one: (1) *placement*, the maps and ranks the co-state's singular values
allocate under the budget (any of the family's linear maps, not only q and v), and (2) *start*, one trust-region
co-state step.  This study trains (1) alone, ``init: standard`` (LoRA's own start, ``B = 0``, on the recommended
maps and ranks), and judges it against LoRA on q and v (what placement alone is worth) and against the
recommender (what the co-state start adds to it), each from the design table's cells.

Decided before any row ran: SST-2, MRPC and CoLA at both budgets, seeds 0, 1, 2, each at the rate the design
table's selection chose for the recommender at that task and budget (not chosen again: same structure, same
parameter count), with the table's harness.  ~1.4 core-hours by ``--plan`` (18 cells).

    nohup .venv/bin/python experiments/design_ablation.py > experiments/results/design_ablation.log 2>&1 &
    .venv/bin/python experiments/design_ablation.py --plan          # the cells and their estimated time
    .venv/bin/python experiments/design_ablation.py --summary-only  # rewrite design_ablation.json from the rows
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec, canonical_config, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from design_table import BUDGETS, cell_complete, mean_curve, spec_data, verdict  # noqa: E402
from design_table import SUMMARY as TABLE_SUMMARY  # noqa: E402
from design_variant import SEEDS, study_main, table_rates  # noqa: E402
from rate_selection import at_chosen_rates  # noqa: E402
from verdicts import chance_wins, mean_std  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT, SUMMARY = RESULTS / "design_ablation.jsonl", RESULTS / "design_ablation.json"
TASKS = ("sst2", "mrpc", "cola")
LABEL = "recommended_placement"
"""The ablation's label: the recommender's placement with LoRA's own start."""
METHOD = "recommended_lora"


def options(budget: str) -> dict[str, Any]:
    """The recommender's options at ``budget`` (:data:`design_table.BUDGETS`) with LoRA's own start."""
    return {**BUDGETS[budget][METHOD][1], "init": "standard"}


def pair_key(row: dict[str, Any]) -> tuple[str, str, str]:
    """``(task, budget, LABEL)`` of an ablation row."""
    config = row["config"]
    key = canonical_config(config.get("options") or {})
    budget = next((b for b in BUDGETS if canonical_config(options(b)) == key), None)
    if config["method"] != METHOD or budget is None:
        raise KeyError(f"cell {config['method']} {config.get('options')} is not a {LABEL} cell")
    return str(config["task"]), budget, LABEL


def pair_where(pair: tuple[str, str, str]) -> dict[str, Any]:
    return {"task": pair[0], "method": METHOD, "options": options(pair[1])}


def spec(tasks: Sequence[str], budgets: Sequence[str], chosen: dict) -> SweepSpec:
    """Seeds 0, 1, 2 of the placement alone at each (task, budget), at the rate the table chose for the
    recommender there (``chosen``: the table's choices, keyed by its pairs)."""
    data = spec_data(tuple(tasks), tuple(budgets), SEEDS, "design_ablation", OUT.name)
    data["grid"]["method"] = [METHOD]
    data["per_method"] = {METHOD: {"options": [options(b) for b in budgets],
                                   "lr": sorted({chosen[(t, b, METHOD)]["lr"] for t in tasks for b in budgets
                                                 if chosen.get((t, b, METHOD), {}).get("lr") is not None})}}
    pairs = [(t, b, LABEL) for t in tasks for b in budgets]
    mine = {(t, b, LABEL): chosen[(t, b, METHOD)] for t, b, _ in pairs if (t, b, METHOD) in chosen}
    return parse_spec(at_chosen_rates(data, mine, pairs, pair_where), "design_ablation", RESULTS)


def cell(rows: list[dict[str, Any]], pair: tuple[str, str, str]) -> dict[str, Any]:
    """The placement alone at one (task, budget): mean and std over its scored seeds, its diverged seeds, its mean
    validation curve and each seed's allocation (maps and ranks)."""
    mine = sorted((r for r in rows if pair_key(r) == pair), key=lambda r: r["config"]["seed"])
    done = [r for r in mine if r.get("status") == "done"]
    mean, std = mean_std([r["score_at_best_val"] for r in done])
    metric = done[0]["metric"] if done else None
    return {"task": pair[0], "budget": pair[1], "method": LABEL, "lr": done[0]["config"]["lr"] if done else None,
            "metric": metric, "mean": mean, "std": std, "n_seeds": len(done),
            "diverged_seeds": sorted(r["config"]["seed"] for r in mine if r.get("status") == "diverged"),
            "n_trainable": done[0].get("n_trainable") if done else None, "val_curve": mean_curve(done, metric),
            "ranks": [((r.get("designs") or {}).get(METHOD) or {}).get("ranks") for r in done]}


def judged(c: dict[str, Any], table: dict[str, dict[str, Any]], against: str, meaning: str) -> dict[str, Any]:
    """The placement's verdict against the table's ``against`` cell at the same task and budget."""
    other = table.get((c["task"], c["budget"], against))
    if other is None:
        return {"task": c["task"], "budget": c["budget"], "baseline": against, "meaning": meaning, "verdict": None,
                "difference": None, "se": None}
    v, diff, se = verdict(c, other)
    return {"task": c["task"], "budget": c["budget"], "baseline": against, "meaning": meaning, "verdict": v,
            "difference": diff, "se": se, "n_seeds": c["n_seeds"], "baseline_mean": other["mean"],
            "baseline_std": other["std"], "baseline_n_seeds": other["n_seeds"]}


def summary(tasks: Sequence[str] = TASKS, budgets: Sequence[str] = tuple(BUDGETS)) -> dict[str, Any]:
    """``design_ablation.json``: the placement's cells and its verdicts against LoRA (``placement``: a win means
    the placement alone beats LoRA on q and v) and against the recommender (``start``: a loss means the co-state
    start adds to the placement)."""
    rows = read_jsonl(OUT) if OUT.is_file() else []
    table_payload = json.loads(TABLE_SUMMARY.read_text())
    table = {(c["task"], c["budget"], c["method"]): c for c in table_payload["cells"]}
    cells = [cell(rows, (t, b, LABEL)) for t in tasks for b in budgets]
    verdicts = [judged(c, table, base, meaning) for c in cells
                for base, meaning in (("lora", "placement"), (METHOD, "start"))]
    payload = {**stamp({"tasks": list(tasks), "budgets": list(budgets), "seeds": SEEDS,
                        "options": {b: options(b) for b in budgets},
                        "harness": "the design table's (experiments/glue_select.yaml settings), at the recommender's "
                                   "chosen rates",
                        "command": "python experiments/design_ablation.py"}),
               "cells": cells, "rows": verdicts, "complete": all(cell_complete(c) for c in cells),
               "counts": {meaning: {v: sum(r["verdict"] == v for r in verdicts if r["meaning"] == meaning)
                                    for v in ("win", "tie", "loss")} for meaning in ("placement", "start")},
               # the wins over LoRA the rule would give a placement no better than LoRA's q and v
               "chance": chance_wins([r for r in verdicts if r["meaning"] == "placement"], "lora")}
    write_json_unless_same(SUMMARY, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    what = (f"the recommender's placement with LoRA's own start x {len(BUDGETS)} budgets x {len(TASKS)} tasks x "
                f"{len(SEEDS)} seeds, at the recommender's chosen rates")
    return study_main(argv, doc=__doc__ or "", runs="runs/design_ablation", out=OUT, summary=summary, what=what,
                      sweep=lambda: spec(TASKS, tuple(BUDGETS), table_rates()))


if __name__ == "__main__":
    main()
