"""The design table with the head fitted first (issue 18): its cells, and its verdicts against LP-FT LoRA and the
table's LoRA, from synthetic rows."""

from __future__ import annotations

import json

import pytest
from study_rows import rendered_caption, sweep_row, variant_selection

from controltune.results import append_jsonl
from controltune.sweep_spec import expand
from experiments import design_probe


def test_every_cell_fits_its_head_first_at_the_tables_rate_and_epochs():
    chosen = design_probe.choose_lrs(variant_selection(design_probe, "cola", "b18k"), design_probe.pair_key)
    cells = expand(design_probe.spec(("cola",), ("b18k",), chosen))
    assert len(cells) == len(design_probe.LABELS) * 3 == 21
    assert {c["head_init"] for c in cells} == {"probe"} and {c["lr"] for c in cells} == {2e-3}
    assert {c["epochs"] for c in cells} == {3} and {c["seed"] for c in cells} == {0, 1, 2}  # the table's CoLA epochs
    assert {design_probe.pair_key({"config": c})[2] for c in cells} == set(design_probe.LABELS)


def _fit(l2: float = 0.1, accuracy: float = 0.69) -> dict:
    return {"l2": l2, "l2_at_edge": False, "converged": True, "held_out_accuracy": accuracy, "train_accuracy": 0.72}


def test_the_summary_judges_each_design_against_lp_ft_lora_and_the_tables_lora(tmp_path, monkeypatch):
    monkeypatch.setattr(design_probe, "OUT", tmp_path / "design_probe.jsonl")
    monkeypatch.setattr(design_probe, "SUMMARY", tmp_path / "design_probe.json")
    monkeypatch.setattr(design_probe, "TABLE_SUMMARY", tmp_path / "design_table.json")
    # the table: every method 0.30 ± 0.001, every design tied with LoRA
    table_cells = [{"task": "cola", "budget": "b18k", "method": label, "lr": 2e-3, "mean": 0.301, "std": 0.001,
                    "n_seeds": 3} for label in design_probe.LABELS]
    table_rows = [{"task": "cola", "budget": "b18k", "design": d, "baseline": "lora", "verdict": "tie",
                   "difference": 0.0, "se": 0.0008} for d in design_probe.DESIGNS]
    (tmp_path / "design_table.json").write_text(json.dumps({"cells": table_cells, "rows": table_rows}))
    # the fitted head lifts LoRA to 0.33; co-state LoRA to 0.36 (a win over both), Riccati to 0.32 (a win over the
    # table's LoRA only: the probe's, not the design's)
    fitted = {"lora": 0.33, "costate_lora": 0.36, "riccati_feedback": 0.32}
    for label in design_probe.LABELS:
        method, options, _ = design_probe.BUDGETS["b18k"][label]
        for seed in (0, 1, 2):
            config = {"task": "cola", "method": method, "options": options, "lr": 2e-3, "seed": seed, "epochs": 3,
                      "head_init": "probe"}
            append_jsonl(design_probe.OUT, sweep_row(config, fitted.get(label, 0.33) + 0.001 * seed, metric="mcc",
                                                     head_fit=_fit()))
    out = design_probe.summary(("cola",), ("b18k",))
    assert out["complete"] and out["config"]["head_init"] == "probe"
    verdicts = {r["design"]: r["verdict"] for r in out["rows"]}
    assert verdicts["costate_lora"] == "win" and verdicts["riccati_feedback"] == "loss"
    assert verdicts["gramian_lora"] == "tie" and out["wins"] == 1
    versus = {r["design"]: r["verdict"] for r in out["against_table_lora"]}
    assert versus["costate_lora"] == versus["riccati_feedback"] == versus["gramian_lora"] == "win"
    assert out["wins_over_table_lora"] == 6
    lora = next(c for c in out["cells"] if c["method"] == "lora")
    assert lora["gain"] == pytest.approx(0.03) and lora["gain_verdict"] == "better"
    assert out["probe"] == {"cola": {"cells": 21, "converged": 21, "l2": [0.1], "held_out_accuracy": [0.69, 0.69],
                                     "train_accuracy": [0.72, 0.72]}}
    caption = rendered_caption("design_probe", tmp_path, tmp_path / "f")
    assert "State: complete" in caption
    assert "Wins over LP-FT LoRA: 1. Were every design equal to LP-FT LoRA, the rule would call 0.3 wins" in caption
    assert "Wins over the table's LoRA (random head): 6 (cola/b18k costate_lora;" in caption
    assert "CoLA: λ 0.1, validation-row accuracy 0.690 (21 of 21 fits stationary)" in caption


def test_a_study_without_rows_draws_a_provisional_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(design_probe, "OUT", tmp_path / "design_probe.jsonl")
    monkeypatch.setattr(design_probe, "SUMMARY", tmp_path / "design_probe.json")
    monkeypatch.setattr(design_probe, "TABLE_SUMMARY", tmp_path / "design_table.json")
    (tmp_path / "design_table.json").write_text(json.dumps({"cells": [], "rows": []}))
    out = design_probe.summary()
    assert not out["complete"] and out["wins"] == 0 and out["probe"] == {} and out["against_table_lora"] == []
    caption = rendered_caption("design_probe", tmp_path, tmp_path / "f")
    assert "running: 0 of 84 runs finished" in caption and "Probes: no probe fitted yet" in caption
