"""The recommender's placement alone (issue 18): its cells at the recommender's rates, and its verdicts against LoRA
and the recommender, from synthetic rows."""

from __future__ import annotations

import json

import pytest
from study_rows import rendered_caption, sweep_row

from controltune.results import append_jsonl
from controltune.sweep_spec import expand
from experiments import design_ablation


def _chosen(lr_b74k: float = 2e-3, lr_b18k: float = 4e-3) -> dict:
    return {(t, b, "recommended_lora"): {"lr": lr} for t in design_ablation.TASKS
            for b, lr in (("b74k", lr_b74k), ("b18k", lr_b18k))}


def test_the_cells_are_the_recommenders_with_loras_own_start_at_its_chosen_rates():
    cells = expand(design_ablation.spec(("mrpc",), ("b74k", "b18k"), _chosen()))
    assert len(cells) == 2 * 3 and {c["method"] for c in cells} == {"recommended_lora"}
    by_budget = {design_ablation.pair_key({"config": c})[1]: c for c in cells if c["seed"] == 0}
    assert by_budget["b74k"]["options"] == {"n_design": 64, "init": "standard"} and by_budget["b74k"]["lr"] == 2e-3
    assert by_budget["b18k"]["options"] == {"budget": 18432, "n_design": 64, "init": "standard"}
    assert by_budget["b18k"]["lr"] == 4e-3 and by_budget["b18k"]["epochs"] == 4  # the table's MRPC epochs
    with pytest.raises(SystemExit, match="no rate chosen"):  # the recommender's selection has not finished
        design_ablation.spec(("mrpc",), ("b74k",), {})
    with pytest.raises(KeyError, match="not a recommended_placement cell"):
        design_ablation.pair_key({"config": {"task": "mrpc", "method": "lora", "options": {"rank": 8}}})


def test_the_summary_separates_the_placements_share_from_the_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(design_ablation, "OUT", tmp_path / "design_ablation.jsonl")
    monkeypatch.setattr(design_ablation, "SUMMARY", tmp_path / "design_ablation.json")
    monkeypatch.setattr(design_ablation, "TABLE_SUMMARY", tmp_path / "design_table.json")
    # the table on MRPC at b74k: LoRA 0.850, the recommender 0.875 (± 0.002 over 3 seeds)
    table = [{"task": "mrpc", "budget": "b74k", "method": m, "lr": 2e-3, "mean": mean, "std": 0.002, "n_seeds": 3}
             for m, mean in (("lora", 0.850), ("recommended_lora", 0.875))]
    (tmp_path / "design_table.json").write_text(json.dumps({"cells": table, "rows": []}))
    for seed in (0, 1, 2):  # the placement alone scores as the recommender: the start adds nothing
        config = {"task": "mrpc", "method": "recommended_lora", "options": design_ablation.options("b74k"),
                  "lr": 2e-3, "seed": seed}
        append_jsonl(design_ablation.OUT, sweep_row(config, 0.874 + 0.001 * seed, metric="f1",
                                                    designs={"recommended_lora": {"ranks": {"0_v": 4}}}))
    out = design_ablation.summary(("mrpc",), ("b74k",))
    assert out["complete"] and out["cells"][0]["ranks"] == [{"0_v": 4}] * 3
    verdicts = {r["meaning"]: (r["verdict"], r["baseline"]) for r in out["rows"]}
    assert verdicts == {"placement": ("win", "lora"), "start": ("tie", "recommended_lora")}
    assert out["counts"] == {"placement": {"win": 1, "tie": 0, "loss": 0}, "start": {"win": 0, "tie": 1, "loss": 0}}
    assert out["chance"]["comparisons"] == 1 and out["chance"]["wins"] == 1
    start = next(r for r in out["rows"] if r["meaning"] == "start")
    assert start["difference"] == pytest.approx(0.0, abs=1e-9) and start["baseline_mean"] == 0.875
    caption = rendered_caption("design_ablation", tmp_path, tmp_path / "figs")
    assert "State: complete (3 seeds in every cell)" in caption
    assert "The placement against LoRA (a win is the placement's): MRPC/b74k win (+0.025 against 0.003)" in caption
    assert "the rule would call 0.1 wins in these 1 comparison by chance (P(t > 2)" in caption
    assert "1 was called" in caption
    # a task the table has no cell for yet is judged by nobody
    empty = design_ablation.summary(("sst2",), ("b74k",))
    assert not empty["complete"] and all(r["verdict"] is None for r in empty["rows"])


def test_role_shares_average_each_seeds_share_of_rank_units_per_role():
    from paper_figs.figures.design_ablation import role_shares

    shares = role_shares([{"0_v": 2, "1_ffn_in": 2}, {"0_q": 1, "3_v": 3}, None])
    assert shares["v"] == pytest.approx((0.5 + 0.75) / 2) and shares["ffn_in"] == pytest.approx(0.25)
    assert shares["q"] == pytest.approx(0.125) and shares["k"] == 0.0
    assert sum(shares.values()) == pytest.approx(1.0)
