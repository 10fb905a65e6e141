"""Issue 15's study summaries and figures, from synthetic rows in the sweeps' formats (nothing is trained)."""

from __future__ import annotations

import itertools
import json

import pytest
from study_rows import rendered_caption, sweep_row

from controltune.results import append_jsonl, write_json
from experiments import (
    composability,
    generalization_gap,
    scale,
    sequential,
    unipelt_low_resource,
)


def test_sequential(tmp_path, monkeypatch):
    monkeypatch.setattr(sequential, "OUT", tmp_path / "sequential.jsonl")
    monkeypatch.setattr(sequential, "SUMMARY", tmp_path / "sequential.json")
    monkeypatch.setattr(sequential, "stage_rates", lambda: {"prompt": 1e-2, "bitfit": 5e-3, "adapter": 2e-3})
    for order in sequential.ORDERS:
        for seed in sequential.SEEDS:
            stages = [{"stage": i, "method": p, "score_at_best_val": 0.7 + 0.05 * i + 0.001 * seed}
                      for i, p in enumerate(order.split("+"))]
            append_jsonl(sequential.OUT, sweep_row({"method": order, "seed": seed}, stages[-1]["score_at_best_val"],
                                                   stages=stages))
    out = sequential.summary()
    assert len(out["orders"]) == 6 and all(o["n_seeds"] == 3 for o in out["orders"])
    assert len(out["steps"]) == 12 and all(s["verdict"] == "helps" for s in out["steps"])
    assert out["claims"] == {"keeps_improving": True, "no_best_order": True} and out["collapsed"] == []
    assert len(out["improving_orders"]) == 6 and out["best_vs_single"]["verdict"] == "above"
    caption = rendered_caption("sequential", tmp_path, tmp_path / "figs")
    assert "helped in 12, hurt in 0" in caption and "6 of 6 orders keep improving" in caption


def test_sequential_flags_a_collapsed_stage_and_a_dominant_order(tmp_path, monkeypatch):
    """A stage that leaves a run at SST-2's majority class (0.509 on 872 dev rows) is named; an order that beats
    the other five by two standard errors means "no order is best" did not hold; stages that only lose keep
    no order improving."""
    monkeypatch.setattr(sequential, "OUT", tmp_path / "sequential.jsonl")
    monkeypatch.setattr(sequential, "SUMMARY", tmp_path / "sequential.json")
    monkeypatch.setattr(sequential, "stage_rates", lambda: {"prompt": 1e-2, "bitfit": 5e-3, "adapter": 2e-3})
    monkeypatch.setattr(sequential, "_majority_rows",
                        lambda: [{"task": "sst2", "mean": 0.5091743119266054, "n_dev": 872}])
    for order in sequential.ORDERS:
        for seed in sequential.SEEDS:
            top = 0.9 if order == sequential.ORDERS[0] else 0.8
            scores = [top + 0.001 * seed, top - 0.01 + 0.001 * seed, top - 0.02 + 0.001 * seed]
            if order == sequential.ORDERS[1] and seed == 0:
                scores[2] = 0.52  # within 2 binomial se (0.034) of 0.509
            stages = [{"stage": i, "method": p, "score_at_best_val": scores[i]} for i, p in enumerate(order.split("+"))]
            append_jsonl(sequential.OUT, sweep_row({"method": order, "seed": seed}, scores[2], stages=stages))
    out = sequential.summary()
    assert out["collapsed"] == [{"order": sequential.ORDERS[1], "seed": 0, "stage": 2,
                                 "part": sequential.ORDERS[1].split("+")[2], "score": 0.52}]
    assert out["best_order"] == sequential.ORDERS[0] and len(out["beaten_by_best"]) == 5
    assert out["claims"] == {"keeps_improving": False, "no_best_order": False}
    assert sequential.at_chance(0.542, 0.509, 872) and not sequential.at_chance(0.545, 0.509, 872)
    caption = rendered_caption("sequential", tmp_path, tmp_path / "figs")
    assert "does not hold here" in caption and f"{sequential.ORDERS[1]} seed 0 after" in caption


def test_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "SELECT_OUT", tmp_path / "s.jsonl")
    monkeypatch.setattr(scale, "TABLE_OUT", tmp_path / "t.jsonl")
    monkeypatch.setattr(scale, "SUMMARY", tmp_path / "scale.json")
    for model, task, method in itertools.product(scale.MODELS, scale.TASKS, scale.METHODS):
        gain = {"minilm": 0.0, "smollm2": 0.1 if method == "prompt" else 0.05}[model]
        base = 0.8 + (0.02 if method == "selective" else 0.0)
        for seed in (0, 1, 2):
            append_jsonl(scale.SELECT_OUT if seed == 0 else scale.TABLE_OUT,
                         sweep_row({"model": model, "task": task, "method": method, "lr": 1e-3, "seed": seed},
                                   base + gain + 0.002 * seed))
    levels = {"sst2": 0.5, "mrpc": 0.5}
    monkeypatch.setattr(scale, "majority_levels", lambda tasks: {t: levels[t] for t in tasks})
    out = scale.summary(tuple(scale.MODELS), scale.TASKS)
    assert len(out["cells"]) == 28 and all(g["verdict"] == "improves" for g in out["gains"])
    assert all(s["verdict"] == "selective better" for s in out["selective_vs_last_layer"])
    assert out["claims"] == {"every_method_improves": True, "prompt_improves_most": True,
                             "prompt_most_per_task": {"mrpc": True, "sst2": True},
                             "selective_beats_last_layer": True, "they_do_well": True}
    caption = rendered_caption("scale", tmp_path, tmp_path / "figs")
    assert "(task, method) pairs: improves 14 — holds here" in caption and "prompt larger 12" in caption
    levels["mrpc"] = 0.95  # every MRPC cell at chance: no test of either claim there
    out = scale.summary(tuple(scale.MODELS), scale.TASKS)
    assert all(g["verdict"] == "not a test" for g in out["gains"] if g["task"] == "mrpc")
    assert out["claims"]["prompt_most_per_task"] == {"sst2": True} and out["claims"]["every_method_improves"]
    caption = rendered_caption("scale", tmp_path, tmp_path / "figs")
    assert "(task, method) pairs: improves 7, not a test 7 — holds here" in caption
    assert "(model, task) pairs: selective better 2, not a test 2 — holds here" in caption
    # before the grid is complete (SmolLM2's MRPC full FT lacks seed 2), a worsening between complete cells already
    # decides "every method improves", and the selective pairs, whose cells are all complete, decide theirs
    levels["mrpc"] = 0.5

    def edit(path):
        rows = [r for r in scale.read_jsonl(path) if not (path == scale.TABLE_OUT and r["config"]["seed"] == 2 and (
            r["config"]["model"], r["config"]["task"], r["config"]["method"]) == ("smollm2", "mrpc", "full"))]
        path.write_text("".join(json.dumps({**r, "score_at_best_val": r["score_at_best_val"] - 0.2} if (
            r["config"]["model"], r["config"]["task"], r["config"]["method"]) == ("smollm2", "sst2", "lora")
            else r) + "\n" for r in rows))

    edit(scale.SELECT_OUT)
    edit(scale.TABLE_OUT)
    out = scale.summary(tuple(scale.MODELS), scale.TASKS)
    assert not out["progress"]["complete"]
    assert out["claims"]["every_method_improves"] is False and out["decided_early"]["every_method_improves"]
    assert out["claims"]["selective_beats_last_layer"] is True  # 4 of 4 selective better, nothing left to run
    assert out["claims"]["prompt_improves_most"] is None and not out["decided_early"]["prompt_improves_most"]
    caption = rendered_caption("scale", tmp_path, tmp_path / "figs")
    assert "worsens 1" in caption and "does not hold here (decided before the grid is complete" in caption


def test_prompt_improves_most_is_judged_per_task_against_each_method(tmp_path, monkeypatch):
    """Prompt gains least on SST-2 (+0.04 against +0.05 for every other method) and is at chance on MRPC: a mean
    over tasks and metrics would crown it; per task, against each method by two standard errors, it does not hold.
    A tie with every other method leaves it open."""
    monkeypatch.setattr(scale, "SELECT_OUT", tmp_path / "s.jsonl")
    monkeypatch.setattr(scale, "TABLE_OUT", tmp_path / "t.jsonl")
    monkeypatch.setattr(scale, "SUMMARY", tmp_path / "scale.json")
    monkeypatch.setattr(scale, "majority_levels", lambda tasks: {"sst2": 0.5, "mrpc": 0.85})

    def write(prompt_gain):
        for path in (scale.SELECT_OUT, scale.TABLE_OUT):
            path.unlink(missing_ok=True)
        for model, task, method in itertools.product(scale.MODELS, scale.TASKS, scale.METHODS):
            big = model == "smollm2"
            if task == "mrpc":
                score = 0.84 if method == "prompt" else 0.86 + (0.01 if big else 0.0)
            else:
                score = 0.8 + ((prompt_gain if method == "prompt" else 0.05) if big else 0.0)
            for seed in (0, 1, 2):
                append_jsonl(scale.SELECT_OUT if seed == 0 else scale.TABLE_OUT,
                             sweep_row({"model": model, "task": task, "method": method, "lr": 1e-3, "seed": seed},
                                       score + 0.002 * seed))
        return scale.summary(tuple(scale.MODELS), scale.TASKS)

    out = write(0.04)
    assert out["claims"]["prompt_most_per_task"] == {"sst2": False} and out["claims"]["prompt_improves_most"] is False
    out = write(0.05)
    assert out["claims"]["prompt_most_per_task"] == {"sst2": None} and out["claims"]["prompt_improves_most"] is None
    out = write(0.08)  # larger than every other method's +0.05 by 2 se (the seeds' spread is shared): shown
    assert out["claims"]["prompt_most_per_task"] == {"sst2": True} and out["claims"]["prompt_improves_most"] is True


def test_prompt_improves_most_is_open_while_it_ties_any_method(tmp_path, monkeypatch):
    """Scale's SST-2 pattern: prompt's gain beats one method's (which worsens) and ties the others'. Exceeding
    one method does not show it improves most: open, not held."""
    gains = [{"task": "sst2", "method": "prompt", "gain": 0.012, "se": 0.019, "verdict": "tie"},
             {"task": "sst2", "method": "prefix", "gain": -0.078, "se": 0.009, "verdict": "worsens"},
             {"task": "sst2", "method": "lora", "gain": 0.038, "se": 0.005, "verdict": "improves"}]
    prompt_vs = scale.prompt_against_others(gains)
    assert [c["verdict"] for c in prompt_vs] == ["tie", "prompt larger"]
    claims = scale.scale_claims(gains, prompt_vs, [], [])
    assert claims["prompt_most_per_task"] == {"sst2": None} and claims["prompt_improves_most"] is None
    # larger than both, but its own gain not above zero: it does not improve, so it cannot improve most
    gains[2] = {**gains[2], "gain": -0.05, "verdict": "worsens"}
    prompt_vs = scale.prompt_against_others(gains)
    assert [c["verdict"] for c in prompt_vs] == ["prompt larger", "prompt larger"]
    assert scale.scale_claims(gains, prompt_vs, [], [])["prompt_most_per_task"] == {"sst2": None}


def test_unipelt(tmp_path, monkeypatch):
    monkeypatch.setattr(unipelt_low_resource, "SELECT_OUT", tmp_path / "s.jsonl")
    monkeypatch.setattr(unipelt_low_resource, "TABLE_OUT", tmp_path / "t.jsonl")
    monkeypatch.setattr(unipelt_low_resource, "SUMMARY", tmp_path / "unipelt_low_resource.json")
    for task, k, method in itertools.product(unipelt_low_resource.TASKS, unipelt_low_resource.KS,
                                             unipelt_low_resource.METHODS):
        for seed in (0, 1, 2):
            score = (0.8 if method == "unipelt" else 0.7) + 0.002 * seed
            append_jsonl(unipelt_low_resource.SELECT_OUT if seed == 0 else unipelt_low_resource.TABLE_OUT,
                         sweep_row({"task": task, "train_size": k, "method": method, "lr": 1e-3, "seed": seed}, score))
    # CoLA's level above every score: UniPELT and its parts all at chance there, no test of the claim
    levels = {"sst2": 0.5, "mrpc": 0.5, "rte": 0.5, "cola": 0.85}
    monkeypatch.setattr(unipelt_low_resource, "glue_majority", lambda _: levels)
    out = unipelt_low_resource.summary(unipelt_low_resource.TASKS)
    assert out["counts"] == {"win": 27, "tie": 0, "loss": 0, "not a test": 9, "too few seeds": 0}
    assert all(c["verdict"] == "not a test" for c in out["comparisons"] if c["task"] == "cola")
    caption = rendered_caption("unipelt_low_resource", tmp_path, tmp_path / "f")
    assert out["per_k"]["100"]["holds"] is True and out["per_k"]["100"]["not a test"] == 3
    assert "K = 100: wins 9, ties 0, losses 0, 3 not a test — holds here" in caption
    assert "Over all K: holds here (wins 27, ties 0, losses 0)" in caption
    assert out["progress"] == {"planned": 48, "with_all_seeds": 48, "complete": True}
    # a table that has not run every seed (here the last task's seed 2) gives its counts and no verdict
    kept = [r for r in unipelt_low_resource.read_jsonl(unipelt_low_resource.TABLE_OUT)
            if not (r["config"]["task"] == "cola" and r["config"]["seed"] == 2)]
    unipelt_low_resource.TABLE_OUT.write_text("".join(json.dumps(r) + "\n" for r in kept))
    out = unipelt_low_resource.summary(unipelt_low_resource.TASKS)
    assert out["progress"] == {"planned": 48, "with_all_seeds": 36, "complete": False}
    caption = rendered_caption("unipelt_low_resource", tmp_path, tmp_path / "f")
    assert "no verdict yet (36 of 48 cells have all 3 seeds)" in caption and "holds here" not in caption
    # a loss between two cells with all their seeds decides its K (the claim needs every test won) before the rest
    for path in (unipelt_low_resource.SELECT_OUT, unipelt_low_resource.TABLE_OUT):
        rows = unipelt_low_resource.read_jsonl(path)
        path.write_text("".join(json.dumps({**r, "score_at_best_val": 0.6} if (
            r["config"]["task"], r["config"]["train_size"], r["config"]["method"]) == ("sst2", 1000, "unipelt")
            else r) + "\n" for r in rows))
    out = unipelt_low_resource.summary(unipelt_low_resource.TASKS)
    assert out["per_k"]["1000"]["holds"] is False and out["per_k"]["1000"]["decided_early"] is True
    assert out["per_k"]["100"]["decided_early"] is False
    caption = rendered_caption("unipelt_low_resource", tmp_path, tmp_path / "f")
    assert "K = 1000: wins 6, ties 0, losses 3, 3 with too few seeds — does not hold here (decided" in caption
    assert "K = 100: wins 9, ties 0, losses 0, 3 with too few seeds — no verdict yet" in caption
    assert "Over all K: does not hold here (decided" in caption


def test_a_share_claim_is_decided_early_only_when_no_untested_outcome_can_change_it():
    from experiments.verdicts import share_verdict, share_verdict_early

    assert share_verdict_early(3, 1, 2, 0, 0.5) == share_verdict(3, 1, 2, 0.5)  # nothing untested: the same rule
    assert share_verdict_early(7, 0, 1, 4, 0.5) is True  # 7 of 12 even if the 4 untested all go against
    assert share_verdict_early(6, 0, 1, 5, 0.5, more_than=True) is None  # 6 of 12 is not more than half
    assert share_verdict_early(1, 6, 1, 4, 0.75) is False  # 1 + 1 + 4 of 12 cannot reach 75 %
    assert share_verdict_early(2, 2, 0, 8, 0.75) is None  # 10 of 12 still could
    assert share_verdict_early(0, 0, 0, 0, 0.5) is None


def test_composability_and_generalization_gap(tmp_path, monkeypatch):
    monkeypatch.setattr(composability, "SELECT_OUT", tmp_path / "s.jsonl")
    monkeypatch.setattr(composability, "TABLE_OUT", tmp_path / "t.jsonl")
    monkeypatch.setattr(composability, "SUMMARY", tmp_path / "composability.json")
    for task, subset in itertools.product(composability.TASKS, composability.SUBSETS):
        parts = subset.split("+")
        score = 0.7 + (0.1 if "adapter" in parts else 0) - (0.05 if "prompt" in parts else 0)
        for seed in (0, 1, 2):
            append_jsonl(composability.SELECT_OUT if seed == 0 else composability.TABLE_OUT,
                         sweep_row({"task": task, "method": subset, "lr": 1e-3, "seed": seed}, score + 0.001 * seed,
                                   train_scores={"accuracy": score + 0.02 * len(parts)}))
    # RTE's level above every score: adding a part there is no test
    monkeypatch.setattr(composability, "glue_majority", lambda _: {"sst2": 0.5, "mrpc": 0.5, "cola": 0.0, "rte": 0.9})
    composability.summary(composability.TASKS)
    caption = rendered_caption("composability", tmp_path, tmp_path / "f")
    assert "adapter helps in 9 of 9" in caption and "prompt hurts in 9 of 9" in caption
    assert "3 more not a test, both at the majority class" in caption
    # before the grid is complete (CoLA's seed 2 missing): decided where the missing comparisons cannot change it
    whole = composability.TABLE_OUT.read_text()
    kept = [r for r in composability.read_jsonl(composability.TABLE_OUT)
            if not (r["config"]["task"] == "cola" and r["config"]["seed"] == 2)]
    composability.TABLE_OUT.write_text("".join(json.dumps(r) + "\n" for r in kept))
    out = composability.summary(composability.TASKS)
    assert not out["progress"]["complete"]
    # of 9 tests (RTE's 3 are none), 3 wait for CoLA: prompt hurts in 6, more than half whatever they give; the
    # adapter helps in 6, and the 3 could still bring it to 75 %; BitFit ties 6, and 3 helps would still not decide it
    assert out["claims"] == {"prompt": True, "bitfit": None, "adapter": None}
    assert out["decided_early"] == {"prompt": True, "bitfit": False, "adapter": False}
    caption = rendered_caption("composability", tmp_path, tmp_path / "f")
    assert "prompt hurts in 6 of 9 (helps 0, no effect 0, hurts 6, too few seeds 3; 3 more not a test, both at the " \
           "majority class), holds here (decided before the grid is complete" in caption
    assert "adapter helps in 6 of 9 (helps 6, no effect 0, hurts 0, too few seeds 3; 3 more not a test, both at " \
           "the majority class), no verdict yet" in caption
    composability.TABLE_OUT.write_text(whole)
    composability.summary(composability.TASKS)
    glue = {"rows": [{"task": t, "method": m, "generalization_gap": g, "generalization_gap_std": 0.01,
                      "n_train_scored": 3} for t in ("sst2", "rte")
                     for m, g in (("full", 0.2), ("lora", 0.05), ("prompt", 0.01), ("adapter", 0.03))]}
    write_json(tmp_path / "glue_table.json", glue)
    generalization_gap.summary(tmp_path)  # what the GLUE table's summary calls
    gap = rendered_caption("generalization_gap", tmp_path, tmp_path / "f")
    assert "smaller in 6 of 6 (task, method) pairs, holds here" in gap
    assert "two standard errors: sst2 holds here, rte holds here (holds here: held on every task" in gap
    assert "Gaps per task (each task's own metric): sst2: full 0.200, lora 0.050, adapter 0.030, prompt 0.010" in gap
    glue["rows"][1]["generalization_gap"] = 0.19  # sst2 LoRA within two standard errors of full FT: a tie
    write_json(tmp_path / "glue_table.json", glue)
    generalization_gap.summary(tmp_path)  # what the GLUE table's summary calls
    gap = rendered_caption("generalization_gap", tmp_path, tmp_path / "f")
    assert "smaller in 5 of 6 (task, method) pairs (not smaller: sst2/lora tie), inconclusive" in gap
    # prompt+adapter's gap 0.039 ± 0.001 against the adapter's 0.03 alone (BitFit has no GLUE row here): within two
    # standard errors while the adapter's spread is 0.01, wider once it is 0.001
    assert "wider in 0 of 2 (task, combination) pairs, tie 2, narrower 0, too few seeds 0" in gap
    for row in glue["rows"]:
        row["generalization_gap_std"] = 0.001
    write_json(tmp_path / "glue_table.json", glue)
    generalization_gap.summary(tmp_path)  # what the GLUE table's summary calls
    gap = rendered_caption("generalization_gap", tmp_path, tmp_path / "f")
    assert "wider in 2 of 2 (task, combination) pairs, tie 0, narrower 0, too few seeds 0: holds here" in gap
    # the same two pairs before the grid is complete: decided only when the pairs still to run cannot change it
    combo = json.loads((tmp_path / "composability.json").read_text())
    write_json(tmp_path / "composability.json", {**combo, "progress": {**combo["progress"], "complete": False}})
    for planned, held in ((3, True), (4, None)):  # 2 of 3 is more than half whatever the third; 2 of 4 is not yet
        monkeypatch.setattr(generalization_gap, "PLANNED_COMBINATIONS", planned)
        out = generalization_gap.summary(tmp_path)
        assert out["claims"]["combinations_widen"] is held
        assert out["decided_early"] == {"combinations_widen": held is not None}
    gap = rendered_caption("generalization_gap", tmp_path, tmp_path / "f")
    assert "too few seeds 0: no verdict yet" in gap


def test_glue_gaps_summary(tmp_path, monkeypatch):
    """The SST-2 budget curve and the RTE resolution from synthetic rows in the sweeps' formats."""
    from experiments import glue_gaps

    monkeypatch.setattr(glue_gaps, "RESULTS", tmp_path)
    monkeypatch.setattr(glue_gaps, "OUT", tmp_path / "glue_gaps.jsonl")
    monkeypatch.setattr(glue_gaps, "SUMMARY", tmp_path / "glue_gaps.json")

    def cfg(task, lr, seed=0, **more):
        return {"task": task, "method": "full", "lr": lr, "seed": seed, "train_size": None, "epochs": 5, **more}

    def row(config, selected, val=None, last=None, **extra):  # last: the dev score after the last step
        return {**sweep_row(config, selected, val, **extra), "score": selected if last is None else last}

    for task, lr, val, fit in (("sst2", 1e-4, 0.93, 0.99), ("sst2", 2e-5, 0.90, 0.95), ("rte", 8e-6, 0.64, 0.65),
                               ("rte", 2e-5, 0.60, 0.95)):
        append_jsonl(tmp_path / "glue_select.jsonl", row(cfg(task, lr), val - 0.05, val, last=val - 0.04,
                                                         train_scores={"accuracy": fit}))
    for seed, acc in ((0, 0.877), (1, 0.881), (2, 0.879)):
        append_jsonl(tmp_path / "glue_table.jsonl", row(cfg("sst2", 1e-4, seed), acc))
    for seed, acc in ((0, 0.556), (1, 0.570), (2, 0.563)):
        append_jsonl(tmp_path / "glue_table.jsonl", row(cfg("rte", 8e-6, seed), acc, last=acc + 0.01,
                                                        train_scores={"accuracy": 0.6 + seed / 100}))
    for size, acc in ((5000, 0.85), (None, 0.889)):
        append_jsonl(tmp_path / "glue_gaps.jsonl", row(cfg("sst2", 1e-4, train_size=size), acc, wall_time_s=1.0))
    for seed, acc in ((0, 0.57), (1, 0.59), (2, 0.60)):
        append_jsonl(tmp_path / "glue_gaps.jsonl", row(cfg("rte", 8e-6, seed, epochs=10), acc, last=0.58,
                                                      best_val={"step": 500}, total_steps=700))
    out = glue_gaps.summary()
    budget = out["sst2_budget"]
    assert [p["train_rows"] for p in budget["points"]] == [5000, 20000, 67349]
    assert "reaches 0.8890 >= 0.88: the table's gap is its 20k-row subsample" in budget["verdict"]
    assert budget["table_20k"]["mean"] == pytest.approx(0.879)
    rte = out["rte_resolution"]
    assert rte["n_dev"] == 277 and rte["binomial_se_one_score"] == pytest.approx((0.563 * 0.437 / 277) ** 0.5,
                                                                                  rel=1e-3)
    # the dev rows' error (0.030) is shared by every seed: it does not shrink with the seeds' 0.004
    assert rte["se_of_mean"] == pytest.approx((rte["se_over_seeds"] ** 2 + rte["binomial_se_one_score"] ** 2) ** 0.5)
    assert rte["goal_within_2se"] is True
    assert [r["epochs"] for r in rte["longer_training"]] == [10, 10, 10]
    longer = rte["longer_training_at_table_rate"]
    assert longer["n_seeds"] == 3 and longer["mean"] == pytest.approx(0.5866667) and longer["goal_met"] is True
    assert longer["se_of_mean"] > rte["binomial_se_one_score"] * 0.9
    # the RTE runs that fit their training rows best (0.95) score 0.55 on dev: the verdict says so with numbers
    assert len(rte["fit"]) == 4 and rte["fit_dev_rank_correlation"]["runs"] == 4  # table seed 0 is the selection cell
    assert rte["verdict"].startswith("full fine-tuning can fit RTE's training rows (training-row accuracy 0.950 at "
                                     "lr 2e-05, 5 epochs) without generalising (validation 0.600, dev 0.550)")
    assert json.loads((tmp_path / "glue_gaps.json").read_text())["rte_resolution"]["lr"] == 8e-6


def test_glue_table_keeps_measured_losses_when_run_folders_are_gone(tmp_path):
    """Each of a pair's two training losses (its own, full fine-tuning's) that cannot be measured now is kept from
    an earlier summary when the cells it was measured on are unchanged, and the reasons are given again from
    them; a loss measured now (a rebuilt run's) is not replaced."""
    from experiments import glue_table

    def pair(method, loss, full_loss, scores):
        reasons = {"rate_at_grid_edge": False, "best_val_at_last_step": "0/3", "train_loss_end": loss,
                   "full_train_loss_end": full_loss, "reasons": ["no measure here explains it"]}
        return {"task": "cola", "method": method, "lr": 2e-3, "seeds": [0, 1, 2], "scores": scores, "lr_grid": [2e-3],
                "gap_reasons": reasons if method != "full" else None}

    full = {"task": "cola", "method": "full", "lr": 1e-4, "seeds": [0, 1, 2], "scores": [0.3, 0.3, 0.3]}
    write_json(tmp_path / "glue_table.json", {"created": "then", "rows": [pair("prompt", 0.57, 0.2, [0.1, 0.2, 0.3]),
                                                                           full]})
    same = pair("prompt", None, None, [0.1, 0.2, 0.3])
    glue_table.carried_losses([same, dict(full)], tmp_path / "glue_table.json")
    g = same["gap_reasons"]
    assert (g["train_loss_end"], g["full_train_loss_end"]) == (0.57, 0.2) and g["carried"] == ["full_train_loss_end",
                                                                                                  "train_loss_end"]
    assert g["train_loss_source"] == "glue_table.json of then"
    assert g["reasons"] == ["it fits the training data less: final training loss 0.570 against full fine-tuning's "
                            "0.200"]
    # its own loss measured now (a rebuilt run): only full fine-tuning's is carried
    rebuilt = pair("prompt", 0.21, None, [0.1, 0.2, 0.3])
    glue_table.carried_losses([rebuilt, dict(full)], tmp_path / "glue_table.json")
    assert rebuilt["gap_reasons"]["train_loss_end"] == 0.21 and rebuilt["gap_reasons"]["carried"] == [
        "full_train_loss_end"]
    assert "about as well" in rebuilt["gap_reasons"]["reasons"][0]
    # other cells, its own or full fine-tuning's: that loss is not carried
    changed = pair("prompt", None, None, [0.1, 0.2, 0.4])
    glue_table.carried_losses([changed, {**full, "scores": [0.3, 0.3, 0.31]}], tmp_path / "glue_table.json")
    assert changed["gap_reasons"]["train_loss_end"] is None and changed["gap_reasons"]["full_train_loss_end"] is None


def test_convergence_reads_curves_from_rows_and_keeps_its_summary_when_curves_are_missing(tmp_path, monkeypatch):
    from experiments import convergence

    monkeypatch.setattr(convergence, "RESULTS", tmp_path)
    monkeypatch.setattr(convergence, "OUT", tmp_path / "convergence.json")
    monkeypatch.setattr(convergence, "validation_majority", lambda config: 0.5)

    def cfg(method, seed):
        return {"task": "sst2", "method": method, "lr": 1e-3, "seed": seed}

    curve = {"val": [{"step": 10, "accuracy": 0.7}, {"step": 20, "accuracy": 0.9}]}
    for method, seed in itertools.product(("full", "lora"), (0, 1)):
        append_jsonl(tmp_path / "glue_select.jsonl" if seed == 0 else tmp_path / "glue_table.jsonl",
                     sweep_row(cfg(method, seed), 0.9, curves=curve, total_steps=20, train_time_s=10.0))
    payload = convergence.main([])
    rows = {r["method"]: r for r in payload["rows"]}
    assert rows["lora"]["n_seeds"] == 2 and rows["lora"]["mean_val"] == [0.7, 0.9]
    assert rows["lora"]["seconds_per_step"] == 0.5 and payload["cells_without_curves"] == []
    # two seeds of full FT at 0.9 (no spread) over a level of 0.5: a test of the order
    assert rows["full"]["beats_majority"] is True and payload["orders"][0]["test"] is True
    before = (tmp_path / "convergence.json").read_text()
    gone = sweep_row(cfg("lora", 2), 0.9, run_dir="runs/gone")  # no curve, no folder
    append_jsonl(tmp_path / "glue_table.jsonl", gone)
    with pytest.raises(SystemExit, match="1 finished GLUE cells have no validation curve"):
        convergence.main([])
    assert (tmp_path / "convergence.json").read_text() == before
    assert convergence.main(["--allow-missing"])["cells_without_curves"] == [sweep_row(cfg("lora", 2), 0.9)["cell"]]
    # a machine that reads fewer curves than the summary holds leaves it as it was, even with --allow-missing
    before = (tmp_path / "convergence.json").read_text()
    lines = (tmp_path / "glue_table.jsonl").read_text().splitlines()
    (tmp_path / "glue_table.jsonl").write_text("\n".join(line for line in lines if '"seed": 1' not in line) + "\n")
    with pytest.raises(SystemExit, match="has more seeds' curves than this machine can read for sst2/full, sst2/lora"):
        convergence.main(["--allow-missing"])
    assert (tmp_path / "convergence.json").read_text() == before


def test_convergence_judges_the_order_seed_by_seed_and_a_task_full_fine_tuning_does_not_learn_is_not_a_test(
        tmp_path):
    from experiments.convergence import order_verdict, pair_order
    from paper_figs.figures.convergence import caption

    assert pair_order([10, 20, 20], [30, None, 40]) == "first"  # a seed that never reaches is later than any
    assert pair_order([30, None, 40], [10, 20, 20]) == "second"
    assert pair_order([10, 30, 20], [30, 40, 50]) == "not separated"  # one evaluation shared: not separated
    assert pair_order([None, None], [None, None, None]) == "neither reaches"

    steps = {"full": [10, 10, 10], "adapter": [20, 20, 30], "lora": [20, 20, 20], "prompt": [None] * 3}
    order = {"task": "rte", "test": False, "claimed": ["full", "adapter", "lora", "prompt"]}
    assert order_verdict(order, steps)["verdict"] == "not a test"
    held = order_verdict({**order, "test": True}, steps)
    assert held["verdict"] == "as claimed"  # adapter ≈ LoRA is not ordered by the claim
    assert {(p["faster"], p["slower"]) for p in held["pairs"]} == {
        ("full", "adapter"), ("full", "lora"), ("full", "prompt"), ("adapter", "prompt"), ("lora", "prompt")}
    loose = order_verdict({**order, "test": True}, {**steps, "lora": [10, 20, 20]})
    assert loose["verdict"] == "inconclusive" and "not separated: full/lora" in loose["reason"]
    swapped = order_verdict({**order, "test": True}, {**steps, "full": [15, 15, 40], "adapter": [10, 10, 10]})
    assert swapped["verdict"] == "not as claimed" and "adapter before full" in swapped["reason"]
    # the mean curve's order is not enough: one seed of full fine-tuning never reaching the level leaves it open
    assert order_verdict({**order, "test": True}, {**steps, "full": [10, 10, None]})["verdict"] == "inconclusive"
    nothing = order_verdict({**order, "test": True}, {m: [None] * 3 for m in steps})
    assert nothing["verdict"] == "inconclusive" and "neither reaches the level" in nothing["reason"]
    assert order_verdict({**order, "test": True}, {"full": [10, 10, 10]})["verdict"] == "inconclusive"

    rows = [{"task": "rte", "method": m, "n_seeds": 3, "steps_to_common": s[0], "seed_steps_to_common": s}
            for m, s in (("full", [10, 10, 20]), ("lora", [20, None, 30]))]
    two = {"task": "rte", "test": False, "by_steps_to_common": ["full", "lora"], "never_reached": [],
           "claimed": ["full", "lora"]}
    write_json(tmp_path / "convergence.json", {"config": {"majority_of": "validation rows"}, "rows": rows, "orders": [
        {**two, **order_verdict(two, {r["method"]: r["seed_steps_to_common"] for r in rows}),
         "pairs_by_seconds": [{"faster": "full", "slower": "lora", "measured": "second"}]}]})
    text = caption(tmp_path)
    assert "rte: seeds reach the level at step full 10/10/20, lora 20/never/30 — not a test" in text
    assert "every seed separates: rte: lora before full." in text
    assert "provisional" not in text  # every cell has its 3 seeds' curves


def test_more_trainable_parameters_against_score_counts_pairs_by_two_standard_errors():
    from paper_figs.figures.glue_table import parameters_and_score

    def row(task, method, trainable, mean, std=0.01):
        return {"task": task, "method": method, "trainable": trainable, "mean": mean, "std": std, "n_seeds": 3}

    payload = {"rows": [row("sst2", "full", 1000, 0.90), row("sst2", "lora", 100, 0.85),
                        row("sst2", "prompt", 10, 0.86),  # fewer parameters, better than LoRA
                        row("rte", "full", 1000, 0.52), row("rte", "lora", 100, 0.51)],  # both at chance
               "majority": [{"task": "sst2", "mean": 0.5}, {"task": "rte", "mean": 0.53}]}
    out = parameters_and_score(payload)
    # sst2: full > lora, full > prompt (more wins twice); lora vs prompt: 0.01 apart, se 0.008, a tie
    assert (out["larger"], out["smaller"], out["tie"], out["not_a_test"]) == (2, 0, 1, 1)
    assert out["holds"] is False
    payload["rows"][2]["mean"] = 0.95  # prompt now beats both by more than two standard errors
    out = parameters_and_score(payload)
    assert out["fewer_won"] == ["sst2: prompt over full", "sst2: prompt over lora"] and out["holds"] is True


def _unipelt_grid(tmp_path, monkeypatch):
    """UniPELT's summary writing to ``tmp_path``, chance at 0.5 on every task; yields every (task, K, method, seed)."""
    monkeypatch.setattr(unipelt_low_resource, "SELECT_OUT", tmp_path / "s.jsonl")
    monkeypatch.setattr(unipelt_low_resource, "TABLE_OUT", tmp_path / "t.jsonl")
    monkeypatch.setattr(unipelt_low_resource, "SUMMARY", tmp_path / "unipelt_low_resource.json")
    monkeypatch.setattr(unipelt_low_resource, "glue_majority", lambda _: dict.fromkeys(unipelt_low_resource.TASKS, 0.5))
    return itertools.product(unipelt_low_resource.TASKS, unipelt_low_resource.KS, unipelt_low_resource.METHODS,
                             (0, 1, 2))


def test_a_cell_with_seeds_that_predict_one_class_is_named_in_its_caption(tmp_path, monkeypatch):
    """A UniPELT cell whose seeds 0 and 2 predict one class for every dev row is named in the caption."""
    for task, k, method, seed in _unipelt_grid(tmp_path, monkeypatch):
        collapsed = (task, k, method, seed) in {("rte", 100, "lora", 0), ("rte", 100, "lora", 2)}
        # the reported deltas' share of the most predicted class: 1.0 collapsed, 0.97 nearly, 0.949 not flagged
        share = 1.0 if collapsed else {("mrpc", 500, "prefix", 1): 0.97, ("mrpc", 500, "prefix", 2): 0.949}.get(
            (task, k, method, seed), 0.6)
        append_jsonl(unipelt_low_resource.SELECT_OUT if seed == 0 else unipelt_low_resource.TABLE_OUT,
                     sweep_row({"task": task, "train_size": k, "method": method, "lr": 1e-3, "seed": seed},
                               0.7 + 0.002 * seed, predicts_one_class=collapsed,
                               dev_at_best_val={"step": 10, "accuracy": 0.7, "top_class_share": share}))
    out = unipelt_low_resource.summary(unipelt_low_resource.TASKS)
    cell = next(c for c in out["cells"] if (c["task"], c["k"], c["method"]) == ("rte", 100, "lora"))
    assert cell["one_class_seeds"] == [0, 2] and cell["near_one_class_seeds"] == []
    assert sum(bool(c["one_class_seeds"]) for c in out["cells"]) == 1
    near = [(c["task"], c["k"], c["method"], c["near_one_class_seeds"]) for c in out["cells"]
            if c["near_one_class_seeds"]]
    assert near == [("mrpc", 500, "prefix", [1])]
    caption = rendered_caption("unipelt_low_resource", tmp_path, tmp_path / "f")
    assert "predict one class for every dev row (a constant prediction's score, counted in the means shown): " \
           "rte K=100 lora seeds 0, 2." in caption
    assert "give one class to at least 95 % of dev rows (nearly a constant prediction, counted in the means " \
           "shown): mrpc K=500 prefix seed 1." in caption


def test_a_diverged_seed_completes_its_cell_and_is_named(tmp_path, monkeypatch):
    """A seed that diverged at the chosen rate is finished (never run again): the grid is complete with it, the
    verdicts are given on the other seeds, and the caption names it."""
    for task, k, method, seed in _unipelt_grid(tmp_path, monkeypatch):
        row = sweep_row({"task": task, "train_size": k, "method": method, "lr": 1e-3, "seed": seed},
                        (0.8 if method == "unipelt" else 0.7) + 0.002 * seed)
        if (task, k, method, seed) == ("mrpc", 500, "unipelt", 2):
            row.update(status="diverged", score_at_best_val=None, val_score=None)
        append_jsonl(unipelt_low_resource.SELECT_OUT if seed == 0 else unipelt_low_resource.TABLE_OUT, row)
    out = unipelt_low_resource.summary(unipelt_low_resource.TASKS)
    cell = next(c for c in out["cells"] if (c["task"], c["k"], c["method"]) == ("mrpc", 500, "unipelt"))
    assert cell["n_seeds"] == 2 and cell["diverged_seeds"] == [2]
    assert out["progress"]["complete"]
    # judged on 3 scored seeds only: its 3 comparisons are "too few seeds", which leaves K = 500 open
    assert out["per_k"]["500"]["too few seeds"] == 3 and out["per_k"]["500"]["holds"] is None
    assert out["per_k"]["100"]["holds"] is True
    caption = rendered_caption("unipelt_low_resource", tmp_path, tmp_path / "f")
    assert "K = 500: wins 9, ties 0, losses 0, 3 with too few seeds — inconclusive" in caption
    assert "Over all K: inconclusive" in caption
    assert "Runs that diverged (no score; the means are over the other seeds): mrpc K=500 unipelt seed 2." in caption


def test_a_cell_that_diverged_at_every_rate_completes_the_grid_and_is_named(tmp_path, monkeypatch):
    """A pair whose every selection rate diverged has no rate and no table cells: its cell is finished with no
    seed, left out of the comparisons, and named in the caption."""
    for task, k, method, seed in _unipelt_grid(tmp_path, monkeypatch):
        if (task, k, method) == ("mrpc", 500, "unipelt"):
            if seed == 0:
                for lr in (2.5e-4, 5e-4, 1e-3):
                    config = {"task": task, "train_size": k, "method": method, "lr": lr, "seed": 0}
                    append_jsonl(unipelt_low_resource.SELECT_OUT,
                                 {**sweep_row(config, 0.0), "status": "diverged", "score_at_best_val": None,
                                  "val_score": None})
            continue
        row = sweep_row({"task": task, "train_size": k, "method": method, "lr": 1e-3, "seed": seed},
                        (0.8 if method == "unipelt" else 0.7) + 0.002 * seed)
        append_jsonl(unipelt_low_resource.SELECT_OUT if seed == 0 else unipelt_low_resource.TABLE_OUT, row)
    out = unipelt_low_resource.summary(unipelt_low_resource.TASKS)
    cell = next(c for c in out["cells"] if (c["task"], c["k"], c["method"]) == ("mrpc", 500, "unipelt"))
    assert cell["diverged_every_rate"] and cell["n_seeds"] == 0 and cell["lr"] is None
    assert out["progress"]["complete"]
    assert not [c for c in out["comparisons"] if (c["task"], c["k"]) == ("mrpc", 500)]
    caption = rendered_caption("unipelt_low_resource", tmp_path, tmp_path / "f")
    assert "Diverged at every rate tried (no seed run at a chosen rate, left out of every comparison): " \
           "mrpc K=500 unipelt." in caption
    # the table leaves the pair out and runs every other pair's seeds
    chosen = unipelt_low_resource.choose_lrs(unipelt_low_resource.read_jsonl(unipelt_low_resource.SELECT_OUT),
                                             key=unipelt_low_resource.pair_key)
    cells = unipelt_low_resource.expand(unipelt_low_resource.table_spec(unipelt_low_resource.TASKS, chosen))
    assert len(cells) == 3 * (48 - 1)
    assert not [c for c in cells if (c["task"], c["train_size"], c["method"]) == ("mrpc", 500, "unipelt")]
    del chosen[("sst2", 100, "lora")]  # a pair whose selection has not run: a stop, never a silent gap
    with pytest.raises(SystemExit, match=r"\('sst2', 100, 'lora'\).*has not finished"):
        unipelt_low_resource.table_spec(unipelt_low_resource.TASKS, chosen)


def test_a_cell_whose_chosen_rate_is_the_edge_of_the_rates_tried_is_named(tmp_path, monkeypatch):
    """A chosen rate that is the highest (or lowest) rate tried does not bracket the pair's optimum: the summary
    flags the cell and the caption names it with its rate; a rate between two worse ones is not named."""
    for task, k, method, seed in _unipelt_grid(tmp_path, monkeypatch):
        row = sweep_row({"task": task, "train_size": k, "method": method, "lr": 1e-3, "seed": seed}, 0.7 + 0.002 * seed)
        append_jsonl(unipelt_low_resource.SELECT_OUT if seed == 0 else unipelt_low_resource.TABLE_OUT, row)
        if seed == 0 and (task, k, method) == ("sst2", 100, "lora"):  # 1e-3 beats the lower rate: the top edge
            append_jsonl(unipelt_low_resource.SELECT_OUT,
                         sweep_row({"task": task, "train_size": k, "method": method, "lr": 5e-4, "seed": 0}, 0.6))
        if seed == 0 and (task, k, method) == ("cola", 100, "lora"):  # 1e-3 between two worse rates: bracketed
            for lr in (5e-4, 2e-3):
                append_jsonl(unipelt_low_resource.SELECT_OUT,
                             sweep_row({"task": task, "train_size": k, "method": method, "lr": lr, "seed": 0}, 0.6))
    out = unipelt_low_resource.summary(unipelt_low_resource.TASKS)
    flagged = {(c["task"], c["k"], c["method"]) for c in out["cells"] if c["rate_at_edge"]}
    assert flagged == {("sst2", 100, "lora")}
    caption = rendered_caption("unipelt_low_resource", tmp_path, tmp_path / "f")
    assert "(the optimum is not bracketed; the score may be the grid's, not the method's): sst2 K=100 lora " \
           "(rate 0.001)." in caption
    assert "cola K=100 lora (rate" not in caption
