"""The generalisation gap (issue 15; Ding et al. 2023), judged from the rows the GLUE table and the composability
study already have: nothing is trained here.

The gap of a run is the task metric on 1,000 seeded rows it was trained on minus its dev score (the deltas it
reports, ``train_scores`` in its row); a cell's gap is the mean over the seeds that have it.  The paper's claims,
each by two standard errors over seeds (:func:`verdicts.judge`: 3 scored seeds a side, "too few seeds" otherwise;
ties and too few seeds are absence of evidence, :func:`verdicts.share_verdict`):

* every single delta method's gap is smaller than full fine-tuning's: per task, each single method against full
  fine-tuning on the same task (the metrics differ across tasks, so no mean over them); held when every pair is
  smaller, not held when one is larger;
* prompt tuning's is the smallest: per task, no single method's gap below prompt's; held on every task, not held
  when it fails on one;
* combinations widen it: a combination's gap (composability study) against the largest gap of its parts alone on
  the same task (GLUE table); held when wider in more than half of the (task, combination) pairs, judged once the
  composability grid is complete.

``results/generalization_gap.json``; refreshed by the GLUE table's and the composability study's summaries.

    .venv/bin/python experiments/generalization_gap.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from controltune.results import stamp, write_json_unless_same

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verdicts import TOO_FEW_SEEDS, early_verdict, judge, share_verdict  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SUMMARY = RESULTS / "generalization_gap.json"
SINGLE = ("lora", "adapter", "prefix", "prompt", "bitfit")
"""The GLUE table's single delta methods (full fine-tuning is the reference)."""
PLANNED_COMBINATIONS = 4 * 4
"""(task, combination) pairs of the complete composability grid: 4 tasks × the 4 subsets of two or three parts."""


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def single_gaps(glue: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {method: {mean, std, n_seeds}}}``: each GLUE cell's gap over the seeds whose training rows were
    scored (``generalization_gap``, ``generalization_gap_std``, ``n_train_scored`` of ``glue_table.json``)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in glue.get("rows", []):
        if row.get("generalization_gap") is not None:
            out.setdefault(row["task"], {})[row["method"]] = {
                "mean": row["generalization_gap"], "std": row.get("generalization_gap_std"),
                "n_seeds": row.get("n_train_scored", 0)}
    return out


def combination_gaps(combo: dict[str, Any] | None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {combination: {mean, std, n_seeds}}}`` of the composability study's combinations that have a gap."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for c in (combo or {}).get("cells", []):
        if "+" in c["subset"] and c.get("gap_mean") is not None:
            out.setdefault(c["task"], {})[c["subset"]] = {"mean": c["gap_mean"], "std": c.get("gap_std"),
                                                          "n_seeds": c.get("n_gap", 0)}
    return out


def against_full(single: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per task with full fine-tuning's gap: each single method's gap against it, "smaller" / "larger" by two
    standard errors, "tie" within, :data:`verdicts.TOO_FEW_SEEDS` below 3 scored seeds on either side."""
    out = []
    for task, gaps in single.items():
        if "full" not in gaps:
            continue
        for method in (m for m in SINGLE if m in gaps):
            verdict, diff = judge(gaps["full"], gaps[method], None, {1: "larger", -1: "smaller", 0: "tie"})
            out.append({"task": task, "method": method, "gap": gaps[method]["mean"], "full_gap": gaps["full"]["mean"],
                        "difference": diff, "verdict": verdict})
    return out


def prompt_smallest(single: dict[str, dict[str, dict[str, Any]]]) -> dict[str, bool | None]:
    """Per task: whether prompt tuning's gap is the smallest of the single methods — False when another's lies
    below it by two standard errors, True when none does and every comparison has its seeds, None otherwise."""
    out = {}
    for task, gaps in single.items():
        if "prompt" not in gaps:
            continue
        verdicts = [judge(gaps["prompt"], gaps[m], None, {1: "above", -1: "below", 0: "tie"})[0]
                    for m in SINGLE if m != "prompt" and m in gaps]
        out[task] = (False if "below" in verdicts else
                     None if not verdicts or TOO_FEW_SEEDS in verdicts or None in verdicts else True)
    return out


def widening(single: dict[str, dict[str, dict[str, Any]]], combos: dict[str, dict[str, dict[str, Any]]]
             ) -> list[dict[str, Any]]:
    """Per (task, combination): its gap against the largest gap of its parts alone on the same task, "wider" /
    "narrower" by two standard errors, "tie" within, :data:`verdicts.TOO_FEW_SEEDS` below 3 scored seeds."""
    out = []
    for task, gaps in combos.items():
        for combination, gap in gaps.items():
            parts = [single.get(task, {}).get(p) for p in combination.split("+")]
            if None in parts:
                continue
            top = max(parts, key=lambda g: g["mean"])
            verdict, diff = judge(top, gap, None, {1: "wider", -1: "narrower", 0: "tie"})
            out.append({"task": task, "combination": combination, "gap": gap["mean"], "parts_max": top["mean"],
                        "difference": diff, "verdict": verdict})
    return out


def _count(items: list[dict[str, Any]], kinds: tuple[str, ...]) -> dict[str, int]:
    return {k: sum(i["verdict"] == k for i in items) for k in kinds}


def summary(results: Path = RESULTS) -> dict[str, Any] | None:
    """Write ``generalization_gap.json`` beside its inputs, ``glue_table.json`` and, when it exists,
    ``composability.json`` (in ``results``); None (nothing written) before the GLUE table has a summary."""
    glue = _load(results, "glue_table.json")
    if glue is None:
        return None
    combo = _load(results, "composability.json")
    single, combos = single_gaps(glue), combination_gaps(combo)
    pairs, smallest, wide = against_full(single), prompt_smallest(single), widening(single, combos)
    c_pairs = _count(pairs, ("smaller", "tie", "larger", TOO_FEW_SEEDS))
    c_wide = _count(wide, ("wider", "tie", "narrower", TOO_FEW_SEEDS))
    progress = (combo or {}).get("progress")
    combos_complete = bool(progress and progress.get("complete"))
    claims = {
        "single_smaller_than_full": share_verdict(c_pairs["smaller"], c_pairs["larger"],
                                                  c_pairs["tie"] + c_pairs[TOO_FEW_SEEDS], 1.0),
        "prompt_smallest": (None if not smallest else False if False in smallest.values()
                            else True if all(smallest.values()) else None),
        # judged once every combination cell has its seeds, or earlier where the (task, combination) pairs still
        # to run cannot change it: a partial grid's count alone would read as the claim's
        "combinations_widen": share_verdict(c_wide["wider"], c_wide["narrower"],
                                            c_wide["tie"] + c_wide[TOO_FEW_SEEDS], 0.5, more_than=True)
        if combos_complete else early_verdict([w["verdict"] for w in wide], "wider", "narrower", "tie",
                                              PLANNED_COMBINATIONS, 0.5, more_than=True)}
    payload = {**stamp({"sources": ["glue_table.json", "composability.json"], "single": list(SINGLE),
                        "command": "python experiments/generalization_gap.py"}),
               "single": single, "combinations": combos, "against_full": pairs, "against_full_counts": c_pairs,
               "prompt_smallest": smallest, "widening": wide, "widening_counts": c_wide,
               "composability_progress": progress, "claims": claims,
               "decided_early": {"combinations_widen": not combos_complete
                                 and claims["combinations_widen"] is not None}}
    write_json_unless_same(results / SUMMARY.name, payload)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    payload = summary()
    if payload is None:
        raise SystemExit("no glue_table.json yet: python experiments/glue_table.py --summary-only writes it")
    print(json.dumps(payload["claims"]))
    return payload


if __name__ == "__main__":
    main()
