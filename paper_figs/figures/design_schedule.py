"""Figure ``design_schedule``: each design's difference from LoRA at the design table's schedule and at twice it.

Source: ``design_schedule.json`` (``experiments/design_schedule.py``): LoRA and the six designs trained again
on SST-2 and CoLA with twice the table's epochs at the table's rates, each design's verdict against LoRA at
both schedules (issue 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from controltune.figures import FigureSpec, new_figure

from ._common import load_json, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "design_schedule.json"
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA"}


def draw(results_dir: Path) -> Figure:
    """One panel per task: per (budget, design) the difference of the means from LoRA at the same budget, with
    ± two standard errors (the verdict's margin), at the table's schedule (grey) and at the longer one (colour)."""
    payload = load_json(results_dir, SOURCE)
    tasks = payload["config"]["tasks"]
    fig = new_figure(4.2 * max(len(tasks), 1), 3.6)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        rows = [r for r in payload["rows"] if r["task"] == task]
        labels = [f"{r['budget']} {r['design']}" for r in rows]
        for offset, (diff, se, name, colour) in enumerate(
                (("table_difference", "table_se", "table's schedule", "tab:gray"),
                 ("difference", "se", f"{payload['config']['factor']}× the epochs", "tab:red"))):
            shown = [(i, r[diff], r[se]) for i, r in enumerate(rows) if r.get(diff) is not None]
            if shown:
                ax.errorbar([i + 0.15 * (2 * offset - 1) for i, _, _ in shown], [d for _, d, _ in shown],
                            yerr=[2 * s for _, _, s in shown], fmt="o", markersize=3, capsize=2, color=colour,
                            label=name)
        ax.axhline(0.0, color="tab:blue", linewidth=0.8, label="LoRA")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        metric = next((c["metric"] for c in payload["cells"] if c["task"] == task and c.get("metric")), "score")
        ax.set(title=TASK_NAMES.get(task, task), ylabel=f"dev {metric}: design − LoRA")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=6, frameon=False)
    return fig


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    factor = payload["config"]["factor"]
    cells = payload["cells"]
    rising = {t: (sum(bool(c.get("rises_at_end")) for c in mine), len(mine)) for t in payload["config"]["tasks"]
              if (mine := [c for c in cells if c["task"] == t and c.get("val_curve")])}
    state = ("complete (3 seeds in every cell, a diverged seed counted)" if payload["complete"] else
             f"running: {sum(c['n_seeds'] for c in cells)} of {3 * len(cells)} runs finished, so every verdict "
             "below is provisional")
    changed = "; ".join(payload["changed"]) or "none"
    gains = payload["gains"]
    return (
        f"Each design's dev score minus LoRA's at the same budget (mean over seeds 0, 1, 2; bars ± two standard "
        f"errors of the difference, the margin of the two-standard-error rule) at the design table's schedule (grey) "
        f"and with {factor}× its epochs (colour; same rows, rates, seeds and evaluation cadence, warm-up and linear "
        "decay stretched), on the tasks where the table's curves rose to their end most. The rates are the table's, "
        f"not chosen again. State: {state}. Wins over LoRA at the longer schedule: {payload['wins']}; verdicts "
        f"against LoRA that differ from the table's: {len(payload['changed'])} of {payload['judged']} judged "
        f"({changed}). Training longer against the table's own cell, per method and budget (same rule): better in "
        f"{gains['better']}, no change in {gains['no change']}, worse in {gains['worse']}"
        + (f", too few seeds in {too_few}" if (too_few := gains.get("too few seeds")) else "")
        + ". Cells whose mean "
        "validation curve is still at its maximum at the last evaluation: "
        + (", ".join(f"{t} {n} of {m}" for t, (n, m) in rising.items()) or "none yet")
        + f". Command: `python experiments/design_schedule.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="design_schedule",
        title="Designs against LoRA at the design table's schedule and at twice its epochs",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/design_schedule.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw"]
