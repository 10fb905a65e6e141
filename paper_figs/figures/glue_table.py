"""Figure ``glue_table``: dev scores of six delta methods and full fine-tuning of MiniLM on four GLUE tasks.

Source: ``glue_table.json`` (``experiments/glue_table.py``): per (task, method) the mean and std over seeds
of the dev score of the best-on-validation deltas, at the learning rate chosen on validation rows, and
each dev set's majority-class level.  A partial table (a sweep still running) is drawn as it is: each
bar is labelled with its number of seeds, and a pair still in its rate selection is hatched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import edge_rate_note, load_json, regret_note, seed_listing, two_se_sign, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "glue_table.json"
TASKS = (("sst2", "SST-2"), ("mrpc", "MRPC"), ("rte", "RTE"), ("cola", "CoLA"))
METHODS = ("full", "lora", "adapter", "prefix", "prompt", "bitfit")
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "mcc": "Matthews corr."}
COLOURS = {"full": "tab:gray", "lora": "tab:blue", "adapter": "tab:orange", "prefix": "tab:green",
           "prompt": "tab:purple", "bitfit": "tab:red"}


def _row(payload: dict[str, Any], task: str, method: str) -> dict[str, Any] | None:
    return next((r for r in payload["rows"] if r["task"] == task and r["method"] == method
                 and r["mean"] is not None), None)


def _majority(payload: dict[str, Any], task: str) -> dict[str, Any] | None:
    return next((r for r in payload.get("majority", []) if r["task"] == task), None)


def draw(results_dir: Path) -> Figure:
    """One panel per task: a bar per method (mean ± std over seeds, n = seeds), the majority-class level dashed."""
    payload = load_json(results_dir, SOURCE)
    fig = new_figure(11.0, 3.3)
    axes = fig.subplots(1, len(TASKS))
    for ax, (task, title) in zip(axes, TASKS):
        majority = _majority(payload, task)
        metric = majority["metric"] if majority else None
        tops = []
        for i, method in enumerate(METHODS):
            row = _row(payload, task, method)
            if row is None:
                ax.text(i, 0.02, "no run", ha="center", va="bottom", fontsize=6, color="0.5", rotation=90,
                        transform=ax.get_xaxis_transform())
                continue
            metric = metric or row["metric"]
            provisional = row.get("stage") != "table"
            spread = row["std"] if row.get("std") is not None and row["n_seeds"] > 1 else None  # no bar for one seed
            ax.bar(i, row["mean"], yerr=spread, color=COLOURS[method], alpha=0.55 if provisional else 0.9,
                   hatch="//" if provisional else None, capsize=2, edgecolor="black", linewidth=0.4)
            top = row["mean"] + (row["std"] or 0.0)
            tops.append(top)
            ax.text(i, top + 0.01, f"n={row['n_seeds']}", ha="center", va="bottom", fontsize=6.5)
        if majority:
            ax.axhline(majority["mean"], color="black", linestyle="--", linewidth=0.9,
                       label=f"majority class ({majority['mean']:.3f})")
            ax.legend(loc="upper right", fontsize=6.5, frameon=False)
        low = min(0.0, majority["mean"] if majority else 0.0) if metric == "mcc" else 0.4
        ax.set_ylim(low, max([1.0 if metric != "mcc" else 0.6, *(t + 0.05 for t in tops)]))
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(METHODS) - 0.4)
        ax.set(title=f"{title} ({METRIC_NAMES.get(metric, metric)})", ylabel="dev score" if task == "sst2" else None)
        ax.grid(True, axis="y", alpha=0.3)
    provisional_any = any(r.get("stage") != "table" for r in payload.get("rows", []) if r.get("method") in METHODS)
    state = ("complete" if payload.get("complete") else
             "partial: n = seeds finished; whiskers ±1 std over seeds"
             + ("; hatched: rate selection still running, 1 seed" if provisional_any else ""))
    fig.suptitle(f"all-MiniLM-L6-v2 on GLUE dev: best-on-validation checkpoint at the validation-chosen rate; "
                 f"{state}", fontsize=9)
    return fig


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    std = f" ± {row['std']:.3f}" if row.get("std") is not None else ""
    gap = row.get("gap_to_full")
    gap_text = f", gap {100 * gap:+.1f} pt" if gap is not None and row["method"] != "full" else ""
    return f"{row['mean']:.3f}{std} (n={row['n_seeds']}, lr {row['lr']:g}{gap_text})"


def _goal(goal: dict[str, Any]) -> str:
    """``rte accuracy 0.612 vs goal 0.58 (met)``."""
    value = "–" if goal["mean"] is None else f"{goal['mean']:.3f}"
    state = "no run yet" if goal["met"] is None else ("met" if goal["met"] else "not met")
    return f"{goal['task']} {goal['metric']} {value} vs goal {goal['goal']} ({state}, n={goal['n_seeds']})"


def _gaps(results_dir: Path) -> str:
    """The measured reasons for the goals full fine-tuning misses (``glue_gaps.json``, when it exists)."""
    path = results_dir / "glue_gaps.json"
    if not path.is_file():
        return ""
    gaps = json.loads(path.read_text())
    parts = []
    if verdict := gaps.get("sst2_budget", {}).get("verdict"):
        parts.append(f"SST-2: {verdict}")
    rte = gaps.get("rte_resolution", {})
    longer = rte.get("longer_training_at_table_rate")
    if longer:
        parts.append(f"RTE at {longer['epochs'][0]} epochs: {longer['mean']:.3f} ± {longer['std']:.3f} "
                     f"(n={longer['n_seeds']})")
    if rte.get("verdict"):
        parts.append(f"RTE: {rte['verdict']}; one dev score's binomial standard error is "
                     f"{rte['binomial_se_one_score']:.3f}")
    return (" Measured reasons (glue_gaps.json, `python experiments/glue_gaps.py`): " + "; ".join(parts) + "."
            if parts else "")


def parameters_and_score(payload: dict[str, Any]) -> dict[str, Any]:
    """The claim "more trainable parameters do not mean better" (Ding et al. 2023) on the table: every pair of
    methods of one task with different trainable counts, judged by the two-standard-error rule on the difference
    of their dev means.  Returns ``{larger, smaller, tie, not_a_test, holds}``: how many pairs the method with more
    parameters wins, the one with fewer wins, neither; ``not_a_test`` counts pairs with both within two standard
    errors of the majority class (no method learnt the task); the claim holds when the larger method does not win
    a majority of the judged pairs."""
    def cell(r: dict[str, Any]) -> tuple[float, float | None, int]:
        return r["mean"], r["std"], r["n_seeds"]

    def above(r: dict[str, Any], level: float) -> bool:
        return r["mean"] - 2 * r["std"] / math.sqrt(r["n_seeds"]) > level

    counts = {"larger": 0, "smaller": 0, "tie": 0, "not_a_test": 0}
    fewer_won: list[str] = []
    for task, _ in TASKS:
        rows = [r for m in METHODS if (r := _row(payload, task, m)) and r.get("trainable") and r["n_seeds"] >= 2
                and r["std"] is not None]
        level = (_majority(payload, task) or {}).get("mean")
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                if a["trainable"] == b["trainable"]:
                    continue
                big, small = (a, b) if a["trainable"] > b["trainable"] else (b, a)
                if level is not None and not above(big, level) and not above(small, level):
                    counts["not_a_test"] += 1
                    continue
                sign = two_se_sign(cell(small), cell(big))
                counts[{1: "larger", -1: "smaller", 0: "tie"}[sign]] += 1
                if sign == -1:
                    fewer_won.append(f"{task}: {small['method']} over {big['method']}")
    judged = counts["larger"] + counts["smaller"] + counts["tie"]
    return {**counts, "fewer_won": fewer_won, "holds": None if not judged else counts["larger"] <= judged / 2}


CLAIMED_ORDER = ("full", "lora", "adapter", "prefix", "prompt")
"""Ding et al. (2023): FT > LoRA > adapter > prefix > prompt on average over tasks."""


def performance_order(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The claim "FT > LoRA > adapter > prefix > prompt on average": per method its mean rank over the tasks
    (1 = the best mean dev score on a task) and its mean dev score over them (accuracy, F1 and MCC averaged, as
    the paper averages its tasks' metrics), over the methods with 3 seeds on every task; ``holds`` when the
    claimed methods' mean ranks are in the claimed order (strictly).  A description of the table, not a
    significance test: per task the methods' differences are judged by two standard errors elsewhere.  None before
    every cell has 3 seeds."""
    rows = {(t, m): _row(payload, t, m) for t, _ in TASKS for m in METHODS}
    if any(r is None or r["n_seeds"] < 3 for r in rows.values()):
        return None
    ranks: dict[str, list[int]] = {m: [] for m in METHODS}
    for task, _ in TASKS:
        for i, m in enumerate(sorted(METHODS, key=lambda m: -rows[(task, m)]["mean"]), 1):
            ranks[m].append(i)
    mean_rank = {m: sum(r) / len(r) for m, r in ranks.items()}
    mean_score = {m: sum(rows[(t, m)]["mean"] for t, _ in TASKS) / len(TASKS) for m in METHODS}
    claimed = [mean_rank[m] for m in CLAIMED_ORDER]
    per_task = {t: sorted(CLAIMED_ORDER, key=lambda m: -rows[(t, m)]["mean"]) == list(CLAIMED_ORDER)
                for t, _ in TASKS}
    return {"mean_rank": mean_rank, "mean_score": mean_score, "holds": all(a < b for a, b in zip(claimed, claimed[1:])),
            "tasks_in_claimed_order": [t for t, ok in per_task.items() if ok]}


def _order_sentence(payload: dict[str, Any]) -> str:
    o = performance_order(payload)
    if o is None:
        return ""
    by_rank = sorted(METHODS, key=lambda m: o["mean_rank"][m])
    names = dict(TASKS)
    return (" Claim (Ding et al. 2023): FT > LoRA > adapter > prefix > prompt on average — mean rank over the 4 "
            "tasks (1 = best): " + ", ".join(f"{m} {o['mean_rank'][m]:g}" for m in by_rank)
            + "; mean dev score over them (accuracy, F1 and MCC averaged, as the paper does): "
            + ", ".join(f"{m} {o['mean_score'][m]:.3f}" for m in by_rank)
            + f": {'holds' if o['holds'] else 'does not hold'} here by mean rank (a description, no significance "
            "test); the claimed methods are in the claimed order on "
            + (", ".join(names[t] for t in o["tasks_in_claimed_order"]) or "no task") + " alone.")


def _parameters_sentence(payload: dict[str, Any]) -> str:
    c = parameters_and_score(payload)
    judged = c["larger"] + c["smaller"] + c["tie"]
    if not judged:
        return ""
    verdict = "holds here" if c["holds"] else "does not hold here"
    return (f" Claim (Ding et al. 2023): more trainable parameters do not mean better — of {judged} pairs of methods "
            f"on one task with different trainable counts, the one with more parameters scores higher by two "
            f"standard errors in {c['larger']}, the one with fewer in {c['smaller']}"
            + (f" ({'; '.join(c['fewer_won'])})" if c["fewer_won"] else "")
            + f", neither in {c['tie']} "
            f"({c['not_a_test']} more pairs not a test, both at the majority class): {verdict} (criterion: more "
            "parameters do not win a majority of the pairs).")


def _one_class_sentence(payload: dict) -> str:
    """Which seeds' reported deltas give every dev row one class (a score that is the constant prediction's), and
    which give one class to at least 95 % of them."""
    rows = [r for r in payload.get("rows", []) if r.get("method") != "majority"]
    known = sum(r.get("n_one_class_known", 0) for r in rows)
    if not known:
        return ""
    hits, near = (seed_listing(rows, k, lambda r: f"{r['task']} {r['method']}")
                  for k in ("one_class_seeds", "near_one_class_seeds"))
    return (f" Runs whose reported deltas predict one class for every dev row (known for {known} of "
            f"{sum(r.get('n_seeds', 0) for r in rows)}, the runs trained or rebuilt since evaluations count it): "
            + ("; ".join(hits) if hits else "none") + "; for at least 95 % of dev rows (nearly a constant "
            "prediction): " + ("; ".join(near) if near else "none") + ".")


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    lines = []
    for task, title in TASKS:
        cells = "; ".join(f"{m} {_cell(_row(payload, task, m))}" for m in METHODS)
        majority = _majority(payload, task)
        level = f"majority {majority['mean']:.3f}" if majority else "majority –"
        lines.append(f"{title} ({level}): {cells}.")
    goals = "; ".join(_goal(g) for g in payload.get("goals", []))
    estimate = payload.get("estimate", {})
    planned = estimate.get("planned", {}).get("hours_on_2_cores", float("nan"))
    planned_cells = estimate.get("planned", {}).get("cells_run")
    observed = estimate.get("observed", {}).get("hours_on_2_cores_total", float("nan"))
    status = "complete (3 seeds per cell)" if payload.get("complete") else \
        "partial: the sweep is still running; n is the number of seeds finished, and a pair still in its rate " \
        "selection shows its best rate so far on validation with one seed"
    return (
        "all-MiniLM-L6-v2 (float32, mean pooling + linear head, dropout off) fine-tuned in full or with a delta "
        "method (LoRA r=8 on q,v; sequential adapter, bottleneck 64; prefix, 10 vectors; prompt, 20 tokens; "
        "BitFit), AdamW with 6 % warm-up and linear decay, gradient clipping 1, batch 32, max length 128 with "
        "dynamic padding. SST-2: a seeded 20k-row training subsample, 2 epochs; MRPC, RTE, CoLA: full training "
        "sets. A seeded part of each training set is held out as validation rows; they choose the checkpoint "
        "(best of ~2 evaluations per epoch) and the learning rate (seed 0, a small grid per method); bars are the "
        f"dev score of the chosen checkpoint, mean ± std over seeds. Table {status}. " + " ".join(lines)
        + _order_sentence(payload)
        + _parameters_sentence(payload)
        + _one_class_sentence(payload)
        + edge_rate_note(payload.get("rows", []), lambda r: f"{r['task']} {r['method']}")
        + regret_note(payload.get("selection_regret", {}))
        + f" Full fine-tuning goals: {goals}.{_gaps(results_dir)} Time: planned {planned:.1f} h on 2 cores for "
        f"{planned_cells} cells (from measured epoch times); "
        "re-estimated from the "
        f"finished cells {observed:.1f} h. "
        f"Command: `python experiments/glue_table.py --cpus-per-cell 1` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="glue_table",
        title="GLUE dev scores of full fine-tuning and five delta methods on MiniLM (rates and checkpoints chosen "
              "on validation rows)",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/glue_table.py", "--cpus-per-cell", "1"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw", "parameters_and_score", "performance_order"]
