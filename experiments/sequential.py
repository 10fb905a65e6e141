"""Sequential combination (issue 15; Ding et al. 2023): prompt tuning, BitFit and the adapter trained one after
another in all 6 orders on SST-2, 3 seeds.

The paper's claims: sequential combination (train a stage, freeze it, add the next) can keep improving, and no
order is best everywhere.  Each cell trains ``a+b+c`` with ``sequential: true`` (``controltune train
--sequential``): stage a for one epoch, frozen, then b, then c, each stage at its own peak rate — the rate the
GLUE table chose for that method on SST-2 (validation rows; :mod:`rate_selection`), so no new selection runs.
Harness: the GLUE table's settings but 5,000 SST-2 training rows (seeded), 500 of them held out as validation
rows, one epoch per stage, evaluation every 50 steps.  Every row lists the dev score after each stage.

``results/sequential.json``: per order the final dev score (mean, std over seeds) and the score after each stage;
in how many (order, stage) steps adding the stage helped (two-standard-error rule); which orders keep improving
(final above the first stage by two standard errors, no stage hurting); the best order, the orders it does not beat
and the best order per seed; the best order against the best part alone; and every run a stage left at the
majority class (``collapsed``).  What was cut to fit: no rate is chosen per stage — a stage trains at its method's
rate chosen alone, from the pretrained model.

    .venv/bin/python experiments/sequential.py --plan
    nohup .venv/bin/python experiments/sequential.py > experiments/results/sequential.log 2>&1 &
    .venv/bin/python experiments/sequential.py --summary-only
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import yaml

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep import run_sweep
from controltune.sweep_spec import SweepSpec, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_model import (  # noqa: E402
    describe_hours,
    sweep_hours,
)
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    choose_lrs,
    sweep_settings,
)
from verdicts import (  # noqa: E402
    glue_majority_rows,
    mean_std,
    two_se,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT, SUMMARY = RESULTS / "sequential.jsonl", RESULTS / "sequential.json"
TASK = "sst2"
PARTS = {"prompt": {"n_tokens": 20}, "bitfit": {}, "adapter": {"bottleneck": 64}}
ORDERS = ["+".join(p) for p in itertools.permutations(PARTS)]
SEEDS = (0, 1, 2)
HARNESS = {"train_size": 5000, "val_size": 500, "epochs": 1, "eval_every": 50, "sequential": True}


def stage_rates() -> dict[str, float | None]:
    """Each part's rate chosen by the GLUE selection on SST-2 (None while its cells are unfinished)."""
    chosen = choose_lrs(read_jsonl(RESULTS / "glue_select.jsonl"))
    return {p: chosen.get((TASK, p), {}).get("lr") for p in PARTS}


def spec(rates: dict[str, float]) -> SweepSpec:
    glue = yaml.safe_load((HERE / "glue_select.yaml").read_text())
    per_method = {}
    for order in ORDERS:
        parts = order.split("+")
        options = {f"{p}.{k}": v for p in parts for k, v in PARTS[p].items()}
        per_method[order] = {"options": [options], "lr": [rates[parts[0]]],
                             "stage_lrs": [[rates[p] for p in parts]]}
    return parse_spec({"name": "sequential", "out": OUT.name,
                       "grid": {"model": "minilm", "task": TASK, "method": ORDERS, "seed": list(SEEDS)},
                       "per_method": per_method, "train": {**glue["train"], **HARNESS}}, "sequential", RESULTS)


def at_chance(score: float, level: float, n_dev: int) -> bool:
    """Whether one run's dev accuracy is not above the majority class's ``level`` by two binomial standard errors,
    ``score ≤ level + 2·(level·(1 − level)/n_dev)^{1/2}``: the run predicts (nearly) one class."""
    return score <= level + 2 * (level * (1 - level) / n_dev) ** 0.5


def _order_cells(rows: list[dict[str, Any]], order: str) -> dict[str, Any]:
    """One order's final dev score and its score after each stage (mean, std over seeds), and its seeds whose
    score after some stage sits at the majority class (``collapsed``: a stage that undid the training)."""
    mine = {r["config"]["seed"]: r for r in rows if r["config"]["method"] == order}
    mean, std = mean_std([r["score_at_best_val"] for r in mine.values()])
    stages = []
    for i, part in enumerate(order.split("+")):
        vals = [r["stages"][i]["score_at_best_val"] for r in mine.values() if len(r.get("stages", [])) > i]
        m, s = mean_std(vals)
        stages.append({"stage": i, "part": part, "mean": m, "std": s, "n_seeds": len(vals)})
    return {"order": order, "mean": mean, "std": std, "n_seeds": len(mine), "stages": stages,
            "finals": {seed: r["score_at_best_val"] for seed, r in sorted(mine.items())},
            "stage_scores": {seed: [st["score_at_best_val"] for st in r.get("stages", [])]
                             for seed, r in sorted(mine.items())}}


def _collapsed(orders: list[dict[str, Any]], level: float | None, n_dev: int | None) -> list[dict[str, Any]]:
    """Every (order, seed, stage) whose dev score sits at the majority class (:func:`at_chance`)."""
    if level is None or not n_dev:
        return []
    return [{"order": o["order"], "seed": seed, "stage": i, "part": o["order"].split("+")[i], "score": score}
            for o in orders for seed, scores in o["stage_scores"].items() for i, score in enumerate(scores)
            if at_chance(score, level, n_dev)]


def _steps(orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (order, added stage): the score after it against the score before it, by the two-standard-error rule."""
    steps = []
    for o in orders:
        for prev, cur in zip(o["stages"], o["stages"][1:]):
            if prev["mean"] is None or cur["mean"] is None:
                continue
            sign, diff, _ = two_se(prev, cur)
            if sign is not None:
                steps.append({"order": o["order"], "added": cur["part"], "stage": cur["stage"], "difference": diff,
                              "verdict": {1: "helps", -1: "hurts", 0: "no effect"}[sign]})
    return steps


def _keeps_improving(o: dict[str, Any], steps: list[dict[str, Any]]) -> bool | None:
    """An order keeps improving when its final score beats its first stage's by two standard errors and no
    added stage hurts (None before every stage has two seeds)."""
    first, final = o["stages"][0], {"mean": o["mean"], "std": o["std"], "n_seeds": o["n_seeds"]}
    if first["mean"] is None or final["mean"] is None:
        return None
    sign = two_se(first, final)[0]
    mine = [s for s in steps if s["order"] == o["order"]]
    if sign is None or len(mine) < len(o["stages"]) - 1:
        return None
    return sign == 1 and all(s["verdict"] != "hurts" for s in mine)


def _best_single(orders: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best part trained alone: the highest first-stage cell (each part is the first stage of two orders,
    the same runs)."""
    firsts = {o["stages"][0]["part"]: o["stages"][0] for o in orders if o["stages"][0]["mean"] is not None}
    return max(firsts.values(), key=lambda c: c["mean"]) if firsts else None


def summary() -> dict[str, Any]:
    rows = [r for r in read_jsonl(OUT) if r.get("status") == "done"]
    orders = [_order_cells(rows, order) for order in ORDERS]
    majority = next((m for m in _majority_rows() if m["task"] == TASK), {})
    steps = _steps(orders)
    for o in orders:
        o["keeps_improving"] = _keeps_improving(o, steps)
    scored = [o for o in orders if o["mean"] is not None and o["n_seeds"] >= 2]
    best = max(scored, key=lambda o: o["mean"]) if scored else None
    ties_with_best = [o["order"] for o in scored if o is not best and two_se(o, best)[0] == 0]
    beaten_by_best = [o["order"] for o in scored if o is not best and two_se(o, best)[0] == 1]
    seeds = sorted({seed for o in orders for seed in o["finals"]})
    best_per_seed = {seed: max((o for o in orders if seed in o["finals"]), key=lambda o: o["finals"][seed])["order"]
                     for seed in seeds}
    single = _best_single(orders)
    complete = len(scored) == len(ORDERS) and all(o["n_seeds"] == len(SEEDS) for o in scored)
    improving = [o["order"] for o in orders if o["keeps_improving"]]
    best_vs_single = None
    if best is not None and single is not None:
        sign, diff, se = two_se(single, best)
        best_vs_single = {"part": next(o["stages"][0]["part"] for o in orders if o["stages"][0] is single),
                          "difference": diff, "se": se,
                          "verdict": {1: "above", -1: "below", 0: "tie", None: None}[sign]}
    claims = {
        # an existence claim: one order whose score keeps rising stage after stage suffices
        "keeps_improving": (True if improving else False) if complete else None,
        # one task only: no order may beat the other five by two standard errors
        "no_best_order": len(beaten_by_best) < len(scored) - 1 if complete else None,
    }
    payload = {**stamp({"task": TASK, "parts": PARTS, "harness": HARNESS, "stage_rates": stage_rates(),
                        "majority": majority.get("mean"), "n_dev": majority.get("n_dev"),
                        "command": "python experiments/sequential.py"}),
               "orders": orders, "steps": steps, "best_order": best["order"] if best else None,
               "ties_with_best": ties_with_best, "beaten_by_best": beaten_by_best, "best_per_seed": best_per_seed,
               "improving_orders": improving, "best_single": single, "best_vs_single": best_vs_single,
               "collapsed": _collapsed(orders, majority.get("mean"), majority.get("n_dev")), "claims": claims}
    write_json_unless_same(SUMMARY, payload)
    return payload


def _majority_rows() -> list[dict[str, Any]]:
    """The majority class's dev scores and dev sizes of the GLUE harness (:func:`verdicts.glue_majority_rows`)."""
    return glue_majority_rows(RESULTS)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, "runs/sequential")
    p.add_argument("--plan", action="store_true", help="print the cells; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    rates = stage_rates()
    if args.plan:
        print(f"{len(ORDERS) * len(SEEDS)} cells ({len(ORDERS)} orders x {len(SEEDS)} seeds, 3 stages of one epoch "
              f"on {HARNESS['train_size']} rows each); stage rates from the GLUE selection: {rates}")
        est = sweep_hours(expand(spec(rates)), read_jsonl(OUT)) if None not in rates.values() else None
        if est:
            print(describe_hours("cells", est))
        return {"hours": est}
    if args.summary_only:
        return summary()
    missing = [p for p, r in rates.items() if r is None]
    if missing:
        raise SystemExit(f"the GLUE selection has not chosen a rate on {TASK} for {missing} yet; run "
                         "experiments/glue_table.py first")
    settings = sweep_settings(args)
    run_sweep(spec(rates), OUT, echo=lambda line: (print(line, flush=True), summary()), **settings)
    return summary()


if __name__ == "__main__":
    main()
