"""The README's renderings of the design table's summary (``results/design_table.json``): the table itself
(:func:`markdown_table`) and, per design, where it wins, ties and loses against LoRA (:func:`verdict_lines`).
``python experiments/design_table.py --markdown`` and ``--verdicts`` print them; ``tests/test_readme_claims.py``
checks that the README holds what they print."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the experiments' shared modules, run or imported
from design_table import BASELINES, DESIGNS, MIN_SEEDS, cell_complete, task_complete  # noqa: E402

__all__ = ["markdown_table", "verdict_lines", "where_verdicts"]

VERDICT_WORDS = (("win", "wins"), ("tie", "ties"), ("loss", "loses"),
                 ("at_chance", "is no test (both at the majority class)"))
"""The verdicts a design's line lists, in order, with the words that introduce them."""


def markdown_table(payload: dict[str, Any]) -> str:
    """The README's design table from a summary: the majority class's score (a constant prediction's), then per
    budget LoRA, the designs (with their verdict against LoRA at that budget) and the other baselines; per task,
    ``mean ± std`` over the seeds of each final cell (:func:`cell_complete`; the others are left blank), ``†``
    where the chosen rate is the edge of the rates tried.  A task with a cell not final yet is marked incomplete."""
    from controltune.data import BUILTIN_TASKS

    tasks = payload["config"]["tasks"]
    cells = {(c["task"], c["budget"], c["method"]): c for c in payload["cells"]}
    verdicts = {(r["task"], r["budget"], r["design"]): r["verdict"] for r in payload["rows"] if r["baseline"] == "lora"}
    unit = {"f1": "F1", "mcc": "MCC"}
    head = [f"{BUILTIN_TASKS[t].folder} ({unit.get(m, m)}{'' if task_complete(payload, t) else '; incomplete'})"
            for t in tasks for m in [BUILTIN_TASKS[t].metric]]
    lines = ["| budget | method | " + " | ".join(head) + " |", "|" + " --- |" * (2 + len(tasks))]
    levels = payload.get("majority") or {}
    lines.append("| | majority class | " + " | ".join(f"{levels[t]:.3f}" if t in levels else "" for t in tasks) + " |")
    for budget in payload["config"]["budgets"]:
        for label in ("lora", *DESIGNS, *(b for b in BASELINES if b != "lora")):
            entries = []
            for t in tasks:
                c = cells.get((t, budget, label))
                lora = cells.get((t, budget, "lora"))
                if c is None or not cell_complete(c):
                    entries.append("")
                    continue
                if c["mean"] is None:
                    entries.append("diverged at every rate" if c["diverged_every_rate"] else "every seed diverged")
                    continue
                text = f"{c['mean']:.3f} ± {c['std'] or 0.0:.3f}" + ("†" if c["rate_at_edge"] else "")
                if c["n_seeds"] < MIN_SEEDS:  # the others diverged (named in the summary)
                    text += f" ({c['n_seeds']} of {MIN_SEEDS} seeds)"
                v = verdicts.get((t, budget, label)) if lora is not None and cell_complete(lora) else None
                entries.append(text + ("" if v is None else f", **{v}**" if v == "win" else f", {v}"))
            lines.append(f"| {budget} | `{label}` | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def where_verdicts(payload: dict[str, Any]) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Per design, the (task, budget) pairs of each verdict against LoRA at the same budget, on the complete tasks
    only (:func:`~design_table.task_complete`), in the table's task and budget order: ``{design: {verdict: [(task,
    budget), ...]}}``.  A comparison where both cells sit at the majority class is ``at_chance`` whatever its
    verdict; a diverged one keeps its named verdict."""
    tasks = [t for t in payload["config"]["tasks"] if task_complete(payload, t)]
    budgets = payload["config"]["budgets"]
    rows = {(r["design"], r["task"], r["budget"]): r for r in payload["rows"] if r["baseline"] == "lora"}
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for design in DESIGNS:
        found: dict[str, list[tuple[str, str]]] = {}
        for task in tasks:
            for budget in budgets:
                r = rows.get((design, task, budget))
                if r is not None:
                    found.setdefault("at_chance" if r["at_chance"] else r["verdict"], []).append((task, budget))
        out[design] = found
    return out


def _where(pairs: list[tuple[str, str]]) -> str:
    from controltune.data import BUILTIN_TASKS

    return ", ".join(f"{BUILTIN_TASKS[t].folder} {b}" for t, b in pairs)


def verdict_lines(payload: dict[str, Any]) -> list[str]:
    """The README's list, one line per design: ``- `recommended_lora`: wins on MRPC b18k; ties on SST-2 b74k, ...;
    loses nowhere`` (:func:`where_verdicts`; a verdict with no pair says "nowhere", other verdicts, like a
    divergence, follow by name), after a line naming the complete tasks."""
    from controltune.data import BUILTIN_TASKS

    complete = [BUILTIN_TASKS[t].folder for t in payload["config"]["tasks"] if task_complete(payload, t)]
    lines = [f"Against LoRA at the same budget, on the complete tasks ({', '.join(complete) or 'none yet'}):"]
    for design, found in where_verdicts(payload).items():
        parts = []
        for verdict, word in VERDICT_WORDS:
            pairs = found.pop(verdict, [])
            if pairs:
                parts.append(f"{word} on {_where(pairs)}")
            elif verdict != "at_chance":
                parts.append(f"{word} nowhere")
        parts += [f"{verdict} on {_where(pairs)}" for verdict, pairs in found.items()]
        lines.append(f"- `{design}`: " + "; ".join(parts))
    return lines
