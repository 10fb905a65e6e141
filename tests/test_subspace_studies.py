"""The unified-subspace and APET studies' summaries and figures, from synthetic rows in the studies' formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controltune.figures import registry, render
from controltune.results import append_jsonl, write_json
from experiments import apet, unified_subspace

ROOT = Path(__file__).resolve().parents[1]


def _row(config: dict, score: float, val: float, metric: str = "accuracy", **extra) -> dict:
    base = {"dtype": "float32", "train_size": None}
    return {"config": {**base, **config}, "status": "done", "score_at_best_val": score, "val_score": val,
            "metric": metric, "n_trainable": 100, "cell": f"c{abs(hash(json.dumps(config, sort_keys=True)))}",
            **extra}


def test_centred_ranks_share_ties_and_the_pooled_correlation():
    assert apet._centred_ranks([3.0, 1.0, 3.0]) == [0.5, -1.0, 0.5]
    perfect = [[(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)], [(5.0, 0.9), (9.0, 1.0)]]
    out = apet.within_group_correlation(perfect)
    assert out["rho"] == pytest.approx(1.0) and out["ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert apet.within_group_correlation([[(1.0, 0.5), (2.0, 0.5)]])["rho"] is None  # no dev variation: no ρ
    flipped = [[(a, -b) for a, b in g] for g in perfect]
    assert apet.within_group_correlation(flipped)["rho"] == pytest.approx(-1.0)


@pytest.fixture
def apet_results(tmp_path, monkeypatch):
    monkeypatch.setattr(apet, "SELECT_OUT", tmp_path / "apet_select.jsonl")
    monkeypatch.setattr(apet, "TABLE_OUT", tmp_path / "apet_table.jsonl")
    monkeypatch.setattr(apet, "SCORES_OUT", tmp_path / "apet_scores.jsonl")
    monkeypatch.setattr(apet, "SUMMARY", tmp_path / "apet.json")
    monkeypatch.setattr(apet, "majority_levels", lambda tasks: {t: {"metric": "accuracy", "level": 0.5}
                                                                for t in tasks})
    def score(budget, draw, gain):
        return 0.5 + 0.02 * apet.BUDGETS.index(budget) + 0.01 * draw * (1 - 10 * gain) + gain

    for model, gain in (("minilm", 0.0), ("smollm2", 0.05)):
        for budget in apet.BUDGETS:  # one rate per budget; the largest budget prefers the smaller rate
            for lr, val in ((1e-3, 0.6 if budget == apet.BUDGETS[-1] else 0.4), (1e-2, score(budget, 0, gain))):
                # the selection cell at the chosen rate is the table's seed-0 cell (same configuration, same row)
                append_jsonl(apet.SELECT_OUT, _row({"model": model, "task": "sst2", "method": "arbitrary", "lr": lr,
                                                    "seed": 0, "options": {"budget": budget, "seed": 0}}, val, val))
        for lr, val in ((1e-3, 0.4), (1e-2, 0.52)):  # the linear probe (B = 0): its rate chosen like a budget's
            append_jsonl(apet.SELECT_OUT, _row({"model": model, "task": "sst2", "method": "linear_probe", "lr": lr,
                                                "seed": 0, "options": {}}, val, val))
        # full fine-tuning's rate is chosen too; a table row at a rate not chosen (1e-4: 0.3) is not its score
        for lr, val in ((2e-5, 0.8), (5e-5, 0.9)):
            append_jsonl(apet.SELECT_OUT, _row({"model": model, "task": "sst2", "method": "full", "lr": lr,
                                                "seed": 0, "options": {}}, 0.9 + gain if lr == 5e-5 else 0.8, val))
        append_jsonl(apet.TABLE_OUT, _row({"model": model, "task": "sst2", "method": "full", "lr": 1e-4,
                                           "seed": 1, "options": {}}, 0.3, 0.3))
        for seed in (0, 1, 2):
            if seed:
                append_jsonl(apet.TABLE_OUT, _row({"model": model, "task": "sst2", "method": "linear_probe",
                                                   "lr": 1e-2, "seed": seed, "options": {}}, 0.52, 0.52))
            if seed:
                append_jsonl(apet.TABLE_OUT, _row({"model": model, "task": "sst2", "method": "full", "lr": 5e-5,
                                                   "seed": seed, "options": {}}, 0.9 + gain, 0.9))
            for budget in apet.BUDGETS:
                for draw in apet.DRAWS:
                    dev = score(budget, draw, gain)
                    append_jsonl(apet.TABLE_OUT, _row({"model": model, "task": "sst2", "method": "arbitrary",
                                                       "lr": 1e-2, "seed": seed,
                                                       "options": {"budget": budget, "seed": draw}},
                                                      dev + 0.001 * seed, dev))
                    if seed == 0:
                        append_jsonl(apet.SCORES_OUT, {"model": model, "task": "sst2", "budget": budget,
                                                       "draw": draw, "costate_energy": float(draw),
                                                       "gramian": float(-draw), "n": budget})
    return tmp_path


def test_apet_summary_and_figures(apet_results, tmp_path):
    out = apet.summary(("minilm", "smollm2"), ("sst2",))
    cells = {(c["model"], c["budget"]): c for c in out["cells"]}
    assert cells[("minilm", 100)]["lr"] == 1e-2 and cells[("minilm", 100)]["n_runs"] == 9
    # the largest budget's rate is its own choice: its table rows at 1e-2 are not read, only its selection cell at
    # 1e-3 (draw 0, seed 0), which is the table's cell of that rate
    assert cells[("minilm", apet.BUDGETS[-1])]["lr"] == 1e-3 and cells[("minilm", apet.BUDGETS[-1])]["n_runs"] == 1
    assert cells[("minilm", 100)]["position_spread"] == pytest.approx(0.01)
    assert cells[("smollm2", 100)]["position_spread"] == pytest.approx(0.005)
    assert out["predictors"]["costate_energy"]["rho"] == pytest.approx(1.0)
    assert out["predictors"]["gramian"]["rho"] == pytest.approx(-1.0)
    # only the cells beyond the probe (B = 100 is not): fewer cells, the same within-cell orderings
    beyond = out["predictors_beyond_probe"]
    assert beyond["costate_energy"]["n_groups"] < out["predictors"]["costate_energy"]["n_groups"]
    assert beyond["costate_energy"]["rho"] == pytest.approx(1.0) and beyond["gramian"]["rho"] == pytest.approx(-1.0)
    assert out["smallest_budget_beating_majority"]["minilm/sst2"] == 100
    # the head alone scores 0.52: B = 100 (mean 0.511) does not beat it, B = 1000 (0.531 ± 0.003) does
    assert {f["model"]: f["mean"] for f in out["linear_probe"]}["minilm"] == pytest.approx(0.52)
    assert out["smallest_budget_beating_probe"]["minilm/sst2"] == 1000
    # full FT scores 0.9 (minilm) and 0.95 (smollm2); no budget comes within two standard errors of either
    assert out["smallest_budget_reaching_full"] == {"minilm/sst2": None, "smollm2/sst2": None}
    assert {f["model"]: f["mean"] for f in out["full"]} == {"minilm": pytest.approx(0.9),
                                                            "smollm2": pytest.approx(0.95)}
    for name in ("apet_positions", "apet_scale"):
        paths = render(_spec(name), apet_results, tmp_path / "figs")
        caption = paths[2].read_text()
        assert "Command: `python experiments/apet.py`" in caption
    positions = (tmp_path / "figs" / "apet_positions.caption.md").read_text()
    assert "smaller for smollm2 than for minilm in 3 of 3" in positions and "holds here" in positions
    assert "costate_energy: ρ = 1.000" in positions
    scale = (tmp_path / "figs" / "apet_scale.caption.md").read_text()
    # the largest budget has one run of nine: "no budget reaches" is not a verdict yet
    assert "sst2: open (no budget reaches full FT in minilm yet)" in scale
    assert "minilm/sst2: best budget" in scale and "of full FT's gain over the majority class" in scale


def test_a_mean_beats_a_level_by_two_standard_errors_or_is_not_judged():
    assert apet.beats(0.60, 0.05, 4, 0.5) is True  # 0.60 − 2·0.025 = 0.55 > 0.5
    assert apet.beats(0.55, 0.05, 4, 0.5) is False  # 0.50, not above
    assert apet.beats(0.9, None, 1, 0.5) is None and apet.beats(None, None, 0, 0.5) is None


def test_reaching_full_fine_tuning_counts_the_reference_seeds_spread_too():
    cell = {"mean": 0.810, "std": 0.008, "n_runs": 9}
    # full FT 0.821 ± 0.024 over 3 seeds: se of the difference 0.014, the budget is within two of it
    assert apet._not_below(cell, {"mean": 0.821, "std": 0.024, "n_seeds": 3})
    assert not apet._not_below(cell, {"mean": 0.821, "std": 0.001, "n_seeds": 3})  # a tight reference: below
    assert not apet._not_below(cell, {"mean": 0.80, "std": None, "n_seeds": 1})  # one seed: no verdict
    assert apet._above([0.77, 0.76, 0.78], (0.762, 0.017, 3, 0.01)) is False  # the probe's spread counts
    assert apet._above([0.80, 0.81, 0.79], (0.762, 0.005, 3, 0.01)) is True


def test_reaching_full_fine_tuning_with_fewer_parameters_in_the_larger_model():
    from paper_figs.figures.apet import _reach_verdict

    payload = {"smallest_budget_reaching_full": {"minilm/sst2": 10000, "minilm/cola": 1000, "minilm/rte": None,
                                                 "smollm2/sst2": 1000, "smollm2/cola": 10000, "smollm2/rte": 100}}
    budgets = [100, 1000, 10000]
    payload["config"] = {"models": ["minilm", "smollm2"], "budgets": budgets, "draws": [0, 1], "seeds": [0]}
    payload["cells"] = [{"model": m, "task": t, "budget": b, "n_runs": 2}
                        for m in ("minilm", "smollm2") for t in ("sst2", "cola", "rte") for b in budgets]
    text = _reach_verdict(payload)
    assert "sst2: minilm needs 1e+4, smollm2 1e+3 — holds" in text
    assert "cola: minilm needs 1e+3, smollm2 1e+4 — does not hold" in text
    # on a complete table "no budget" is a verdict: the larger model reaches it, the smaller never does
    assert "rte: minilm reaches it at no budget up to 1e+4, smollm2 needs 1e+2 — holds" in text
    payload["smallest_budget_reaching_full"].update({"minilm/rte": 100, "smollm2/rte": None})
    assert "rte: minilm needs 1e+2, smollm2 reaches it at no budget up to 1e+4 — does not hold" in _reach_verdict(
        payload)
    payload["smallest_budget_reaching_full"]["minilm/rte"] = None
    assert "rte: inconclusive (neither model reaches full FT at any budget up to 1e+4)" in _reach_verdict(payload)
    payload["cells"][-1]["n_runs"] = 1  # smollm2/rte at the top budget is missing a run: not judged yet
    assert "rte: open (no budget reaches full FT in minilm yet)" in _reach_verdict(payload)
    payload["full"] = [{"model": "minilm", "task": "cola", "mean": -0.013, "beats_majority": False},
                       {"model": "smollm2", "task": "cola", "mean": 0.17, "beats_majority": True}]
    assert "cola: not a test (full FT does not beat the majority class in minilm: -0.013" in _reach_verdict(payload)


def test_the_recovered_gain_leaves_out_cells_whose_original_space_does_not_rise_above_the_base():
    from paper_figs.figures.unified_subspace import recovered

    payload = {"majority": {"rte": 0.5, "cola": 0.0}, "head_only": {"cola": {"mean": 0.1}},
               "cells": [{"task": "rte", "method": "lora", "dim": 4, "mean": 0.52,
                          "original": {"mean": 0.53, "std": 0.03, "n_seeds": 3}},  # gain 0.03 < 2 se = 0.035
                         {"task": "cola", "method": "lora", "dim": 4, "mean": 0.2,
                          "original": {"mean": 0.3, "std": 0.01, "n_seeds": 3}}]}
    rel, left_out = recovered(payload)
    assert rel == {4: [pytest.approx(0.5)]} and left_out == ["rte/lora d=4"]  # cola from the head-only level


def _spec(name: str):
    return registry(ROOT / "paper_figs" / "figures")[name]


@pytest.fixture
def unified_results(tmp_path, monkeypatch):
    for name in ("SELECT_OUT", "TABLE_OUT", "TRANSFER_OUT", "APPROX_OUT"):
        monkeypatch.setattr(unified_subspace, name, tmp_path / getattr(unified_subspace, name).name)
    monkeypatch.setattr(unified_subspace, "LANDSCAPE_OUT", tmp_path / "unified_landscape.json")
    monkeypatch.setattr(unified_subspace, "SUMMARY", tmp_path / "unified_subspace.json")
    monkeypatch.setattr(unified_subspace, "glue_majority", lambda _: dict.fromkeys(unified_subspace.TASKS, 0.5))
    monkeypatch.setattr(unified_subspace, "_glue_cell",
                        lambda task, method: {"mean": 0.8, "std": 0.01, "n_seeds": 3, "lr": 1e-3, "stage": "table"})
    for dim in unified_subspace.DIMS:
        proj = str(unified_subspace.projections_path("rte", dim))
        for method in unified_subspace.METHODS:
            options = {"projections": proj, "delta": method}
            rates = ((3e-3, 0.6, 0.6), (3e-2, 0.72, 0.65))  # the chosen one is the table's seed 0
            if method == "adapter":  # bracketed by a worse rate above it; the others' 3e-2 is the top edge
                rates += ((3e-1, 0.6, 0.55),)
            for lr, dev, val in rates:
                append_jsonl(unified_subspace.SELECT_OUT, _row({"model": "minilm", "task": "rte", "lr": lr, "seed": 0,
                                                                "method": "unified_subspace", "options": options},
                                                               dev, val))
            for seed in (0, 1, 2):
                row = _row({"model": "minilm", "task": "rte", "lr": 3e-2, "seed": seed, "method": "unified_subspace",
                            "options": options}, 0.72 + 0.01 * seed, 0.65)
                append_jsonl(unified_subspace.TABLE_OUT, row)
                others = {m: 0.55 for m in unified_subspace.METHODS if m != method}
                append_jsonl(unified_subspace.TRANSFER_OUT, {"cell": row["cell"], "task": "rte", "seed": seed,
                                                             "projections": proj, "from": method,
                                                             "from_score": row["score_at_best_val"],
                                                             "metric": "accuracy", "to": others})
        if dim == unified_subspace.DIMS[0]:  # the head-only control: z frozen at 0 through LoRA
            options = {"projections": proj, **unified_subspace.HEAD_ONLY}
            for lr in (3e-3, 3e-2):
                append_jsonl(unified_subspace.SELECT_OUT, _row({"model": "minilm", "task": "rte", "lr": lr, "seed": 0,
                                                                "method": "unified_subspace", "options": options},
                                                               0.55, 0.6 if lr == 3e-3 else 0.5))
            for seed in (0, 1, 2):
                append_jsonl(unified_subspace.TABLE_OUT, _row({"model": "minilm", "task": "rte", "lr": 3e-3,
                                                               "seed": seed, "method": "unified_subspace",
                                                               "options": options}, 0.55, 0.6))
        append_jsonl(unified_subspace.APPROX_OUT, {"target": "rte", "dim": dim, "path": proj,
                                                   "info": {"seconds": 1.0, "reconstruction": []}})
    grid = [0.0, 0.5, 1.0]
    points = [{"alpha": a, "beta": b, "scores": {"lora": 0.9 - a, "adapter": 0.9 - b, "prefix": 0.7}}
              for a in grid for b in grid]
    write_json(unified_subspace.LANDSCAPE_OUT, {"task": "sst2", "metric": "accuracy",
                                                "methods": list(unified_subspace.METHODS),
                                                "plane": list(unified_subspace.METHODS), "grid": grid, "n_dev": 8,
                                                "points": points})
    return tmp_path


def test_unified_summary_and_figures(unified_results, tmp_path):
    out = unified_subspace.summary()
    cells = {(c["method"], c["dim"]): c for c in out["cells"]}
    assert len(cells) == 6 and cells[("lora", 4)]["lr"] == 3e-2 and cells[("lora", 4)]["n_seeds"] == 3
    assert out["head_only"]["rte"] == {"mean": pytest.approx(0.55), "std": 0.0, "n_seeds": 3, "lr": 3e-3,
                                       "rate_at_edge": True}  # the lowest of its two rates
    assert {k for k, c in cells.items() if not c["rate_at_edge"]} == {("adapter", 4), ("adapter", 32)}
    assert cells[("adapter", 32)]["head_only"]["mean"] == pytest.approx(0.55)
    assert cells[("lora", 4)]["mean"] == pytest.approx(0.73)
    diag = [t for t in out["transfer"] if t["from"] == t["to"]]
    assert len(out["transfer"]) == 18 and all(t["mean"] == pytest.approx(0.73) for t in diag)
    # lora is good for α ≤ 0.4 (3 of 9 points), adapter for β ≤ 0.4, prefix everywhere: 1 point shared of 9
    assert out["landscape_overlap"] == {"jaccard": pytest.approx(1 / 9), "n_points": 9,
                                        "good": {"lora": 3, "adapter": 3, "prefix": 9}, "shared": 1}
    for name in ("unified_subspace", "subspace_transfer"):
        paths = render(_spec(name), unified_results, tmp_path / "figs")
        assert paths[1].read_bytes()[:4] == b"\x89PNG"
    caption = (tmp_path / "figs" / "unified_subspace.caption.md").read_text()
    # (0.73 − 0.55) / (0.8 − 0.55) = 0.72 of the original space's gain over the head-only control
    assert "recovers 0.72 of the original space's gain" in caption and "the claim does not hold here" in caption
    assert "rte: 0.550 (head-only)" in caption
    assert ("the score may be the grid's, not the method's): rte/lora d=32 (rate 0.03); rte/lora d=4 (rate 0.03); "
            in caption)
    assert "rte/adapter" not in caption.split("not the method's)")[1]
    assert "rte/prefix d=4 (rate 0.03); rte/head-only control (rate 0.003)." in caption
    transfer = (tmp_path / "figs" / "subspace_transfer.caption.md").read_text()
    assert "12 of 12 off-diagonal" in transfer and "Jaccard 0.111" in transfer
    assert "0 of 12 above the head-only control" in transfer  # every transferred entry ties the control at 0.55


def test_the_spread_claim_leaves_out_budgets_that_add_nothing_to_the_head():
    from paper_figs.figures.apet import spread_claim

    def cell(model, budget, spread, beats):
        return {"model": model, "task": "cola", "budget": budget, "position_spread": spread, "beats_probe": beats}

    payload = {"config": {"draws": [0, 1, 2]},
               "cells": [cell("minilm", 100, 0.004, False), cell("smollm2", 100, 0.0, False),  # the probe's score
                         cell("minilm", 1000, 0.003, False), cell("smollm2", 1000, 0.035, True)]}
    text = spread_claim(payload)
    assert "in 0 of 1 (task, budget) pairs" in text and "does not hold" in text
    assert "left out, neither model above the linear probe: cola B=100" in text


def test_the_plan_counts_the_edge_rates_it_will_run_and_every_cell_it_counts_as_done(apet_results):
    from collections import Counter

    from controltune.results import read_jsonl

    select = read_jsonl(apet.SELECT_OUT)
    rows = select + read_jsonl(apet.TABLE_OUT)
    kind = lambda c: (c["model"], c["method"])  # noqa: E731
    planned = Counter(kind(c) for c in apet.plan_cells(("minilm", "smollm2"), ("sst2",), select))
    done = apet.cells_done(("minilm", "smollm2"), ("sst2",), select, rows, kind)
    assert all(n <= planned[k] for k, n in done.items())  # else cells still to run vanish from the estimate
    grid = len(apet.BUDGETS) * (len(apet.RATES) + len(apet.DRAWS) * len(apet.SEEDS) - 1)
    # a two-rate grid's choice is always at an edge: every budget runs one more rate beyond it (the largest below,
    # the others above), which the grid alone does not count
    assert planned[("minilm", "arbitrary")] == grid + len(apet.BUDGETS)


def test_a_complete_unified_study_remakes_nothing_and_a_missing_row_is_work(tmp_path, monkeypatch):
    """On the committed rows the study is complete (a fresh machine need not remake its projections); one transfer
    or the landscape missing is work again."""
    import shutil

    results = ROOT / "experiments" / "results"
    for name in ("APPROX_OUT", "SELECT_OUT", "TABLE_OUT", "TRANSFER_OUT", "LANDSCAPE_OUT"):
        path = getattr(unified_subspace, name)
        shutil.copy(results / path.name, tmp_path / path.name)
        monkeypatch.setattr(unified_subspace, name, tmp_path / path.name)
    monkeypatch.setattr(unified_subspace, "RESULTS", tmp_path)  # the specs' outputs, never written here
    assert unified_subspace.nothing_to_run(unified_subspace.TASKS)
    transfers = (tmp_path / "unified_transfer.jsonl").read_text().splitlines()
    (tmp_path / "unified_transfer.jsonl").write_text("\n".join(transfers[1:]) + "\n")
    assert not unified_subspace.nothing_to_run(unified_subspace.TASKS)
    (tmp_path / "unified_transfer.jsonl").write_text("\n".join(transfers) + "\n")
    assert unified_subspace.nothing_to_run(unified_subspace.TASKS)
    (tmp_path / "unified_landscape.json").unlink()
    assert not unified_subspace.nothing_to_run(unified_subspace.TASKS)
