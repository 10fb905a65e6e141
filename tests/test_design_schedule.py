"""The design table's schedule check (issue 18): its cells, and its verdicts beside the table's, from synthetic rows."""

from __future__ import annotations

import json

import pytest
from study_rows import rendered_caption, sweep_row, variant_selection

from controltune.results import append_jsonl
from controltune.sweep_spec import expand
from experiments import design_schedule


def test_the_cells_are_the_tables_pairs_at_their_chosen_rates_with_twice_the_epochs():
    chosen = design_schedule.choose_lrs(variant_selection(design_schedule, "cola", "b18k"), design_schedule.pair_key)
    cells = expand(design_schedule.spec(("cola",), ("b18k",), chosen))
    assert len(cells) == len(design_schedule.LABELS) * 3 == 21
    assert {c["epochs"] for c in cells} == {2 * 3}  # glue_select.yaml: CoLA trains 3 epochs
    assert {c["eval_every"] for c in cells} == {120} and {c["seed"] for c in cells} == {0, 1, 2}
    assert {c["lr"] for c in cells} == {2e-3}
    assert {design_schedule.pair_key({"config": c})[2] for c in cells} == set(design_schedule.LABELS)
    # a pair the table has not chosen a rate for stops the study instead of leaving a gap
    rows = variant_selection(design_schedule, "cola", "b18k", skip="gramian_lora")
    partial = design_schedule.choose_lrs(rows, design_schedule.pair_key)
    with pytest.raises(SystemExit, match="gramian_lora"):
        design_schedule.spec(("cola",), ("b18k",), partial)


def test_the_summary_judges_each_design_against_lora_at_both_schedules(tmp_path, monkeypatch):
    monkeypatch.setattr(design_schedule, "OUT", tmp_path / "design_schedule.jsonl")
    monkeypatch.setattr(design_schedule, "SUMMARY", tmp_path / "design_schedule.json")
    monkeypatch.setattr(design_schedule, "TABLE_SUMMARY", tmp_path / "design_table.json")
    # the table: every method 0.30 ± 0.001 at 2e-3, every design tied with LoRA
    table_cells = [{"task": "cola", "budget": "b18k", "method": label, "lr": 2e-3, "mean": 0.301, "std": 0.001,
                    "n_seeds": 3} for label in design_schedule.LABELS]
    table_rows = [{"task": "cola", "budget": "b18k", "design": d, "baseline": "lora", "verdict": "tie",
                   "difference": 0.0, "se": 0.0008} for d in design_schedule.DESIGNS]
    (tmp_path / "design_table.json").write_text(json.dumps({"cells": table_cells, "rows": table_rows}))
    longer = {"parallel_control": 0.35, "costate_lora": 0.25}  # one design pulls ahead, one falls behind
    for label in design_schedule.LABELS:
        method, options, _ = design_schedule.BUDGETS["b18k"][label]
        for seed in (0, 1, 2):
            config = {"task": "cola", "method": method, "options": options, "lr": 2e-3, "seed": seed, "epochs": 6}
            row = sweep_row(config, longer.get(label, 0.30) + 0.001 * seed, metric="mcc",
                            curves={"val": [{"step": 120, "mcc": 0.1}, {"step": 240, "mcc": 0.2}]})
            if (label, seed) == ("gramian_lora", 2):
                row.update(status="diverged", score_at_best_val=None)
            append_jsonl(design_schedule.OUT, row)
    out = design_schedule.summary(("cola",), ("b18k",))
    assert out["complete"]  # the diverged seed counts as finished
    verdicts = {r["design"]: r["verdict"] for r in out["rows"]}
    assert verdicts["parallel_control"] == "win" and verdicts["costate_lora"] == "loss"
    assert verdicts["gramian_lora"] == "too few seeds" and verdicts["riccati_feedback"] == "tie"
    assert out["wins"] == 1 and out["judged"] == 6
    assert out["chance"]["comparisons"] == 5 and out["chance"]["wins"] == 1  # too few seeds: no test
    assert out["changed"] == ["cola/b18k costate_lora: tie -> loss", "cola/b18k gramian_lora: tie -> too few seeds",
                              "cola/b18k parallel_control: tie -> win"]
    lora = next(c for c in out["cells"] if c["method"] == "lora")
    assert lora["epochs"] == 6 and lora["standard_mean"] == 0.301 and lora["gain"] == pytest.approx(0.0)
    assert lora["gain_verdict"] == "no change" and lora["rises_at_end"] is True
    # gramian_lora's two scored seeds are too few, for its gain as for its verdict
    assert out["gains"] == {"better": 1, "no change": 4, "worse": 1, "too few seeds": 1}
    caption = rendered_caption("design_schedule", tmp_path, tmp_path / "f")
    assert "State: complete" in caption
    assert "Wins over LoRA at the longer schedule: 1. Were every design equal to LoRA" in caption
    assert "differ from the table's: 3 of 6 judged (cola/b18k costate_lora: tie -> loss;" in caption
    assert "better in 1, no change in 4, worse in 1, too few seeds in 1." in caption
    assert "at the last evaluation: cola 7 of 7" in caption


def test_a_running_study_says_its_verdicts_are_provisional(tmp_path, monkeypatch):
    monkeypatch.setattr(design_schedule, "OUT", tmp_path / "design_schedule.jsonl")
    monkeypatch.setattr(design_schedule, "SUMMARY", tmp_path / "design_schedule.json")
    monkeypatch.setattr(design_schedule, "TABLE_SUMMARY", tmp_path / "design_table.json")
    (tmp_path / "design_table.json").write_text(json.dumps({"cells": [], "rows": []}))
    method, options, _ = design_schedule.BUDGETS["b74k"]["lora"]
    append_jsonl(design_schedule.OUT, sweep_row({"task": "sst2", "method": method, "options": options, "lr": 2e-3,
                                                 "seed": 0, "epochs": 4}, 0.86))
    out = design_schedule.summary()
    assert not out["complete"] and out["wins"] == 0 and out["judged"] == 0
    caption = rendered_caption("design_schedule", tmp_path, tmp_path / "f")
    assert "running: 1 of 84 runs finished, so every verdict below is provisional" in caption
