"""Shared helpers of the study-summary tests: a figure's registry entry, a finished sweep row in the sweeps'
format, and a rendered figure's caption."""

from __future__ import annotations

import json
from pathlib import Path

from controltune.figures import registry, render

ROOT = Path(__file__).resolve().parents[1]


def figure_spec(name: str):
    return registry(ROOT / "paper_figs" / "figures")[name]


def sweep_row(config: dict, score: float, val: float | None = None, metric: str = "accuracy", **extra) -> dict:
    cell = "c" + str(abs(hash(json.dumps(config, sort_keys=True))))
    return {"config": config, "status": "done", "score_at_best_val": score, "score": score,
            "val_score": score if val is None else val,
            "metric": metric, "n_trainable": 10, "cell": cell, **extra}


def rendered_caption(name: str, results: Path, out: Path) -> str:
    paths = render(figure_spec(name), results, out)
    assert paths[1].read_bytes()[:4] == b"\x89PNG"
    return paths[2].read_text()


def variant_selection(study, task: str, budget: str, skip: str | None = None) -> list[dict]:
    """Seed-0 selection rows of a design-variant ``study``'s labels (LoRA and the designs) on ``task`` at
    ``budget``: 2e-3 best for every pair (5e-4 scores lower); ``skip`` leaves one label without rows."""
    rows = []
    for label in study.LABELS:
        if label == skip:
            continue
        method, options, _ = study.BUDGETS[budget][label]
        for lr, val in ((5e-4, 0.2), (2e-3, 0.3)):
            rows.append(sweep_row({"task": task, "method": method, "options": options, "lr": lr, "seed": 0}, val))
    return rows
