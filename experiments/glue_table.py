"""The GLUE table (issue 14): six methods on SST-2, MRPC, RTE and CoLA, rates chosen on validation rows, 3 seeds.

MiniLM (all-MiniLM-L6-v2, float32, mean pooling + linear head, dropout off), AdamW with 6 % warm-up
and linear decay, gradient norm clipped at 1, batch 32, max length 128 with dynamic padding
(length-grouped batches).  Budgets: SST-2 a seeded 20k-row subsample for 2 epochs, MRPC (3.7k),
RTE (2.5k) and CoLA (8.5k) their full training sets for 4, 5 and 3 epochs.  Of each training set
a seeded part is held out as validation rows (SST-2 1,000 rows, the others 10 %; the same rows for
every method, rate and seed); they are scored about twice per epoch and after the last step, the
deltas best on them are kept, and the reported score is the dev score of those deltas.  Dev is
never used to choose anything: not the checkpoint, not the learning rate.

Two sweeps (:mod:`controltune.sweep`, on an embedded local Ray, one CPU and one torch thread per cell):

1. ``glue_select.yaml`` -> ``results/glue_select.jsonl``: seed 0 on a small grid of peak rates per
   method (full fine-tuning 2e-5, 5e-5, 1e-4; LoRA r=8 on q,v and the adapter (bottleneck 64)
   5e-4, 2e-3; prefix (10 vectors) 3e-3, 1e-2; prompt (20 tokens) 1e-2, 5e-2; BitFit 1e-3, 5e-3).
   Where a pair's best validation score is at the edge of its grid, the grid continues
   geometrically one rate up (or down) at a time, at most two rates beyond it
   (:func:`rate_selection.next_edge_rate`: on CoLA five of six methods chose their grid's top rate).
   For each (task, method) the rate with the highest validation score of the task's metric is
   chosen (a diverged cell is never chosen; ties go to the smaller rate).
2. ``glue_table.yaml`` -> ``results/glue_table.jsonl``: seeds 0, 1, 2 at the chosen rates.  Its
   settings equal the selection's, so the seed-0 cell *is* the selection cell at the chosen rate:
   that row is copied (``copied_from``), not run again.  A pair that diverged at every rate tried is
   left out of the table; the table waits until every selection cell has finished.

Both run through :func:`rate_selection.select_then_tabulate`, the driver every table study shares.

``results/glue_table.json`` (rewritten after every finished cell, so a partial table is always
there) has rows ``{task, method, metric, mean, std, n_seeds, trainable, lr}`` (plus the per-seed
scores, the validation score, the last-step dev score, every metric of the task, ``gap_to_full``:
mean minus full fine-tuning's mean on the same task, and ``stage``: ``table`` once a pair's table
cells exist, ``selection`` while only its selection cells do: then the row is the best rate so far,
one seed), one ``majority`` row per task (every metric of the constant prediction of the dev set's
majority class), the full-fine-tuning goals and whether they are met, and the time estimate.

Time budget (the whole table, selection + 3 seeds, about 6 hours of the 2-core machine): 52
selection cells and 72 table cells, of which the 24 seed-0 cells are copies, so 100 cells run.
Estimated from epoch times measured at one torch thread on this machine while other jobs shared it
(:data:`MEASURED_EPOCH_S`: 40 timed steps of every (task, method), scaled to an epoch), times the
share of rows trained on, the epochs, and 1.1 for the validation and dev evaluations
(:func:`planned_estimate`): 12.2 core-hours, i.e. 6.1 hours with two one-thread cells side by side
(per task: MRPC 3.5, RTE 3.3, CoLA 2.7, SST-2 2.6 core-hours; full fine-tuning is ~36 % of it, its
AdamW step over all 22.7M weights costing ~0.4 s at one thread).  ``glue_table.json`` carries this
plan and the estimate re-made from the wall times of the cells finished so far (``estimate.observed``).

Resumable: rerun the same command after any stop; finished cells are skipped, and a cell stopped
midway resumes from its checkpoint in ``--runs`` (checkpoints of finished cells are deleted, their
deltas kept).

    nohup .venv/bin/python experiments/glue_table.py --cpus-per-cell 1 \\
        > experiments/results/glue_table.log 2>&1 &
    .venv/bin/python experiments/glue_table.py --summary-only   # rewrite glue_table.json from the rows
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from controltune.data import load_split, resolve_task
from controltune.metrics import AUXILIARY_KEYS, majority_baseline
from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep import FINISHED, train_loss_end
from controltune.sweep_spec import SweepSpec, canonical_config, expand, load_spec, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the experiments' shared modules, run or imported
from generalization_gap import summary as gap_summary  # noqa: E402
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    at_chosen_rates,
    choose_lrs,
    extended_spec,
    progress_echo,
    rate_at_edge,
    regret_by_task,
    select_then_tabulate,
    sweep_settings,
    task_method,
    with_rebuilt,
)
from verdicts import (  # noqa: E402
    mean_std,
    near_one_class_seeds,
    one_class_seeds,
)

HERE = Path(__file__).resolve().parent
SELECT_SPEC = HERE / "glue_select.yaml"
TABLE_SPEC = HERE / "glue_table.yaml"
SUMMARY = HERE / "results" / "glue_table.json"
TASKS = ("sst2", "mrpc", "rte", "cola")
METHODS = ("full", "lora", "adapter", "prefix", "prompt", "bitfit")
GOALS = {"sst2": ("accuracy", 0.88), "mrpc": ("f1", 0.85), "rte": ("accuracy", 0.58), "cola": ("mcc", 0.25)}
"""Full fine-tuning on dev (issue 14): metric and the level to reach."""

MEASURED_EPOCH_S = {
    "sst2": {"full": 380.8, "lora": 114.2, "adapter": 87.3, "prefix": 117.0, "prompt": 261.4, "bitfit": 77.9},
    "mrpc": {"full": 152.4, "lora": 101.8, "adapter": 105.9, "prefix": 94.3, "prompt": 137.3, "bitfit": 171.6},
    "rte": {"full": 179.2, "lora": 55.8, "adapter": 79.5, "prefix": 54.8, "prompt": 78.9, "bitfit": 104.6},
    "cola": {"full": 288.7, "lora": 100.1, "adapter": 58.8, "prefix": 93.0, "prompt": 163.6, "bitfit": 50.5},
}
"""Seconds per epoch over the whole training set (SST-2: the 20k subsample) at one torch thread: 40 timed
optimiser steps of each (task, method) (batch 32, max length 128, length-grouped batches) scaled to an
epoch, measured on this 2-core machine while other jobs shared it (load average 2.2-3.9), so each number
carries up to ~2x of contention (CoLA LoRA 100 s against CoLA BitFit 50 s for the same forward and
backward passes); the sweep runs under the same sharing."""
N_TRAIN = {"sst2": 20000, "mrpc": 3668, "rte": 2490, "cola": 8551}
EVAL_OVERHEAD = 0.10
"""Validation and dev scoring, as a fraction of training time (forward passes over ~10 % of the rows, ~2 per
epoch, and dev twice)."""


# --- the selection (experiments/rate_selection.py) -------------------------------------------
_rate_key = task_method


def selection_spec(path: Path, select_rows: list[dict[str, Any]]) -> SweepSpec:
    """``glue_select.yaml`` plus the edge rates of :func:`rate_selection.extended_spec`, per (task, method)."""
    return extended_spec(path, select_rows)


def table_spec(path: Path, chosen: dict[tuple[str, str], dict[str, Any]] | None = None) -> SweepSpec:
    """``glue_table.yaml``; with ``chosen``, each (task, method) at its chosen rate
    (:func:`rate_selection.at_chosen_rates`: one override ``{where: {task, method}, set: {lr}}`` per pair, a pair
    that diverged at every rate tried excluded, a clear stop on a pair whose selection has not finished); without,
    its settings at a placeholder rate (for planning and for the rows' file).
    """
    import yaml

    data = yaml.safe_load(path.read_text())
    data["grid"].setdefault("lr", 0.0)
    spec = parse_spec(data, str(path), path.parent)
    if chosen is None:
        return spec
    pairs = list(dict.fromkeys(task_method({"config": c}) for c in expand(spec)))  # the grid's pairs, as it reads
    return parse_spec(at_chosen_rates(data, chosen, pairs), str(path), path.parent)


# --- the table ---------------------------------------------------------------------------------
def majority_rows(tasks: tuple[str, ...] = TASKS) -> list[dict[str, Any]]:
    """Every metric of the constant majority-class prediction on each task's dev set."""
    rows = []
    for task in tasks:
        spec = resolve_task(task)
        labels = [ex.label for ex in load_split(spec, "dev")]
        scores = majority_baseline(spec, labels)
        rows.append({"task": task, "method": "majority", "metric": spec.metric, "mean": scores[spec.metric],
                     "std": 0.0, "n_seeds": 0, "trainable": 0, "lr": None, "n_dev": len(labels),
                     "all_metrics": {k: {"mean": v, "std": 0.0} for k, v in scores.items()}})
    return rows


def _method_row(task: str, method: str, rows: list[dict[str, Any]], lr: float | None, stage: str,
                grid: list[float]) -> dict[str, Any]:
    """One table row from the finished cells of a (task, method) at one rate."""
    done = sorted((r for r in rows if r.get("status") == "done"), key=lambda r: r["config"]["seed"])
    metric = done[0]["metric"] if done else (rows[0].get("metric") if rows else None)
    selected = [r["score_at_best_val"] for r in done]
    mean, std = mean_std(selected)
    names = list((done[0].get("dev_at_best_val") or {}) if done else [])
    all_metrics = {}
    for name in (n for n in names if n not in AUXILIARY_KEYS):
        m, s = mean_std([r["dev_at_best_val"][name] for r in done])
        all_metrics[name] = {"mean": m, "std": s}
    gap_mean, gap_std = mean_std([r["train_scores"][metric] - r["score_at_best_val"] for r in done
                                  if r.get("train_scores")])
    return {"task": task, "method": method, "metric": metric, "mean": mean, "std": std, "n_seeds": len(done),
            "seeds": [r["config"]["seed"] for r in done], "scores": selected,
            "trainable": done[0]["n_trainable"] if done else None,
            "trainable_fraction": done[0]["trainable_fraction"] if done else None, "lr": lr, "lr_grid": grid,
            "val_mean": mean_std([r["val_score"] for r in done])[0],
            "train_mean": mean_std([r["train_scores"][metric] for r in done if r.get("train_scores")])[0],
            "n_train_scored": sum(bool(r.get("train_scores")) for r in done),
            "generalization_gap": gap_mean, "generalization_gap_std": gap_std,
            "last_step_mean": mean_std([r["score"] for r in done])[0],
            "best_val_steps": [r["best_val"]["step"] for r in done],
            "total_steps": done[0].get("total_steps") if done else None,
            "all_metrics": all_metrics,
            "diverged_seeds": sorted(r["config"]["seed"] for r in rows if r.get("status") == "diverged"),
            # seeds whose reported deltas give every dev row one class (known for rows written or rebuilt since
            # evaluations report top_class_share)
            "one_class_seeds": one_class_seeds(done), "near_one_class_seeds": near_one_class_seeds(done),
            "n_one_class_known": sum(r.get("predicts_one_class") is not None for r in done),
            "mean_train_time_s": mean_std([r["train_time_s"] for r in done if r.get("train_time_s")])[0],
            "stage": stage}


def table_rows(select_rows: list[dict[str, Any]], table_rows_in: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per (task, method) with any finished cell: the table cells at the chosen rate when there are any,
    else (selection still running) the best rate so far on validation, one seed."""
    chosen = choose_lrs(select_rows)
    grids: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in select_rows:
        grids[_rate_key(row)].append(float(row["config"]["lr"]))
    out, used = [], {}
    for task in TASKS:
        for method in METHODS:
            pair = (task, method)
            info = chosen.get(pair)
            if info is None or info["lr"] is None:
                continue
            lr = info["lr"]
            in_table = [r for r in table_rows_in if _rate_key(r) == pair and float(r["config"]["lr"]) == lr]
            at_lr = [r for r in select_rows if _rate_key(r) == pair and float(r["config"]["lr"]) == lr]
            stage = "table" if in_table else "selection"
            used[pair] = [r for r in in_table or at_lr if r.get("status") == "done"]
            out.append({**_method_row(task, method, in_table or at_lr, lr, stage, sorted(set(grids[pair]))),
                        "rate_at_edge": rate_at_edge(info)})
    for task in TASKS:
        full = next((r for r in out if r["task"] == task and r["method"] == "full"), None)
        for row in out:
            if row["task"] == task:
                row["gap_to_full"] = (row["mean"] - full["mean"]) if full and row["mean"] is not None else None
                if row["gap_to_full"] is not None and row["gap_to_full"] < -GAP:
                    row["gap_reasons"] = gap_reasons(row, used[(task, row["method"])], used[(task, "full")])
    return out


GAP = 0.03
"""A delta method more than this below full fine-tuning (3 points) gets its gap's measured reasons."""


def _curves(row: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's training curves, from its run folder's ``metrics.json`` (``runs/`` stays on the machine that ran
    the sweep; the measures below are written into ``glue_table.json``)."""
    import json

    path = Path(row.get("run_dir") or "") / "metrics.json"
    return json.loads(path.read_text())["curves"] if row.get("run_dir") and path.is_file() else None


def _train_loss_end(rows: list[dict[str, Any]]) -> float | None:
    """Mean training loss over the last 10 % of steps (:func:`controltune.sweep.train_loss_end`), averaged
    over the cells; None unless every cell has it (in its row, or in its run folder on this machine)."""
    ends = []
    for row in rows:
        if row.get("train_loss_end") is not None:
            ends.append(float(row["train_loss_end"]))
        elif (curves := _curves(row)) and curves.get("train_loss"):
            ends.append(train_loss_end(curves["train_loss"]))
    return statistics.fmean(ends) if ends and len(ends) == len(rows) else None


def carried_losses(rows: list[dict[str, Any]], previous: Path) -> None:
    """Keep the training losses an earlier summary measured when the run folders are gone from this machine.

    Rows written before 2026-12-03 do not carry their training loss; it was read from the run folders, which
    are never committed, and comes back only as their cells are rebuilt.  Each of a pair's two losses (its own
    and full fine-tuning's) that is not measurable now takes the earlier ``glue_table.json``'s value when the
    cells it was measured on (rate, seeds, scores) are the ones here, marked with that summary's date; the
    reasons are then given again from the losses.  Any other change leaves them None.
    """
    if not previous.is_file():
        return
    import json

    before = json.loads(previous.read_text())
    old = {(r["task"], r["method"]): r for r in before.get("rows", [])}
    now = {(r["task"], r["method"]): r for r in rows}

    def same(key: tuple[str, str]) -> bool:
        a, b = old.get(key), now.get(key)
        return bool(a and b) and all(a[k] == b[k] for k in ("lr", "seeds", "scores"))

    for row in rows:
        reasons, then = row.get("gap_reasons"), old.get((row["task"], row["method"]))
        if not reasons or not then or not then.get("gap_reasons"):
            continue
        carried = {}
        for key, cells in (("train_loss_end", (row["task"], row["method"])),
                           ("full_train_loss_end", (row["task"], "full"))):
            if reasons.get(key) is None and then["gap_reasons"].get(key) is not None and same(cells):
                carried[key] = then["gap_reasons"][key]
        if carried:
            measures = {**reasons, **carried}
            source = then["gap_reasons"].get("train_loss_source") or f"glue_table.json of {before.get('created')}"
            row["gap_reasons"] = {**measures, "train_loss_source": source, "carried": sorted(carried),
                                  "reasons": _reasons(row, measures)}


def gap_reasons(row: dict[str, Any], cells: list[dict[str, Any]], full_cells: list[dict[str, Any]]) -> dict[str, Any]:
    """What the runs show about a gap of more than :data:`GAP` to full fine-tuning, measured, not guessed.

    * the chosen rate is the highest or lowest of the rates tried (the grid may not have reached the optimum);
    * the best validation score came at the last evaluation in most seeds (still improving: under-trained);
    * the final training loss against full fine-tuning's: clearly higher (1.25x or more) means the method
      does not fit the training data as well (capacity or optimisation); about equal (or lower) means it fits
      them as well and the gap is in generalisation.
    """
    grid = row["lr_grid"]
    at_end = [c["best_val"]["step"] == c["total_steps"] for c in cells if c.get("best_val") and c.get("total_steps")]
    measures = {"rate_at_grid_edge": bool(grid) and row["lr"] in (min(grid), max(grid)) and len(grid) > 1,
                "best_val_at_last_step": f"{sum(at_end)}/{len(at_end)}", "train_loss_end": _train_loss_end(cells),
                "full_train_loss_end": _train_loss_end(full_cells)}
    return {**measures, "reasons": _reasons(row, measures)}


def _reasons(row: dict[str, Any], measures: dict[str, Any]) -> list[str]:
    """The sentences :func:`gap_reasons` gives for its measures."""
    grid, reasons = row["lr_grid"], []
    if measures["rate_at_grid_edge"]:
        side = "highest" if row["lr"] == max(grid) else "lowest"
        reasons.append(f"its rate {row['lr']:g} is the {side} tried ({', '.join(f'{g:g}' for g in grid)})")
    done, n = map(int, measures["best_val_at_last_step"].split("/"))
    if n and done * 2 > n:
        reasons.append("its validation score was still rising at the last evaluation (under-trained at this budget)")
    mine, full = measures["train_loss_end"], measures["full_train_loss_end"]
    if mine is not None and full is not None:
        if mine >= 1.25 * full:
            reasons.append(f"it fits the training data less: final training loss {mine:.3f} against full "
                           f"fine-tuning's {full:.3f}")
        else:
            reasons.append(f"it fits the training data about as well (final training loss {mine:.3f} against "
                           f"{full:.3f}) but scores lower on held-out data: a generalisation gap")
    return reasons or ["no measure here explains it"]


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full-fine-tuning goals: reached or not (so far)."""
    result = []
    for task, (metric, level) in GOALS.items():
        row = next((r for r in rows if r["task"] == task and r["method"] == "full"), None)
        value = row["all_metrics"].get(metric, {}).get("mean") if row else None
        result.append({"task": task, "metric": metric, "goal": level, "mean": value,
                       "n_seeds": row["n_seeds"] if row else 0, "met": None if value is None else value >= level})
    return result


# --- the time budget ----------------------------------------------------------------------------
def planned_cell_s(cell: dict[str, Any]) -> float:
    """Planned wall time of one cell at one thread: measured epoch time x the share of rows trained on (the
    rest is validation) x epochs x (1 + evaluation overhead)."""
    val = float(cell.get("val_size") or 0.0)
    trained = 1.0 - (val if val < 1 else val / N_TRAIN[cell["task"]])
    return MEASURED_EPOCH_S[cell["task"]][cell["method"]] * trained * float(cell["epochs"]) * (1 + EVAL_OVERHEAD)


def planned_estimate(select: SweepSpec, table: SweepSpec) -> dict[str, Any]:
    """Core-seconds of the whole table before any cell ran: the selection cells, and the table cells that are
    not seed-0 copies (two seeds per pair)."""
    select_cells = expand(select)
    table_cells = [c for c in _table_cells_any_lr(table) if c["seed"] != 0]
    core_s = sum(planned_cell_s(c) for c in select_cells) + sum(planned_cell_s(c) for c in table_cells)
    return {"how": "measured epoch time at one thread (MEASURED_EPOCH_S) x share of rows trained on x epochs x (1 + "
                   f"{EVAL_OVERHEAD}) per cell, summed over the {len(select_cells)} selection cells and the "
                   f"{len(table_cells)} table cells of seeds 1 and 2 (seed 0 is copied)",
            "cells_run": len(select_cells) + len(table_cells), "core_hours": core_s / 3600,
            "hours_on_2_cores": core_s / 3600 / 2}


def _table_cells_any_lr(table: SweepSpec) -> list[dict[str, Any]]:
    """The table cells, with the placeholder rate where none is chosen yet (for planning)."""
    return expand(table)


def observed_estimate(select: SweepSpec, table: SweepSpec, select_rows: list[dict[str, Any]],
                      table_rows_in: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimate re-made from the cells finished so far: their wall times, and for each cell still to run the
    mean time of the finished cells of its (task, method) (the planned time when there is none yet)."""
    ran = [r for r in select_rows + table_rows_in if r.get("wall_time_s") and not r.get("copied_from")]
    by_pair: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in ran:
        by_pair[_rate_key(r)].append(float(r["wall_time_s"]))
    finished = {canonical_config(r["config"]) for r in select_rows if r.get("status") in FINISHED}
    pending = [c for c in expand(select) if canonical_config(c) not in finished]
    table_done = {canonical_config(r["config"]) for r in table_rows_in if r.get("status") in FINISHED}
    chosen = choose_lrs(select_rows)
    for cell in _table_cells_any_lr(table):
        info = chosen.get((cell["task"], cell["method"]))
        if cell["seed"] == 0:
            continue
        if info and info["lr"] is not None and canonical_config({**cell, "lr": info["lr"]}) in table_done:
            continue
        pending.append(cell)

    def expected(cell: dict[str, Any]) -> float:
        times = by_pair.get((cell["task"], cell["method"]))
        return statistics.fmean(times) if times else planned_cell_s(cell)

    spent = sum(float(r["wall_time_s"]) for r in ran)
    remaining = sum(expected(c) for c in pending)
    return {"how": "wall times of the finished cells; each cell still to run takes the mean of its (task, method)'s "
                   "finished cells, else its planned time", "cells_finished": len(ran), "cells_pending": len(pending),
            "core_hours_spent": spent / 3600, "core_hours_remaining": remaining / 3600,
            "hours_on_2_cores_total": (spent + remaining) / 3600 / 2}


# --- driver ------------------------------------------------------------------------------------
def write_summary(select: SweepSpec, table: SweepSpec, out: Path = SUMMARY) -> dict[str, Any]:
    """Rewrite ``glue_table.json`` from whatever rows exist."""
    select_rows, table_rows_in = read_jsonl(select.out), read_jsonl(table.out)
    rebuilt = read_jsonl(Path(select.out).parent / "glue_rebuilt.jsonl")  # rows of old cells lack their losses
    rows = table_rows(with_rebuilt(select_rows, rebuilt), with_rebuilt(table_rows_in, rebuilt))
    carried_losses(rows, out)
    chosen = [{"task": t, "method": m, **info} for (t, m), info in sorted(choose_lrs(select_rows).items())]
    payload = {**stamp({"select_spec": "experiments/glue_select.yaml", "table_spec": "experiments/glue_table.yaml",
                        "model": "minilm", "dtype": "float32", "seeds": [0, 1, 2],
                        "selection": "per (task, method) the peak rate with the highest validation score (rows held "
                                     "out of train, val_seed 0); reported: dev score of the best-on-validation "
                                     "deltas of each seed (mean, sample std over seeds)",
                        "command": "python experiments/glue_table.py --cpus-per-cell 1"}),
               "rows": rows, "majority": majority_rows(), "goals": goals(rows),
               "chosen_lr": chosen, "selection_regret": regret_by_task(select_rows),
               "estimate": {"planned": planned_estimate(select, table),
                            "observed": observed_estimate(select, table, select_rows, table_rows_in)},
               "complete": bool(rows) and len(rows) == len(TASKS) * len(METHODS)
                           and all(r["stage"] == "table" and r["n_seeds"] == 3 for r in rows)}
    write_json_unless_same(out, payload)
    gap_summary(out.parent)  # its single methods' gaps are this table's
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--select", type=Path, default=SELECT_SPEC, help="the selection sweep spec")
    p.add_argument("--table", type=Path, default=TABLE_SPEC, help="the table sweep spec (rates added here)")
    add_sweep_arguments(p, "runs/glue_table")
    p.add_argument("--summary-only", action="store_true", help="only rewrite glue_table.json from the rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(load_spec(args.select).out)
    table = table_spec(args.table)  # the table's settings and file; rates come after the selection

    def summary() -> dict[str, Any]:  # with the edge rates the rows have led to
        return write_summary(selection_spec(args.select, read_jsonl(out)), table)

    if args.summary_only:
        return summary()
    summary()
    select_then_tabulate(lambda rows: selection_spec(args.select, rows), out,
                         lambda rows: table_spec(args.table, choose_lrs(rows)), Path(table.out), out.parent,
                         progress_echo(summary), sweep_settings(args))
    return summary()


if __name__ == "__main__":
    main()
