"""Sequential combination (issue 15; Ding et al. 2023): prompt tuning, BitFit and the adapter trained one after
another in all 6 orders on SST-2, 3 seeds.

The paper's claims: sequential combination (train a stage, freeze it, add the next) can keep improving, and no
order is best everywhere.  Each cell trains ``a+b+c`` with ``sequential: true`` (``controltune train
--sequential``): stage a for one epoch, frozen, then b, then c, each stage at its own peak rate — the rate the
GLUE table chose for that method on SST-2 (validation rows; :mod:`rate_selection`), so no new selection runs.
Harness: the GLUE table's settings but 5,000 SST-2 training rows (seeded), 500 of them held out as validation
rows, one epoch per stage, evaluation every 50 steps.  Every row lists the dev score after each stage.

``results/sequential.json``: per order the final dev score (mean, std over seeds) and the score after each stage;
in how many (order, stage) steps adding the stage helped (two-standard-error rule), and the best order.

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
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    choose_lrs,
    describe_hours,
    mean_std,
    sweep_hours,
    sweep_settings,
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


def summary() -> dict[str, Any]:
    rows = [r for r in read_jsonl(OUT) if r.get("status") == "done"]
    orders = []
    for order in ORDERS:
        mine = {r["config"]["seed"]: r for r in rows if r["config"]["method"] == order}
        finals = [r["score_at_best_val"] for r in mine.values()]
        mean, std = mean_std(finals)
        stages = []
        for i, part in enumerate(order.split("+")):
            vals = [r["stages"][i]["score_at_best_val"] for r in mine.values() if len(r.get("stages", [])) > i]
            m, s = mean_std(vals)
            stages.append({"stage": i, "part": part, "mean": m, "std": s, "n_seeds": len(vals)})
        orders.append({"order": order, "mean": mean, "std": std, "n_seeds": len(finals), "stages": stages})
    steps = []
    for o in orders:
        for prev, cur in zip(o["stages"], o["stages"][1:]):
            if prev["mean"] is None or cur["mean"] is None:
                continue
            sign, diff, _ = two_se(prev, cur)
            if sign is not None:
                steps.append({"order": o["order"], "added": cur["part"], "stage": cur["stage"], "difference": diff,
                              "verdict": {1: "helps", -1: "hurts", 0: "no effect"}[sign]})
    scored = [o for o in orders if o["mean"] is not None]
    best = max(scored, key=lambda o: o["mean"]) if scored else None
    payload = {**stamp({"task": TASK, "parts": PARTS, "harness": HARNESS, "stage_rates": stage_rates(),
                        "command": "python experiments/sequential.py"}),
               "orders": orders, "steps": steps, "best_order": best["order"] if best else None}
    write_json_unless_same(SUMMARY, payload)
    return payload


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
