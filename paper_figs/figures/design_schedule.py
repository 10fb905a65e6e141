"""Figure ``design_schedule``: each design's difference from LoRA at the design table's schedule and at twice it.

Source: ``design_schedule.json`` (``experiments/design_schedule.py``): LoRA and the six designs trained again
on SST-2 and CoLA with twice the table's epochs at the table's rates, each design's verdict against LoRA at
both schedules (issue 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from controltune.figures import FigureSpec

from ._common import chance_text, load_json, versions_line
from ._variant import draw_differences, gains_note, state_note

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "design_schedule.json"


def draw(results_dir: Path) -> Figure:
    """:func:`._variant.draw_differences` at the table's schedule (grey) and at the longer one (colour)."""
    payload = load_json(results_dir, SOURCE)
    return draw_differences(payload, f"{payload['config']['factor']}× the epochs")


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    factor = payload["config"]["factor"]
    cells = payload["cells"]
    rising = {t: (sum(bool(c.get("rises_at_end")) for c in mine), len(mine)) for t in payload["config"]["tasks"]
              if (mine := [c for c in cells if c["task"] == t and c.get("val_curve")])}
    state = state_note(payload)
    changed = "; ".join(payload["changed"]) or "none"
    return (
        f"Each design's dev score minus LoRA's at the same budget (mean over seeds 0, 1, 2; bars ± two standard "
        f"errors of the difference, the margin of the two-standard-error rule) at the design table's schedule (grey) "
        f"and with {factor}× its epochs (colour; same rows, rates, seeds and evaluation cadence, warm-up and linear "
        "decay stretched), on the tasks where the table's curves rose to their end most. The rates are the table's, "
        f"not chosen again. State: {state}. Wins over LoRA at the longer schedule: {payload['wins']}."
        + chance_text(payload.get("chance"))
        + f" Verdicts against LoRA that differ from the table's: {len(payload['changed'])} of {payload['judged']} "
        f"judged ({changed}). Training longer against the table's own cell, per method and budget (same rule): "
        f"{gains_note(payload['gains'])}. Cells whose mean "
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
