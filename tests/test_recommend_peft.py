"""experiments/recommend_peft.py: the plain peft loop and the study's verdicts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import toy_task

from experiments import recommend_peft as rp


@pytest.mark.usefixtures("one_thread")
def test_the_plain_loop_trains_the_adapter_and_reports_dev_at_its_best_validation_state(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from controltune.zoo import load_model

    spec, train_ex, dev_ex = toy_task(tmp_path, n_train=40, n_dev=16)
    loaded = load_model("random:bert", seed=0, head="sequence_classification", num_labels=2)
    model = get_peft_model(loaded.model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                    task_type="SEQ_CLS"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    settings = {**rp.HARNESS, "batch_size": 8, "max_length": 16}
    out = rp.train_plain(model, loaded.tokenizer, train_ex[:32], train_ex[32:], dev_ex, spec, "accuracy", 1e-2,
                         epochs=2, eval_every=3, seed=0, settings=settings)
    assert out["steps"] == out["total_steps"] == 2 * math.ceil(32 / 8) and out["diverged"] is None
    assert [c["step"] for c in out["val_curve"]] == [3, 6, 8]  # every 3 steps and the last
    best = out["best_val"]
    assert best["scores"]["accuracy"] == max(c["accuracy"] for c in out["val_curve"])
    # the model is left at its best validation state: scoring it again gives the reported numbers
    items = rp._encode(loaded.tokenizer, train_ex[32:], 16)
    assert rp.scores(model, loaded.tokenizer, items, spec, 128) == best["scores"]
    dev_items = rp._encode(loaded.tokenizer, dev_ex, 16)
    assert rp.scores(model, loaded.tokenizer, dev_items, spec, 128) == out["dev_at_best_val"]
    assert model.training  # scoring restores the training mode
    # only the adapter and the head moved
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_the_study_judges_the_recommender_against_lora_under_both_reports():
    def row(arm, seed, best, end, status="done"):
        return {"config": {"arm": arm, "task": "mrpc", "budget": "b18k", "seed": seed}, "status": status,
                "score": best, "score_end": end}

    rows = [row("recommended", s, 0.88 + 0.002 * s, 0.86 + 0.01 * s) for s in range(3)]
    rows += [row("lora", s, 0.85 + 0.002 * s, 0.86 + 0.01 * s) for s in range(2)]
    part = rp.summarize(rows, "mrpc", "b18k", [0, 1, 2])
    assert not part["complete"] and part["cells"]["lora"]["best"]["n_seeds"] == 2
    rows.append(row("lora", 2, None, None, status="diverged"))
    rows.append(row("lora", 0, 0.1, 0.1) | {"config": {"arm": "lora", "task": "sst2", "budget": "b18k", "seed": 0}})
    out = rp.summarize(rows, "mrpc", "b18k", [0, 1, 2])
    assert out["complete"] and out["cells"]["lora"]["diverged_seeds"] == [2]
    assert out["verdict"]["best"]["verdict"] == "win" and out["verdict"]["best"]["difference"] == pytest.approx(0.031)
    assert out["verdict"]["end"]["verdict"] == "tie"


def test_the_summary_has_one_entry_per_task_and_budget_run(tmp_path, monkeypatch):
    from controltune.results import append_jsonl

    monkeypatch.setattr(rp, "ROWS", tmp_path / "rows.jsonl")
    monkeypatch.setattr(rp, "SUMMARY", tmp_path / "summary.json")
    for budget in ("b18k", "b74k"):
        append_jsonl(rp.ROWS, {"config": {"arm": "lora", "task": "mrpc", "budget": budget, "seed": 0},
                               "status": "done", "score": 0.8, "score_end": 0.8})
    out = rp.main(["--summary-only", "--task", "rte"])
    assert [(p["task"], p["budget"]) for p in out["pairs"]] == [("mrpc", "b18k"), ("mrpc", "b74k"), ("rte", "b18k")]
    assert not any(p["complete"] for p in out["pairs"]) and (tmp_path / "summary.json").is_file()


def test_the_figure_draws_each_run_and_its_caption_states_both_verdicts(tmp_path):
    from controltune.results import append_jsonl
    from paper_figs.figures import recommend_peft as fig

    rows = [{"config": {"arm": arm, "task": "mrpc", "budget": budget, "seed": s}, "status": "done",
             "score": 0.86 + 0.01 * s + (0.03 if arm == "recommended" else 0.0), "score_end": 0.85 + 0.01 * s}
            for budget in ("b18k", "b74k") for arm in ("recommended", "lora")
            for s in range(3 if budget == "b18k" else 1)]
    for r in rows:
        append_jsonl(tmp_path / fig.ROWS, r)
    pairs = [{"task": "mrpc", "budget": b, **rp.summarize(rows, "mrpc", b, [0, 1, 2])} for b in ("b18k", "b74k")]
    (tmp_path / fig.SOURCE).write_text(json.dumps({"config": {}, "versions": {}, "pairs": pairs}))
    assert fig.seed_scores(rows, pairs[0], "lora", "score_end") == pytest.approx([0.85, 0.86, 0.87])
    drawn = fig.draw(tmp_path)
    assert len(drawn.axes) == 2 and "(incomplete)" in drawn.axes[1].get_title()
    text = fig.caption(tmp_path)
    assert "MRPC b18k: at the best validation step 0.900 ± 0.010 against 0.870 ± 0.010, win (+0.030 against 0.016)" \
        in text
    assert "at the last step 0.860 ± 0.010 against 0.860 ± 0.010, tie (+0.000 against 0.016)" in text
    assert "MRPC b74k (incomplete): at the best validation step not judged yet" in text
