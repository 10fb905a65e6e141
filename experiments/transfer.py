"""Zero-shot task transfer of trained deltas (issue 15; Ding et al. 2023): a source × target matrix over SST-2, MRPC,
RTE and CoLA.

The paper's claim: deltas trained on one task transfer to tasks of the same kind, poorly across kinds.  No new
training: every GLUE-table run (each method at its chosen rate, seeds 0, 1, 2; ``runs/glue_table``) is loaded with
its head and scored on every other task's dev set.  The label spaces are mapped explicitly: each task's class
that *affirms* its question — SST-2 1 (positive), CoLA 1 (acceptable), MRPC 1 (equivalent), RTE 0 (entailment) —
is the affirming class of every other task, so a source whose affirming class sits at a different index than the
target's has its two head rows swapped (``LABEL_MAP``).  Kinds: single-sentence (SST-2, CoLA) and sentence-pair
(MRPC, RTE) tasks.

``results/transfer.jsonl``: one row per (source run, target task); ``results/transfer.json``: per method the matrix
of mean dev scores, each entry also relative to the target's own in-task score of that method (the diagonal is 1),
and the mean relative transfer within and across kinds.

Run folders stay on the machine that trained them.  A source run whose deltas are not here is trained again from
its row first (:func:`rate_selection.rebuild_cells`, into its own folder; the new row goes to
``results/glue_rebuilt.jsonl``, where the convergence study also reads its curve) and scored at once, ``--jobs``
sources at a time, so a stop loses at most the sources in hand: the scores already written stay, and the next
start goes on with the sources that have none.  Each row says whether its source was rebuilt and whether the
rebuild reproduced the recorded dev and validation scores exactly.

    nohup .venv/bin/python experiments/transfer.py > experiments/results/transfer.log 2>&1 &
    .venv/bin/python experiments/transfer.py --plan           # sources, scores to compute, runs to rebuild
    .venv/bin/python experiments/transfer.py --summary-only
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from controltune.results import append_jsonl, read_jsonl, stamp, write_json_unless_same
from controltune.run_folder import DELTAS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rate_selection import (  # noqa: E402
    choose_lrs,
    mean_std,
    rebuild_cells,
    reproduces,
    task_method,
)

HERE = Path(__file__).resolve().parent
ROOT, RESULTS = HERE.parent, HERE / "results"
OUT, SUMMARY = RESULTS / "transfer.jsonl", RESULTS / "transfer.json"
REBUILT_OUT = RESULTS / "glue_rebuilt.jsonl"
"""Where rebuilt source runs' rows go: shared with ``rebuild_runs.py``, read by ``convergence.py`` for curves."""
TASKS = ("sst2", "mrpc", "rte", "cola")
METHODS = ("full", "lora", "adapter", "prefix", "prompt", "bitfit")
LABEL_MAP = {"sst2": 1, "cola": 1, "mrpc": 1, "rte": 0}
"""The index of each task's affirming class (positive, acceptable, equivalent, entailment)."""
KIND = {"sst2": "single", "cola": "single", "mrpc": "pair", "rte": "pair"}


def source_rows() -> list[dict[str, Any]]:
    """Finished GLUE cells at their pair's chosen rate (one per seed; a copied row is its source's cell), whether or
    not their deltas are on this machine."""
    select = read_jsonl(RESULTS / "glue_select.jsonl")
    chosen = choose_lrs(select)
    out = {}
    for row in select + read_jsonl(RESULTS / "glue_table.jsonl"):
        pair = task_method(row)
        if (row.get("status") == "done" and pair[1] in METHODS and row.get("run_dir")
                and float(row["config"]["lr"]) == chosen.get(pair, {}).get("lr")):
            out.setdefault(row["cell"], row)
    return list(out.values())


def has_deltas(row: dict[str, Any]) -> bool:
    return (ROOT / row["run_dir"] / DELTAS).is_file()


def targets_of(row: dict[str, Any]) -> list[str]:
    return [t for t in TASKS if t != row["config"]["task"]]


def swapped(source: str, target: str) -> bool:
    return LABEL_MAP[source] != LABEL_MAP[target]


def _score(job: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """The source run's deltas and head on the target's dev set (one worker, one thread)."""
    import torch

    from controltune import checkpoint
    from controltune.controllers.spec import build_spec
    from controltune.data import load_split, resolve_task
    from controltune.evaluation import evaluate
    from controltune.run_folder import reported_deltas
    from controltune.system import ResidualSystem
    from controltune.zoo import load_model

    torch.set_num_threads(1)
    row, target = job
    cfg = row["config"]
    spec = resolve_task(target)
    loaded = load_model(cfg["model"], dtype=cfg["dtype"])
    system = ResidualSystem(loaded, num_labels=2, pooling=cfg["pooling"], seed=cfg["seed"])
    build_spec(system, cfg["method"], cfg["options"], cfg["seed"], cfg["task"])
    checkpoint.load(system, reported_deltas(ROOT / row["run_dir"]))  # the deltas the row's dev score is of
    if swapped(cfg["task"], target):
        with torch.no_grad():
            head = system.readout.head
            head.weight.copy_(head.weight.flip(0))
            head.bias.copy_(head.bias.flip(0))
    scores = evaluate(system, load_split(spec, "dev"), spec, loaded.tokenizer, max_length=cfg["max_length"])
    return {"cell": row["cell"], "method": cfg["method"], "source": cfg["task"], "target": target,
            "seed": cfg["seed"], "metric": spec.metric, "score": scores[spec.metric], "scores": scores,
            "labels_swapped": swapped(cfg["task"], target)}


def pending(sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sources with a target not scored yet."""
    have = {(r["cell"], r["target"]) for r in read_jsonl(OUT)}
    return [row for row in sources if any((row["cell"], t) not in have for t in targets_of(row))]


def run(jobs: int, sweep: dict[str, Any]) -> None:
    """Score every pending source on its targets, ``jobs`` sources at a time, rebuilding a source first where its
    deltas are not on this machine."""
    have = {(r["cell"], r["target"]) for r in read_jsonl(OUT)}
    todo = pending(source_rows())
    lost = sum(not has_deltas(r) for r in todo)
    print(f"{len(todo)} source runs to score on the other tasks, {lost} of them to train again first", flush=True)
    jobs = max(1, jobs)
    with ProcessPoolExecutor(jobs) as pool:
        for start in range(0, len(todo), jobs):
            chunk = todo[start:start + jobs]
            rebuilt: dict[str, bool] = {}
            if missing := [r for r in chunk if not has_deltas(r)]:
                for new in rebuild_cells(missing, REBUILT_OUT, sweep, ROOT):
                    old = next(r for r in missing if r["cell"] == new["cell"])
                    rebuilt[new["cell"]] = reproduces(old, new)
                    print(f"rebuilt {new['cell']} ({old['config']['method']} {old['config']['task']} seed "
                          f"{old['config']['seed']}): " + ("reproduces its row" if rebuilt[new["cell"]] else
                                                          f"dev {new.get('score_at_best_val')} against the row's "
                                                          f"{old.get('score_at_best_val')}"), flush=True)
            jobs_here = [(row, t) for row in chunk if has_deltas(row) for t in targets_of(row)
                         if (row["cell"], t) not in have]
            for out in pool.map(_score, jobs_here):
                out |= {"source_rebuilt": out["cell"] in rebuilt, "source_reproduces": rebuilt.get(out["cell"])}
                append_jsonl(OUT, {**stamp({"label_map": LABEL_MAP}), **out})
                print(f"{out['method']} {out['source']} seed {out['seed']} -> {out['target']}: {out['metric']} "
                      f"{out['score']:.4f}", flush=True)


def summary() -> dict[str, Any]:
    rows = read_jsonl(OUT)
    own: dict[tuple[str, str], list[float]] = {}
    for row in source_rows():
        own.setdefault(task_method(row)[::-1], []).append(row["score_at_best_val"])
    matrix, relative = [], {"same kind": [], "cross kind": []}
    for method in METHODS:
        for source in TASKS:
            for target in TASKS:
                if source == target:
                    vals = own.get((method, source), [])
                else:
                    vals = [r["score"] for r in rows if (r["method"], r["source"], r["target"]) ==
                            (method, source, target)]
                mean, std = mean_std(vals)
                base = mean_std(own.get((method, target), []))[0]
                rel = mean / base if mean is not None and base else None
                matrix.append({"method": method, "source": source, "target": target, "mean": mean, "std": std,
                               "n_seeds": len(vals), "relative": rel})
                if source != target and rel is not None:
                    relative["same kind" if KIND[source] == KIND[target] else "cross kind"].append(rel)
    kinds = {k: {"mean": mean_std(v)[0], "n": len(v)} for k, v in relative.items()}
    same, cross = kinds["same kind"]["mean"], kinds["cross kind"]["mean"]
    payload = {**stamp({"tasks": list(TASKS), "methods": list(METHODS), "label_map": LABEL_MAP, "kind": KIND,
                        "command": "python experiments/transfer.py"}),
               "matrix": matrix, "kinds": kinds,
               "claim_holds": None if same is None or cross is None else same > cross}
    write_json_unless_same(SUMMARY, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="sources in hand at a time: scoring worker processes and "
                                                       "cells rebuilt side by side, one thread each")
    p.add_argument("--executor", default="auto", choices=["auto", "ray", "local"], help="for the rebuilt cells")
    p.add_argument("--address", default=None, help="an existing Ray cluster, for the rebuilt cells")
    p.add_argument("--plan", action="store_true", help="count what would run; run nothing")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    if args.plan:
        sources = source_rows()
        todo = pending(sources)
        lost = [r for r in todo if not has_deltas(r)]
        hours = sum(float(r.get("wall_time_s") or 0.0) for r in lost) / 3600
        print(f"{len(sources)} source runs, {len(todo)} with scores to compute; {len(lost)} of those to train again "
              f"first ({hours:.1f} core-hours by their recorded wall times, scoring aside)")
        return {"sources": len(sources), "pending": len(todo), "rebuild": len(lost), "rebuild_core_hours": hours}
    if not args.summary_only:
        # rebuilt cells go back to the folders their rows name, ``jobs`` side by side with one thread each
        run(args.jobs, {"cpus_per_cell": 1, "cpus": max(1, args.jobs), "executor": args.executor,
                        "address": args.address})
    return summary()


if __name__ == "__main__":
    main()
