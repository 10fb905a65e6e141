"""The design table (issue 18, part 3): designed deltas and the recommender against standard deltas at equal budgets.

Designs: ``costate_lora`` (one MSA step as LoRA's start), ``gramian_lora`` (placement by controllability),
``recommended_lora`` (targets, ranks and a trust-region start from the co-state: what ``controltune
recommend`` writes for peft), ``riccati_feedback`` (Riccati/LQR state feedback), ``closed_loop_prefix``
and ``parallel_control`` (the state-based control of Zhang et al., ICML 2025).  Baselines: LoRA on q, v,
the adapter, prefix tuning, and peft's own initialisations of the same LoRA (``peft_lora`` with PiSSA,
OLoRA, LoRA-GA and EVA, the last two computed on 64 training rows of the cell's task).  Two budgets:
``b74k`` (LoRA r=8 on q, v: 73,728 trainable parameters besides the head) and ``b18k`` (r=2: 18,432);
every method's options at each budget are in :data:`BUDGETS` and ``--plan`` prints their counts.

The harness is the GLUE table's (``experiments/glue_table.py``): MiniLM, float32, the training settings
of ``glue_select.yaml`` (batch 32, length 128, AdamW, warm-up and linear decay, the per-task epochs,
validation rows and evaluation cadence), seed 0 on each (task, method, options)'s grid of rates with the
rate chosen on validation rows (grids continued up to :data:`EDGE_RATES` steps past their edge, and on CoLA,
SST-2 and MRPC the bracket around an interior best narrowed to a factor of 2 by the geometric midpoints on both
sides: :mod:`rate_selection`, :data:`REFINE_TASKS`), then seeds 0, 1, 2 at the chosen rate; a designed
controller designs on its cell's task (training rows).  LoRA at ``b74k`` is the GLUE table's own LoRA cell: those
rows are copied, not rerun.

``results/design_table.json`` rows ``{design, baseline, task, budget, mean, std, n_seeds, verdict}``, and per cell
each seed's design (``designs``: sites, ranks, the start's step; :func:`compact_design`);
``verdict`` by the two-standard-error rule on the difference of the means (win: above ``2·se``, loss:
below ``−2·se``, tie otherwise, ``se = (s_d²/n_d + s_b²/n_b)^{1/2}``; none below two seeds each).

    nohup .venv/bin/python experiments/design_table.py --tasks rte,mrpc > experiments/results/design_table.log 2>&1 &
    .venv/bin/python experiments/design_table.py --plan          # cells, budgets and trainable counts; runs nothing
    .venv/bin/python experiments/design_table.py --summary-only  # rewrite design_table.json from the rows
    .venv/bin/python experiments/design_table.py --markdown      # the README's table, from design_table.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec, canonical_config, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the experiments' shared modules, run or imported
from cost_model import (  # noqa: E402
    cell_seconds,
    describe_hours,
    sweep_hours,
)
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    at_chosen_rates,
    choose_lrs,
    completed_rows,
    diverged_at_chosen,
    diverged_everywhere,
    extended_spec,
    progress_echo,
    rate_at_edge,
    rate_bracket,
    regret_by_task,
    select_then_tabulate,
    sweep_settings,
)
from verdicts import (  # noqa: E402
    MIN_SEEDS,
    TOO_FEW_SEEDS,
    both_at_chance,
    chance_wins,
    checkpoint_rule,
    glue_majority,
    mean_std,
    near_one_class_seeds,
    one_class_seeds,
    resolution,
    two_se,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SELECT_OUT, TABLE_OUT, SUMMARY = (RESULTS / "design_select.jsonl", RESULTS / "design_table.jsonl",
                                  RESULTS / "design_table.json")
TASKS = ("sst2", "mrpc", "rte", "cola")
QV = ["q", "v"]
LORA_LIKE = (5.0e-4, 2.0e-3)
PREFIX_LIKE = (3.0e-3, 1.0e-2)
REFINE_ROUNDS = 2
"""Selection rounds for the midpoints around an interior best: one halves a factor-4 bracket (LoRA-like grids, and
their edge steps), the second serves a bracket wider than 2.5 after the first (none on these grids)."""
EDGE_RATES = 3
"""Steps a pair's grid may be continued past its edge (the other studies but scale: ``rate_selection.MAX_EDGE_RATES``,
2).  Prefix tuning's SST-2 validation accuracy still rose at the second step at both budgets (3e-3 to 0.111: 0.867,
0.873, 0.878, 0.882 at b74k), so with two steps its cells, and the designs' wins over it, would be the grid's."""
REFINE_TASKS = ("cola", "sst2", "mrpc")
"""The tasks whose brackets are narrowed to a factor of 2.  Not RTE: at MiniLM's scale no two methods separate on it
(``glue_table.json``: every difference within two standard errors, the dev set's 277 rows giving one score a
binomial standard error of 0.030), so a rate known to a factor of 2 instead of 4 cannot turn a tie into a verdict,
and its midpoints would cost ~12 core-hours (2 selection cells per pair at its long rows, and the table cells of
the pairs whose rate moves)."""

BUDGETS: dict[str, dict[str, tuple[str, dict[str, Any], tuple[float, ...]]]] = {
    "b74k": {
        "lora": ("lora", {"rank": 8, "alpha": 16, "targets": QV}, LORA_LIKE),
        "adapter": ("adapter", {"bottleneck": 8}, LORA_LIKE),
        "prefix": ("prefix", {"length": 16}, PREFIX_LIKE),
        "pissa": ("peft_lora", {"rank": 8, "alpha": 16, "targets": QV, "init": "pissa"}, LORA_LIKE),
        "olora": ("peft_lora", {"rank": 8, "alpha": 16, "targets": QV, "init": "olora"}, LORA_LIKE),
        "lora_ga": ("peft_lora", {"rank": 8, "alpha": 16, "targets": QV, "init": "lora_ga"}, LORA_LIKE),
        "eva": ("peft_lora", {"rank": 8, "alpha": 16, "targets": QV, "init": "eva", "n_design": 64}, LORA_LIKE),
        "costate_lora": ("costate_lora", {"rank": 8, "alpha": 16, "targets": QV, "n_design": 32}, LORA_LIKE),
        "gramian_lora": ("gramian_lora", {"rank": 8, "n_design": 16, "n_probes": 4}, LORA_LIKE),
        "recommended_lora": ("recommended_lora", {"n_design": 64}, LORA_LIKE),
        "riccati_feedback": ("riccati_feedback", {"rank": 16, "state_dim": 16, "n_design": 16}, LORA_LIKE),
        "closed_loop_prefix": ("closed_loop_prefix", {"n_prefix": 8, "rank": 1}, PREFIX_LIKE),
        "parallel_control": ("parallel_control", {"rank": 16}, LORA_LIKE),
    },
    "b18k": {
        "lora": ("lora", {"rank": 2, "alpha": 4, "targets": QV}, LORA_LIKE),
        "adapter": ("adapter", {"bottleneck": 2}, LORA_LIKE),
        "prefix": ("prefix", {"length": 4}, PREFIX_LIKE),
        "pissa": ("peft_lora", {"rank": 2, "alpha": 4, "targets": QV, "init": "pissa"}, LORA_LIKE),
        "olora": ("peft_lora", {"rank": 2, "alpha": 4, "targets": QV, "init": "olora"}, LORA_LIKE),
        "lora_ga": ("peft_lora", {"rank": 2, "alpha": 4, "targets": QV, "init": "lora_ga"}, LORA_LIKE),
        "eva": ("peft_lora", {"rank": 2, "alpha": 4, "targets": QV, "init": "eva", "n_design": 64}, LORA_LIKE),
        "costate_lora": ("costate_lora", {"rank": 2, "alpha": 4, "targets": QV, "n_design": 32}, LORA_LIKE),
        "gramian_lora": ("gramian_lora", {"rank": 2, "n_design": 16, "n_probes": 4}, LORA_LIKE),
        "recommended_lora": ("recommended_lora", {"budget": 18432, "n_design": 64}, LORA_LIKE),
        "riccati_feedback": ("riccati_feedback", {"rank": 4, "state_dim": 4, "n_design": 16}, LORA_LIKE),
        "closed_loop_prefix": ("closed_loop_prefix", {"n_prefix": 2, "rank": 1}, PREFIX_LIKE),
        "parallel_control": ("parallel_control", {"rank": 4}, LORA_LIKE),
    },
}
"""budget -> label -> (registered method, options, grid of peak rates)."""
DESIGNS = ("costate_lora", "gramian_lora", "recommended_lora", "riccati_feedback", "closed_loop_prefix",
           "parallel_control")
BASELINES = ("lora", "adapter", "prefix", "pissa", "olora", "lora_ga", "eva")


def label_of(config: dict[str, Any]) -> tuple[str, str]:
    """``(budget, label)`` of a cell configuration (its method and options in :data:`BUDGETS`)."""
    key = canonical_config({"m": config["method"], "o": config.get("options") or {}})
    for budget, entries in BUDGETS.items():
        for label, (method, options, _) in entries.items():
            if canonical_config({"m": method, "o": options}) == key:
                return budget, label
    raise KeyError(f"cell {config['method']} {config.get('options')} is not in BUDGETS")


def pair_key(row: dict[str, Any]) -> tuple[str, str, str]:
    """The design table's pair: (task, budget, label) — one rate each."""
    return (str(row["config"]["task"]), *label_of(row["config"]))


def pair_where(pair: tuple[str, str, str]) -> dict[str, Any]:
    method, options, _ = BUDGETS[pair[1]][pair[2]]
    return {"task": pair[0], "method": method, "options": options}


def spec_data(tasks: tuple[str, ...], budgets: tuple[str, ...], seeds: list[int], name: str,
              out: str) -> dict[str, Any]:
    """A sweep spec with the GLUE selection's settings, one override per (budget, label) setting its options and
    rates (methods that appear twice in a budget, peft_lora, are told apart by their options)."""
    glue = yaml.safe_load((HERE / "glue_select.yaml").read_text())
    methods = sorted({m for b in budgets for m, _, _ in BUDGETS[b].values()})
    per_method: dict[str, dict[str, Any]] = {}
    for b in budgets:
        for method, options, grid in BUDGETS[b].values():
            entry = per_method.setdefault(method, {"options": [], "lr": []})
            entry["options"].append(copy.deepcopy(options))
            entry["lr"] = sorted(set(entry["lr"]) | set(grid))
    # A method whose settings share one lr grid needs no more; the grids here are per method.
    return {"name": name, "out": out, "grid": {"model": "minilm", "task": list(tasks), "method": methods,
                                                "seed": seeds},
            "per_method": per_method, "train": glue["train"], "overrides": glue["overrides"]}


def selection_spec(tasks: Sequence[str], budgets: Sequence[str], rows: list[dict[str, Any]] | None = None) -> SweepSpec:
    """Seed 0 on every pair's grid, plus the edge rates the rows call for and, once a pair's best rate is interior,
    the midpoints that narrow its bracket to a factor of 2 (:func:`rate_selection.refine_rates`; tasks of
    :data:`REFINE_TASKS`)."""
    data = spec_data(tasks, budgets, [0], "design_select", SELECT_OUT.name)
    return extended_spec(data, rows or [], pair_key, pair_where, RESULTS, max_edge_rates=EDGE_RATES,
                         refine=lambda pair: pair[0] in REFINE_TASKS)


def table_spec(tasks: Sequence[str], budgets: Sequence[str], chosen: dict) -> SweepSpec:
    """Seeds 0, 1, 2 at each pair's chosen rate (a pair that diverged at every rate is left out)."""
    pairs = [(t, b, label) for t in tasks for b in budgets for label in BUDGETS[b]]
    data = spec_data(tasks, budgets, [0, 1, 2], "design_table", TABLE_OUT.name)
    return parse_spec(at_chosen_rates(data, chosen, pairs, pair_where), "design_table", RESULTS)


def verdict(d: dict[str, Any], b: dict[str, Any]) -> tuple[str | None, float | None, float | None]:
    """``(verdict, difference, se)`` of design ``d`` against baseline ``b`` (:func:`verdicts.two_se`);
    :data:`verdicts.TOO_FEW_SEEDS` when either has fewer than 3 scored seeds (a seed diverged)."""
    sign, diff, se = two_se(b, d)
    if sign is not None and min(d["n_seeds"], b["n_seeds"]) < MIN_SEEDS:
        return TOO_FEW_SEEDS, diff, se
    return (None if sign is None else {1: "win", -1: "loss", 0: "tie"}[sign]), diff, se


def compact_design(report: Any, depth: int = 0) -> Any:
    """A design report (a row's ``designs``) without its bulky parts: numbers, strings, short lists and the
    sites' ranks stay; per-site score tables, trial lists and plans are dropped (they stay in the rows)."""
    if isinstance(report, dict):
        if depth and len(report) > 64:
            return None
        kept = {k: compact_design(v, depth + 1) for k, v in report.items()
                if k not in ("scores", "top_sigma2", "trials", "plan_norm")}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(report, list):
        return report if len(report) <= 8 and all(not isinstance(x, (dict, list)) for x in report) else None
    return report


def _designs(rows: list[dict[str, Any]], method: str) -> list[Any] | None:
    """Each seed's compacted design report of ``method`` (None for a method that designs nothing)."""
    by_seed = sorted(rows, key=lambda r: r["config"]["seed"])
    reports = [compact_design((r.get("designs") or {}).get(method)) for r in by_seed]
    return reports if any(reports) else None


def costate_search(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Where the co-state initialisation's line searches stopped, per ``"task/budget"``, over the distinct searches
    of its rows (the design batch is seeded by ``design_seed``, but the co-state runs through the run's own
    random head, so each seed searches anew, and its rows at other rates repeat that search up to float noise in the
    step: one search per seed): each step ``η`` against the grid searched (``η_0·2^{-j}``, j = 0..8,
    :class:`~controltune.controllers.designed.costate_lora.CostateLoRA`), the held-out J at the pretrained start
    (``J0_search``) and at the step (``J_search``): ``{searches, at_smallest, lowered, mean_change}`` — how many
    stopped at the grid's smallest step, how many lowered the held-out J, and the mean of ``J_search − J0_search``."""
    found: dict[str, dict[int, tuple[float, float, float, float]]] = {}
    for r in rows:
        report = (r.get("designs") or {}).get("costate_lora")
        if r.get("status") != "done" or not report or "grid" not in report:
            continue
        task, budget, _ = pair_key(r)
        smallest = min(eta for _, eta in report["grid"])
        found.setdefault(f"{task}/{budget}", {}).setdefault(
            int(r["config"]["seed"]), (report["step"], smallest, report["J0_search"], report["J_search"]))
    return {key: {"searches": len(mine), "at_smallest": sum(step == low for step, low, _, _ in mine.values()),
                  "lowered": sum(j < j0 for _, _, j0, j in mine.values()),
                  "mean_change": statistics.fmean(j - j0 for _, _, j0, j in mine.values())}
            for key, mine in sorted(found.items())}


def mean_curve(rows: list[dict[str, Any]], metric: str | None) -> list[dict[str, float]] | None:
    """The seeds' mean validation curve ``[{step, mean, n}]``: ``metric`` at each evaluation step that every seed
    of ``rows`` with a curve reached (a seed stopped early by divergence shortens it); None without curves."""
    curves = [{p["step"]: p[metric] for p in (r.get("curves") or {}).get("val", []) if p.get(metric) is not None}
              for r in rows] if metric else []
    curves = [c for c in curves if c]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [{"step": s, "mean": statistics.fmean(c[s] for c in curves), "n": len(curves)} for s in steps]


def other_rates(rows: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    """A pair's table cells at rates other than its chosen ``lr`` (``rows``: the pair's finished table rows):
    ``[{lr, mean, std, n_seeds}]`` for each rate with two seeds or more, i.e. the cells of a rate the selection
    chose before its midpoints moved it (kept, so the move's effect on dev is on record)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if float(r["config"]["lr"]) != lr:
            by_lr.setdefault(float(r["config"]["lr"]), []).append(r["score_at_best_val"])
    return [{"lr": x, "mean": mean_std(v)[0], "std": mean_std(v)[1], "n_seeds": len(v)}
            for x, v in sorted(by_lr.items()) if len(v) >= MIN_SEEDS - 1]


def earlier_cell(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The complete cell (≥ 3 seeds) of ``cell``'s pair at the one rate chosen before its last move, if any."""
    earlier = [o for o in cell["other_rates"] if o["n_seeds"] >= MIN_SEEDS]
    return earlier[0] if len(earlier) == 1 else None


def refinement(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, what moving a pair's rate did on dev: over the pairs with a complete cell at an earlier rate
    (:func:`other_rates`, ≥ 3 seeds), ``change = mean(chosen) − mean(earlier)``; ``{pairs, lower, higher,
    mean_change, changes: [{budget, method, earlier_lr, lr, change}], wins_over_lora_at_earlier_rates, verdicts,
    verdicts_changed}`` (``lower``: change < 0, ``higher``: > 0; the verdicts: :func:`earlier_verdicts`)."""
    out: dict[str, dict[str, Any]] = {}
    for c in cells:
        earlier = earlier_cell(c)
        if c["mean"] is None or c["n_seeds"] < MIN_SEEDS or earlier is None:
            continue
        entry = out.setdefault(c["task"], {"pairs": 0, "lower": 0, "higher": 0, "mean_change": None, "changes": []})
        change = c["mean"] - earlier["mean"]
        entry["pairs"] += 1
        if change:
            entry["lower" if change < 0 else "higher"] += 1
        entry["changes"].append({"budget": c["budget"], "method": c["method"], "earlier_lr": earlier["lr"],
                                 "lr": c["lr"], "change": change})
    for task, entry in out.items():
        entry["mean_change"] = statistics.fmean(x["change"] for x in entry["changes"])
        verdicts = earlier_verdicts(cells, task)
        entry["wins_over_lora_at_earlier_rates"] = [f"{v['budget']}:{v['design']}" for v in verdicts
                                                    if v["baseline"] == "lora" and v["earlier"] == "win"]
        entry["verdicts"] = len(verdicts)
        entry["verdicts_changed"] = [v for v in verdicts if v["earlier"] != v["chosen"]]
    return out


def earlier_verdicts(cells: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Every (design, baseline) verdict on ``task`` (:func:`verdict`) had each pair with a complete cell at an
    earlier rate kept that rate, beside the verdict at the chosen rates: ``[{budget, design, baseline, earlier,
    chosen}]`` — how much the verdicts hang on the rates' last move."""
    now = {(c["budget"], c["method"]): c for c in cells if c["task"] == task and c["mean"] is not None}
    before = {k: {**c, **(earlier_cell(c) or {})} for k, c in now.items()}
    return [{"budget": b, "design": m, "baseline": base, "earlier": verdict(before[(b, m)], before[(b, base)])[0],
             "chosen": verdict(c, now[(b, base)])[0]}
            for (b, m), c in sorted(now.items()) if m in DESIGNS for base in BASELINES if (b, base) in now]


def _at_end(cell: dict[str, Any]) -> dict[str, Any]:
    """``cell`` scored by each seed's dev score at its last step instead of at its best validation score."""
    return {"mean": cell["end_mean"], "std": cell["end_std"], "n_seeds": cell["end_n_seeds"]}


def summary(tasks: Sequence[str], budgets: Sequence[str]) -> dict[str, Any]:
    select_rows, table_rows = completed_rows(SELECT_OUT), completed_rows(TABLE_OUT)  # old rows completed
    chosen = choose_lrs(select_rows, pair_key)
    diverged = diverged_at_chosen(select_rows, table_rows, pair_key)
    everywhere = diverged_everywhere(chosen)
    cells: dict[tuple, dict[str, Any]] = {}
    for pair, info in chosen.items():
        mine = [r for r in table_rows if r.get("status") == "done" and pair_key(r) == pair]
        done = [r for r in mine if float(r["config"]["lr"]) == info["lr"]]
        mean, std = mean_std([r["score_at_best_val"] for r in done])
        ends = [r["score"] for r in done if r.get("score") is not None]  # each seed's dev score at its last step
        end_mean, end_std = mean_std(ends)
        cells[pair] = {"task": pair[0], "budget": pair[1], "method": pair[2], "lr": info["lr"], "mean": mean,
                       "std": std, "end_mean": end_mean, "end_std": end_std, "end_n_seeds": len(ends),
                       "n_seeds": len(done), "trainable": done[0]["n_trainable"] if done else None,
                       "one_class_seeds": one_class_seeds(done), "near_one_class_seeds": near_one_class_seeds(done),
                       "diverged_seeds": diverged.get(pair, []), "diverged_every_rate": pair in everywhere,
                       "rate_at_edge": rate_at_edge(info), "rate_bracket": rate_bracket(info),
                       "metric": done[0]["metric"] if done else None,
                       "other_rates": other_rates(mine, info["lr"]),
                       "val_curve": mean_curve(done, done[0]["metric"] if done else None),
                       "designs": _designs(done, pair_where(pair)["method"])}
    levels = glue_majority(RESULTS)  # the GLUE harness's full dev sets
    rows = []
    for (task, budget, label), d in sorted(cells.items()):
        if label not in DESIGNS:
            continue
        for base in BASELINES:
            b = cells.get((task, budget, base))
            if b is None:
                continue
            v, diff, se = verdict(d, b)
            v_end, diff_end, se_end = verdict(_at_end(d), _at_end(b))
            if d["diverged_every_rate"] or b["diverged_every_rate"]:  # no score to compare: named, never a tie
                v = f"{'design' if d['diverged_every_rate'] else 'baseline'} diverged at every rate"
            rows.append({"design": label, "baseline": base, "task": task, "budget": budget, "metric": d["metric"],
                         "mean": d["mean"], "std": d["std"], "n_seeds": d["n_seeds"], "baseline_mean": b["mean"],
                         "baseline_std": b["std"], "baseline_n_seeds": b["n_seeds"], "difference": diff, "se": se,
                         "verdict": v, "trainable": d["trainable"], "baseline_trainable": b["trainable"],
                         # a tie where neither beats the majority class says nothing of the design
                         "at_chance": both_at_chance(d, b, levels.get(task)),
                         "verdict_at_end": v_end, "difference_at_end": diff_end, "se_at_end": se_end})
    for c in cells.values():
        c["final"] = cell_complete(c)
    payload = {**stamp({"tasks": list(tasks), "budgets": list(budgets), "budgets_options": BUDGETS,
                        "harness": "experiments/glue_select.yaml settings", "seeds": [0, 1, 2],
                        "command": "python experiments/design_table.py"}),
               "cells": list(cells.values()), "rows": rows, "refinement": refinement(list(cells.values())),
               "majority": {t: levels[t] for t in tasks if t in levels},
               "selection_regret": regret_by_task(select_rows, pair_key),
               "resolution": resolution(rows, list(tasks), "lora"),
               # the verdicts against LoRA that change when each seed reports its last step
               "checkpoint_rule": checkpoint_rule([r for r in rows if not r["at_chance"]], "lora"),
               # the wins against LoRA the rule would call were every design equal to LoRA
               "chance": chance_wins([r for r in rows if not r["at_chance"]], "lora"),
               "costate_search": costate_search(select_rows + table_rows),
               "wins": sum(r["verdict"] == "win" and r["baseline"] == "lora" for r in rows)}
    # stated in the summary so that the figures' captions read the rule rather than restate it
    payload["complete_tasks"] = [t for t in tasks if task_complete(payload, t)]
    write_json_unless_same(SUMMARY, payload)
    return payload


def cell_complete(cell: dict[str, Any]) -> bool:
    """Whether a cell is final: 3 scored seeds at its chosen rate, or every seed left diverged (named in the
    summary), or no rate that did not diverge (a variant's cells, at the table's rates, have no such flag)."""
    return cell["n_seeds"] + len(cell["diverged_seeds"]) >= MIN_SEEDS or bool(cell.get("diverged_every_rate"))


def task_complete(payload: dict[str, Any], task: str) -> bool:
    """Whether every (budget, method) pair of ``task`` has its final cell (:func:`cell_complete`)."""
    mine = [c for c in payload["cells"] if c["task"] == task]
    pairs = sum(len(BUDGETS[b]) for b in payload["config"]["budgets"])
    return len(mine) == pairs and all(cell_complete(c) for c in mine)


def plan(tasks: Sequence[str], budgets: Sequence[str]) -> list[dict[str, Any]]:
    """Trainable parameters of every (budget, label) on MiniLM (designed ones on 8 SST-2 rows), and the cell count."""
    from controltune import ResidualSystem, load_model
    from controltune.controllers.spec import build_spec

    loaded = load_model("minilm")
    out = []
    for budget in budgets:
        for label, (method, options, grid) in BUDGETS[budget].items():
            system = ResidualSystem(copy.deepcopy(loaded))
            opts = {**options, **({"n_design": 8} if "n_design" in options else {})}
            build_spec(system, method, opts, 0, "sst2")
            trainable = sum(c.param.numel() for c in system.controls() if c.kind != "term")  # the head aside
            out.append({"budget": budget, "label": label, "method": method, "grid": list(grid),
                        "trainable": trainable})
    cells = expand(selection_spec(tasks, budgets, read_jsonl(SELECT_OUT)))  # with its edge rates so far
    n_select = len(cells)
    n_pairs = len(tasks) * sum(len(BUDGETS[b]) for b in budgets)
    print(f"{n_pairs} (task, budget, method) pairs: {n_select} selection cells (edge rates so far included), "
          f"{2 * n_pairs} table cells of seeds 1 and 2 (seed 0 is the selection cell)")
    for row in out:
        print(f"{row['budget']:<5} {row['label']:<20} {row['method']:<20} {row['trainable']:>8,}  lr {row['grid']}")
    print(describe_hours("cells", sweep_hours(cells, read_jsonl(SELECT_OUT) + read_jsonl(TABLE_OUT), seeds_after=2)))
    glue = [r for r in read_jsonl(RESULTS / "glue_table.jsonl") if r.get("status") == "done"
            and r["config"]["method"] == "lora" and not r.get("copied_from")]
    per_task = {t: statistics.fmean(cell_seconds(r) or 0.0 for r in glue if r["config"]["task"] == t) for t in tasks
                if any(r["config"]["task"] == t for r in glue)}
    if len(per_task) == len(tasks):
        n = {t: sum(c["task"] == t for c in cells) for t in tasks}
        hours = sum((n[t] + 2 * n_pairs // len(tasks)) * per_task[t] for t in tasks) / 3600
        print(f"reference: ~{hours:.0f} core-h if every cell takes the GLUE table's mean LoRA time on its task")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated GLUE tasks")
    p.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated budgets (b74k, b18k)")
    add_sweep_arguments(p, "runs/design_table")
    p.add_argument("--plan", action="store_true", help="print the cells and trainable counts; run nothing")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the README's table from design_table.json")
    p.add_argument("--verdicts", action="store_true",
                   help="print the README's list of where each design wins, ties and loses against LoRA")
    args = p.parse_args(argv)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    budgets = tuple(b for b in args.budgets.split(",") if b)
    unknown = [t for t in tasks if t not in TASKS] + [b for b in budgets if b not in BUDGETS]
    if unknown:
        raise SystemExit(f"unknown task(s)/budget(s) {unknown}; accepted: {', '.join(TASKS)}; {', '.join(BUDGETS)}")
    if args.plan:
        return {"plan": plan(tasks, budgets)}
    if args.summary_only:
        return summary(TASKS, tuple(BUDGETS))
    if args.markdown or args.verdicts:
        from design_report import markdown_table, verdict_lines

        payload = json.loads(SUMMARY.read_text())
        print(markdown_table(payload) if args.markdown else "\n".join(verdict_lines(payload)))
        return {}
    def chosen(rows: list[dict[str, Any]]) -> dict:
        return {pair: info for pair, info in choose_lrs(rows, pair_key).items()
                if pair[0] in tasks and pair[1] in budgets}

    select_then_tabulate(lambda rows: selection_spec(tasks, budgets, rows), SELECT_OUT,
                         lambda rows: table_spec(tasks, budgets, chosen(rows)), TABLE_OUT, RESULTS,
                         progress_echo(lambda: summary(TASKS, tuple(BUDGETS))), sweep_settings(args),
                         max_edge_rates=EDGE_RATES, refine_rounds=REFINE_ROUNDS)
    return summary(TASKS, tuple(BUDGETS))

if __name__ == "__main__":
    main()
