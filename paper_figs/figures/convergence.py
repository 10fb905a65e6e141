"""Figure ``convergence``: validation score against training step per method, from the GLUE table's runs (issue 15).

Source: ``convergence.json`` (``experiments/convergence.py``): per (task, method) at its chosen rate the mean
validation curve over the seeds whose run folders were found, the majority-class level, and the level of 90 %
of full fine-tuning's gain over it; the orders claimed by the Delta Tuning paper and measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import load_json, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "convergence.json"
TASKS = (("sst2", "SST-2"), ("mrpc", "MRPC"), ("rte", "RTE"), ("cola", "CoLA"))
COLOURS = {"full": "tab:gray", "lora": "tab:blue", "adapter": "tab:orange", "prefix": "tab:green",
           "prompt": "tab:purple", "bitfit": "tab:red"}


def _rows(payload: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return [r for r in payload["rows"] if r["task"] == task]


def draw(results_dir: Path) -> Figure:
    """Two rows of panels, one column per task with curves: validation score against training step (top) and
    against wall time (bottom: each evaluation's step times the method's mean seconds per step over its seeds),
    the majority and common levels as horizontal lines."""
    payload = load_json(results_dir, SOURCE)
    tasks = [(t, name) for t, name in TASKS if _rows(payload, t)]
    fig = new_figure(3.6 * max(len(tasks), 1), 5.8)
    axes = fig.subplots(2, max(len(tasks), 1), squeeze=False)
    for column, (task, name) in enumerate(tasks):
        rows = _rows(payload, task)
        seeds = sorted({r["n_seeds"] for r in rows})
        common = next((r.get("common_level") for r in rows if r.get("common_level") is not None), None)
        for ax, seconds in ((axes[0][column], False), (axes[1][column], True)):
            for r in rows:
                x = [s * r["seconds_per_step"] for s in r["steps"]] if seconds else r["steps"]
                ax.plot(x, r["mean_val"], marker="o", markersize=2.5, color=COLOURS.get(r["method"], "black"),
                        linewidth=2.0 if r["method"] == "full" else 1.2, label=r["method"])
            ax.axhline(rows[0]["majority"], color="black", linestyle=":", linewidth=0.8, label="majority class")
            if common is not None:
                ax.axhline(common, color="black", linestyle="--", linewidth=0.8, label="90 % of full FT's gain")
            ax.set(xlabel="wall time (s)" if seconds else "training step",
                   ylabel="validation score" if column == 0 else None)
            ax.grid(True, alpha=0.3)
        axes[0][column].set_title(f"{name} (n = {', '.join(map(str, seeds))} seeds)")
    if tasks:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", fontsize=6, frameon=False)
    fig.suptitle("Convergence on held-out training rows (GLUE table runs, MiniLM; mean over seeds)", fontsize=9)
    return fig


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    parts = []
    for o in payload.get("orders", []):
        rows = {r["method"]: r for r in _rows(payload, o["task"])}
        shown = ", ".join(f"{m} {'/'.join('never' if s is None else str(s) for s in r['seed_steps_to_common'])}"
                          for m, r in rows.items() if m in o["claimed"])
        reached = f"seeds reach the level at step {shown}"
        verdict = o["verdict"] + (f" ({o['reason']})" if o.get("reason") else "")
        parts.append(f"{o['task']}: {reached} — {verdict}")
    timed = []
    for o in payload.get("orders", []):
        pairs = [f"{p['faster']} before {p['slower']}" if p["measured"] == "first" else
                 f"{p['slower']} before {p['faster']}" for p in o["pairs_by_seconds"]
                 if p["measured"] in ("first", "second")]
        timed.append(f"{o['task']}: {', '.join(pairs) or 'no pair separates'}")
    wall = (" By wall time (each seed's step at the level times its own seconds per step; reported, not judged: "
            "the claim is about steps, and a step's cost differs by method), every seed separates: "
            + "; ".join(timed) + "." if timed else "")
    seeds = sorted({r["n_seeds"] for r in payload["rows"]})
    level_of = payload["config"]["majority_of"]
    provisional = (" Some cells have fewer than 3 seeds' curves, so these orders are provisional."
                   if seeds and min(seeds) < 3 else "")
    return (
        "Validation score (the task's metric on rows held out of train, ~2 evaluations per epoch) against "
        "training step (top) and against wall time (bottom: step × the method's seconds per step, a run's training "
        "time with its evaluations over its steps, mean over seeds; one torch thread per run, two runs side by side "
        "on a shared 2-core CPU), per method at the learning rate chosen on those rows, mean over the seeds whose run "
        f"folders were found (n = {', '.join(map(str, seeds))}); no new training: the curves are the GLUE table's "
        "runs (all-MiniLM-L6-v2, batch 32, AdamW with warm-up and linear decay; see the glue_table figure). "
        f"Dotted: the majority-class level m of the {level_of}; dashed: m + 0.9·(full fine-tuning's best − m), "
        "the level "
        "used to order methods by speed. A method is faster than another when every seed of it reaches the level "
        "at an earlier evaluation than every seed of the other (a seed that never reaches it is later than any; 3 "
        "seeds against 3 separate so by chance in 1 ordering of 20 each way); the claim is judged on the pairs it "
        "orders (adapter ≈ LoRA is not ordered) and speed can order (at least one of the two reaches the level): "
        "as claimed when all separate the claimed way, not as claimed when one separates the other way, "
        "inconclusive otherwise. Claim (Ding et al. 2023): full fine-tuning converges fastest, then "
        f"adapter ≈ LoRA, then prefix, prompt tuning far slower. Here: {'; '.join(parts) or 'no task yet'}."
        f"{wall}{provisional} "
        f"Command: `python experiments/convergence.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="convergence",
        title="Validation score against training step per method (GLUE table runs)",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/convergence.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw"]
