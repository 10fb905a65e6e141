"""Arbitrary-position tuning across scale (issue 16; Su et al., EMNLP 2023, "Exploring the Impact of Model Scaling
on Parameter-Efficient Tuning"): does the position of the tuned parameters matter less in a larger model, and do
control-theoretic scores of a draw predict how well it trains?

The ``arbitrary`` controller tunes exactly B scalars at seeded random positions of the blocks' parameters
(``options.seed`` is the position draw; the cell seed is the training seed: head initialisation and batch order).
Grid: MiniLM (22M) and SmolLM2 (135M) × SST-2 and CoLA × B in ``BUDGETS`` × draws 0, 1, 2 × seeds 0, 1, 2, plus
full fine-tuning as the reference above and the linear probe (``linear_probe``: B = 0, only the classification
head trains, as it does beside every budget) as the reference below, seeds 0, 1, 2 each, their rates chosen like a
budget's (full fine-tuning from ``FULL_RATES``: at one unselected rate, 5e-5, MiniLM's 100 steps on CoLA had
stayed at MCC 0, which made the reference the majority class).  One
harness for both models (``TRAIN``: 2,000 training rows, 200 of them held out as validation rows, 100 steps of
batch 16, max length 48, 500 dev rows; AdamW, warm-up and linear decay) — cut to fit SmolLM2 into the budget.
The rate of the Δ is chosen per (model, task, budget) on validation rows, at draw 0 and seed 0, from ``RATES``
(continued at its edge), and used for every draw and seed of that budget: one rate for every budget (chosen at
B = 10,000) left the 100,000-scalar cells of MiniLM on SST-2 at the majority class (training loss ln 2 at the
end), a rate too large for that many tuned scalars, not a property of their positions.

Then, per (model, task, budget, draw), :func:`controltune.design.gramian.control_set_scores` on 64 training
rows at Δ = 0: the co-state energy ``Σ‖∂J/∂u‖²`` and the GN-weighted controllability Gramian ``tr(CᵀHC)/S`` of
the drawn positions (``results/apet_scores.jsonl``).  Within each (model, task, budget) the draws are ranked by
score and by dev score (mean over seeds); the pooled within-group Spearman correlation, with a bootstrap interval
over groups, says whether the scores predict the better draws.

``results/apet.json``: per (model, task, budget) the mean dev score, the spread across draws (std of the draws'
seed means) and across seeds, the majority-class level, whether the budget beats it (mean − 2·se above it), the
full fine-tuning and linear-probe scores and the smallest budget that beats each lower level; the predictor
correlations.  Figures ``apet_positions`` and ``apet_scale``.

    .venv/bin/python experiments/apet.py --plan
    nohup .venv/bin/python experiments/apet.py > experiments/results/apet.log 2>&1 &
    .venv/bin/python experiments/apet.py --summary-only
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import append_jsonl, read_jsonl, stamp, write_json_unless_same
from controltune.sweep import FINISHED
from controltune.sweep_spec import SweepSpec, canonical_config, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_model import (  # noqa: E402
    describe_hours,
    observed_core_hours,
    with_estimate,
)
from rate_selection import (  # noqa: E402
    POOLING,
    add_sweep_arguments,
    choose_lrs,
    extended_spec,
    progress_echo,
    rate_at_edge,
    require_rates,
    select_then_tabulate,
    sweep_settings,
)
from verdicts import (  # noqa: E402
    beats_level,
    majority_level,
    mean_std,
    two_se,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SELECT_OUT, TABLE_OUT = RESULTS / "apet_select.jsonl", RESULTS / "apet_table.jsonl"
SCORES_OUT, SUMMARY = RESULTS / "apet_scores.jsonl", RESULTS / "apet.json"
MODELS = ("minilm", "smollm2")
TASKS = ("sst2", "cola")
BUDGETS = (100, 1000, 10000, 100000)
DRAWS = (0, 1, 2)
SEEDS = (0, 1, 2)
RATES = [1.0e-3, 1.0e-2]
FULL_RATES = [2.0e-5, 1.0e-4]
PROBE, FULL = 0, -1
"""The "budget" of a rate pair for the two references: the linear probe (no Δ) and full fine-tuning (every one)."""
TRAIN = {"dtype": "float32", "batch_size": 16, "eval_batch_size": 64, "max_length": 48, "warmup": 0.06,
         "schedule": "linear", "weight_decay": 0.0, "grad_clip": 1.0, "data_seed": 0, "val_seed": 0,
         "train_size": 2000, "val_size": 200, "dev_size": 500, "steps": 100, "eval_every": 25}
SCORE_ROWS = 64
BOOTSTRAP = 2000
UNCHOSEN = 1e-30
"""A rate no cell has: the planned cells of a pair whose rate is not chosen yet match no finished row."""


# --- the sweeps ------------------------------------------------------------------------------------
Pair = tuple[str, str, int]


def pair_key(row: dict[str, Any]) -> Pair:
    """One rate per (model, task, budget); the references' budgets are ``PROBE`` and ``FULL``."""
    c = row["config"]
    if c["method"] == "full":
        return str(c["model"]), str(c["task"]), FULL
    return str(c["model"]), str(c["task"]), int((c.get("options") or {}).get("budget", PROBE))


def pooling_overrides(models: Sequence[str]) -> list[dict[str, Any]]:
    """Each model's readout (``rate_selection.POOLING``); the mean is every cell's default."""
    return [{"where": {"model": m}, "set": {"pooling": POOLING[m]}} for m in models if POOLING[m] != "mean"]


def pair_where(pair: Pair, draw: int = 0) -> dict[str, Any]:
    """The cells of one (model, task, budget) and one position draw (selection runs draw 0 only), or of a
    reference (``PROBE``: the linear probe, ``FULL``: full fine-tuning)."""
    if pair[2] in (PROBE, FULL):
        return {"model": pair[0], "task": pair[1], "method": "linear_probe" if pair[2] == PROBE else "full"}
    return {"model": pair[0], "task": pair[1], "method": "arbitrary", "options": {"budget": pair[2], "seed": draw}}


def selection_spec(models: Sequence[str], tasks: Sequence[str], rows: list[dict[str, Any]] | None) -> SweepSpec:
    data = {"name": "apet_select", "out": SELECT_OUT.name,
            "grid": {"model": list(models), "task": list(tasks), "method": ["arbitrary", "linear_probe", "full"],
                     "seed": [0], "lr": RATES},
            "per_method": {"arbitrary": {"options": [{"budget": b, "seed": 0} for b in BUDGETS]},
                           "full": {"lr": FULL_RATES}},
            "train": TRAIN, "overrides": pooling_overrides(models)}
    return extended_spec(data, rows or [], key=pair_key, where=pair_where, folder=RESULTS)


def table_spec(models: Sequence[str], tasks: Sequence[str], chosen: dict) -> SweepSpec:
    pairs = [(m, t, b) for m in models for t in tasks for b in (PROBE, FULL, *BUDGETS)]
    require_rates(chosen, pairs)
    overrides = [{"where": pair_where(p, d), "set": {"lr": chosen[p]["lr"]}} for p in pairs
                 for d in (DRAWS if p[2] > 0 else (0,))]
    overrides += pooling_overrides(models)
    data = {"name": "apet_table", "out": TABLE_OUT.name,
            "grid": {"model": list(models), "task": list(tasks), "method": ["arbitrary", "full", "linear_probe"],
                     "seed": list(SEEDS), "lr": 0.0},
            "per_method": {"arbitrary": {"options": [{"budget": b, "seed": d} for b in BUDGETS for d in DRAWS]}},
            "train": TRAIN, "overrides": overrides}
    return parse_spec(data, "apet_table", RESULTS)


# --- scores of the draws -----------------------------------------------------------------------------
def _current(row: dict[str, Any]) -> bool:
    """A draw score computed with its model's readout (rows before ``pooling`` was recorded used the mean)."""
    return row.get("pooling", "mean") == POOLING.get(row["model"], "mean")


def run_scores(models: Sequence[str], tasks: Sequence[str], echo: Callable[[str], None]) -> None:
    """``control_set_scores`` of every draw not scored yet (in this process, one thread: a sweep may share the
    machine)."""
    import torch

    torch.set_num_threads(1)
    from controltune.controllers import build
    from controltune.data import resolve_task
    from controltune.design.gramian import control_set_scores
    from controltune.design.linearize import design_batch
    from controltune.system import ResidualSystem
    from controltune.zoo import load_model

    have = {(r["model"], r["task"], r["budget"], r["draw"]) for r in read_jsonl(SCORES_OUT) if _current(r)}
    for model in models:
        todo = [(t, b, d) for t in tasks for b in BUDGETS for d in DRAWS if (model, t, b, d) not in have]
        if not todo:
            continue
        loaded = load_model(model)
        batches: dict[str, dict] = {}  # the same 64 rows score every draw of a task
        for task, budget, draw in todo:
            spec = resolve_task(task)
            # a fresh copy per draw: attaching a controller wraps the model's modules in place
            system = ResidualSystem(copy.deepcopy(loaded), num_labels=spec.num_labels, pooling=POOLING[model], seed=0)
            if task not in batches:
                batches[task] = design_batch(system, task, n=SCORE_ROWS, seed=0, max_length=TRAIN["max_length"])
            batch = batches[task]
            build("arbitrary", system, budget=budget, seed=draw)
            scores = control_set_scores(system, batch, n_probes=8, seed=0)
            append_jsonl(SCORES_OUT, {**stamp({"model": model, "task": task, "budget": budget, "draw": draw,
                                               "rows": SCORE_ROWS, "pooling": POOLING[model]}),
                                      "model": model, "task": task, "budget": budget, "draw": draw,
                                      "pooling": POOLING[model], **scores})
            echo(f"scores {model} {task} B={budget} draw {draw}: energy {scores['costate_energy']:.3e}, "
                 f"gramian {scores['gramian']:.3e}")
            del system


# --- summary ---------------------------------------------------------------------------------------
def within_group_correlation(groups: list[list[tuple[float, float]]], seed: int = 0) -> dict[str, Any]:
    """Pooled within-group Spearman ρ of (score, dev) pairs: each group's values are replaced by their ranks
    centred in the group, then ρ of the pooled centred ranks; a 95 % percentile interval by resampling groups."""
    def pooled(sample: list[list[tuple[float, float]]]) -> float | None:
        xs, ys = [], []
        for g in sample:
            if len(g) < 2:
                continue
            rx = _centred_ranks([a for a, _ in g])
            ry = _centred_ranks([b for _, b in g])
            xs += rx
            ys += ry
        den = math.sqrt(sum(a * a for a in xs) * sum(b * b for b in ys))
        return None if den == 0 else sum(a * b for a, b in zip(xs, ys)) / den

    rho = pooled(groups)
    rng = random.Random(seed)
    boot = [r for r in (pooled([rng.choice(groups) for _ in groups]) for _ in range(BOOTSTRAP)) if r is not None]
    boot.sort()
    ci = [boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]] if boot else None
    return {"rho": rho, "ci95": ci, "n_groups": len(groups), "n_points": sum(len(g) for g in groups)}


def _centred_ranks(v: list[float]) -> list[float]:
    """Ranks of ``v`` (ties share their average rank) minus their mean."""
    order = sorted(range(len(v)), key=v.__getitem__)
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    mean = statistics.fmean(r)
    return [x - mean for x in r]


def majority_levels(tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per task ``{metric, level}``: the majority class on the study's dev rows."""
    out = {}
    for task in tasks:
        metric, level = majority_level(task, TRAIN["dev_size"], TRAIN["data_seed"])
        out[task] = {"metric": metric, "level": level}
    return out


def beats(mean: float | None, std: float | None, n: int, level: float) -> bool | None:
    """Whether a mean over ``n`` seeds lies above ``level`` by two standard errors: ``mean − 2·std/√n > level``
    (None below two seeds)."""
    return beats_level({"mean": mean, "std": std, "n_seeds": n}, level)


def _above(values: list[float], reference: tuple) -> bool | None:
    """Whether the runs' mean lies above a reference cell ``(mean, std, n_seeds, lr)`` by two standard errors of the
    difference, ``se = (s²/n + s_r²/n_r)^{1/2}`` (both sides vary by seed); None below two runs on either side."""
    mean, std = mean_std(values)
    if mean is None or reference[0] is None:
        return None
    sign = two_se({"mean": reference[0], "std": reference[1], "n_seeds": reference[2]},
                  {"mean": mean, "std": std, "n_seeds": len(values)})[0]
    return None if sign is None else sign == 1


def _not_below(cell: dict[str, Any], ref: dict[str, Any]) -> bool:
    """A budget's cell is not below the reference ``{mean, std, n_seeds}`` by two standard errors of the difference
    (False when either side has fewer than two runs: no verdict, no reach)."""
    if ref["mean"] is None or cell["mean"] is None:
        return False
    sign = two_se(ref, {"mean": cell["mean"], "std": cell["std"], "n_seeds": cell["n_runs"]})[0]
    return sign is not None and sign >= 0


def _predictor(cells: list[dict[str, Any]], scores: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Pooled within-cell Spearman correlation of a draw's score ``key`` with its mean dev score, over ``cells``
    (:func:`within_group_correlation`; a cell counts with two or more scored draws)."""
    groups = []
    for c in cells:
        pts = []
        for draw, dev in c["draw_means"].items():
            s = next((r[key] for r in scores if (r["model"], r["task"], r["budget"], r["draw"])
                      == (c["model"], c["task"], c["budget"], int(draw))), None)
            if s is not None:
                pts.append((s, dev))
        if len(pts) >= 2:
            groups.append(pts)
    return within_group_correlation(groups) if groups else None


def summary(models: Sequence[str], tasks: Sequence[str]) -> dict[str, Any]:
    select, table = read_jsonl(SELECT_OUT), read_jsonl(TABLE_OUT)
    chosen = choose_lrs(select, key=pair_key)
    majority = majority_levels(tasks)
    done = [r for r in table + select if r.get("status") == "done"]
    cells, full, probe = [], {}, {}
    for model in models:
        for task in tasks:
            full_lr = chosen.get((model, task, FULL), {}).get("lr")
            ft = {r["config"]["seed"]: r["score_at_best_val"] for r in done if r["config"]["method"] == "full"
                  and (r["config"]["model"], r["config"]["task"]) == (model, task)
                  and float(r["config"]["lr"]) == full_lr}
            full[(model, task)] = mean_std(list(ft.values())) + (len(ft), full_lr)
            probe_lr = chosen.get((model, task, PROBE), {}).get("lr")
            lp = {r["config"]["seed"]: r["score_at_best_val"] for r in done if r["config"]["method"] == "linear_probe"
                  and (r["config"]["model"], r["config"]["task"]) == (model, task)
                  and float(r["config"]["lr"]) == probe_lr}
            probe[(model, task)] = mean_std(list(lp.values())) + (len(lp), probe_lr)
            for budget in BUDGETS:
                lr = chosen.get((model, task, budget), {}).get("lr")
                per_draw = {}
                for draw in DRAWS:
                    vals = {r["config"]["seed"]: r["score_at_best_val"] for r in done
                            if r["config"]["method"] == "arbitrary" and float(r["config"]["lr"]) == lr
                            and (r["config"]["model"], r["config"]["task"]) == (model, task)
                            and r["config"]["options"] == {"budget": budget, "seed": draw}}
                    if vals:
                        per_draw[draw] = list(vals.values())
                allv = [v for vs in per_draw.values() for v in vs]
                mean, std = mean_std(allv)
                draw_means = [statistics.fmean(v) for v in per_draw.values()]
                seed_stds = [statistics.stdev(v) for v in per_draw.values() if len(v) > 1]
                level = majority[task]["level"]
                se = (std / math.sqrt(len(allv))) if std is not None else None
                cells.append({"model": model, "task": task, "budget": budget, "lr": lr, "mean": mean, "std": std,
                              "n_runs": len(allv), "draw_means": {str(d): statistics.fmean(v)
                                                                  for d, v in per_draw.items()},
                              "position_spread": statistics.stdev(draw_means) if len(draw_means) > 1 else None,
                              "seed_spread": statistics.fmean(seed_stds) if seed_stds else None,
                              "majority": level, "beats_majority": None if se is None else mean - 2 * se > level,
                              "probe": probe[(model, task)][0],
                              "beats_probe": _above(allv, probe[(model, task)]),
                              "full": full[(model, task)][0]})
    scores = [r for r in read_jsonl(SCORES_OUT) if _current(r)]
    predictors = {key: _predictor(cells, scores, key) for key in ("costate_energy", "gramian")}
    # where a budget adds nothing beyond the head, its draws train alike (same seed, same score): nothing to predict
    acting = [c for c in cells if c["beats_probe"]]
    predictors_acting = {key: _predictor(acting, scores, key) for key in ("costate_energy", "gramian")}
    heads = {}  # the classification head trains in every cell, beside the B scalars of Δ
    for row in done:
        c = row["config"]
        if c["method"] == "arbitrary" and row.get("n_trainable") is not None:
            heads.setdefault(c["model"], int(row["n_trainable"]) - int(c["options"]["budget"]))
    smallest = {}
    for model in models:
        for task in tasks:
            ok = [c["budget"] for c in cells if (c["model"], c["task"]) == (model, task) and c["beats_majority"]]
            smallest[f"{model}/{task}"] = min(ok) if ok else None
    beyond_probe = {}
    for model in models:
        for task in tasks:
            ok = [c["budget"] for c in cells if (c["model"], c["task"]) == (model, task) and c["beats_probe"]]
            beyond_probe[f"{model}/{task}"] = min(ok) if ok else None
    reach_full = {}  # not below full fine-tuning by two standard errors of the difference (both sides vary)
    for model in models:
        for task in tasks:
            ref = dict(zip(("mean", "std", "n_seeds"), full[(model, task)][:3]))
            ok = [c["budget"] for c in cells if (c["model"], c["task"]) == (model, task)
                  and _not_below(c, ref)]
            reach_full[f"{model}/{task}"] = min(ok) if ok else None
    payload = {**stamp({"models": list(models), "tasks": list(tasks), "budgets": list(BUDGETS), "draws": list(DRAWS),
                        "seeds": list(SEEDS), "rates": RATES, "full_rates": FULL_RATES,
                        "select": "per (model, task, budget), draw 0, seed 0",
                        "train": TRAIN, "command": "python experiments/apet.py"}),
               "cells": cells, "majority": majority,
               "full": [{"model": m, "task": t, "mean": v[0], "std": v[1], "n_seeds": v[2], "lr": v[3],
                         "beats_majority": beats(v[0], v[1], v[2], majority[t]["level"])}
                        for (m, t), v in full.items()],
               "linear_probe": [{"model": m, "task": t, "mean": v[0], "std": v[1], "n_seeds": v[2], "lr": v[3]}
                                for (m, t), v in probe.items()],
               "rates_at_edge": [{"model": m, "task": t, "budget": b, "lr": info["lr"], "rate_at_edge": True}
                                 for (m, t, b), info in sorted(chosen.items(), key=str) if rate_at_edge(info)],
               "smallest_budget_beating_majority": smallest, "smallest_budget_beating_probe": beyond_probe,
               "smallest_budget_reaching_full": reach_full,
               "head_scalars": heads, "predictors": predictors,
               "predictors_beyond_probe": predictors_acting}
    write_json_unless_same(SUMMARY, payload)
    return payload


def plan_cells(models: Sequence[str], tasks: Sequence[str], select: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells of the plan as it stands, given the ``select`` rows: the selection cells with the edge rates they
    led to, and the table cells (a pair whose rate is not chosen yet at a placeholder rate: it will run, once)."""
    chosen = choose_lrs(select, key=pair_key)
    rates = {(m, t, b): {"lr": chosen.get((m, t, b), {}).get("lr") or UNCHOSEN}
             for m in models for t in tasks for b in (PROBE, FULL, *BUDGETS)}
    cells = expand(selection_spec(models, tasks, select)) + expand(table_spec(models, tasks, rates))
    unique = {canonical_config(c): c for c in cells}  # a table cell at its selection cell's rate is that cell
    return list(unique.values())


def cells_done(models: Sequence[str], tasks: Sequence[str], select: list[dict[str, Any]], rows: list[dict[str, Any]],
               kind: Callable[[dict[str, Any]], Any]) -> dict[Any, int]:
    """Per kind, the finished ``rows`` that are cells of the plan as it stands, given the ``select`` rows: rows at a
    rate no longer chosen, or of a pair whose rate is not chosen yet, will not be read and do not count."""
    wanted = {canonical_config(c) for c in plan_cells(models, tasks, select)}
    seen: set[str] = set()
    done: dict[Any, int] = defaultdict(int)
    for row in rows:
        key = canonical_config(row["config"])
        if row.get("status") in FINISHED and key in wanted and key not in seen:
            seen.add(key)
            done[kind(row["config"])] += 1
    return done


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--tasks", default=",".join(TASKS))
    add_sweep_arguments(p, "runs/apet")
    p.add_argument("--plan", action="store_true", help="print the cells; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if any(m not in MODELS for m in models) or any(t not in TASKS for t in tasks):
        raise SystemExit(f"models must be among {MODELS}, tasks among {TASKS}")
    if args.plan:
        n_sel = len(models) * len(tasks) * ((len(BUDGETS) + 1) * len(RATES) + len(FULL_RATES))
        n_tab = len(models) * len(tasks) * (len(BUDGETS) * len(DRAWS) + 2) * len(SEEDS)
        print(f"{n_sel} selection cells (+ edge rates), {n_tab} table cells (one per (model, task, budget) a copy "
              "of its selection cell), "
              f"{len(models) * len(tasks) * len(BUDGETS) * len(DRAWS)} draw scores")
        # a cell's time depends on the model and on whether it is full fine-tuning (fixed steps and length);
        # counted on the plan as it stands, edge rates included (counting the grid alone while the edge rates'
        # rows counted as done had made 21 SmolLM2 cells look like 0.7 core-hours instead of ~2.4)
        kind = lambda c: (c["model"], c["method"])  # noqa: E731
        select = read_jsonl(SELECT_OUT)
        planned = dict(Counter(kind(c) for c in plan_cells(models, tasks, select)))
        rows = select + read_jsonl(TABLE_OUT)
        est = observed_core_hours(planned, rows, lambda r: kind(r["config"]),
                                  done=cells_done(models, tasks, select, rows, kind))
        # a rate does not change the time
        any_rate = {(m, t, b): {"lr": RATES[0]} for m in models for t in tasks for b in (PROBE, FULL, *BUDGETS)}
        cells = expand(selection_spec(models, tasks, [])) + expand(table_spec(models, tasks, any_rate))
        est = with_estimate(est, planned, cells, kind, rows)
        print(describe_hours("cells", est))
        return est
    if args.summary_only:
        return summary(models, tasks)

    echo = progress_echo(lambda: summary(models, tasks))
    run_scores(models, tasks, echo)
    select_then_tabulate(lambda rows: selection_spec(models, tasks, rows), SELECT_OUT,
                         lambda rows: table_spec(models, tasks, choose_lrs(rows, key=pair_key)),
                         TABLE_OUT, RESULTS, echo, sweep_settings(args))
    return summary(models, tasks)


if __name__ == "__main__":
    main()
