"""Score finished runs' reported deltas on dev again, from their run folders: what rows written before evaluations
reported ``top_class_share`` lack, and a check that each folder holds what its row recorded.

Rows written before 2026-12-04 (CoLA's design table among them) carry no ``top_class_share`` and no
``predicts_one_class``, so a study cannot name the seeds whose deltas give (nearly) one class to every dev row.
Their run folders, while on the machine that trained them, hold the reported deltas (``best.safetensors``, the
best-on-validation ones).  For every such row this script rebuilds the cell without training
(:func:`controltune.sweep.build_cell`: the same data, model, method and design), loads those deltas, scores the
cell's dev rows with the cell's batch size, length and one thread, and appends a row to
``results/rescored.jsonl``: the recorded and the rescored dev scores and whether the task's metric is identical.
A rescore that does not reproduce its row's score exactly is recorded and reported, never merged:
:func:`rate_selection.with_rescored` takes ``top_class_share`` only from identical ones.  Resumable: rows already
rescored are skipped.  No training: a few seconds per row on one thread, design computations included (CoLA's
78 design-table rows took 222 s).

    .venv/bin/python experiments/rescore_runs.py --rows design_table.jsonl --plan
    .venv/bin/python experiments/rescore_runs.py --rows design_table.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from controltune.results import append_jsonl, read_jsonl, stamp
from controltune.run_folder import reported_deltas
from controltune.sweep_spec import cell_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rate_selection import rescored_lacks  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT, RESULTS = HERE.parent, HERE / "results"
OUT = RESULTS / "rescored.jsonl"


def candidates(rows: list[dict[str, Any]], done: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(todo, lost)``: the finished rows lacking ``top_class_share`` and not yet rescored (one per cell), split by
    whether their reported deltas are on this machine."""
    todo, lost, seen = [], [], set(done)
    for row in rows:
        if not rescored_lacks(row) or row["cell"] in seen:
            continue
        seen.add(row["cell"])
        if cell_id(row["config"]) != row["cell"]:
            raise SystemExit(f"row of cell {row['cell']} has a configuration whose id is {cell_id(row['config'])}: "
                             "it was edited after it was written and cannot be rebuilt")
        folder = ROOT / (row.get("run_dir") or "")
        (todo if row.get("run_dir") and reported_deltas(folder).is_file() else lost).append(row)
    return todo, lost


def rescore(row: dict[str, Any]) -> dict[str, Any]:
    """The dev scores of ``row``'s reported deltas, rebuilt and scored in this process with one thread."""
    import torch

    from controltune import checkpoint
    from controltune.evaluation import evaluate
    from controltune.sweep import build_cell
    from controltune.train import finalize

    torch.set_num_threads(1)  # the cells trained and scored with one thread: the same reductions
    config = row["config"]
    start = time.perf_counter()
    cell = build_cell(config)
    checkpoint.load(cell.system, reported_deltas(ROOT / row["run_dir"]))
    finalize(cell.system, config.get("budget"))  # as the run left its reported deltas
    scores = evaluate(cell.system, cell.dev_examples, cell.spec, cell.loaded.tokenizer,
                      config.get("eval_batch_size", 128), config["max_length"])
    metric = row["metric"]
    recorded = row.get("score_at_best_val")
    if recorded is None:
        recorded = row.get("score")
    return {**stamp({"command": "python experiments/rescore_runs.py", "cell_config": config}),
            "cell": row["cell"], "run_dir": row["run_dir"], "metric": metric, "recorded": recorded, "scores": scores,
            "reproduces": scores[metric] == recorded, "difference": scores[metric] - recorded,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", required=True, nargs="+",
                   help="result files under experiments/results whose rows to rescore (e.g. design_table.jsonl)")
    p.add_argument("--plan", action="store_true", help="count the rows to rescore; score none")
    args = p.parse_args(argv)
    rows = []
    for name in args.rows:
        path = RESULTS / name
        if not path.is_file():
            p.error(f"no result file {path}")
        rows += read_jsonl(path)
    todo, lost = candidates(rows, {r["cell"] for r in read_jsonl(OUT)})
    print(f"{len(todo)} rows to rescore, {len(lost)} lacking top_class_share whose run folder is not on this machine",
          flush=True)
    if args.plan:
        return []
    written = []
    for i, row in enumerate(todo, 1):
        result = rescore(row)
        append_jsonl(OUT, result)
        written.append(result)
        c = row["config"]
        print(f"[{i}/{len(todo)}] {c['task']} {c['method']} seed {c['seed']}: recorded {result['recorded']:.6f}, "
              f"rescored {result['scores'][result['metric']]:.6f} "
              f"({'identical' if result['reproduces'] else 'DIFFERENT'}), top class "
              f"{result['scores']['top_class_share']:.3f} ({result['seconds']:.0f} s)", flush=True)
    differ = [r for r in written if not r["reproduces"]]
    if differ:
        print(f"{len(differ)} rescored rows differ from their recorded scores (not merged): "
              + ", ".join(r["cell"] for r in differ), flush=True)
    return written


if __name__ == "__main__":
    main()
