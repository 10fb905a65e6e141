"""The design-evaluation figures choose learning rates on validation only and judge designs honestly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controltune.figures import load_scripts, render

# The figure script paper_figs/figures/design.py, imported the way `controltune figures` imports it.
design = load_scripts(Path(__file__).resolve().parents[1] / "paper_figs" / "figures")["design"]


def _row(budget, task, method, seed, lr, val, dev, n=74498):
    metric = design.METRIC[task]
    return {"budget": budget, "task": task, "method": method, "seed": seed, "lr": lr, "n_trainable": n,
            "n_train": 100, "n_val": 20, "n_dev": 50, "steps": 7,
            "val": {"accuracy": val, "loss": 1 - val, metric: val},
            "val_curve": [{"step": 3, "accuracy": val / 2, metric: val / 2}],
            "train_loss": [0.7, 0.6, 0.5, 0.4, 0.4, 0.3, 0.3], "dev": {"accuracy": dev, metric: dev}}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    rows = [
        # selection cell: lr 1e-3 has the better validation score but the worse dev score
        _row("b74k", "sst2", "lora", 0, 1e-3, 0.80, 0.70), _row("b74k", "sst2", "lora", 0, 3e-3, 0.70, 0.90),
        _row("b74k", "sst2", "costate_lora", 0, 1e-3, 0.60, 0.80),
        _row("b74k", "sst2", "costate_lora", 0, 3e-3, 0.85, 0.85),
    ]
    rows += [_row("b74k", "sst2", "lora", s, 1e-3, 0.8, 0.70 + 0.01 * s) for s in (1, 2)]
    rows += [_row("b74k", "sst2", "costate_lora", s, 3e-3, 0.8, 0.85 + 0.01 * s) for s in (1, 2)]
    rows += [_row("b18k", "rte", m, s, lr, 0.5, 0.5 + 0.01 * s, n=19202)
             for m, lr in (("lora", 1e-3), ("costate_lora", 3e-3)) for s in (0, 1)]
    (tmp_path / design.SOURCE).write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    return tmp_path


def test_learning_rate_is_chosen_on_validation_not_dev(results: Path) -> None:
    rows = design.load_rows(results)
    assert design.selection_cell(rows) == ("b74k", "sst2")
    assert design.chosen_lr(rows) == {"lora": 1e-3, "costate_lora": 3e-3}
    groups = design.cells(rows)
    assert {r["lr"] for r in groups[("b74k", "sst2", "lora")]} == {1e-3}
    assert len(groups[("b74k", "sst2", "lora")]) == 3  # the 3e-3 selection run is excluded


def test_verdict_uses_two_standard_errors() -> None:
    assert design.verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.72]) == "win"
    assert design.verdict([0.70, 0.71, 0.72], [0.80, 0.81, 0.82]) == "loss"
    assert design.verdict([0.70, 0.80, 0.90], [0.75, 0.85, 0.76]) == "tie"
    assert design.verdict([0.9], [0.1, 0.2]) == "n/a"


def test_table_and_figures_render(results: Path, tmp_path: Path) -> None:
    text = design.table_markdown(design.load_rows(results))
    assert "| b74k | **costate_lora** | 0.003 | 74,498 | 0.860 ± 0.010 (3) |" in text
    assert "| b74k | costate_lora | lora | win |" in text
    assert "| b18k | costate_lora | lora | – | tie |" in text
    for spec in design.FIGURES:
        paths = render(spec, results, tmp_path / "out")
        assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_two_selection_cells_are_refused(results: Path) -> None:
    rows = design.load_rows(results) + [_row("b18k", "rte", "lora", 0, 3e-3, 0.5, 0.5)]
    with pytest.raises(ValueError, match="one selection cell"):
        design.selection_cell(rows)
