"""Do the design table's close calls hold on new seeds? (issue 18: one win over LoRA, about what chance gives)

At 3 seeds a side the table's two-standard-error rule calls a win between equal methods with probability 0.058
(:func:`verdicts.null_win_rate`), and the table's one win over LoRA (the recommender on MRPC at b18k) becomes a tie
when each seed reports its last step instead of its best validation score.  This study trains the close calls
again on five new seeds, 3 to 7: every comparison against LoRA on a complete task of the table where the design's
mean is above LoRA's by at least :data:`CLOSE_SE` standard errors of the difference (both at the majority class:
no test), the design and LoRA at that task and budget, each at the rate the table's selection chose, on the
table's harness.

Decided before any row ran: the pairs are chosen by the rule above from ``design_table.json``; the answer is the
verdict on the new seeds alone (the table's seeds chose the pairs, so a verdict pooling them would carry the
selection's luck: a confirmation, not a re-estimate), by the same rule (at 5 seeds a side chance gives a win with
probability 0.040); the eight seeds pooled are reported beside it.  On the table of 2026-12-05 (SST-2, MRPC, CoLA
complete) the rule picks 5 comparisons in 8 (task, budget, method) pairs: 40 cells, ~3.5 core-hours.

    nohup .venv/bin/python experiments/design_seeds.py > experiments/results/design_seeds.log 2>&1 &
    .venv/bin/python experiments/design_seeds.py --plan          # the comparisons, cells and estimated time
    .venv/bin/python experiments/design_seeds.py --summary-only  # rewrite design_seeds.json from the rows
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import read_jsonl, stamp, write_json_unless_same
from controltune.sweep_spec import SweepSpec, parse_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from design_table import BUDGETS, pair_key, pair_where, spec_data, verdict  # noqa: E402
from design_table import SUMMARY as TABLE_SUMMARY  # noqa: E402
from design_table import TABLE_OUT as TABLE_ROWS  # noqa: E402
from design_variant import study_main, table_rates  # noqa: E402
from rate_selection import at_chosen_rates, completed_rows  # noqa: E402
from verdicts import MIN_SEEDS, chance_wins, mean_std  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT, SUMMARY = RESULTS / "design_seeds.jsonl", RESULTS / "design_seeds.json"
SEEDS = [3, 4, 5, 6, 7]
"""The new seeds (the table's are 0, 1, 2)."""
CLOSE_SE = 1.0
"""A comparison is a close call when the design's mean exceeds LoRA's by at least this many standard errors."""
Pair = tuple[str, str, str]


def close_calls(table: dict[str, Any], close_se: float = CLOSE_SE) -> list[dict[str, Any]]:
    """The table's comparisons against LoRA to train again: on its complete tasks, judged win, tie or loss, not
    both at the majority class, with ``difference ≥ close_se · se``: ``[{task, budget, design, difference, se,
    verdict}]``."""
    return [{k: r[k] for k in ("task", "budget", "design", "difference", "se", "verdict")}
            for r in table["rows"]
            if r["baseline"] == "lora" and r["task"] in table["complete_tasks"] and not r.get("at_chance")
            and r["verdict"] in ("win", "tie", "loss") and r["difference"] >= close_se * r["se"]]


def pairs_of(calls: list[dict[str, Any]]) -> list[Pair]:
    """The (task, budget, label) pairs the close calls train: each design and LoRA at its task and budget."""
    found = {(c["task"], c["budget"], label) for c in calls for label in ("lora", c["design"])}
    return sorted(found)


def spec(pairs: Sequence[Pair], chosen: dict) -> SweepSpec:
    """Seeds :data:`SEEDS` of ``pairs`` at the table's chosen rates: the table's spec on their tasks, budgets and
    labels, every (task, budget, label) not among ``pairs`` excluded."""
    tasks = tuple(sorted({p[0] for p in pairs}))
    budgets = tuple(b for b in BUDGETS if any(p[1] == b for p in pairs))
    labels = {p[2] for p in pairs}
    data = spec_data(tasks, budgets, SEEDS, "design_seeds", OUT.name)
    settings = {(b, label): BUDGETS[b][label] for b in budgets for label in labels}
    data["grid"]["method"] = sorted({m for m, _, _ in settings.values()})
    data["per_method"] = {m: {"options": [o for mm, o, _ in settings.values() if mm == m],
                              "lr": sorted({chosen[p]["lr"] for p in pairs if BUDGETS[p[1]][p[2]][0] == m})}
                          for m in data["grid"]["method"]}
    data = at_chosen_rates(data, chosen, list(pairs), pair_where)
    data["exclude"] = data["exclude"] + [pair_where((t, b, label)) for t in tasks for b, label in settings
                                         if (t, b, label) not in pairs]
    return parse_spec(data, "design_seeds", RESULTS)


def seed_scores(rows: list[dict[str, Any]], pair: Pair, lr: float | None, key: str = "score_at_best_val"
                ) -> dict[int, float]:
    """``{seed: dev score}`` of the finished rows of ``pair`` at rate ``lr``: at the best validation score
    (``score_at_best_val``, the table's report) or at the last step (``score``)."""
    return {int(r["config"]["seed"]): r[key] for r in rows
            if r.get("status") == "done" and pair_key(r) == pair and float(r["config"]["lr"]) == lr
            and r.get(key) is not None}


def cell(scores: dict[int, float]) -> dict[str, Any]:
    """``{mean, std, n_seeds, seeds}`` over the seeds' scores."""
    mean, std = mean_std([scores[s] for s in sorted(scores)])
    return {"mean": mean, "std": std, "n_seeds": len(scores), "seeds": sorted(scores)}


def judged(call: dict[str, Any], new: dict[Pair, dict[int, float]], old: dict[Pair, dict[int, float]],
           new_at_end: dict[Pair, dict[int, float]] | None = None) -> dict[str, Any]:
    """One close call on the new seeds (the answer), on all seeds pooled and, with ``new_at_end``, on the new
    seeds scored at their last step, beside the table's verdict."""
    d, lora = (call["task"], call["budget"], call["design"]), (call["task"], call["budget"], "lora")
    out = {**{k: call[k] for k in ("task", "budget", "design")}, "baseline": "lora",
           "table_difference": call["difference"], "table_se": call["se"], "table_verdict": call["verdict"]}
    series = [("new", new), ("pooled", {p: {**old.get(p, {}), **new.get(p, {})} for p in (d, lora)})]
    if new_at_end is not None:
        series.append(("new_at_end", new_at_end))
    for name, scores in series:
        a, b = cell(scores.get(d, {})), cell(scores.get(lora, {}))
        v, diff, se = verdict(a, b) if min(a["n_seeds"], b["n_seeds"]) >= 2 else (None, None, None)
        out[name] = {"design": a, "lora": b, "difference": diff, "se": se, "verdict": v}
    return out


def summary(pairs: Sequence[Pair] | None = None) -> dict[str, Any]:
    """``design_seeds.json``: the close calls, each judged on the new seeds and on all seeds pooled."""
    table = json.loads(TABLE_SUMMARY.read_text())
    calls = close_calls(table)
    chosen = {(c["task"], c["budget"], c["method"]): c["lr"] for c in table["cells"]}
    rows = read_jsonl(OUT) if OUT.is_file() else []
    table_rows = completed_rows(TABLE_ROWS)
    mine = pairs_of(calls) if pairs is None else list(pairs)
    new = {p: seed_scores(rows, p, chosen.get(p)) for p in mine}
    old = {p: seed_scores(table_rows, p, chosen.get(p)) for p in mine}
    at_end = {p: seed_scores(rows, p, chosen.get(p), "score") for p in mine}
    verdicts = [judged(c, new, old, at_end) for c in calls]
    finished = {p: {int(r["config"]["seed"]) for r in rows if r.get("status") in ("done", "diverged")
                    and pair_key(r) == p and float(r["config"]["lr"]) == chosen.get(p)} for p in mine}
    complete = all(finished[p] >= set(SEEDS) for p in mine)  # a diverged seed is finished, not scored
    answer = [{**{k: v[k] for k in ("task", "budget", "design")}, "baseline": "lora", "verdict": v["new"]["verdict"],
               "n_seeds": v["new"]["design"]["n_seeds"], "baseline_n_seeds": v["new"]["lora"]["n_seeds"]}
              for v in verdicts]
    payload = {**stamp({"seeds": SEEDS, "close_se": CLOSE_SE, "pairs": [list(p) for p in mine],
                        "harness": "the design table's (experiments/glue_select.yaml settings), at its chosen rates",
                        "command": "python experiments/design_seeds.py"}),
               "rows": verdicts, "complete": complete,
               "confirmed_wins": [f"{v['task']}/{v['budget']} {v['design']}" for v in verdicts
                                  if v["new"]["verdict"] == "win"],
               "chance": chance_wins([a for a in answer if min(a["n_seeds"], a["baseline_n_seeds"]) >= MIN_SEEDS],
                                     "lora")}
    write_json_unless_same(SUMMARY, payload)
    return payload


def sweep() -> SweepSpec:
    """The study's sweep on the current design table."""
    table = json.loads(TABLE_SUMMARY.read_text())
    pairs = pairs_of(close_calls(table))
    if not pairs:
        raise SystemExit("no close call in design_table.json: nothing to train again")
    return spec(pairs, table_rates())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return study_main(argv, doc=__doc__ or "", runs="runs/design_seeds", out=OUT, sweep=sweep, summary=summary,
                      what="the table's close calls against LoRA, seeds 3-7, at the table's rates")


if __name__ == "__main__":
    main()
