"""Parallel sweep cells do not oversubscribe the cores (issue 14): two cells, three ways.

The same two-cell sweep (MiniLM, LoRA rank 8 on q,v, SST-2 rows, two seeds) through
:func:`controltune.sweep.run_sweep` on an embedded local Ray, interleaved over rounds:

* ``one_by_one_1_thread``: Ray with 1 CPU, 1 CPU (one torch thread) per cell: the cells run one after the other;
* ``one_by_one_all_threads``: Ray with every core, every core per cell: one after the other, each using all threads;
* ``parallel_1_thread``: Ray with every core, 1 CPU (one thread) per cell: the two cells run side by side.

``total_s`` is the wall time of the whole sweep (Ray start-up included, and reported
separately as ``ray_start_s``); the claim checked is ``parallel_1_thread`` total <=
``one_by_one_1_thread`` total.

    python experiments/bench_sweep.py                  # writes experiments/results/bench_sweep.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from controltune import sweep, sweep_spec
from controltune.results import read_jsonl, stamp, write_json

OUT = Path(__file__).resolve().parent / "results" / "bench_sweep.json"
MODES = {"one_by_one_1_thread": (1, 1), "one_by_one_all_threads": (None, None), "parallel_1_thread": (None, 1)}
"""mode -> (CPUs of the local Ray, CPUs per cell); None: every core."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimiser steps per cell")
    p.add_argument("--rows", type=int, default=2000, help="seeded SST-2 training rows")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def the_spec(args: argparse.Namespace) -> sweep_spec.SweepSpec:
    return sweep_spec.parse_spec({
        "name": "bench", "grid": {"model": "minilm", "method": "lora", "task": "sst2", "lr": 5e-4, "seed": [0, 1],
                                  "options": {"rank": 8, "targets": ["q", "v"]}},
        "train": {"steps": args.steps, "batch_size": 32, "max_length": 128, "train_size": args.rows,
                  "dev_size": 200}})


def timed_start(cpus: int) -> float:
    """Seconds to start and stop an embedded Ray with ``cpus`` CPUs (the fixed cost inside each total)."""
    t0 = time.perf_counter()
    ray = sweep.start_ray(None, cpus)
    started = time.perf_counter() - t0
    ray.shutdown()
    return started


def run_mode(spec: sweep_spec.SweepSpec, cpus: int, per_cell: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        t0 = time.perf_counter()
        summary = sweep.run_sweep(spec, out, cpus=cpus, cpus_per_cell=per_cell, executor="ray", echo=lambda _: None)
        total = time.perf_counter() - t0
        rows = read_jsonl(out)
    assert summary["done"] == 2 and summary["executor"] == "ray", summary
    return {"total_s": total, "cpus": cpus, "cpus_per_cell": per_cell,
            "cell_wall_s": [r["wall_time_s"] for r in rows], "cell_train_s": [r["train_time_s"] for r in rows],
            "worker_pids": sorted({r["worker"]["pid"] for r in rows})}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cores = sweep.machine_cpus()
    spec = the_spec(args)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    load_before = os.getloadavg()
    ray_start = [timed_start(cores)]
    names = list(MODES)
    for r in range(args.rounds):
        for mode in names[r % len(names):] + names[:r % len(names)]:
            cpus, per_cell = MODES[mode]
            result = run_mode(spec, cpus or cores, per_cell or cores)
            runs[mode].append(result)
            print(f"round {r + 1}/{args.rounds} {mode:24s} total {result['total_s']:.1f} s, cells "
                  f"{', '.join(f'{t:.1f}' for t in result['cell_train_s'])} s training", flush=True)
    ray_start.append(timed_start(cores))
    medians = {m: statistics.median(x["total_s"] for x in v) for m, v in runs.items()}
    payload = {**stamp({"model": "minilm", "method": "lora", "rank": 8, "targets": ["q", "v"], "task": "sst2",
                        "rows": args.rows, "steps_per_cell": args.steps, "batch_size": 32, "max_length": 128,
                        "cells": 2, "cores": cores, "rounds": args.rounds}),
               "modes": {m: {"local_ray_cpus": c or cores, "cpus_per_cell": p or cores} for m, (c, p) in MODES.items()},
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "ray_start_s": ray_start, "runs": runs, "total_s_median": medians,
               "parallel_over_one_by_one_1_thread": medians["parallel_1_thread"] / medians["one_by_one_1_thread"],
               "parallel_over_one_by_one_all_threads":
                   medians["parallel_1_thread"] / medians["one_by_one_all_threads"],
               "note": "the machine is shared with other jobs; rounds are interleaved and the order rotates"}
    write_json(args.out, payload)
    print("median totals: " + ", ".join(f"{m} {t:.1f} s" for m, t in medians.items()) + f" -> {args.out}")
    return payload


if __name__ == "__main__":
    main()
