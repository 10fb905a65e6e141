"""Composability and generalisation gap (issue 15; Ding et al. 2023): the 7 non-empty subsets of {prompt, BitFit,
adapter} combined simultaneously, on SST-2, MRPC, RTE and CoLA, 3 seeds.

The paper's claims: adapters almost always help a combination, prompt tuning usually hurts, BitFit usually helps;
the train − dev gap is smaller for every single delta method than for full fine-tuning (prompt tuning smallest)
and combinations widen it.

The harness is the GLUE table's (``glue_select.yaml``'s training settings: MiniLM, batch 32, AdamW with warm-up
and linear decay, per-task epochs, validation rows, evaluation cadence).  Parts: prompt (20 tokens), BitFit,
adapter (bottleneck 64) — so the three single-method cells *are* GLUE table cells, copied from its rows, not
rerun.  A combination ``a+b`` trains its parts at once (``controltune train --method a+b``), each part at its own
rate: the rate the GLUE selection chose for that part alone on the task, times one factor chosen on validation rows
from ``COMBO_FACTORS`` (``part_lr_scales``; the head at the smallest part rate times the factor; grids continued at
their edge, :mod:`rate_selection`) — one shared rate would leave prompt tuning (best near 5e-2) or the adapter
(near 2e-3) far from its own; seeds 0, 1, 2 at the chosen factor.  Every run scores its reported deltas on 1,000
of its training rows (``train_scores``), so each row has its generalisation gap; rows of GLUE cells run before
those scores existed have none.

``results/composability.json``: per task and subset the dev score (mean, std over seeds) and the train − dev gap;
per part, in how many (task, subset-without-it) pairs adding it helped (two-standard-error rule).

    .venv/bin/python experiments/composability.py --plan
    nohup .venv/bin/python experiments/composability.py > experiments/results/composability.log 2>&1 &
    .venv/bin/python experiments/composability.py --summary-only
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path
from typing import Any

import yaml

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_model import (  # noqa: E402
    describe_hours,
    sweep_hours,
)
from generalization_gap import summary as gap_summary  # noqa: E402
from rate_selection import (  # noqa: E402
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
    require_rates,
    select_then_tabulate,
    sweep_settings,
)
from verdicts import (  # noqa: E402
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SELECT_OUT, TABLE_OUT, SUMMARY = (RESULTS / "composability_select.jsonl", RESULTS / "composability_table.jsonl",
                                  RESULTS / "composability.json")
TASKS = ("sst2", "mrpc", "rte", "cola")
PARTS = {"prompt": {"n_tokens": 20}, "bitfit": {}, "adapter": {"bottleneck": 64}}
SINGLE_GRID = {"prompt": [1.0e-2, 5.0e-2], "bitfit": [1.0e-3, 5.0e-3], "adapter": [5.0e-4, 2.0e-3]}
"""The GLUE selection's grids (its cells are these, copied)."""
COMBO_FACTORS = [0.5, 1.0, 2.0]
"""A combination's grid: its parts at their own GLUE-chosen rates on the task, all times one of these factors."""
SUBSETS = ["+".join(c) for k in (1, 2, 3) for c in itertools.combinations(PARTS, k)]


def _options(subset: str) -> dict[str, Any]:
    parts = subset.split("+")
    if len(parts) == 1:
        return copy.deepcopy(PARTS[parts[0]])
    return {f"{p}.{k}": v for p in parts for k, v in PARTS[p].items()}


def part_rates(tasks: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """``(task, part) -> the rate the GLUE selection chose`` for every part on every task (or a SystemExit)."""
    chosen = choose_lrs(read_jsonl(RESULTS / "glue_select.jsonl"))
    pairs = [(t, p) for t in tasks for p in PARTS]
    require_rates(chosen, pairs)
    return {pair: float(chosen[pair]["lr"]) for pair in pairs}


def combo_rates(subset: str, task: str, rates: dict[tuple[str, str], float]) -> tuple[list[float], list[float]]:
    """``(lr grid, part_lr_scales)`` of a combination: part p at ``lr × r_p / r_min`` (r: GLUE-chosen rates on the
    task), the head at ``lr``, with ``lr`` on ``r_min × COMBO_FACTORS``: every part at its own rate times one factor."""
    own = [rates[(task, p)] for p in subset.split("+")]
    base = min(own)
    return [base * f for f in COMBO_FACTORS], [r / base for r in own]


def spec_data(tasks: tuple[str, ...], seeds: list[int], name: str, out: str) -> dict[str, Any]:
    glue = yaml.safe_load((HERE / "glue_select.yaml").read_text())
    per_method = {s: {"lr": SINGLE_GRID[s], "options": _options(s)} for s in SUBSETS if "+" not in s}
    per_method.update({s: {"lr": [COMBO_FACTORS[1]], "options": _options(s)} for s in SUBSETS if "+" in s})
    for entry in per_method.values():
        if not entry["options"]:
            del entry["options"]
    rates = part_rates(tasks)
    combos = []
    for task in tasks:
        for subset in (s for s in SUBSETS if "+" in s):
            grid, scales = combo_rates(subset, task, rates)
            combos.append({"where": {"task": task, "method": subset}, "set": {"lr": grid, "part_lr_scales": [scales]}})
    return {"name": name, "out": out, "grid": {"model": "minilm", "task": list(tasks), "method": SUBSETS,
                                                "seed": seeds},
            "per_method": per_method, "train": glue["train"], "overrides": list(glue["overrides"]) + combos}


def selection_spec(tasks: tuple[str, ...], rows: list[dict[str, Any]] | None = None) -> SweepSpec:
    return extended_spec(spec_data(tasks, [0], "composability_select", SELECT_OUT.name), rows or [],
                         folder=RESULTS)


def table_spec(tasks: tuple[str, ...], chosen: dict) -> SweepSpec:
    data = spec_data(tasks, [0, 1, 2], "composability_table", TABLE_OUT.name)
    return parse_spec(at_chosen_rates(data, chosen, [(t, s) for t in tasks for s in SUBSETS]), "composability_table",
                      RESULTS)


CLAIMS = {"adapter": ("helps", 0.75, False), "prompt": ("hurts", 0.5, True), "bitfit": ("helps", 0.5, True)}
"""Per part, the paper's claim: adapters almost always help (in ≥ 75 % of the tests), prompt tuning usually hurts
and BitFit usually helps (in more than half)."""


def part_claims(effects: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Each part's claim (:data:`CLAIMS`) over its (task, subset) effects by :func:`verdicts.share_verdict`:
    "no effect" and too few seeds are absence of evidence, "not a test" is left out."""
    out = {}
    for part, (what, share, more_than) in CLAIMS.items():
        v = [e["verdict"] for e in effects if e["part"] == part and e["verdict"] != "not a test"]
        other = "hurts" if what == "helps" else "helps"
        out[part] = share_verdict(v.count(what), v.count(other), len(v) - v.count(what) - v.count(other), share,
                                  more_than)
    return out


def planned_effects(part: str) -> int:
    """How many (task, subset without ``part``) comparisons the full grid judges for ``part``."""
    return len(TASKS) * sum(1 for s in SUBSETS if part not in s.split("+"))


def part_claims_early(effects: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Each part's claim before the grid is complete (:func:`verdicts.early_verdict`): comparisons short of their
    seeds, and those whose cells have not run, are untested; a claim is decided only where no outcome of them can
    change it."""
    out = {}
    for part, (what, share, more_than) in CLAIMS.items():
        mine = [e["verdict"] for e in effects if e["part"] == part]
        other = "hurts" if what == "helps" else "helps"
        out[part] = early_verdict(mine, what, other, "no effect", planned_effects(part), share, more_than)
    return out


def summary(tasks: tuple[str, ...]) -> dict[str, Any]:
    cells = {}
    select_rows, table_rows = completed_rows(SELECT_OUT), completed_rows(TABLE_OUT)  # old rows completed
    diverged = diverged_at_chosen(select_rows, table_rows)
    chosen = choose_lrs(select_rows)
    everywhere = diverged_everywhere(chosen)
    for (task, subset), (lr, done) in chosen_rows(select_rows, table_rows).items():
        dev = [r["score_at_best_val"] for r in done.values()]
        gaps = [r["train_scores"][r["metric"]] - r["score_at_best_val"] for r in done.values() if r.get("train_scores")]
        mean, std = mean_std(dev)
        gap_mean, gap_std = mean_std(gaps)
        cells[(task, subset)] = {"task": task, "subset": subset, "lr": lr, "mean": mean, "std": std,
                                 "n_seeds": len(dev), "gap_mean": gap_mean, "gap_std": gap_std, "n_gap": len(gaps),
                                 "one_class_seeds": one_class_seeds(done.values()),
                                 "near_one_class_seeds": near_one_class_seeds(done.values()),
                                 "diverged_seeds": diverged.get((task, subset), []),
                                 "diverged_every_rate": (task, subset) in everywhere,
                                 "rate_at_edge": rate_at_edge(chosen[(task, subset)])}
    levels = required_levels(glue_majority(RESULTS), tasks)  # the GLUE harness's full dev sets
    effects = []
    for part in PARTS:
        for task in tasks:
            for subset in SUBSETS:
                if part in subset.split("+"):
                    continue
                with_part = "+".join(p for p in PARTS if p in subset.split("+") + [part])
                # not a test: with and without the part at the majority class
                verdict, diff = judge(cells.get((task, subset)), cells.get((task, with_part)), levels[task],
                                      {1: "helps", -1: "hurts", 0: "no effect"})
                if verdict is None:
                    continue
                effects.append({"part": part, "task": task, "without": subset, "with": with_part, "difference": diff,
                                "majority": levels[task], "verdict": verdict})
    progress = grid_progress(list(cells.values()), len(TASKS) * len(SUBSETS))
    early = None if progress["complete"] else part_claims_early(effects)
    claims = part_claims(effects) if early is None else early
    payload = {**stamp({"tasks": list(tasks), "parts": PARTS, "combo_factors": COMBO_FACTORS, "majority": levels,
                        "part_rates": {f"{t}/{p}": r for (t, p), r in part_rates(tasks).items()},
                        "harness": "experiments/glue_select.yaml settings", "command":
                            "python experiments/composability.py"}),
               "cells": list(cells.values()), "effects": effects,
               "claims": claims, "decided_early": {p: early is not None and v is not None for p, v in claims.items()},
               "progress": progress}
    write_json_unless_same(SUMMARY, payload)
    gap_summary(SUMMARY.parent)  # its combinations' gaps against their parts'
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    add_sweep_arguments(p, "runs/composability")
    p.add_argument("--plan", action="store_true", help="print the cells; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if any(t not in TASKS for t in tasks):
        raise SystemExit(f"unknown task(s) in {tasks}; accepted: {', '.join(TASKS)}")
    if args.plan:
        cells = expand(selection_spec(tasks, read_jsonl(SELECT_OUT)))  # with its edge rates so far
        print(f"{len(cells)} selection cells ({len(tasks)} tasks x {len(SUBSETS)} subsets; the single-method ones are "
              f"GLUE table cells), then {2 * len(tasks) * len(SUBSETS)} table cells of seeds 1 and 2")
        glue = read_jsonl(RESULTS / "glue_select.jsonl") + read_jsonl(RESULTS / "glue_table.jsonl")  # the singles
        est = sweep_hours(cells, read_jsonl(SELECT_OUT) + read_jsonl(TABLE_OUT) + glue, seeds_after=2)
        print(describe_hours("cells", est))
        return {"cells": len(cells), "hours": est}
    if args.summary_only:
        return summary(TASKS)
    select_then_tabulate(lambda rows: selection_spec(tasks, rows), SELECT_OUT,
                         lambda rows: table_spec(tasks, choose_lrs(rows)), TABLE_OUT, RESULTS,
                         progress_echo(lambda: summary(TASKS)), sweep_settings(args))
    return summary(TASKS)

if __name__ == "__main__":
    main()
