"""Convergence (issue 15; Ding et al. 2023): validation score against step and wall time, per method and task.

No new training: the curves are those of the GLUE table's runs (``experiments/glue_table.py``).  For every
(task, method) at its chosen rate, each finished cell's run folder (``runs/glue_table/<cell>/metrics.json``,
kept on the machine that ran the sweep) holds the validation scores of the task's metric at every evaluation
(about twice per epoch) and the run's training time; a step's wall time is the run's training time over its
steps (the cells ran at one thread each, two at a time).  Written to ``results/convergence.json``: per (task,
method) the mean curve over the cells found, the steps and seconds to reach 90 % of the method's own best
validation score, and the ordering the paper claims (full fine-tuning fastest, then adapter ≈ LoRA, then
prefix, prompt tuning far slower) judged pair by pair on the seeds (:func:`order_verdict`: one method is faster
than another only when every seed of it reaches the level at an earlier evaluation).  The chance level of a curve is the
majority class *of the validation rows* the curve is scored on (drawn from train, whose class balance differs from
dev's), and a task whose full fine-tuning does not beat it (best validation score over seeds, two standard errors)
is no test of the order: 90 % of no gain is reached by anything.

    .venv/bin/python experiments/convergence.py     # seconds; rerun as the GLUE table grows
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from controltune.results import read_jsonl, stamp, write_json_unless_same

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue_table import METHODS, TASKS  # noqa: E402
from rate_selection import (  # noqa: E402
    choose_lrs,
    with_rebuilt,
)
from verdicts import (  # noqa: E402
    beats_level,
    mean_std,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
OUT = RESULTS / "convergence.json"
REACH = 0.9
"""A curve has converged once it reaches this fraction of its best validation score."""
CLAIMED = ("full", "adapter", "lora", "prefix", "prompt")
"""The paper's order, fastest first (adapter ≈ LoRA)."""


def _curve(row: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's validation curve: from its row (rows carry it since 2026-12-03, older rows take it from their
    exact rebuild, :func:`rate_selection.with_rebuilt`), else from its run folder."""
    if (row.get("curves") or {}).get("val") and row.get("total_steps") and row.get("train_time_s"):
        points, seconds, steps = row["curves"]["val"], row["train_time_s"], row["total_steps"]
    else:
        path = ROOT / (row.get("run_dir") or "") / "metrics.json"
        if not row.get("run_dir") or not path.is_file():
            return None
        metrics = json.loads(path.read_text())
        points, seconds, steps = metrics["curves"].get("val", []), metrics["wall_time_s"], metrics.get("total_steps")
    metric = row["metric"]
    val = [(p["step"], p[metric]) for p in points if metric in p]
    if not val or not steps:
        return None
    per_step = float(seconds) / float(steps)
    return {"steps": [s for s, _ in val], "scores": [v for _, v in val], "seconds_per_step": per_step,
            "seed": row["config"]["seed"]}


def reach(steps: list[int], scores: list[float], floor: float, best: float, fraction: float = REACH) -> int | None:
    """First step at which the score reaches ``floor + fraction·(best − floor)`` (None: never)."""
    target = floor + fraction * (best - floor)
    return next((s for s, v in zip(steps, scores) if v >= target), None)


def validation_majority(config: dict[str, Any]) -> float:
    """The majority-class score on the validation rows a GLUE cell of ``config`` selects on: the same seeded draw
    of train (``data_seed``, ``train_size``) and the same held-out rows (``val_size``, ``val_seed``) as the cell."""
    return _validation_majority(config["task"], config.get("data_seed", 0), config.get("train_size"),
                                config["val_size"], config.get("val_seed", 0))


@functools.cache
def _validation_majority(task: str, data_seed: int, train_size: int | None, val_size: float, val_seed: int) -> float:
    from controltune.data import load_split, resolve_task
    from controltune.evaluation import validation_rows
    from controltune.metrics import majority_baseline

    spec = resolve_task(task, holdout_seed=data_seed)
    train = load_split(spec, "train", n=train_size, seed=data_seed)
    val = validation_rows(train, val_size, val_seed)
    return majority_baseline(spec, [e.label for e in val])[spec.metric]


def _ranked(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Methods by ``key`` (fastest first); those that never reach the level after, by the share of full
    fine-tuning's gain they do reach."""
    never = float("inf")
    return [r["method"] for r in sorted(rows, key=lambda r: (r[key] or never, -(r["share_of_full_gain"] or 0)))]


def summary() -> dict[str, Any]:
    rebuilt = read_jsonl(RESULTS / "glue_rebuilt.jsonl")
    select = with_rebuilt(read_jsonl(RESULTS / "glue_select.jsonl"), rebuilt)
    table = with_rebuilt(read_jsonl(RESULTS / "glue_table.jsonl"), rebuilt)
    chosen = choose_lrs(select)
    rows: list[dict[str, Any]] = []
    absent: list[str] = []
    for task in TASKS:
        for method in METHODS:
            info = chosen.get((task, method))
            if not info or info["lr"] is None:
                continue
            cells = [r for r in table + select if r.get("status") == "done" and r["config"]["task"] == task
                     and r["config"]["method"] == method and float(r["config"]["lr"]) == info["lr"]
                     and not r.get("copied_from")]
            found = [(r, _curve(r)) for r in cells]
            curves = [c for _, c in found if c]
            absent += [r["cell"] for r, c in found if c is None]
            seen, unique = set(), []
            for c in curves:  # a seed's cell appears in both files when copied; keep one per seed
                if c["seed"] not in seen:
                    seen.add(c["seed"])
                    unique.append(c)
            if not unique:
                continue
            steps = unique[0]["steps"]
            same = [c for c in unique if c["steps"] == steps]
            mean = [statistics.fmean(c["scores"][i] for c in same) for i in range(len(steps))]
            floor = validation_majority(cells[0]["config"])
            reached = reach(steps, mean, floor, max(mean))
            best, best_std = mean_std([max(c["scores"]) for c in same])
            per_step = statistics.fmean(c["seconds_per_step"] for c in same)
            rows.append({"task": task, "method": method, "lr": info["lr"], "n_seeds": len(same), "steps": steps,
                         "seeds": [c["seed"] for c in same], "seed_val": [c["scores"] for c in same],
                         "seed_seconds_per_step": [c["seconds_per_step"] for c in same],
                         "mean_val": mean, "seconds_per_step": per_step, "majority": floor,
                         "best_val": best, "best_val_std": best_std,
                         "beats_majority": beats_level({"mean": best, "std": best_std, "n_seeds": len(same)}, floor),
                         "steps_to_own": reached, "seconds_to_own": None if reached is None else reached * per_step,
                         "fraction_of_run_to_own": None if reached is None else reached / steps[-1]})
    for task in TASKS:  # the common level: 90 % of full fine-tuning's gain over the majority class
        full = next((r for r in rows if r["task"] == task and r["method"] == "full"), None)
        for r in (r for r in rows if r["task"] == task):
            if full is None:
                r.update(common_level=None, share_of_full_gain=None, steps_to_common=None, seconds_to_common=None,
                         seed_steps_to_common=None, seed_seconds_to_common=None)
                continue
            hit = reach(r["steps"], r["mean_val"], r["majority"], max(full["mean_val"]))
            gain = max(full["mean_val"]) - r["majority"]
            r.update(common_level=r["majority"] + REACH * gain,
                     share_of_full_gain=(max(r["mean_val"]) - r["majority"]) / gain if gain > 0 else None,
                     steps_to_common=hit, seconds_to_common=None if hit is None else hit * r["seconds_per_step"],
                     seed_steps_to_common=[reach(r["steps"], v, r["majority"], max(full["mean_val"]))
                                           for v in r["seed_val"]])
            r["seed_seconds_to_common"] = [None if k is None else k * sec for k, sec in
                                           zip(r["seed_steps_to_common"], r["seed_seconds_per_step"])]
    orders = []
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task and r["method"] in CLAIMED]
        if len(mine) < 2:
            continue
        by_steps, by_time = _ranked(mine, "steps_to_common"), _ranked(mine, "seconds_to_common")
        full = next((r for r in mine if r["method"] == "full"), None)
        order = {"task": task, "by_steps_to_common": by_steps, "by_seconds_to_common": by_time,
                 "test": None if full is None else full["beats_majority"],
                 "never_reached": sorted(r["method"] for r in mine if r["steps_to_common"] is None),
                 "claimed": [m for m in CLAIMED if m in by_steps]}
        seconds = {r["method"]: r["seed_seconds_to_common"] for r in mine}
        # wall time is reported, not judged: the claim is about steps, and a step's cost differs by method
        by_time = [{"faster": a, "slower": b, "measured": pair_order(seconds[a], seconds[b])}
                   for a, b in claimed_pairs([m for m in order["claimed"] if seconds.get(m) is not None])]
        orders.append({**order, **order_verdict(order, {r["method"]: r["seed_steps_to_common"] for r in mine}),
                       "pairs_by_seconds": by_time})
    return {**stamp({"source": "GLUE table runs (glue_select.jsonl, glue_table.jsonl, runs/glue_table/*/metrics.json)",
                     "reach": REACH, "majority_of": "validation rows",
                     "command": "python experiments/convergence.py"}),
            "rows": rows, "orders": orders, "cells_without_curves": sorted(set(absent))}


def claimed_pairs(claimed: list[str]) -> list[tuple[str, str]]:
    """The (faster, slower) pairs the claim orders, among ``claimed`` (fastest first): every pair of
    :data:`CLAIMED` except adapter ≈ LoRA, which the claim does not order."""
    return [(a, b) for i, a in enumerate(claimed) for b in claimed[i + 1:] if {a, b} != {"adapter", "lora"}]


def pair_order(first: list[int | None], second: list[int | None]) -> str:
    """How two methods' seeds separate, from each seed's first step at the common level (None: never).

    ``"first"`` when every seed of the first reaches it at an earlier evaluation than any seed of the second
    (a seed that never reaches it counts as later than every step), ``"second"`` the reverse, ``"neither
    reaches"`` when no seed of either does (speed does not order them), ``"not separated"`` otherwise.  Complete
    separation of 3 seeds against 3 happens by chance in 1 of 20 orderings each way.
    """
    never = float("inf")
    a = [never if s is None else s for s in first]
    b = [never if s is None else s for s in second]
    if not a or not b or min(a + b) == never:
        return "neither reaches"
    if max(a) < min(b):
        return "first"
    if max(b) < min(a):
        return "second"
    return "not separated"


def order_verdict(order: dict[str, Any], seed_steps: dict[str, list[int | None]]) -> dict[str, Any]:
    """``{verdict, reason, pairs}`` of one task's order against the claimed one (:data:`CLAIMED`, fastest first,
    adapter ≈ LoRA unordered), judged pair by pair on the seeds (:func:`pair_order`), not on mean curves:
    "not a test" when full fine-tuning does not beat the majority class (90 % of no gain is reached by anything);
    "not as claimed" when some claimed pair separates the other way; "as claimed" when every pair that speed can
    order (at least one of the two reaches the level) separates the claimed way; "inconclusive" otherwise (a pair
    not separated, or no pair to order).  ``seed_steps``: per method each seed's first step at the level."""
    pairs = [{"faster": a, "slower": b, "measured": pair_order(seed_steps[a], seed_steps[b])}
             for a, b in claimed_pairs([m for m in order["claimed"] if seed_steps.get(m) is not None])]
    result: dict[str, Any] = {"pairs": pairs}
    if order["test"] is False:
        return {**result, "verdict": "not a test", "reason": "full fine-tuning's best validation score does not "
                "beat the majority class by two standard errors: 90 % of no gain is reached by anything"}
    tested = [p for p in pairs if p["measured"] != "neither reaches"]
    ahead = [f"{p['faster']} before {p['slower']}" for p in tested if p["measured"] == "first"]
    behind = [f"{p['slower']} before {p['faster']}" for p in tested if p["measured"] == "second"]
    loose = [f"{p['faster']}/{p['slower']}" for p in tested if p["measured"] == "not separated"]
    unordered = [f"{p['faster']}/{p['slower']}" for p in pairs if p["measured"] == "neither reaches"]
    parts = [f"every seed: {', '.join(ahead + behind)}" if ahead + behind else "",
             f"not separated: {', '.join(loose)}" if loose else "",
             f"neither reaches the level: {', '.join(unordered)}" if unordered else ""]
    reason = "; ".join(p for p in parts if p)
    if behind:
        verdict = "not as claimed"
    elif not tested or loose:
        verdict = "inconclusive"
    else:
        verdict = "as claimed"
    return {**result, "verdict": verdict, "reason": reason or "no claimed pair has both methods' curves"}


def fewer_seeds_than_before(payload: dict[str, Any]) -> list[str]:
    """The (task, method) pairs whose curves the written summary averages over more seeds than ``payload``, or
    that it has and ``payload`` lacks: writing ``payload`` would lose them (a machine without the run folders
    reads fewer curves than the one that wrote the summary)."""
    if not OUT.is_file():
        return []
    before = {(r["task"], r["method"]): r["n_seeds"] for r in json.loads(OUT.read_text()).get("rows", [])}
    now = {(r["task"], r["method"]): r["n_seeds"] for r in payload["rows"]}
    return [f"{t}/{m}" for (t, m), n in before.items() if now.get((t, m), 0) < n]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--allow-missing", action="store_true",
                   help="write the summary even if some finished cells have no curve here (fewer seeds)")
    args = p.parse_args(argv)
    payload = summary()
    if payload["cells_without_curves"] and not args.allow_missing:
        raise SystemExit(f"{len(payload['cells_without_curves'])} finished GLUE cells have no validation curve "
                         "here (rows written before rows carried curves, and no run folder on this machine): "
                         "rebuild their run folders with experiments/rebuild_runs.py, or pass --allow-missing "
                         f"to summarise fewer seeds; {OUT.name} is left as it was")
    if lost := fewer_seeds_than_before(payload):
        raise SystemExit(f"{OUT.name} has more seeds' curves than this machine can read for {', '.join(lost)}: it is "
                         "left as it was (rebuild the runs with experiments/rebuild_runs.py, or delete it to start "
                         "over)")
    write_json_unless_same(OUT, payload)
    for r in payload["rows"]:
        print(f"{r['task']:<5} {r['method']:<8} n={r['n_seeds']} own level at step {r['steps_to_own']}, "
              f"common level at step {r['steps_to_common']} of {r['steps'][-1]}")
    for o in payload["orders"]:
        print(f"{o['task']}: by steps {o['by_steps_to_common']}, by seconds {o['by_seconds_to_common']}, never "
              f"{o['never_reached']}; claimed {o['claimed']}")
    return payload


if __name__ == "__main__":
    main()
