"""Rebuild lost run folders of finished GLUE cells, and check that each rebuilt run reproduces its recorded row.

Run folders (``runs/glue_table/<cell>/``: deltas, metrics, checkpoints) stay on the machine that trained
them and are never committed; the rows in ``results/glue_select.jsonl`` and ``results/glue_table.jsonl`` are.
The studies that start from the GLUE solutions (the unified subspace's sources, zero-shot transfer) need the
deltas, and the convergence study the curves of rows written before rows carried them.  This script re-trains
the recorded cells from their recorded configurations into the same folders (``runs/<sweep>/<cell id>``),
appends the new rows to ``results/glue_rebuilt.jsonl`` and writes ``results/glue_rebuilt.json``: per cell the
recorded and the rebuilt dev scores and their difference.  The cells are seeded and train with one thread, so
on the same software a rebuilt run is expected to match its row exactly; a difference is reported, never
hidden, and the rebuilt folder is the one the studies then read.

Only cells with no rebuilt row yet are trained (resumable: a stop leaves the others rebuilt, and their rows, curves
included, are what the convergence study needs); ``--deltas`` trains every cell whose folder lacks its deltas on
this machine, rebuilt before or not (a folder is lost with the machine; ``transfer.py`` rebuilds the runs it
scores itself, one source at a time, so that its progress outlives the machine).

    .venv/bin/python experiments/rebuild_runs.py --methods lora,adapter,prefix --seeds 0 --deltas  # the unified sources
    .venv/bin/python experiments/rebuild_runs.py --plan                                   # cells and core-hours
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.run_folder import DELTAS
from controltune.sweep_spec import cell_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_model import cell_seconds  # noqa: E402
from glue_table import METHODS, TASKS  # noqa: E402
from rate_selection import REPRODUCED, add_sweep_arguments, choose_lrs, rebuild_cells, sweep_settings  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT, RESULTS = HERE.parent, HERE / "results"
SOURCES = ("glue_select.jsonl", "glue_table.jsonl")
OUT, SUMMARY = RESULTS / "glue_rebuilt.jsonl", RESULTS / "glue_rebuilt.json"


def recorded_cells(tasks: list[str], methods: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Finished rows of (task, method, seed) at the pair's chosen rate, one per cell (a copied row is its
    source's cell), each with a run folder recorded."""
    rows = [r for name in SOURCES for r in read_jsonl(RESULTS / name)]
    chosen = choose_lrs(read_jsonl(RESULTS / SOURCES[0]))
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        config = row.get("config") or {}
        pair = (config.get("task"), config.get("method"))
        if (row.get("status") != "done" or pair[0] not in tasks or pair[1] not in methods
                or int(config.get("seed", -1)) not in seeds or not row.get("run_dir")
                or chosen.get(pair, {}).get("lr") is None or float(config["lr"]) != float(chosen[pair]["lr"])):
            continue
        if cell_id(config) != row["cell"]:
            raise SystemExit(f"row of cell {row['cell']} has a configuration whose id is {cell_id(config)}: "
                             "it was edited after it was written and cannot be rebuilt")
        out.setdefault(row["cell"], row)
    return sorted(out.values(), key=lambda r: (TASKS.index(r["config"]["task"]),
                                               METHODS.index(r["config"]["method"]), r["config"]["seed"]))


def missing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose run folder has no deltas on this machine."""
    return [r for r in rows if not (ROOT / r["run_dir"] / DELTAS).is_file()]


def not_rebuilt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with no finished rebuild recorded in ``glue_rebuilt.jsonl`` and no deltas on this machine."""
    rebuilt = {r["cell"] for r in read_jsonl(OUT) if r.get("status") == "done"}
    return [r for r in missing(rows) if r["cell"] not in rebuilt]


def comparison(recorded: list[dict[str, Any]]) -> dict[str, Any]:
    """Recorded against rebuilt scores of every cell rebuilt so far (the latest rebuild of each)."""
    rebuilt = {r["cell"]: r for r in read_jsonl(OUT) if r.get("status") == "done"}
    cells = []
    for row in recorded:
        new = rebuilt.get(row["cell"])
        if new is None:
            continue
        diffs = {k: None if row.get(k) is None or new.get(k) is None else abs(float(new[k]) - float(row[k]))
                 for k in REPRODUCED}
        cells.append({"cell": row["cell"], "task": row["config"]["task"], "method": row["config"]["method"],
                      "seed": row["config"]["seed"], "lr": row["config"]["lr"], "metric": row.get("metric"),
                      "recorded": {k: row.get(k) for k in REPRODUCED}, "rebuilt": {k: new.get(k) for k in REPRODUCED},
                      "abs_difference": diffs, "identical": all(d == 0.0 for d in diffs.values() if d is not None),
                      "recorded_versions": row.get("versions"), "rebuilt_versions": new.get("versions"),
                      "wall_time_s": new.get("wall_time_s")})
    worst = [d for c in cells for d in c["abs_difference"].values() if d is not None]
    return {"cells": cells, "n_rebuilt": len(cells), "n_identical": sum(c["identical"] for c in cells),
            "max_abs_difference": max(worst) if worst else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sweep_arguments(p, "runs/glue_table")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {','.join(TASKS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--deltas", action="store_true", help="rebuild every cell whose deltas are not on this machine, "
                                                         "also those rebuilt before (their rows are recorded)")
    p.add_argument("--plan", action="store_true", help="list the cells to rebuild and their recorded time; train none")
    args = p.parse_args(argv)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    for name, given, known in (("task", tasks, TASKS), ("method", methods, METHODS)):
        if unknown := sorted(set(given) - set(known)):
            p.error(f"unknown {name} {unknown}; known: {', '.join(known)}")
    recorded = recorded_cells(tasks, methods, args.seeds)
    todo = missing(recorded) if args.deltas else not_rebuilt(recorded)
    hours = sum(cell_seconds(r) or 0.0 for r in todo) / 3600
    print(f"{len(recorded)} recorded cells, {len(todo)} to rebuild "
          + ("(deltas not on this machine) " if args.deltas else "(no rebuilt row yet, deltas not on this machine) ")
          + f"({hours:.1f} core-hours by their recorded times)", flush=True)
    if args.plan:
        for r in todo:
            c = r["config"]
            print(f"  {c['task']:<5} {c['method']:<8} seed {c['seed']} lr {c['lr']:g}: {cell_seconds(r) or 0.0:.0f} s")
        return {"todo": [r["cell"] for r in todo], "core_hours": hours}
    if todo:
        rebuild_cells(todo, OUT, sweep_settings(args), ROOT)
    # still missing: no rebuilt row anywhere, not merely no deltas here (run folders stay on the machine that
    # trained them, so the latter would make the committed summary depend on where it was last written)
    payload = {**stamp({"command": "python experiments/rebuild_runs.py " + " ".join(argv or sys.argv[1:]),
                        "tasks": tasks, "methods": methods, "seeds": args.seeds}),
               **comparison(recorded), "still_missing": [r["cell"] for r in not_rebuilt(recorded)]}
    if payload["cells"]:
        times = [c["wall_time_s"] for c in payload["cells"] if c["wall_time_s"]]
        payload["mean_wall_time_s"] = statistics.fmean(times) if times else None
    write_json_unless_same(SUMMARY, payload)
    print(f"rebuilt {payload['n_rebuilt']} cells, {payload['n_identical']} identical to their rows; largest score "
          f"difference {payload['max_abs_difference']}", flush=True)
    return payload


if __name__ == "__main__":
    main()
