"""What a study's cells cost (``experiments/cost_model.py``): core-hours spent and to run, timed by each kind's own
finished rows, and the step-and-row model that estimates the kinds not timed yet."""

from __future__ import annotations

import pytest


def test_observed_core_hours_times_each_kind_by_its_own_finished_rows():
    from experiments.cost_model import describe_hours, observed_core_hours

    rows = [{"config": {"task": "cola"}, "status": "done", "wall_time_s": 3600.0},
            {"config": {"task": "cola"}, "status": "done", "wall_time_s": 7200.0},
            {"config": {"task": "cola"}, "status": "failed", "wall_time_s": 99.0}]  # not a finished cell
    est = observed_core_hours({"cola": 4, "rte": 3}, rows, lambda r: r["config"]["task"])
    assert est == {"spent": 3.0, "remaining": 3.0, "unknown": 3}  # 2 cola cells left at 1.5 h; rte untimed
    assert observed_core_hours({"cola": 4}, rows, lambda r: r["config"]["task"], done={"cola": 0})["remaining"] == 6.0
    assert describe_hours("cells", est) == ("cells: 3.0 core-h spent, ~3.0 core-h to run "
                                            "(3 cells of kinds not timed yet)")



def test_sweep_hours_counts_as_done_only_the_rows_that_are_cells_of_the_plan():
    from experiments.cost_model import sweep_hours

    def cfg(lr, seed=0):
        return {"task": "cola", "method": "lora", "lr": lr, "seed": seed}

    cells = [cfg(lr) for lr in (1e-4, 1e-3, 1e-2, 1e-1)]  # the grid and the edge rate it led to
    rows = [{"config": cfg(lr), "status": "done", "wall_time_s": 3600.0} for lr in (1e-4, 1e-3, 1e-2)]
    rows += [{"config": cfg(5.0), "status": "done", "wall_time_s": 3600.0},  # a rate no longer planned
             {"config": cfg(1e-3), "status": "done", "wall_time_s": 3600.0, "copied_from": "glue"},  # one cell
             {"config": cfg(1e-3, seed=1), "status": "done", "wall_time_s": 3600.0}]
    est = sweep_hours(cells, rows, seeds_after=2)
    # planned 4 + 2; done 3 selection cells + 1 further seed: the edge rate and seed 2 are left, at 1 h each
    assert est["remaining"] == pytest.approx(2.0) and est["unknown"] == 0
    assert est["spent"] == pytest.approx(5.0)  # every timed row of the kind, the copy aside



def test_the_cost_model_counts_steps_and_scored_rows_and_scales_the_reference_step(monkeypatch):
    from experiments import cost_model as cm

    monkeypatch.setattr(cm, "_split_size", lambda task, split: {"train": 1000, "dev": 300}[split])
    monkeypatch.setattr(cm, "reference_step_seconds", lambda: {("cola", "lora"): 0.2, ("cola", "prompt"): 0.4})
    monkeypatch.setattr(cm, "model_factors", lambda: {"minilm": {"*": 1.0}, "smollm2": {"lora": 10.0, "*": 8.0}})
    cfg = {"model": "minilm", "task": "cola", "method": "lora", "batch_size": 16, "epochs": 2, "train_size": None,
           "val_size": 0.1, "eval_every": 50, "dev_size": None}
    assert cm.cell_steps(cfg) == 2 * 57  # ceil(900 / 16) per epoch
    assert cm.scored_rows(cfg) == (114 // 50 + 1) * 100 + 2 * 300  # validation at 2 evaluations and the end; dev twice
    assert cm.estimated_seconds(cfg) == 0.2 * 0.5 * (114 + 900 / 96)
    no_val = {**cfg, "val_size": None}
    assert cm.scored_rows(no_val) == (2 * 63 // 50 + 1) * 300  # without validation rows every evaluation scores dev
    sequential = {**cfg, "method": "prompt+lora", "sequential": True}
    assert cm.cell_steps(sequential) == 2 * 114
    assert cm.step_seconds(sequential) == 0.4 * 0.5  # a combination costs its dearest part
    assert cm.step_seconds({**cfg, "model": "smollm2", "method": "gramian_lora"}) == 0.2 * 0.5 * 8.0
    with pytest.raises(ValueError, match="no GLUE rows"):
        cm.step_seconds({**cfg, "method": "nonesuch"})


def test_kinds_not_timed_yet_are_estimated_as_the_sweeps_timed_cells_ran_on_their_task(monkeypatch):
    from experiments import cost_model as cm

    monkeypatch.setattr(cm, "estimated_seconds", lambda config: 1000.0)  # the GLUE table's step times say 1000 s

    def row(task, method, seconds):
        return {"config": {"task": task, "method": method, "lr": 1e-3, "seed": 0}, "status": "done",
                "wall_time_s": seconds}

    rows = [row("mrpc", "lora", s) for s in (600.0, 650.0, 700.0)] + [row("cola", "lora", 1000.0)]
    assert cm.sweep_scale(rows) == {"mrpc": pytest.approx(0.65)}  # CoLA: one row is too few to rescale
    cells = [{"task": t, "method": "pissa", "lr": 1e-3, "seed": 0} for t in ("mrpc", "cola")]
    kind = cm.cell_kind
    planned = {kind(c): 2 for c in cells} | {kind(row("mrpc", "lora", 0)["config"]): 3}
    est = cm.observed_core_hours(planned, rows, lambda r: kind(r["config"]))
    est = cm.with_estimate(est, planned, cells, kind, rows)
    assert est["estimated"] == pytest.approx((2 * 650.0 + 2 * 1000.0) / 3600)  # MRPC scaled, CoLA as estimated
    assert est["scale"] == {"mrpc": pytest.approx(0.65)}
    assert "scaled as this sweep's timed cells ran on the same task: mrpc ×0.65)" in cm.describe_hours("cells", est)
