"""Training loop, resume, delta checkpoints and the train CLI (tiny random models, a tmp JSONL task)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fails_after, toy_task

from controltune import ResidualSystem, load_model
from controltune import checkpoint as ckpt
from controltune.cli import main
from controltune.controllers import build
from controltune.evaluation import evaluate
from controltune.schedule import linear_schedule
from controltune.train import TrainConfig, train
from controltune.zoo import offline_tokenizer

REQUIRED_KEYS = {"config", "versions", "curves", "final", "best", "wall_time_s", "peak_memory_mb", "n_trainable",
                 "trainable_fraction", "n_base_params", "total_steps"}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A separable toy sentiment task: positive and negative words."""
    return toy_task(tmp_path_factory.mktemp("toy"), 48, 16)


def _lora_system(name: str = "random:bert", seed: int = 0, dtype: str = "float32") -> ResidualSystem:
    system = ResidualSystem(load_model(name, dtype=dtype, seed=seed), seed=0)
    build("lora", system, rank=2, targets=["q", "v"])
    return system


def _config(out, **kw) -> TrainConfig:
    base = {"lr": 1e-2, "steps": 12, "batch_size": 8, "max_length": 16, "eval_every": 4, "seed": 0,
            "out": str(out), "progress": False}
    return TrainConfig(**{**base, **kw})


def test_training_reduces_the_loss_and_writes_metrics(task, tmp_path):
    spec, tr, dev = task
    system = _lora_system()
    before = evaluate(system, dev, spec, offline_tokenizer())
    result = train(system, tr, dev, spec, _config(tmp_path, warmup=0.25, lr=3e-2))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(saved) and saved["status"] == "done"
    losses = saved["curves"]["train_loss"]
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])
    assert saved["final"]["loss"] < 0.5 * before["loss"]
    assert [r["step"] for r in saved["curves"]["dev"]] == [4, 8, 12]
    assert saved["final"]["accuracy"] >= 0.9 and saved["config"]["lr"] == 3e-2
    assert saved["n_trainable"] == sum(c.param.numel() for c in system.controls())
    assert 0 < saved["trainable_fraction"] < 0.05 and saved["peak_memory_mb"] > 0
    assert result["final"] == saved["final"]
    assert saved["curves"]["lr"][0] == pytest.approx(3e-2 / 3)  # warm-up over 3 steps


def test_schedule_warms_up_then_decays_to_zero():
    f = linear_schedule(2, 10)
    assert [f(t) for t in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_resume_continues_from_the_saved_step(task, tmp_path):
    spec, tr, dev = task
    full = _lora_system()
    train(full, tr, dev, spec, _config(tmp_path / "a"))

    stopped = _lora_system()
    fails_after(stopped, 9)
    with pytest.raises(KeyboardInterrupt):
        train(stopped, tr, dev, spec, _config(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["step"] == 8  # last checkpoint

    resumed = _lora_system()
    calls_after = {"n": 0}
    cost2 = resumed.cost
    resumed.cost = lambda b: (calls_after.__setitem__("n", calls_after["n"] + 1), cost2(b))[1]
    result = train(resumed, tr, dev, spec, _config(tmp_path / "b", resume=True))
    assert calls_after["n"] == 4  # steps 9..12 only
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert result["curves"]["train_loss"] == a["curves"]["train_loss"]  # bit for bit, as the README promises
    for c_full, c_res in zip(full.controls(), resumed.controls()):
        assert torch.equal(c_res.param, c_full.param), c_full.name


def test_checkpoint_roundtrip_restores_outputs_exactly(task, tmp_path):
    spec, tr, _ = task
    system = _lora_system(dtype="float64")
    with torch.no_grad():
        for i, c in enumerate(system.controls()):
            c.param.add_(torch.randn(c.param.shape, generator=torch.Generator().manual_seed(i), dtype=c.param.dtype))
    path = ckpt.save(system, tmp_path / "d.safetensors", {"method": "lora", "options": {"rank": 2}})
    other = _lora_system(dtype="float64")
    batch = dict(offline_tokenizer()(["good fine", "bad"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert not torch.equal(other(batch), system(batch))
        header = ckpt.load(other, path)
        assert torch.equal(other(batch), system(batch))
    assert header["spec"]["options"] == {"rank": 2} and header["methods"] == ["lora"]
    bare = ResidualSystem(load_model("random:bert", dtype="float64"), seed=0)
    assert ckpt.fingerprint(other) == ckpt.fingerprint(bare)  # attaching deltas does not change the base


def test_checkpoint_refuses_another_base_model_or_method(tmp_path):
    path = ckpt.save(_lora_system(seed=0), tmp_path / "d.safetensors")
    with pytest.raises(ckpt.CheckpointMismatchError, match="different base model") as err:
        ckpt.load(_lora_system(seed=1), path)
    assert "random:bert" in str(err.value) and "fingerprint" in str(err.value)
    wider = ResidualSystem(load_model("random:bert"), seed=0)
    build("lora", wider, rank=4, targets=["q", "v"])
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"lora\.0\.q\.A.*shape \(2, 64\).*\(4, 64\)"):
        ckpt.load(wider, path)
    adapter = ResidualSystem(load_model("random:bert"), seed=0)
    build("adapter", adapter, bottleneck=4)
    with pytest.raises(ckpt.CheckpointMismatchError, match="missing tensors"):
        ckpt.load(adapter, path)


def test_train_cli_trains_a_sequential_combination_stage_by_stage(task, tmp_path, capsys):
    spec, _, _ = task
    out = tmp_path / "seq"
    code = main(["train", "--model", "random:bert", "--method", "bitfit+lora", "--sequential", "--task",
                 str(spec.folder), "--opt", "lora.rank=2", "--steps", "3", "--batch-size", "8", "--max-length", "16",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    first = json.loads((out / "stage0-bitfit" / "metrics.json").read_text())
    second = json.loads((out / "stage1-lora" / "metrics.json").read_text())
    assert first["config"]["extra"]["stage"] == 0 and second["config"]["extra"]["stage_method"] == "lora"
    # stage 1 trains LoRA (3 layers x q, v x (2x64 + 64x2)) and the head (64x2 + 2) only: the biases are frozen
    assert second["n_trainable"] == 3 * 2 * (2 * 64 + 64 * 2) + 64 * 2 + 2
    assert first["n_trainable"] != second["n_trainable"]
    assert second["config"]["methods"] == first["config"]["methods"] == ["sequential"]
    text = capsys.readouterr().out
    assert "stage 0 (bitfit)" in text and "stage 1 (lora)" in text
    assert main(["train", "--model", "random:bert", "--method", "lora", "--sequential", "--task",
                 str(spec.folder)]) == 2
    assert "has one part" in capsys.readouterr().err


def test_train_cli_writes_metrics(task, tmp_path, capsys):
    spec, _, _ = task
    code = main(["train", "--model", "random:bert", "--method", "lora+adapter", "--task", str(spec.folder),
                 "--opt", "lora.rank=2", "--opt", "adapter.bottleneck=4", "--steps", "3", "--batch-size", "8",
                 "--max-length", "16", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["extra"]["method"] == "combination"
    assert saved["config"]["methods"] == ["combination"] and len(saved["curves"]["train_loss"]) == 3
    assert "accuracy=" in capsys.readouterr().out
    assert main(["train", "--model", "random:bert", "--method", "lora", "--task", str(spec.folder),
                 "--opt", "rank"]) == 2


def test_methods_cli_lists_placement_and_budget(tmp_path):
    out = tmp_path / "methods.json"
    assert main(["methods", "--model", "random:bert", "--method", "lora", "--method", "combination",
                 "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["methods"]}
    lora = rows["lora"]
    assert lora["supported"] and lora["modules"] == ["q", "v"] and lora["layers"] == [0, 1, 2]
    assert lora["n_trainable"] == 3 * 2 * (8 * 64 + 64 * 8) and lora["kinds"] == ["layer"]
    assert lora["fraction"] == pytest.approx(lora["n_trainable"] / lora["n_base_params"])
    assert rows["combination"]["n_trainable"] > lora["n_trainable"] and "[bitfit]" in rows["combination"]["form"]


def test_train_cli_throughput_flags(task, tmp_path, monkeypatch):
    spec, _, _ = task
    monkeypatch.setenv("CONTROLTUNE_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    code = main(["train", "--model", "random:bert", "--method", "lora", "--task", str(spec.folder), "--opt", "rank=2",
                 "--steps", "2", "--batch-size", "8", "--max-length", "16", "--out", str(tmp_path / "run"),
                 "--no-progress", "--threads", "1", "--no-group-by-length", "--token-cache"])
    assert code == 0 and torch.get_num_threads() == before  # the run's thread setting is not left behind
    config = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert config["threads"] == 1 and config["group_by_length"] is False and config["token_cache"] is True
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 2  # train and dev splits, tokenised once


def test_the_reported_deltas_are_also_scored_on_training_rows(task, tmp_path):
    spec, train_ex, dev_ex = task
    result = train(_lora_system(), train_ex, dev_ex, spec, _config(tmp_path / "a", val_size=8, train_score_size=16))
    assert set(result["train_scores"]) >= {"accuracy", "loss", "step"}
    assert result["train_scores"]["step"] == result["best_val"]["step"]  # the reported deltas, on 16 of the 40 rows
    none = train(_lora_system(), train_ex, dev_ex, spec, _config(tmp_path / "b", train_score_size=0))
    assert none["train_scores"] is None


def test_stochastic_controls_train_stochastically_with_dropout_off(task, tmp_path):
    """Diff pruning's gates are part of the method: sampled in training steps even when dropout is off, so their
    log α gets the task's gradient (with the L0 penalty at 0, the only gradient they have)."""
    spec, tr, dev = task
    system = ResidualSystem(load_model("random:bert", seed=0), seed=0)
    ctrl = build("diff_pruning", system, l0_penalty=0.0, layers=[0])
    alphas = {n: p.detach().clone() for n, p in ctrl.named_parameters() if "log_alpha" in n}
    train(system, tr, dev, spec, _config(tmp_path, steps=3, lr=0.1, eval_every=None, dropout=False))
    moved = [float((p.detach() - alphas[n]).abs().max()) for n, p in ctrl.named_parameters() if "log_alpha" in n]
    assert max(moved) > 0
    assert not system.model.training  # dropout stayed off in the base model


def test_parts_of_a_combination_train_at_their_own_rates_and_resume(task, tmp_path):
    """part_lr_scales: part i at lr × K_i, the head at lr; a step of plain SGD-free AdamW moves each group by
    about its rate, and a resumed run keeps every group's rate."""
    from controltune.schedule import parameter_groups

    spec, tr, dev = task

    def system():
        from controltune.controllers.spec import build_spec

        s = ResidualSystem(load_model("random:bert", seed=0), seed=0)
        build_spec(s, "prompt+bitfit", {"prompt.n_tokens": 2}, 0)
        return s

    config = _config(tmp_path / "a", part_lr_scales=[10.0, 0.5], warmup=0, schedule="constant", steps=1)
    s = system()
    groups = parameter_groups(s, config)
    assert [g["lr"] for g in groups] == pytest.approx([1e-1, 5e-3, 1e-2]) and len(groups) == 3
    combo = s.controllers[0]
    assert {id(p) for p in groups[0]["params"]} == {id(c.param) for c in combo.parts[0].controls()}
    assert {id(p) for p in groups[2]["params"]} == {id(c.param) for c in s.readout.controls()}
    before = {c.name: c.param.detach().clone() for c in s.controls()}
    train(s, tr, dev, spec, config)
    moved = {c.name: float((c.param - before[c.name]).abs().max()) for c in s.controls()}
    first_part = {c.name for c in combo.parts[0].controls()}
    # AdamW's first step moves every entry by at most (about) its group's rate, the largest ones by it
    assert max(v for k, v in moved.items() if k in first_part) == pytest.approx(0.1, rel=1e-3)
    second_part = {c.name for c in combo.parts[1].controls()}
    assert max(v for k, v in moved.items() if k in second_part) == pytest.approx(5e-3, rel=1e-3)
    # a run without part rates compares on resume the configuration it always had
    from controltune.run_folder import run_config

    assert "part_lr_scales" not in run_config(_config(None), system(), spec, tr)
    assert run_config(config, s, spec, tr)["part_lr_scales"] == [10.0, 0.5]
    # stopped after a checkpoint and resumed, every group keeps its rate: the same deltas as one straight run
    def cfg(out, **kw):
        return _config(out, part_lr_scales=[10.0, 0.5], steps=4, checkpoint_every=2, **kw)

    straight = system()
    train(straight, tr, dev, spec, cfg(tmp_path / "c"))
    stopped = system()
    fails_after(stopped, 3)
    with pytest.raises(KeyboardInterrupt):
        train(stopped, tr, dev, spec, cfg(tmp_path / "d"))
    resumed = system()
    train(resumed, tr, dev, spec, cfg(tmp_path / "d", resume=True))
    for a, b in zip(straight.controls(), resumed.controls()):
        assert torch.equal(b.param, a.param), a.name
    with pytest.raises(ValueError, match="one simultaneous combination with 3 parts"):
        parameter_groups(system(), _config(None, part_lr_scales=[1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="part_lr_scales"):
        _config(None, part_lr_scales=[1.0, 0.0])
    assert main(["train", "--model", "random:bert", "--method", "bitfit", "--task", str(spec.folder),
                 "--part-lr-scales", "2,1"]) == 2
