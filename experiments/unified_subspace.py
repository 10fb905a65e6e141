"""A unified optimisation subspace of adapter, prefix and LoRA (issue 16; Yi et al., 2022), leave one task out.

For each target task T of SST-2, MRPC, RTE and CoLA and each dimension d in ``DIMS``:

1. **Approximation** (``controltune subspace approximate``): the projections of LoRA (r=8 on q, v), the adapter
   (bottleneck 64) and prefix tuning (10 vectors) are trained on the other three tasks, from those methods'
   GLUE-table solutions (``runs/glue_table``: the seed-0 cell of each (task, method) at its chosen rate) — no new
   source training.  Seed 0 only (``SOURCE_SEEDS``), as the paper's sources: every solution then starts from the
   reference point θ⁰ (the seed-0 initialisation), so Δθ is what training learned, not the difference between
   two random initialisations of LoRA's A or the adapter's down-projection.  ``APPROX`` settings; one
   approximation per (T, d) (seed 0: the variance over approximation seeds is not measured, to fit the budget).
2. **Optimisation**: the ``unified_subspace`` controller (z ∈ R^d and a fresh head) trained on T through each
   method's up-projection, as sweep cells with the GLUE table's harness (validation rows, evaluation cadence,
   warm-up and decay) but at most ``STAGE2_STEPS`` steps; the rate of z chosen on validation rows from
   ``Z_RATES`` (grid continued at its edge), then seeds 0, 1, 2.  Beside them, per target, the control run
   ``HEAD_ONLY``: z frozen at 0 through LoRA, only the head trains (a linear probe of the frozen model in the
   same harness): a subspace score says what z adds only against it.
3. **Transfer**: each stage-2 run's z (and head) decoded by the two other methods, scored on T's dev set
   (``results/unified_transfer.jsonl``).
4. **Landscape**: every method's dev score (256 rows) on SST-2 over the plane through the intrinsic vectors of
   the three source tasks of the RTE-left-out projections (``LANDSCAPE``; the paper's plane, through the three
   methods' vectors of one task, collapses under the aligned start, where those vectors nearly coincide), a
   9 × 9 grid of (α, β) in [−0.5, 1.5]² (``results/unified_landscape.json``).

The original-space score of a (T, method) is its GLUE table cell (same harness, its full epochs: more steps than
stage 2 gets).  ``results/unified_subspace.json`` holds, per (T, method, d), the subspace score (mean, std over
seeds), the original score, and the transfer matrix; figures ``unified_subspace`` and ``subspace_transfer``.

Time: ``--plan`` prints the core-hours spent and still to run, estimated from this study's own finished rows
(measured here: the 8 approximations took 1.4 core-hours, a stage-2 cell 49 s on CoLA and 181 s on MRPC at one
thread); approximations and transfers run in worker processes with one thread each (``--jobs``), stage 2 as
sweep cells.

    .venv/bin/python experiments/unified_subspace.py --plan
    nohup .venv/bin/python experiments/unified_subspace.py > experiments/results/unified_subspace.log 2>&1 &
    .venv/bin/python experiments/unified_subspace.py --summary-only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from controltune.results import append_jsonl, read_jsonl, stamp, write_json, write_json_unless_same
from controltune.run_folder import DELTAS
from controltune.sweep import finished_configs
from controltune.sweep_spec import SweepSpec, canonical_config, expand, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_model import (  # noqa: E402
    describe_hours,
    observed_core_hours,
)
from rate_selection import (  # noqa: E402
    add_sweep_arguments,
    choose_lrs,
    chosen_rows,
    extended_spec,
    rate_at_edge,
    rebuild_cells,
    reproduces,
    select_then_tabulate,
    sweep_settings,
    task_method,
)
from verdicts import (  # noqa: E402
    glue_majority,
    mean_std,
)

if TYPE_CHECKING:
    from collections.abc import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PROJECTIONS = Path("runs/unified_subspace")
"""Projections files, relative to the repository root (cells name them so; the driver runs from there)."""
APPROX_OUT, TRANSFER_OUT = RESULTS / "unified_approx.jsonl", RESULTS / "unified_transfer.jsonl"
SELECT_OUT, TABLE_OUT = RESULTS / "unified_select.jsonl", RESULTS / "unified_table.jsonl"
REBUILT_OUT = RESULTS / "unified_rebuilt.jsonl"
LANDSCAPE_OUT, SUMMARY = RESULTS / "unified_landscape.json", RESULTS / "unified_subspace.json"
TASKS = ("sst2", "mrpc", "rte", "cola")
METHODS = ("lora", "adapter", "prefix")
DIMS = (4, 32)
APPROX = {"steps": 300, "lr": 1.0e-2, "recon_weight": 1.0, "batch_size": 16, "train_size": 2000, "eval_size": 200,
          "max_length": 128, "init": "aligned"}
SOURCE_SEEDS = (0,)
Z_RATES = [3.0e-3, 3.0e-2]
HEAD_ONLY = {"delta": "lora", "frozen_z": True}
"""The control run of stage 2, per target: z frozen at 0 through LoRA (whose θ⁰ adds nothing), so only the fresh
head trains — a linear probe of the frozen model in the same harness, at rates chosen from the same grid.  What
training z adds is the subspace score minus this one."""
HEAD = "head_only"
STAGE2_STEPS = 250
STAGE2_EVAL_EVERY = 50
LANDSCAPE = {"projections_of": "rte", "task": "sst2", "dim": 4, "grid": [-0.5 + 0.25 * i for i in range(9)],
             "dev_size": 256, "plane": "tasks"}


def projections_path(target: str, dim: int) -> Path:
    return PROJECTIONS / f"{target}-d{dim}.safetensors"


# --- sources: the GLUE table's solutions -------------------------------------------------------
def glue_solutions(task: str, method: str) -> list[str]:
    """Run folders of the finished GLUE cells of (task, method) at its chosen rate (one per seed of SOURCE_SEEDS)."""
    select = read_jsonl(RESULTS / "glue_select.jsonl")
    table = read_jsonl(RESULTS / "glue_table.jsonl")
    chosen = choose_lrs(select).get((task, method), {}).get("lr")
    if chosen is None:
        return []
    runs = {}
    for row in select + table:
        if (row.get("status") == "done" and task_method(row) == (task, method)
                and float(row["config"]["lr"]) == chosen and row.get("run_dir")
                and int(row["config"]["seed"]) in SOURCE_SEEDS):
            if (ROOT / row["run_dir"] / DELTAS).is_file():  # recorded relative to the root, as the rows have it
                runs.setdefault(int(row["config"]["seed"]), str(row["run_dir"]))
    return [runs[s] for s in sorted(runs)]


def lost_hint(missing: list[tuple[str, str]]) -> str:
    """How to get the missing sources: finished GLUE cells whose folders are gone are rebuilt, others trained."""
    rows = read_jsonl(RESULTS / "glue_select.jsonl") + read_jsonl(RESULTS / "glue_table.jsonl")
    finished = {task_method(r) for r in rows if r.get("status") == "done"}
    lost = [pair for pair in missing if pair in finished]
    if not lost:
        return "run experiments/glue_table.py"
    methods = sorted({m for _, m in lost}, key=METHODS.index)
    return (f"{len(lost)} of them finished on a machine whose run folders are not here: "
            f"python experiments/rebuild_runs.py --methods {','.join(methods)} --deltas --seeds "
            + " ".join(str(s) for s in SOURCE_SEEDS))


def sources_of(target: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Every source run of ``target``'s approximation, and the (task, method) pairs that have none yet."""
    runs, missing = [], []
    for task in TASKS:
        if task == target:
            continue
        for method in METHODS:
            found = glue_solutions(task, method)
            runs += found
            if not found:
                missing.append((task, method))
    return runs, missing


def _approximate(target: str, dim: int, runs: list[str]) -> dict[str, Any]:
    """One approximation (in a worker process with one thread)."""
    import torch

    from controltune.unified_subspace import ApproximationConfig, SourceRun, approximate
    from controltune.zoo import load_model

    torch.set_num_threads(1)
    config = ApproximationConfig(dim=dim, seed=0, threads=1, progress=False, **APPROX)
    projections = approximate(load_model("minilm"), [SourceRun.read(r) for r in runs], config, model_name="minilm")
    path = projections.save(ROOT / projections_path(target, dim))
    return {"target": target, "dim": dim, "path": str(projections_path(target, dim)), "file": str(path),
            "info": projections.info}


def run_approximations(targets: tuple[str, ...], jobs: int, echo: Callable[[str], None]) -> list[tuple[str, int]]:
    """Approximations not done yet (resumable: a row in ``unified_approx.jsonl`` and its file); returns the
    (target, dim) that are ready."""
    done = {(r["target"], r["dim"]) for r in read_jsonl(APPROX_OUT) if (ROOT / r["path"]).is_file()}
    todo = []
    for target in targets:
        runs, missing = sources_of(target)
        if missing:
            echo(f"approximation for {target} waits for GLUE cells of {missing} ({lost_hint(missing)})")
            continue
        todo += [(target, dim, runs) for dim in DIMS if (target, dim) not in done]
    if todo:
        with ProcessPoolExecutor(max(1, jobs)) as pool:
            futures = {pool.submit(_approximate, *item): item for item in todo}
            for future, (target, dim, _) in futures.items():
                row = future.result()
                append_jsonl(APPROX_OUT, {**stamp({"target": target, "dim": dim, "approx": APPROX}), **row})
                rec = row["info"]["reconstruction"]
                echo(f"approximation {target} d={dim} in {row['info']['seconds']:.0f} s: " + "; ".join(
                    f"{r['method']}/{r['task']} {r['original'][r['metric']]:.3f}->{r['reconstructed'][r['metric']]:.3f}"
                    for r in rec))
                done.add((target, dim))
    return sorted(done)


# --- stage 2: sweep cells ------------------------------------------------------------------------
def pair_key(row: dict[str, Any]) -> tuple[str, str, str]:
    """(task, delta or ``head_only``, projections file): one rate each."""
    options = row["config"]["options"]
    return (str(row["config"]["task"]), HEAD if options.get("frozen_z") else str(options["delta"]),
            str(options["projections"]))


def pair_where(pair: tuple[str, str, str]) -> dict[str, Any]:
    options = {"projections": pair[2], **HEAD_ONLY} if pair[1] == HEAD else {"projections": pair[2], "delta": pair[1]}
    return {"task": pair[0], "options": options}


def spec_data(ready: list[tuple[str, int]], seeds: list[int], name: str, out: str) -> dict[str, Any]:
    """The GLUE selection's harness for ``unified_subspace`` cells of the ready (target, dim)."""
    glue = yaml.safe_load((HERE / "glue_select.yaml").read_text())
    targets = sorted({t for t, _ in ready}, key=TASKS.index)
    overrides = [{"where": o["where"], "set": {**o["set"], "eval_every": STAGE2_EVAL_EVERY}}
                 for o in glue["overrides"] if o["where"].get("task") in targets]
    for target in targets:
        options = [{"projections": str(projections_path(target, d)), "delta": m}
                   for d in DIMS if (target, d) in ready for m in METHODS]
        if (target, DIMS[0]) in ready:
            options.append({"projections": str(projections_path(target, DIMS[0])), **HEAD_ONLY})
        overrides.append({"where": {"task": target}, "set": {"options": options}})
    return {"name": name, "out": out, "grid": {"model": "minilm", "task": targets, "method": ["unified_subspace"],
                                               "seed": seeds, "lr": Z_RATES},
            "train": {**glue["train"], "steps": STAGE2_STEPS}, "overrides": overrides}


def _strip_epochs(data: dict[str, Any]) -> dict[str, Any]:
    # stage 2 is capped by steps: the GLUE overrides' epochs would conflict with it
    for o in data["overrides"]:
        o["set"].pop("epochs", None)
    return data


def selection_spec(ready: list[tuple[str, int]], rows: list[dict[str, Any]] | None) -> SweepSpec:
    data = _strip_epochs(spec_data(ready, [0], "unified_select", SELECT_OUT.name))
    return extended_spec(data, rows or [], key=pair_key, where=pair_where, folder=RESULTS)


def table_spec(ready: list[tuple[str, int]], chosen: dict) -> SweepSpec:
    missing = [pair for pair, info in chosen.items() if info["lr"] is None]
    if missing:
        raise SystemExit(f"no rate chosen for {missing} (every rate diverged)")
    data = _strip_epochs(spec_data(ready, [0, 1, 2], "unified_table", TABLE_OUT.name))
    data["grid"]["lr"] = 0.0
    data["overrides"] += [{"where": pair_where(pair), "set": {"lr": info["lr"]}}
                          for pair, info in sorted(chosen.items()) if info["lr"] is not None]
    return parse_spec(data, "unified_table", RESULTS)


def nothing_to_run(targets: tuple[str, ...]) -> bool:
    """Whether every row the study needs for ``targets`` is recorded: both approximations of each target, the
    selection cells with every edge rate they call for, the table cells at the chosen rates, a transfer of each
    table run, and the landscape.  Then nothing is remade: the projections and source runs stay on the machine
    that made them, and remaking them (~2 core-hours) would only reproduce recorded rows."""
    ready = [(t, d) for t in targets for d in DIMS]
    if not set(ready) <= {(r["target"], r["dim"]) for r in read_jsonl(APPROX_OUT)}:
        return False

    select, table = read_jsonl(SELECT_OUT), read_jsonl(TABLE_OUT)
    if not {canonical_config(c) for c in expand(selection_spec(ready, select))} <= finished_configs(select):
        return False
    chosen = choose_lrs(select, key=pair_key)
    if any(info["lr"] is None for info in chosen.values()):
        return False
    if not {canonical_config(c) for c in expand(table_spec(ready, chosen))} <= finished_configs(table):
        return False
    transferred = {r["cell"] for r in read_jsonl(TRANSFER_OUT)}
    runs = [r for r in table if r.get("status") == "done" and r.get("run_dir")
            and not r["config"]["options"].get("frozen_z") and r["config"]["task"] in targets]
    return all(r["cell"] in transferred for r in runs) and LANDSCAPE_OUT.is_file()


# --- stage 3 and the landscape -------------------------------------------------------------------
def _transfer(row: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from controltune.unified_subspace import transfer_scores
    from controltune.zoo import load_model

    torch.set_num_threads(1)
    options = row["config"]["options"]
    others = [m for m in METHODS if m != options["delta"]]
    return transfer_scores(load_model("minilm"), ROOT / options["projections"], row["run_dir"],
                           row["config"]["task"], others)


def run_transfers(jobs: int, echo: Callable[[str], None], sweep: dict[str, Any] | None = None) -> None:
    """Decode every table run's z by the two other methods; a run whose folder is gone (trained on another
    machine) is trained again from its row first (``results/unified_rebuilt.jsonl``, compared with its row)."""
    rows = [r for r in read_jsonl(TABLE_OUT) if r.get("status") == "done" and r.get("run_dir")
            and not r["config"]["options"].get("frozen_z")]  # a head-only run has no z to transfer
    have = {r["cell"] for r in read_jsonl(TRANSFER_OUT)}
    lost = [r for r in rows if r["cell"] not in have and not (ROOT / r["run_dir"] / DELTAS).is_file()]
    if lost and sweep is not None:
        echo(f"{len(lost)} table runs have no deltas on this machine: training them again from their rows")
        for new in rebuild_cells(lost, REBUILT_OUT, sweep, ROOT, echo):
            old = next(r for r in lost if r["cell"] == new["cell"])
            echo(f"rebuilt {new['cell']}: " + ("reproduces its row" if reproduces(old, new) else
                                                f"dev {new.get('score_at_best_val')} against the row's "
                                                f"{old.get('score_at_best_val')}"))
    todo = [r for r in rows if r["cell"] not in have and (ROOT / r["run_dir"] / DELTAS).is_file()]
    if not todo:
        return
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        for row, scores in zip(todo, pool.map(_transfer, todo)):
            options = row["config"]["options"]
            out = {"cell": row["cell"], "task": row["config"]["task"], "seed": row["config"]["seed"],
                   "projections": options["projections"], "from": options["delta"], "from_score":
                   row["score_at_best_val"], "metric": row["metric"],
                   "to": {s["method"]: s["score"] for s in scores}}
            append_jsonl(TRANSFER_OUT, {**stamp({"cell": row["cell"]}), **out})
            echo(f"transfer {row['config']['task']} {options['projections']} {options['delta']} "
                 f"{row['score_at_best_val']:.3f} -> " + ", ".join(f"{k} {v:.3f}" for k, v in out["to"].items()))


def run_landscape(echo: Callable[[str], None]) -> None:
    import torch

    from controltune.unified_subspace import landscape
    from controltune.zoo import load_model

    if LANDSCAPE_OUT.is_file():
        return
    path = ROOT / projections_path(LANDSCAPE["projections_of"], LANDSCAPE["dim"])
    if not path.is_file():
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = landscape(load_model("minilm"), path, LANDSCAPE["task"], LANDSCAPE["grid"],
                       dev_size=LANDSCAPE["dev_size"], plane=LANDSCAPE["plane"])
    write_json(LANDSCAPE_OUT, {**stamp({**LANDSCAPE, "command": "python experiments/unified_subspace.py"}),
                               **result, "seconds": time.perf_counter() - start})
    echo(f"landscape written ({len(result['points'])} points, {time.perf_counter() - start:.0f} s)")


# --- summary ----------------------------------------------------------------------------------------
def _glue_cell(task: str, method: str) -> dict[str, Any] | None:
    """The GLUE table's row of (task, method): the original-space score."""
    import json

    path = RESULTS / "glue_table.json"
    if not path.is_file():
        return None
    for row in json.loads(path.read_text()).get("rows", []):
        if row.get("task") == task and row.get("method") == method:
            return row
    return None


def landscape_overlap(payload: dict[str, Any], majority: float) -> dict[str, Any]:
    """Each method's good region on the plane — points scoring at least halfway from the majority level to its
    best point — and their overlap: |∩| / |∪| over all methods (Jaccard), the size of each region and of ∩."""
    points = payload["points"]
    good = {}
    for m in payload["methods"]:
        best = max(p["scores"][m] for p in points)
        cut = majority + 0.5 * (best - majority)
        good[m] = {i for i, p in enumerate(points) if p["scores"][m] >= cut}
    inter = set.intersection(*good.values())
    union = set.union(*good.values())
    return {"jaccard": len(inter) / len(union) if union else None, "n_points": len(points),
            "good": {m: len(v) for m, v in good.items()}, "shared": len(inter)}


def summary() -> dict[str, Any]:
    cells, head = [], {}
    select = read_jsonl(SELECT_OUT)
    chosen = chosen_rows(select, read_jsonl(TABLE_OUT), pair_key)
    infos = choose_lrs(select, key=pair_key)
    edge = {pair: rate_at_edge(info) for pair, info in infos.items()}
    for (task, delta, proj), (lr, done) in chosen.items():
        if delta == HEAD:
            mean, std = mean_std([r["score_at_best_val"] for r in done.values()])
            head[task] = {"mean": mean, "std": std, "n_seeds": len(done), "lr": lr,
                          "rate_at_edge": edge.get((task, delta, proj), False)}
    for (task, delta, proj), (lr, done) in sorted(chosen.items()):
        if delta == HEAD:
            continue
        scores = [r["score_at_best_val"] for r in done.values()]
        mean, std = mean_std(scores)
        original = _glue_cell(task, delta)
        dim = int(Path(proj).stem.rsplit("-d", 1)[1])
        cells.append({"task": task, "method": delta, "dim": dim, "lr": lr, "mean": mean, "std": std,
                      "n_seeds": len(scores), "metric": next(iter(done.values()))["metric"] if done else None,
                      "original": None if original is None else {k: original.get(k) for k in
                                                                 ("mean", "std", "n_seeds", "lr", "stage")},
                      "trainable": next(iter(done.values()))["n_trainable"] if done else None,
                      "head_only": head.get(task),
                      "rate_at_edge": edge.get((task, delta, proj), False)})
    transfers = []
    for row in read_jsonl(TRANSFER_OUT):
        # the diagonal is the stage-2 score itself (the z decoded by the method it was trained with)
        for to, score in {row["from"]: row["from_score"], **row["to"]}.items():
            dim = int(Path(row["projections"]).stem.rsplit("-d", 1)[1])
            transfers.append({"task": row["task"], "dim": dim, "seed": row["seed"], "from": row["from"], "to": to,
                              "score": score, "from_score": row["from_score"]})
    matrix = []
    for dim in DIMS:
        for a in METHODS:
            for b in METHODS:
                for task in TASKS:
                    vals = [t["score"] for t in transfers
                            if (t["dim"], t["from"], t["to"], t["task"]) == (dim, a, b, task)]
                    if vals:
                        matrix.append({"dim": dim, "from": a, "to": b, "task": task, "mean": mean_std(vals)[0],
                                       "n": len(vals)})
    approx = [{"target": r["target"], "dim": r["dim"], "seconds": r["info"]["seconds"],
               "reconstruction": r["info"]["reconstruction"]} for r in read_jsonl(APPROX_OUT)]
    payload = {**stamp({"tasks": list(TASKS), "methods": list(METHODS), "dims": list(DIMS), "approx": APPROX,
                        "z_rates": Z_RATES, "stage2_steps": STAGE2_STEPS, "landscape": LANDSCAPE,
                        "command": "python experiments/unified_subspace.py"}),
               "cells": cells, "head_only": head, "transfer": matrix, "approximations": approx,
               "majority": {t: glue_majority(RESULTS).get(t) for t in TASKS}}
    if LANDSCAPE_OUT.is_file():
        import json

        land = json.loads(LANDSCAPE_OUT.read_text())
        level = glue_majority(RESULTS).get(land["task"])
        payload["landscape_overlap"] = None if level is None else landscape_overlap(land, level)
    write_json_unless_same(SUMMARY, payload)
    return payload


def plan_hours(targets: tuple[str, ...]) -> dict[str, Any]:
    """Core-hours of the study by its own finished rows (approximations by their recorded seconds, stage-2
    cells by target task; the edge rates of the selection are not counted before they exist)."""
    per_task = len(DIMS) * len(METHODS)
    rows = read_jsonl(APPROX_OUT)
    kept = {t: len({r["dim"] for r in rows if r["target"] == t and (ROOT / r["path"]).is_file()}) for t in targets}
    approx = observed_core_hours({t: len(DIMS) for t in targets}, rows, lambda r: r["target"],
                                 lambda r: r["info"]["seconds"], done=kept)
    stage2 = observed_core_hours({t: (per_task + 1) * (len(Z_RATES) + 2) for t in targets},
                                 read_jsonl(SELECT_OUT) + read_jsonl(TABLE_OUT), lambda r: r["config"]["task"])
    for name, est in (("approximations", approx), ("stage-2 cells", stage2)):
        print(describe_hours(name, est))
    print("transfers and the landscape are evaluation only (seconds each); the sources, if their run folders are "
          "gone: see experiments/rebuild_runs.py --plan")
    return {"approximations": approx, "stage2": stage2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="target tasks")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each) for approximations "
                                                       "and transfers")
    add_sweep_arguments(p, "runs/unified_subspace/cells")
    p.add_argument("--plan", action="store_true", help="print what would run; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    os.chdir(ROOT)  # cells name their projections relative to the repository root
    targets = tuple(t for t in args.tasks.split(",") if t)
    if any(t not in TASKS for t in targets):
        raise SystemExit(f"unknown task(s) in {targets}; accepted: {', '.join(TASKS)}")
    if args.plan:
        for t in targets:
            runs, missing = sources_of(t)
            print(f"{t}: {len(runs)} source runs" + (f"; waiting for {missing} ({lost_hint(missing)})"
                                                      if missing else ""))
        n = len(targets) * (len(DIMS) * len(METHODS) + 1)  # and one head-only control per target
        print(f"{len(targets) * len(DIMS)} approximations, {n * len(Z_RATES)} selection cells (+ edge rates), "
              f"{2 * n} table cells of seeds 1, 2 (head-only controls included), "
              f"{2 * len(targets) * len(DIMS) * len(METHODS)} transfers")
        return plan_hours(targets)
    if args.summary_only:
        return summary()

    def echo(line: str) -> None:
        print(line, flush=True)

    if nothing_to_run(targets):
        echo("every cell, transfer and the landscape are recorded: nothing to run (projections not remade)")
        return summary()
    ready = [(t, d) for t, d in run_approximations(targets, args.jobs, echo) if t in targets]
    if ready:
        select_then_tabulate(lambda rows: selection_spec(ready, rows), SELECT_OUT,
                             lambda rows: table_spec(ready, choose_lrs(rows, key=pair_key)),
                             TABLE_OUT, RESULTS, echo, sweep_settings(args))
        run_transfers(args.jobs, echo, sweep_settings(args))
        run_landscape(echo)
    return summary()


if __name__ == "__main__":
    main()
