"""The design table's close calls on new seeds (issue 18): which comparisons are trained again, their cells, and
the verdict on the new seeds beside the pooled one, from synthetic rows."""

from __future__ import annotations

import json

import pytest
from study_rows import rendered_caption, sweep_row

from controltune.results import append_jsonl
from controltune.sweep_spec import expand
from experiments import design_seeds
from experiments.design_table import BUDGETS


def _row(task: str, budget: str, design: str, difference: float, se: float, verdict: str = "tie",
         at_chance: bool = False) -> dict:
    return {"task": task, "budget": budget, "design": design, "baseline": "lora", "difference": difference,
            "se": se, "verdict": verdict, "at_chance": at_chance}


TABLE = {"complete_tasks": ["mrpc", "cola"],
         "rows": [_row("mrpc", "b18k", "recommended_lora", 0.009, 0.0044, "win"),
                  _row("mrpc", "b18k", "costate_lora", -0.010, 0.004),
                  _row("mrpc", "b74k", "costate_lora", 0.004, 0.0075),  # under one se: not close
                  _row("cola", "b18k", "riccati_feedback", 0.03, 0.02, at_chance=True),  # no test
                  _row("rte", "b18k", "parallel_control", 0.05, 0.01),  # task incomplete
                  {**_row("mrpc", "b18k", "gramian_lora", 0.02, 0.01), "baseline": "adapter"}],
         "cells": [{"task": "mrpc", "budget": "b18k", "method": m, "lr": 4e-3}
                   for m in ("lora", "recommended_lora")]}


def test_close_calls_are_the_complete_tasks_comparisons_a_standard_error_in_the_designs_favour():
    calls = design_seeds.close_calls(TABLE)
    assert [(c["task"], c["budget"], c["design"]) for c in calls] == [("mrpc", "b18k", "recommended_lora")]
    assert design_seeds.pairs_of(calls) == [("mrpc", "b18k", "lora"), ("mrpc", "b18k", "recommended_lora")]
    assert len(design_seeds.close_calls(TABLE, close_se=0.5)) == 2  # the b74k call at 0.53 se


def test_the_cells_are_the_close_pairs_on_new_seeds_at_the_tables_rates():
    pairs = [("mrpc", "b18k", "lora"), ("mrpc", "b18k", "recommended_lora"), ("mrpc", "b74k", "costate_lora")]
    chosen = {("mrpc", "b18k", "lora"): {"lr": 4e-3}, ("mrpc", "b18k", "recommended_lora"): {"lr": 2e-3},
              ("mrpc", "b74k", "costate_lora"): {"lr": 1e-3}}
    cells = expand(design_seeds.spec(pairs, chosen))
    assert len(cells) == 3 * len(design_seeds.SEEDS) and {c["seed"] for c in cells} == {3, 4, 5, 6, 7}
    found = {(design_seeds.pair_key({"config": c}), c["lr"]) for c in cells}
    assert found == {(p, chosen[p]["lr"]) for p in pairs}  # b74k LoRA and b18k co-state left out
    assert {c["epochs"] for c in cells} == {4}  # the table's MRPC epochs


@pytest.fixture
def study(tmp_path, monkeypatch):
    """The study's files in ``tmp_path``, beside a design table summary of :data:`TABLE` and no table rows."""
    monkeypatch.setattr(design_seeds, "OUT", tmp_path / "design_seeds.jsonl")
    monkeypatch.setattr(design_seeds, "SUMMARY", tmp_path / "design_seeds.json")
    monkeypatch.setattr(design_seeds, "TABLE_SUMMARY", tmp_path / "design_table.json")
    monkeypatch.setattr(design_seeds, "TABLE_ROWS", tmp_path / "design_table.jsonl")
    (tmp_path / "design_table.json").write_text(json.dumps(TABLE))
    (tmp_path / "design_table.jsonl").write_text("")
    return tmp_path


def test_the_answer_is_the_new_seeds_verdict_and_the_pooled_one_is_reported(study):
    tmp_path = study

    def add(path, label: str, lr: float, seed: int, score: float) -> None:
        method, options, _ = BUDGETS["b18k"][label]
        config = {"task": "mrpc", "method": method, "options": options, "lr": lr, "seed": seed}
        append_jsonl(path, sweep_row(config, score, metric="f1"))

    # the table's seeds: the design ahead by ~0.009; the new seeds: equal methods (no win), one seed missing
    for seed, (d, b) in enumerate(((0.863, 0.856), (0.862, 0.861), (0.868, 0.848))):
        add(tmp_path / "design_table.jsonl", "recommended_lora", 4e-3, seed, d)
        add(tmp_path / "design_table.jsonl", "lora", 4e-3, seed, b)
        add(tmp_path / "design_table.jsonl", "lora", 2e-3, seed, 0.99)  # another rate: not LoRA's cell
    for seed, score in zip(design_seeds.SEEDS, (0.855, 0.860, 0.858, 0.857, 0.861)):
        add(design_seeds.OUT, "lora", 4e-3, seed, score)
        if seed != 7:
            add(design_seeds.OUT, "recommended_lora", 4e-3, seed, score + 0.0005)
    out = design_seeds.summary()
    assert not out["complete"] and out["confirmed_wins"] == []
    (row,) = out["rows"]
    assert row["table_verdict"] == "win" and row["new"]["verdict"] == "tie"
    assert row["new"]["design"]["seeds"] == [3, 4, 5, 6] and row["new"]["lora"]["n_seeds"] == 5
    assert row["pooled"]["design"]["n_seeds"] == 7 and row["pooled"]["lora"]["n_seeds"] == 8
    assert row["new_at_end"]["verdict"] == "tie"  # the synthetic rows' last step scores as their best
    assert row["pooled"]["lora"]["mean"] == pytest.approx((0.856 + 0.861 + 0.848 + 0.855 + 0.860 + 0.858 + 0.857
                                                           + 0.861) / 8)
    assert out["chance"] == {"comparisons": 1, "wins": 0, "expected_wins": pytest.approx(0.0428, abs=1e-4)}  # t_7
    caption = rendered_caption("design_seeds", tmp_path, tmp_path / "figs")
    assert "State: running" in caption and "Wins confirmed on the new seeds: none." in caption
    assert ("MRPC/b18k recommended_lora: table win (+0.009 against 0.009), new seeds tie (-0.000 against "
            in caption) and "4 and 5 seeds), pooled tie" in caption
    assert "would call 0.0 wins in these 1 comparison by chance" in caption and "0 were called" in caption


def test_a_diverged_new_seed_is_finished_but_not_scored(study):
    for label in ("lora", "recommended_lora"):
        method, options, _ = BUDGETS["b18k"][label]
        for seed in design_seeds.SEEDS:
            row = sweep_row({"task": "mrpc", "method": method, "options": options, "lr": 4e-3, "seed": seed},
                            0.85 + 0.001 * seed, metric="f1")
            if (label, seed) == ("recommended_lora", 5):
                row.update(status="diverged", score_at_best_val=None)
            append_jsonl(design_seeds.OUT, row)
    out = design_seeds.summary()
    assert out["complete"] and out["rows"][0]["new"]["design"]["seeds"] == [3, 4, 6, 7]
