"""Drawing shared by the design-table variants (``design_schedule``, ``design_probe``): each design's difference
from LoRA in the table and in the variant, one panel per task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controltune.figures import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA"}


def draw_differences(payload: dict[str, Any], variant: str) -> Figure:
    """One panel per task: per (budget, design) the difference of the means from LoRA at the same budget, with
    ± two standard errors (the verdict's margin), in the design table (grey) and in the variant (colour, LoRA
    under the same change), from a variant's summary (``rows`` with ``difference``/``se`` and
    ``table_difference``/``table_se``)."""
    tasks = payload["config"]["tasks"]
    fig = new_figure(4.2 * max(len(tasks), 1), 3.6)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        rows = [r for r in payload["rows"] if r["task"] == task]
        labels = [f"{r['budget']} {r['design']}" for r in rows]
        for offset, (diff, se, name, colour) in enumerate(
                (("table_difference", "table_se", "design table", "tab:gray"),
                 ("difference", "se", variant, "tab:red"))):
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


def state_note(payload: dict[str, Any]) -> str:
    """``complete (...)`` or ``running: n of N runs finished, so every verdict below is provisional``."""
    cells = payload["cells"]
    return ("complete (3 seeds in every cell, a diverged seed counted)" if payload["complete"] else
            f"running: {sum(c['n_seeds'] for c in cells)} of {3 * len(cells)} runs finished, so every verdict "
            "below is provisional")


def gains_note(gains: dict[str, int]) -> str:
    """``better in 1, no change in 4, worse in 1`` (and too few seeds, when any)."""
    return (f"better in {gains['better']}, no change in {gains['no change']}, worse in {gains['worse']}"
            + (f", too few seeds in {too_few}" if (too_few := gains.get("too few seeds")) else ""))
