"""Figure ``design_seeds``: the design table's close calls against LoRA on the table's seeds, on five new seeds
(the answer) and on all seeds pooled.

Source: ``design_seeds.json`` (``experiments/design_seeds.py``): every comparison against LoRA on a complete task
where the design's mean was at least one standard error above LoRA's, trained again on seeds 3 to 7 (issue 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import chance_text, load_json, versions_line
from ._variant import TASK_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "design_seeds.json"
SERIES = (("table", "the table's seeds 0-2", "tab:gray"), ("new", "new seeds 3-7 (the answer)", "tab:red"),
          ("pooled", "seeds 0-7 pooled", "black"))


def points(row: dict[str, Any], which: str) -> tuple[float, float] | None:
    """``(difference, se)`` of one close call on ``which`` seeds (``table``, ``new`` or ``pooled``), None when not
    judged yet."""
    if which == "table":
        return row["table_difference"], row["table_se"]
    found = row[which]
    return None if found["difference"] is None else (found["difference"], found["se"])


def draw(results_dir: Path) -> Figure:
    """Each close call's difference from LoRA (design − LoRA, dev score) with ± two standard errors, the margin of
    the two-standard-error rule, on the table's seeds, the new seeds and all seeds pooled."""
    payload = load_json(results_dir, SOURCE)
    rows = payload["rows"]
    fig = new_figure(max(4.0, 1.3 * len(rows) + 1.5), 3.6)
    ax = fig.subplots()
    for k, (which, name, colour) in enumerate(SERIES):
        shown = [(i, p) for i, r in enumerate(rows) if (p := points(r, which)) is not None]
        if shown:
            ax.errorbar([i + 0.18 * (k - 1) for i, _ in shown], [p[0] for _, p in shown],
                        yerr=[2 * p[1] for _, p in shown], fmt="o", markersize=3, capsize=2, color=colour, label=name)
    ax.axhline(0.0, color="tab:blue", linewidth=0.8, label="LoRA")
    ax.set_xticks(range(len(rows)), [f"{TASK_NAMES.get(r['task'], r['task'])} {r['budget']}\n{r['design']}"
                                     for r in rows], fontsize=6)
    ax.set(ylabel="dev score: design − LoRA", title="close calls on new seeds")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=6, frameon=False)
    return fig


def _call(row: dict[str, Any]) -> str:
    """``MRPC/b18k recommended_lora: table win (+0.009 against 0.009), new seeds tie (+0.002 against 0.008, 5 and 5
    seeds), pooled tie (...)``."""
    def said(which: str) -> str:
        p = points(row, which)
        if p is None:
            return "not judged yet"
        verdict = row["table_verdict"] if which == "table" else row[which]["verdict"]
        seeds = "" if which == "table" else (f", {row[which]['design']['n_seeds']} and {row[which]['lora']['n_seeds']}"
                                            " seeds")
        return f"{verdict} ({p[0]:+.3f} against {2 * p[1]:.3f}{seeds})"

    return (f"{TASK_NAMES.get(row['task'], row['task'])}/{row['budget']} {row['design']}: table {said('table')}, "
            f"new seeds {said('new')}, pooled {said('pooled')}"
            + (f", new seeds at their last step {said('new_at_end')}" if "new_at_end" in row else ""))


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    state = "complete (5 new seeds in every cell)" if payload["complete"] else (
        "running, so every verdict on the new seeds is provisional")
    confirmed = ", ".join(payload["confirmed_wins"]) or "none"
    return (
        "The design table's close calls against LoRA (on a complete task, the design's mean at least "
        f"{payload['config']['close_se']:g} standard error of the difference above LoRA's) trained again, design and "
        "LoRA, on seeds 3 to 7 at the table's rates on the table's harness. Points: design − LoRA (dev score at each "
        "seed's best validation score), bars ± two standard errors (the rule's margin). Decided before any row ran: "
        "the answer is the verdict on the new seeds alone (the table's seeds chose these comparisons); the pooled "
        "verdict, and the new seeds scored at their last step instead of their best validation score, are reported "
        f"beside it. State: {state}. "
        + "; ".join(_call(r) for r in payload["rows"])
        + f". Wins confirmed on the new seeds: {confirmed}."
        + chance_text(payload.get("chance"))
        + f" Command: `python experiments/design_seeds.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="design_seeds",
        title="The design table's close calls on new seeds",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/design_seeds.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw", "points"]
