"""The recommender: the HF sequence head as readout, ``recommended_lora``, the trust region and the peft export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_batch, needs_peft, toy_task

from controltune import ResidualSystem, load_model
from controltune.cli import main
from controltune.controllers import UnsupportedMethodError, build
from controltune.design.trust_region import trust_region_radius
from controltune.peft_export import to_peft
from controltune.verification import verify

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(family: str, labels: int = 2) -> tuple:
    loaded = load_model(f"random:{family}", dtype="float64", head="sequence_classification", num_labels=labels)
    return loaded, ResidualSystem(loaded, readout="sequence_classifier", num_labels=labels)


def _hf_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "gpt2"])
def test_the_sequence_classifier_readout_is_the_hf_head(family):
    loaded, system = _classifier(family, labels=3)
    batch = make_batch(loaded.tokenizer, 3)
    with torch.no_grad():
        ours = system(batch)
        theirs = loaded.model(**_hf_inputs(batch)).logits
    assert ours.shape == (3, 3)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-15 * float(theirs.abs().max()) + 1e-15)
    head = {c.name for c in system.controls()}
    assert head and all(n.startswith("head.") and c.kind == "term" for n, c in
                        ((c.name, c) for c in system.controls()))


def test_a_base_model_refuses_the_sequence_classifier_readout():
    with pytest.raises(ValueError, match="ForSequenceClassification"):
        ResidualSystem(load_model("random:bert"), readout="sequence_classifier")
    with pytest.raises(ValueError, match="head 'cls' is not one of"):
        load_model("random:bert", head="cls")


def test_the_trust_region_takes_the_largest_step_the_held_out_cost_agrees_with():
    # J(η) = 1 − η + η²: ρ(Δ) = 1 − η with ‖D‖ = 1, so ρ ≥ 1/4 needs η ≤ 3/4.
    step = trust_region_radius(lambda eta: 1 - eta + eta ** 2, 1.0, 4.0)
    assert step.radius == 0.5 and step.eta == 0.5
    assert [t["radius"] for t in step.trials] == [4.0, 2.0, 1.0, 0.5]
    assert all(t["ratio"] < 0.25 for t in step.trials[:-1]) and step.trials[-1]["ratio"] == pytest.approx(0.5)
    rising = trust_region_radius(lambda eta: 1 + eta, 1.0, 1.0, steps=3)
    assert rising.radius == 0.0 and rising.eta == 0.0 and len(rising.trials) == 4
    with pytest.raises(ValueError, match="direction is zero"):
        trust_region_radius(lambda eta: 1.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    toy_task(folder, 64, 16)
    return str(folder)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_recommended_lora_allocates_the_budget_and_starts_inside_the_trust_region(task, family):
    _, system = _classifier(family)
    ctrl = build("recommended_lora", system, task=task, n_design=32, budget=3000, max_rank=4)
    report = ctrl.report
    assert 0 < report["used"] <= 3000 and report["budget"] == 3000
    assert all(1 <= r <= 4 for r in report["ranks"].values())
    used = sum(d.A.numel() + d.B.numel() for d in ctrl.deltas.values())
    assert used == report["used"]
    tr = report["trust_region"]
    assert tr["accepted"] and tr["trials"][-1]["ratio"] >= 0.25
    assert tr["trials"][-1]["j"] < tr["j0"]  # the held-out cost went down, by at least a quarter of the prediction
    assert all(t["ratio"] < 0.25 for t in tr["trials"][:-1])
    for d in ctrl.deltas.values():
        assert math.isclose(d.scale, 2.0) and float(d.B.detach().abs().max()) > 0
    # the built system is the accepted trial: its held-out cost, and each map's step η·U_r Σ_r V_rᵀ
    from controltune.controllers.designed.designed_lora import _design_batch, _half

    with torch.no_grad():
        held_out = float(system.cost(_half(_design_batch(ctrl, system), False)))
    assert held_out == pytest.approx(tr["trials"][-1]["j"], rel=1e-12)
    assert tr["eta"] == tr["trials"][-1]["eta"] > 0
    for key, d in ctrl.deltas.items():
        r = report["ranks"][key]
        applied = torch.linalg.svdvals(d.scale * d.B.detach() @ d.A.detach())[:r]
        sigma = torch.tensor(report["top_sigma2"][key][:r], dtype=torch.float64).sqrt()
        assert torch.allclose(applied, tr["eta"] * sigma, rtol=1e-10, atol=0)
    standard = build("recommended_lora", _classifier(family)[1], task=task, n_design=32, budget=3000, max_rank=4,
                     init="standard")
    assert standard.report["ranks"] == report["ranks"]  # the same design rows, the same allocation
    assert all(float(d.B.detach().abs().max()) == 0 for d in standard.deltas.values())


def test_recommended_lora_refuses_a_budget_that_fits_nothing(task):
    with pytest.raises(ValueError, match="does not fit one rank"):
        build("recommended_lora", _classifier("bert")[1], task=task, n_design=8, budget=10)
    with pytest.raises(ValueError, match="init 'pissa' is not one of"):
        build("recommended_lora", _classifier("bert")[1], task=task, init="pissa")


def test_recommended_lora_passes_verify(task):
    _, system = _classifier("bert")
    build("recommended_lora", system, task=task, n_design=16, budget=2000, max_rank=2)
    report = verify(system.eval(), make_batch(system.tokenizer, 2), n_state_directions=1)
    assert report.passed, report.failures()


@needs_peft
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_peft_folder_loads_gives_the_same_logits_and_trains(task, family, tmp_path):
    from peft import PeftModel

    loaded, system = _classifier(family)
    build("recommended_lora", system, task=task, n_design=32, budget=3000, max_rank=4)
    out = to_peft(system, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) <= {1, 2, 3, 4} and config["modules_to_save"]
    assert len(set(config["modules_to_save"])) == len(config["modules_to_save"]), config["modules_to_save"]
    assert set(loaded.family.sequence_head) <= set(config["modules_to_save"])
    base = load_model(f"random:{family}", dtype="float64", head="sequence_classification").model
    if loaded.family.prepare is not None:
        loaded.family.prepare(base)  # the system's float64-exact norms (identical in float32)
    model = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    batch = make_batch(loaded.tokenizer, 4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(system(batch), model(**_hf_inputs(batch)).logits)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(**_hf_inputs(batch)).logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@needs_peft
def test_to_peft_refuses_what_peft_cannot_hold(tmp_path):
    _, system = _classifier("bert")
    build("prefix", system, length=2)
    with pytest.raises(UnsupportedMethodError, match="'prefix' is not one"):
        to_peft(system, tmp_path / "a")
    mean_pooled = ResidualSystem(load_model("random:bert", dtype="float64"))
    build("lora", mean_pooled, rank=2)
    with pytest.raises(UnsupportedMethodError, match="readout='sequence_classifier'"):
        to_peft(mean_pooled, tmp_path / "b")


@needs_peft
def test_the_recommend_command_writes_a_peft_folder(task, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["recommend", "--model", "random:bert", "--task", task, "--budget", "2500", "--max-rank", "2",
                 "--n-design", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recommended LoRA for random:bert" in text and "PeftModel.from_pretrained" in text
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["used"] <= 2500 and rec["ranks"] and rec["versions"]
    assert (out / "adapter_model.safetensors").is_file()
    assert main(["recommend", "--model", "random:bert", "--task", task, "--out", str(out)]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err


def test_a_designed_controller_designs_on_the_task_it_is_trained_on():
    from controltune.controllers.spec import controller_spec

    name, options = controller_spec("recommended_lora", {"budget": 100}, seed=3, task="cola")
    assert name == "recommended_lora" and options == {"budget": 100, "task": "cola", "seed": 3}
    assert controller_spec("costate_lora", {"task": "rte"}, 0, task="cola")[1]["task"] == "rte"  # given wins
    assert "task" not in controller_spec("lora", {}, 0, task="cola")[1]  # LoRA designs nothing
    parts = controller_spec("lora+costate_lora", {}, 0, task="mrpc")[1]["parts"]
    assert "task" not in parts[0][1] and parts[1][1]["task"] == "mrpc"


@needs_peft
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_training_the_peft_folder_in_plain_peft_follows_the_system_step_for_step(task, family, tmp_path):
    """The design table trains ``recommended_lora`` in the system; this is the claim that its rows stand for the
    recommender trained through plain peft: the same AdamW steps on the same batches from the written folder give the
    same logits (float64) in peft as in the system, because the folder holds the same parameters in the same
    parameterisation (B A scaled by α_W/r_W, the sequence head in ``modules_to_save``)."""
    from peft import PeftModel

    loaded, system = _classifier(family)
    build("recommended_lora", system, task=task, n_design=32, budget=3000, max_rank=4)
    out = to_peft(system, tmp_path / "adapter")
    base = load_model(f"random:{family}", dtype="float64", head="sequence_classification").model
    if loaded.family.prepare is not None:
        loaded.family.prepare(base)
    model = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    ours = [p for p in system.parameters() if p.requires_grad]
    theirs = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours) == sum(p.numel() for p in theirs)
    batches = [make_batch(loaded.tokenizer, n) for n in (4, 3, 5)]
    system.train(False), model.train(False)  # dropout off in both: the comparison is of the optimisation
    with torch.no_grad():
        before = system(batches[0])
    opt_a, opt_b = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    for batch in batches:
        for opt, logits in ((opt_a, lambda b: system(b)), (opt_b, lambda b: model(**_hf_inputs(b)).logits)):
            loss = torch.nn.functional.cross_entropy(logits(batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        a, b = system(batches[0]), model(**_hf_inputs(batches[0])).logits
    assert (a - before).abs().max() > 1e-3  # the steps moved the logits: the agreement is not of two idle models
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
