"""Figure ``design_probe``: each design's difference from LoRA with the random head (the design table) and with
the head fitted first as a linear probe (LP-FT).

Source: ``design_probe.json`` (``experiments/design_probe.py``): LoRA and the six designs trained again on SST-2
and CoLA with the head fitted first, at the table's rates, each design judged against LoRA started from the same
fitted head (issue 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from controltune.figures import FigureSpec

from ._common import chance_text, load_json, versions_line
from ._variant import TASK_NAMES, draw_differences, gains_note, state_note

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "design_probe.json"


def draw(results_dir: Path) -> Figure:
    """:func:`._variant.draw_differences` with the random head (grey) and the fitted head (colour)."""
    return draw_differences(load_json(results_dir, SOURCE), "head fitted first (against LP-FT LoRA)")


def _probe_note(probe: dict) -> str:
    """``SST-2: λ 0.001, validation accuracy 0.85 (84 of 84 fits stationary)``, per task with fits."""
    parts = []
    for task, p in probe.items():
        lo, hi = p["held_out_accuracy"]
        acc = f"{lo:.3f}" if lo == hi else f"{lo:.3f}–{hi:.3f}"
        parts.append(f"{TASK_NAMES.get(task, task)}: λ {', '.join(f'{v:g}' for v in p['l2'])}, validation-row "
                     f"accuracy {acc} ({p['converged']} of {p['cells']} fits stationary)")
    return "; ".join(parts) or "no probe fitted yet"


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    changed = "; ".join(payload["changed"]) or "none"
    versus = ["{task}/{budget} {design}".format(**r) for r in payload["against_table_lora"] if r["verdict"] == "win"]
    return (
        "Each design's dev score minus LoRA's at the same budget (mean over seeds 0, 1, 2; bars ± two standard "
        "errors of the difference, the margin of the two-standard-error rule) with the run's random head (grey: the "
        "design table) and with the head fitted first as a linear probe on the run's training rows, its L2 penalty "
        "chosen on the validation rows (colour: against LoRA started from the same fitted head, LP-FT). Every design "
        "then designs through a head that separates the task, the same for every seed. The rates are the table's, "
        f"not chosen again. State: {state_note(payload)}. Wins over LP-FT LoRA: {payload['wins']}."
        + chance_text(payload.get("chance"), "every design equal to LP-FT LoRA")
        + f" Verdicts that differ from the table's: {len(payload['changed'])} of {payload['judged']} judged "
        f"({changed}). Wins over "
        f"the table's LoRA (random head): {payload['wins_over_table_lora']}"
        + (f" ({'; '.join(versus)})" if versus else "")
        + f". The fitted head against each method's own table cell (same rule): {gains_note(payload['gains'])}. "
        f"Probes: {_probe_note(payload['probe'])}. Command: `python experiments/design_probe.py` "
        f"({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="design_probe",
        title="Designs against LoRA with the random head and with the head fitted first",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/design_probe.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw"]
