"""How a study judges a claim: cells compared over seeds, scores measured from chance, shares of tests.

A *cell* is ``{mean, std, n_seeds}`` of one configuration's dev scores over seeds.  Two cells differ when their
means are more than two standard errors of the difference apart (:func:`two_se`); a comparison needs
:data:`MIN_SEEDS` scored seeds a side (:func:`judge`), and one whose cells both sit at the majority class is "not a
test" (:func:`both_at_chance`, the level from :func:`glue_majority` or :func:`majority_level`).  A claim that
something happens in a share of the tests counts ties and too-few-seeds comparisons as absence of evidence
(:func:`share_verdict`), and waits for the whole grid (:func:`grid_progress`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """``(mean, sample std)`` (std None below two values; both None for none)."""
    import statistics

    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def glue_majority_rows(results: Path | None = None) -> list[dict[str, Any]]:
    """The majority-class rows of ``glue_table.json`` (``{task, metric, mean, n_dev, ...}`` on the full dev sets;
    empty when the table has not been summarised)."""
    import json

    path = (results or Path(__file__).resolve().parent / "results") / "glue_table.json"
    return json.loads(path.read_text()).get("majority", []) if path.is_file() else []


def glue_majority(results: Path | None = None) -> dict[str, float]:
    """Each GLUE task's dev score (its main metric) of the constant majority-class prediction, from
    ``glue_table.json`` (the full dev sets; empty when the table has not been summarised): the chance level of
    every study scored on the same dev sets."""
    return {r["task"]: float(r["mean"]) for r in glue_majority_rows(results)}


def majority_level(task: str, dev_size: int | None = None, seed: int = 0) -> tuple[str, float]:
    """``(metric, score)`` of the constant majority-class prediction on the dev rows a study scores: all of them
    (``dev_size`` None, as :func:`glue_majority`) or its seeded draw of ``dev_size`` (the ``load_split`` draw the
    cells make with ``data_seed`` = ``seed``)."""
    from controltune.data import load_split, resolve_task
    from controltune.metrics import majority_baseline

    spec = resolve_task(task, holdout_seed=seed)
    dev = load_split(spec, "dev", n=dev_size, seed=seed)
    return spec.metric, majority_baseline(spec, [ex.label for ex in dev])[spec.metric]


def beats_level(cell: dict[str, Any], level: float | None) -> bool | None:
    """Whether a cell ``{mean, std, n_seeds}`` lies above ``level`` by two standard errors,
    ``mean − 2·std/√n > level`` (None below two seeds or without a level)."""
    if level is None or cell.get("mean") is None or cell.get("std") is None or cell.get("n_seeds", 0) < 2:
        return None
    return cell["mean"] - 2 * cell["std"] / cell["n_seeds"] ** 0.5 > level


def both_at_chance(a: dict[str, Any], b: dict[str, Any], level: float | None) -> bool:
    """Whether neither cell beats ``level`` by two standard errors (:func:`beats_level`): a comparison of two cells
    at the majority class is no test of a claim about them."""
    return beats_level(a, level) is False and beats_level(b, level) is False


def one_class_seeds(rows: Iterable[dict[str, Any]]) -> list[int]:
    """The seeds of a cell's finished rows whose reported deltas predict one class for every dev row
    (``predicts_one_class``, recorded since evaluations report ``top_class_share``): a score that is a constant
    prediction's, named in a study's caption rather than averaged in silently."""
    return sorted(int(r["config"]["seed"]) for r in rows if r.get("predicts_one_class"))


NEAR_ONE_CLASS = 0.95
"""A run whose reported deltas give one class to at least this share of the dev rows, but not to all, predicts
nearly a constant (prompt tuning on MRPC: 96.6–97.3 %, at an F1 a hair above the majority class's); named in a
caption beside the one-class runs.  No task here has a majority class above 69 % of its dev rows."""


def near_one_class_seeds(rows: Iterable[dict[str, Any]], share: float = NEAR_ONE_CLASS) -> list[int]:
    """The seeds of a cell's finished rows whose reported deltas (``dev_at_best_val``, else the last step's
    ``scores``) give one class to at least ``share`` of the dev rows but not to every row (those are
    :func:`one_class_seeds`)."""
    def reported(row: dict[str, Any]) -> float | None:
        return (row.get("dev_at_best_val") or row.get("scores") or {}).get("top_class_share")

    return sorted(int(r["config"]["seed"]) for r in rows
                  if not r.get("predicts_one_class") and (s := reported(r)) is not None and share <= s < 1.0)


def grid_progress(cells: list[dict[str, Any]], planned: int, seeds: int = 3) -> dict[str, Any]:
    """How much of a study's grid has every seed finished (scored, or diverged: ``diverged_seeds``; a pair that
    diverged at every rate tried, ``diverged_every_rate``, is finished with none):
    ``{planned, with_all_seeds, complete}``.  A study's verdicts wait for ``complete``: counted over part of its
    grid (a sweep stopped halfway, or its first tasks only) they would read as the claim's."""
    full = sum(1 for c in cells if c.get("diverged_every_rate")
               or (c.get("n_seeds") or 0) + len(c.get("diverged_seeds") or []) >= seeds)
    return {"planned": planned, "with_all_seeds": full, "complete": full >= planned}


MIN_SEEDS = 3
"""Scored seeds a cell needs before a study compares it (issue 15: 3 seeds per cell)."""

TOO_FEW_SEEDS = "too few seeds"
"""The verdict of a comparison whose cells do not both have :data:`MIN_SEEDS` scored seeds (seeds diverged)."""


def judge(a: dict[str, Any] | None, b: dict[str, Any] | None, level: float | None,
          words: dict[int, str]) -> tuple[str | None, float | None]:
    """``(verdict, b − a)`` of two cells ``{mean, std, n_seeds}``: ``words[sign]`` by the two-standard-error rule
    (:func:`two_se`); ``"not a test"`` when both sit at the majority class ``level``; :data:`TOO_FEW_SEEDS` when
    a cell has fewer than :data:`MIN_SEEDS` scored seeds; None when a cell has no score yet."""
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return None, None
    diff = b["mean"] - a["mean"]
    if min(a["n_seeds"], b["n_seeds"]) < MIN_SEEDS:
        return TOO_FEW_SEEDS, diff
    sign = two_se(a, b)[0]
    return ("not a test" if both_at_chance(a, b, level) else words[sign]), diff


def share_verdict(yes: int, no: int, ties: int, share: float, more_than: bool = False) -> bool | None:
    """A claim that ``yes`` happens in at least (``more_than``: more than) ``share`` of the tests, ties being
    absence of evidence: held when the ``yes`` alone reach it; not held when even every tie counted as ``yes``
    does not; None in between, or with no test."""
    n = yes + no + ties
    if not n:
        return None

    def reaches(k: int) -> bool:
        return k > share * n if more_than else k >= share * n

    return True if reaches(yes) else (False if not reaches(yes + ties) else None)


def share_verdict_early(yes: int, no: int, ties: int, untested: int, share: float, more_than: bool = False
                        ) -> bool | None:
    """:func:`share_verdict` before every test has run, decided only where no outcome of the ``untested``
    comparisons (cells still short of their seeds: each may become a test for, against, a tie, or no test) can
    change it: held when the ``yes`` reach the share even if every untested one became a test against it; not
    held when even every tie and every untested one counted for it would not reach it; None otherwise.  With
    ``untested = 0`` it is :func:`share_verdict`."""
    total = yes + no + ties + untested
    if not total:
        return None

    def reaches(k: int, n: int) -> bool:
        return k > share * n if more_than else k >= share * n

    if yes and reaches(yes, total):
        return True
    if not reaches(yes + ties + untested, total):
        return False
    return None


def early_verdict(verdicts: list[str], yes: str, no: str, tie: str, planned: int, share: float,
                  more_than: bool = False) -> bool | None:
    """:func:`share_verdict_early` over a partial grid's comparison ``verdicts``: those saying ``yes``, ``no`` or
    ``tie`` are tests, "not a test" is none, and every other of the ``planned`` comparisons (too few seeds, or not
    run yet) is untested."""
    counted = sum(verdicts.count(k) for k in (yes, no, tie, "not a test"))
    return share_verdict_early(verdicts.count(yes), verdicts.count(no), verdicts.count(tie), planned - counted,
                               share, more_than)


def required_levels(levels: dict[str, float], tasks: Iterable[str]) -> dict[str, float]:
    """``levels`` for every task in ``tasks``, or a clear stop: without a task's majority level every comparison
    at chance would pass for a test."""
    missing = [t for t in tasks if levels.get(t) is None]
    if missing:
        raise SystemExit(f"no majority-class level for {missing}: summarise the GLUE table first "
                         "(python experiments/glue_table.py --summary-only writes glue_table.json)")
    return levels


def two_se(a: dict[str, Any], b: dict[str, Any]) -> tuple[int | None, float | None, float | None]:
    """``(sign, b − a, se)`` by the two-standard-error rule on cells ``{mean, std, n_seeds}``: sign 1 when
    ``b − a > 2·se``, −1 when below ``−2·se``, 0 otherwise, ``se = (s_a²/n_a + s_b²/n_b)^{1/2}``; None below two
    seeds each."""
    import math

    if a["n_seeds"] < 2 or b["n_seeds"] < 2:
        return None, None, None
    diff = b["mean"] - a["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n_seeds"] + b["std"] ** 2 / b["n_seeds"])
    return (1 if diff > 2 * se else -1 if diff < -2 * se else 0), diff, se


def resolution(rows: list[dict[str, Any]], tasks: list[str], baseline: str) -> dict[str, dict[str, Any]]:
    """Per task, what its verdicts against ``baseline`` can resolve: over the rows ``{task, design, baseline,
    budget, difference, se, verdict, n_seeds, baseline_n_seeds}`` against it with :data:`MIN_SEEDS` scored seeds
    on both sides, the margin a win needed, ``2·se`` (:func:`two_se`; smallest, median, largest), and the row with
    the largest difference in the design's favour: ``{task: {n, margin_min, margin_median, margin_max, closest:
    {design, budget, difference, margin, verdict}}}``.  A tie says "closer than the margin", no more."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        mine = [r for r in rows if r["task"] == task and r["baseline"] == baseline and r["se"] is not None
                and min(r["n_seeds"], r["baseline_n_seeds"]) >= MIN_SEEDS]
        if not mine:
            continue
        margins = [2 * r["se"] for r in mine]
        best = max(mine, key=lambda r: r["difference"])
        out[task] = {"n": len(mine), "margin_min": min(margins), "margin_median": statistics.median(margins),
                     "margin_max": max(margins),
                     "closest": {"design": best["design"], "budget": best["budget"],
                                 "difference": best["difference"], "margin": 2 * best["se"],
                                 "verdict": best["verdict"]}}
    return out


def null_win_rate(n_a: int, n_b: int) -> float:
    """The chance that :func:`two_se` calls a win between two equal methods: ``P(T_ν > 2)``, ``ν = n_a + n_b − 2``.

    With normal seed scores of one spread on both sides and ``n_a = n_b = n``, ``se² = (s_a² + s_b²)/n`` is the
    pooled estimate of the difference's variance, so ``(b − a)/se`` is Student's t with ``2n − 2`` degrees of
    freedom and the rule's ``> 2`` is that t beyond 2 (0.058 at 3 seeds a side, against 0.023 for a known
    spread).  With unequal seed counts it is the pooled test's rate, an approximation of the rule's."""
    from scipy.stats import t

    return float(t.sf(2.0, n_a + n_b - 2))


def chance_wins(rows: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """How many wins against ``baseline`` chance alone would give: over the rows ``{baseline, verdict, n_seeds,
    baseline_n_seeds}`` against it judged win, tie or loss, ``{comparisons, wins, expected_wins}`` with
    ``expected_wins = Σ`` :func:`null_win_rate` (were every design equal to the baseline; the comparisons share
    the baseline's seeds, so the wins are not independent, but their expected count is this sum)."""
    tested = [r for r in rows if r["baseline"] == baseline and r["verdict"] in ("win", "tie", "loss")]
    return {"comparisons": len(tested), "wins": sum(r["verdict"] == "win" for r in tested),
            "expected_wins": sum(null_win_rate(r["n_seeds"], r["baseline_n_seeds"]) for r in tested)}


def checkpoint_rule(rows: list[dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per task, whether the verdicts against ``baseline`` hang on which deltas a run reports: each seed's
    dev score at its best validation score (the table's) against at its last step.  Over the rows judged win,
    tie or loss: ``{task: {comparisons, changed: [{budget, design, verdict, verdict_at_end, difference_at_end,
    margin_at_end}]}}``, ``margin_at_end = 2·se`` of the last steps' difference."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["baseline"] != baseline or r["verdict"] not in ("win", "tie", "loss"):
            continue
        entry = out.setdefault(r["task"], {"comparisons": 0, "changed": []})
        entry["comparisons"] += 1
        if r["verdict_at_end"] != r["verdict"]:
            entry["changed"].append({"budget": r["budget"], "design": r["design"], "verdict": r["verdict"],
                                     "verdict_at_end": r["verdict_at_end"],
                                     "difference_at_end": r["difference_at_end"],
                                     "margin_at_end": None if r["se_at_end"] is None else 2 * r["se_at_end"]})
    return out
