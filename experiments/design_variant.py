"""A variant of the design table (issue 18): LoRA and the designs trained again with one change to the harness.

The studies built on it (``design_schedule``: twice the epochs; ``design_probe``: the head fitted first) train
LoRA and the six designs on some tasks at both budgets, seeds 0, 1, 2, each (task, budget, method) at the rate
the design table's selection chose (not chosen again), with the table's harness but for their one change.  Each
judges every design against LoRA *under the same change* by the table's two-standard-error rule, beside its
verdict in the table, and every method against its own table cell (``gain``: does the change help it?).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import read_jsonl
from controltune.sweep_spec import SweepSpec, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the experiments' shared modules, run or imported
from cost_model import describe_hours, sweep_hours  # noqa: E402
from design_table import (  # noqa: E402
    BUDGETS,
    DESIGNS,
    cell_complete,
    mean_curve,
    pair_key,
    pair_where,
    spec_data,
    verdict,
)
from design_table import SELECT_OUT as TABLE_SELECT  # noqa: E402
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    at_chosen_rates,
    choose_lrs,
    completed_rows,
    progress_echo,
    sweep_settings,
)
from verdicts import TOO_FEW_SEEDS, chance_wins, mean_std  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

LABELS = ("lora", *DESIGNS)
SEEDS = [0, 1, 2]
GAIN_VERDICTS = {"win": "better", "loss": "worse", "tie": "no change"}
Pair = tuple[str, str, str]


def pairs(tasks: Sequence[str], budgets: Sequence[str]) -> list[Pair]:
    """Every (task, budget, label) a variant trains: LoRA and the designs."""
    return [(t, b, label) for t in tasks for b in budgets for label in LABELS]


def table_rates() -> dict:
    """The design table's chosen rate per pair (its selection rows)."""
    return choose_lrs(completed_rows(TABLE_SELECT), pair_key)


def variant_spec(tasks: Sequence[str], budgets: Sequence[str], chosen: dict, name: str, out: Path,
                 change: Callable[[dict[str, Any]], dict[str, Any]]) -> SweepSpec:
    """Seeds 0, 1, 2 of LoRA and the designs at the table's chosen rates, with ``change`` applied to the spec's
    data (the table's: :func:`design_table.spec_data`) before the rates are set."""
    data = spec_data(tuple(tasks), tuple(budgets), SEEDS, name, out.name)
    methods = {BUDGETS[b][label][0] for b in budgets for label in LABELS}
    data["grid"]["method"] = sorted(methods)
    data["per_method"] = {m: v for m, v in data["per_method"].items() if m in methods}
    data = change(data)
    return parse_spec(at_chosen_rates(data, chosen, pairs(tasks, budgets), pair_where), name, out.parent)


def rises_at_end(curve: list[dict[str, float]] | None) -> bool | None:
    """Whether a mean validation curve is at its maximum at its last evaluation (None: no curve)."""
    if not curve or len(curve) < 2:
        return None
    return curve[-1]["mean"] >= max(p["mean"] for p in curve)


def variant_cell(rows: list[dict[str, Any]], pair: Pair, standard: dict[str, Any] | None) -> dict[str, Any]:
    """One (task, budget, label) in the variant, beside the design table's cell (``standard``): its mean and std
    over the scored seeds, the diverged seeds, its mean validation curve and, against the table's cell, ``gain``
    (the difference of the means) and ``gain_verdict`` (better, no change, worse by the two-standard-error rule)."""
    mine = [r for r in rows if pair_key(r) == pair]
    done = [r for r in mine if r.get("status") == "done"]
    mean, std = mean_std([r["score_at_best_val"] for r in done])
    metric = done[0]["metric"] if done else None
    curve = mean_curve(done, metric)
    out = {"task": pair[0], "budget": pair[1], "method": pair[2], "lr": done[0]["config"]["lr"] if done else None,
           "epochs": done[0]["config"]["epochs"] if done else None, "metric": metric, "mean": mean, "std": std,
           "n_seeds": len(done), "diverged_seeds": sorted(r["config"]["seed"] for r in mine
                                                          if r.get("status") == "diverged"),
           "rises_at_end": rises_at_end(curve), "val_curve": curve}
    if standard is not None:
        out.update(standard_lr=standard["lr"], standard_mean=standard["mean"], standard_std=standard["std"],
                   standard_n_seeds=standard["n_seeds"])
        v, diff, _ = verdict({"mean": mean, "std": std, "n_seeds": len(done)}, standard)
        out["gain"] = diff
        out["gain_verdict"] = GAIN_VERDICTS.get(v, v)  # type: ignore[arg-type]
    return out


def judge(cells: dict[Pair, dict[str, Any]], table: dict[str, Any]) -> dict[str, Any]:
    """Each design against LoRA in the variant (``rows``), beside its verdict in the table, and the counts:
    ``{rows, complete, wins, chance, changed, judged, gains}`` (``complete``: 3 seeds in every cell, a diverged seed
    counted; ``changed``: the verdicts that differ from the table's; ``gains``: the cells' gain verdicts)."""
    before = {(r["task"], r["budget"], r["design"]): r for r in table["rows"] if r["baseline"] == "lora"}
    rows = []
    for (task, budget, label), d in cells.items():
        if label == "lora":
            continue
        v, diff, se = verdict(d, cells[(task, budget, "lora")])
        t = before.get((task, budget, label)) or {}
        was = t.get("verdict")
        rows.append({"task": task, "budget": budget, "design": label, "baseline": "lora", "mean": d["mean"],
                     "std": d["std"], "n_seeds": d["n_seeds"],
                     "baseline_n_seeds": cells[(task, budget, "lora")]["n_seeds"], "difference": diff, "se": se,
                     "verdict": v,
                     "table_difference": t.get("difference"), "table_se": t.get("se"), "table_verdict": was,
                     "changed": None if v is None or was is None else v != was})
    judged = [r for r in rows if r["changed"] is not None]
    return {"rows": rows,
            "complete": all(cell_complete(c) for c in cells.values()),
            "wins": sum(r["verdict"] == "win" for r in rows),
            "chance": chance_wins(rows, "lora"),  # the wins equal methods would get from the rule
            "changed": [f"{r['task']}/{r['budget']} {r['design']}: {r['table_verdict']} -> {r['verdict']}"
                        for r in judged if r["changed"]],
            "judged": len(judged),
            "gains": {k: sum(c.get("gain_verdict") == k for c in cells.values())
                      for k in ("better", "no change", "worse", TOO_FEW_SEEDS)}}


def variant_cells(rows: list[dict[str, Any]], table_summary: Path, tasks: Sequence[str], budgets: Sequence[str]
                  ) -> tuple[dict[Pair, dict[str, Any]], dict[str, Any]]:
    """Every pair's :func:`variant_cell` beside the design table's cells (read from ``table_summary``), and the
    table's summary itself."""
    table = json.loads(table_summary.read_text())
    standard = {(c["task"], c["budget"], c["method"]): c for c in table["cells"]}
    return {p: variant_cell(rows, p, standard.get(p)) for p in pairs(tasks, budgets)}, table


def study_main(argv: list[str] | None, *, doc: str, runs: str, out: Path, sweep: Callable[[], SweepSpec],
               summary: Callable[[], dict[str, Any]], what: str) -> dict[str, Any]:
    """The command line the design-table studies share: ``--plan`` (the cells of ``sweep()`` and their estimated
    time, ``what`` describing them), ``--summary-only`` (``summary()`` from the rows), or the resumable sweep into
    ``out`` (the summary rewritten after every finished cell)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_sweep_arguments(p, runs)
    p.add_argument("--plan", action="store_true", help="print the cells and their estimated time; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    if args.summary_only:
        return summary()
    spec = sweep()
    if args.plan:
        cells = expand(spec)
        print(f"{len(cells)} cells: {what}")
        print(describe_hours("cells", sweep_hours(cells, read_jsonl(out) if out.is_file() else [])))
        return {"cells": len(cells)}
    from controltune.sweep import run_sweep

    run_sweep(spec, out, echo=progress_echo(summary), **sweep_settings(args))
    return summary()
