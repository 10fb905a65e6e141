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
of mean dev scores, each entry with whether it beats the target's majority class (two standard errors over seeds)
and its *gain share* ``(score − majority) / (in-task − majority)``: how much of the target's own gain over chance the
transferred delta keeps (None where the method does not learn the target in-task: no test).  The claim is judged
per (method, target) the method learns: the same-kind source's transferred score against the cross-kind sources'
on that target, by two standard errors (:func:`paired_kinds`; one target shares its majority level and in-task
gain on both sides, so no ratio's small denominator swings it), and held when the same-kind source wins in more
than half of those pairs (:func:`kinds_verdict`; a pair where it keeps no gain at all counts against), only once
every source is scored.

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
from cost_model import cell_seconds  # noqa: E402
from rate_selection import (  # noqa: E402
    choose_lrs,
    rebuild_cells,
    reproduces,
    task_method,
)
from verdicts import (  # noqa: E402
    TOO_FEW_SEEDS,
    beats_level,
    glue_majority,
    judge,
    mean_std,
    share_verdict,
    two_se,
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


def scored() -> set[tuple[str, str]]:
    """The (source cell, target) pairs with a row in ``transfer.jsonl``."""
    return {(r["cell"], r["target"]) for r in read_jsonl(OUT)}


def pending(sources: list[dict[str, Any]], have: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """The sources with a target not in ``have`` (:func:`scored`)."""
    return [row for row in sources if any((row["cell"], t) not in have for t in targets_of(row))]


def run(jobs: int, sweep: dict[str, Any]) -> None:
    """Score every pending source on its targets, ``jobs`` sources at a time, rebuilding a source first where its
    deltas are not on this machine."""
    have = scored()
    recorded = {r["cell"] for r in read_jsonl(REBUILT_OUT) if r.get("status") == "done"}
    # sources never rebuilt first (their rebuilt rows also give convergence its curves and the gap its training-row
    # scores), and by recorded time, so the two cells in hand take about as long as each other
    todo = sorted(pending(source_rows(), have), key=lambda r: (r["cell"] in recorded, cell_seconds(r) or 0.0))
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


def majority_levels() -> dict[str, float]:
    """Each task's chance level: the GLUE table's majority-class score on the same full dev sets."""
    return {t: v for t, v in glue_majority(RESULTS).items() if t in TASKS}


def gain_share(mean: float | None, own: dict[str, Any], level: float) -> float | None:
    """``(mean − level) / (own − level)``: the share of the target's in-task gain over the majority class that a
    transferred score keeps; None where the in-task score does not beat the level by two standard errors (a
    target the method does not learn is no test of transfer to it: any chance-level predictor keeps "all" of it).

    A ratio of raw scores is no measure here: a constant "equivalent" prediction scores MRPC F1 0.81 against
    in-task scores near 0.86, and RTE's in-task accuracies sit at its majority level."""
    if mean is None or own.get("mean") is None or not beats_level(own, level):
        return None
    return (mean - level) / (own["mean"] - level)


def _pooled(shares: list[float]) -> dict[str, Any]:
    """Mean, std and median of gain shares; the median, since a barely learnt target's small denominator makes a
    share of ±several that moves the mean."""
    import statistics

    mean, std = mean_std(shares)
    return {"mean": mean, "std": std, "median": statistics.median(shares) if shares else None, "n": len(shares)}


def _cell(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n_seeds": len(values)}


NO_TRANSFER = "no transfer within kind"
"""A pair whose same-kind source keeps no gain over the target's majority class by two standard errors: the claim's
first half (deltas transfer within their kind) fails there, whatever the cross-kind sources do."""


def paired_kinds(rows: list[dict[str, Any]], own: dict[tuple[str, str], dict[str, Any]], levels: dict[str, float]
                 ) -> list[dict[str, Any]]:
    """Per (method, target) the target learns in-task: the same-kind source's transferred gain over the target's
    majority class, ``max(0, score − majority)`` per run, against the cross-kind sources' (per seed, the mean of
    the two), by the two-standard-error rule.

    On one target both sides share the target's majority level and in-task gain, so the comparison needs no
    ratio: a gain share divides by the in-task gain, which for a barely learnt target (MRPC F1 0.819 against a
    majority 0.812) turns a small miss into a share of −3 that would swing a pooled mean.  A score below the
    majority class counts as no gain, as one at it: on MRPC's F1 a constant "equivalent" scores the majority
    level, so a delta whose predictions carry the wrong task's signal would otherwise lose to a constant.
    Verdicts: :data:`NO_TRANSFER` when the same-kind gain does not beat 0 by two standard errors, else "same kind
    better" / "cross kind better" / "tie"; :data:`verdicts.TOO_FEW_SEEDS` below 3 seeds a side."""
    by: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in rows:
        level = levels.get(r["target"])
        if level is not None:
            by.setdefault((r["method"], r["source"], r["target"]), {})[r["seed"]] = max(0.0, r["score"] - level)
    pairs = []
    for method, target in sorted({(r["method"], r["target"]) for r in rows}):
        level = levels.get(target)
        if level is None or not beats_level(own.get((method, target), {}), level):
            continue  # a target the method does not learn is no test of transfer to it
        same = [s for s in TASKS if s != target and KIND[s] == KIND[target]]
        cross = [s for s in TASKS if KIND[s] != KIND[target]]
        same_vals = [v for s in same for v in by.get((method, s, target), {}).values()]
        seeds = set.intersection(*(set(by.get((method, s, target), {})) for s in cross))
        cross_vals = [mean_std([by[(method, s, target)][k] for s in cross])[0] for k in sorted(seeds)]
        a, b = _cell(cross_vals), _cell(same_vals)
        verdict, diff = judge(a, b, None, {1: "same kind better", -1: "cross kind better", 0: "tie"})
        if verdict not in (None, TOO_FEW_SEEDS) and not beats_level(b, 0.0):
            verdict = NO_TRANSFER  # the claim's first half: within its kind a delta keeps some gain
        se = two_se(a, b)[2]
        pairs.append({"method": method, "target": target, "same_kind": {**b, "sources": same},
                      "cross_kind": {**a, "sources": cross}, "difference": diff, "se": se, "verdict": verdict})
    return pairs


def kinds_verdict(pairs: list[dict[str, Any]], complete: bool) -> bool | None:
    """Deltas transfer within their kind and poorly across it, by :func:`verdicts.share_verdict` over the judged
    (method, target) pairs: for it, "same kind better"; against it, "cross kind better" and :data:`NO_TRANSFER`
    (nothing kept within the kind); ties and too few seeds are absence of evidence.  Held when the pairs for it are
    more than half; None before every source is scored."""
    judged = [p["verdict"] for p in pairs if p["verdict"] is not None]
    if not complete or not judged:
        return None
    wins = judged.count("same kind better")
    losses = judged.count("cross kind better") + judged.count(NO_TRANSFER)
    return share_verdict(wins, losses, len(judged) - wins - losses, 0.5, more_than=True)


def summary() -> dict[str, Any]:
    rows = read_jsonl(OUT)
    levels = majority_levels()
    own_scores: dict[tuple[str, str], list[float]] = {}
    for row in source_rows():
        own_scores.setdefault(task_method(row)[::-1], []).append(row["score_at_best_val"])
    own = {key: dict(zip(("mean", "std"), mean_std(v)), n_seeds=len(v)) for key, v in own_scores.items()}
    matrix = []
    shares: dict[str, list[float]] = {"same kind": [], "cross kind": []}
    above: dict[str, list[bool]] = {"same kind": [], "cross kind": []}
    for method in METHODS:
        for source in TASKS:
            for target in TASKS:
                if source == target:
                    vals = own_scores.get((method, source), [])
                else:
                    vals = [r["score"] for r in rows if (r["method"], r["source"], r["target"]) ==
                            (method, source, target)]
                cell = _cell(vals)
                level = levels.get(target)
                target_own = own.get((method, target), {})
                share = None if level is None else gain_share(cell["mean"], target_own, level)
                base = target_own.get("mean")
                entry = {"method": method, "source": source, "target": target, **cell,
                         "relative": cell["mean"] / base if cell["mean"] is not None and base else None,
                         "majority": level, "beats_majority": None if level is None or cell["mean"] is None
                         else beats_level(cell, level), "gain_share": share}
                matrix.append(entry)
                if source != target:
                    kind = "same kind" if KIND[source] == KIND[target] else "cross kind"
                    if share is not None:
                        shares[kind].append(share)
                    if entry["beats_majority"] is not None:
                        above[kind].append(entry["beats_majority"])
    kinds = {k: {**_pooled(v), "beats_majority": sum(above[k]), "judged": len(above[k])}
             for k, v in shares.items()}
    sources = source_rows()
    complete = bool(sources) and not pending(sources, scored())
    pairs = paired_kinds(rows, own, levels)
    untested = sorted({(m["method"], m["target"]) for m in matrix if m["source"] != m["target"]
                       and m["gain_share"] is None and m["mean"] is not None})
    payload = {**stamp({"tasks": list(TASKS), "methods": list(METHODS), "label_map": LABEL_MAP, "kind": KIND,
                        "majority": levels, "command": "python experiments/transfer.py"}),
               "matrix": matrix, "kinds": kinds, "pairs": pairs,
               "sources": len(sources), "sources_scored": len(sources) - len(pending(sources, scored())),
               "complete": complete,
               "targets_not_learnt": [{"method": m, "target": t} for m, t in untested],
               "sources_rebuilt": len({r["cell"] for r in rows if r.get("source_rebuilt")}),
               "sources_not_reproduced": sorted({r["cell"] for r in rows if r.get("source_reproduces") is False}),
               "claim_holds": kinds_verdict(pairs, complete)}
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
        todo = pending(sources, scored())
        lost = [r for r in todo if not has_deltas(r)]
        hours = sum(cell_seconds(r) or 0.0 for r in lost) / 3600
        print(f"{len(sources)} source runs, {len(todo)} with scores to compute; {len(lost)} of those to train again "
              f"first ({hours:.1f} core-hours by their recorded times, scoring aside)")
        return {"sources": len(sources), "pending": len(todo), "rebuild": len(lost), "rebuild_core_hours": hours}
    if not args.summary_only:
        # rebuilt cells go back to the folders their rows name, ``jobs`` side by side with one thread each
        run(args.jobs, {"cpus_per_cell": 1, "cpus": max(1, args.jobs), "executor": args.executor,
                        "address": args.address})
    return summary()


if __name__ == "__main__":
    main()
