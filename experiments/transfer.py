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

    nohup .venv/bin/python experiments/transfer.py > experiments/results/transfer.log 2>&1 &
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
from rate_selection import choose_lrs, mean_std, task_method  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT, RESULTS = HERE.parent, HERE / "results"
OUT, SUMMARY = RESULTS / "transfer.jsonl", RESULTS / "transfer.json"
TASKS = ("sst2", "mrpc", "rte", "cola")
METHODS = ("full", "lora", "adapter", "prefix", "prompt", "bitfit")
LABEL_MAP = {"sst2": 1, "cola": 1, "mrpc": 1, "rte": 0}
"""The index of each task's affirming class (positive, acceptable, equivalent, entailment)."""
KIND = {"sst2": "single", "cola": "single", "mrpc": "pair", "rte": "pair"}


def source_rows(lost: list[str] | None = None) -> list[dict[str, Any]]:
    """Finished GLUE cells at their pair's chosen rate, with their deltas on disk (one per seed); the cells whose
    deltas are not on this machine are appended to ``lost`` (``experiments/rebuild_runs.py`` makes them again)."""
    select = read_jsonl(RESULTS / "glue_select.jsonl")
    chosen = choose_lrs(select)
    out = {}
    for row in select + read_jsonl(RESULTS / "glue_table.jsonl"):
        pair = task_method(row)
        if (row.get("status") != "done" or pair[1] not in METHODS or not row.get("run_dir")
                or float(row["config"]["lr"]) != chosen.get(pair, {}).get("lr")):
            continue
        if (ROOT / row["run_dir"] / DELTAS).is_file():
            out.setdefault(row["cell"], row)
        elif lost is not None and row["cell"] not in lost:
            lost.append(row["cell"])
    return list(out.values())


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


def run(jobs: int) -> None:
    have = {(r["cell"], r["target"]) for r in read_jsonl(OUT)}
    lost: list[str] = []
    todo = [(row, t) for row in source_rows(lost) for t in TASKS if t != row["config"]["task"]
            and (row["cell"], t) not in have]
    print(f"{len(todo)} (source run, target) scores to compute", flush=True)
    if lost:
        print(f"{len(lost)} finished GLUE runs have no deltas on this machine and are not scored: "
              "python experiments/rebuild_runs.py makes them again", flush=True)
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        for out in pool.map(_score, todo):
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
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    if not args.summary_only:
        run(args.jobs)
    return summary()


if __name__ == "__main__":
    main()
