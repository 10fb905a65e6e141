"""Model selection on rows held out of train, never dev (issue 14, part 2): the hold-out, the best-on-validation
deltas and their dev score, resume, divergence, the CLI flags and the sweep settings (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fails_after, toy_task

from controltune import ResidualSystem, load_model
from controltune import checkpoint as ckpt
from controltune import train as train_module
from controltune.cli import main
from controltune.controllers import build
from controltune.divergence import TrainingDiverged
from controltune.evaluation import evaluate, validation_split
from controltune.results import read_jsonl
from controltune.run_folder import BEST_DELTAS, CHECKPOINT
from controltune.sweep import run_sweep
from controltune.sweep_spec import expand, parse_spec
from controltune.train import TrainConfig, train
from controltune.zoo import offline_tokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A separable toy sentiment task (64 train, 16 dev rows)."""
    return toy_task(tmp_path_factory.mktemp("toy"), 64, 16)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """One thread: tiny models."""


def _system() -> ResidualSystem:
    system = ResidualSystem(load_model("random:bert", seed=0), seed=0)
    build("lora", system, rank=2, targets=["q", "v"])
    return system


def _config(out=None, **kw) -> TrainConfig:
    base = {"lr": 1e-2, "steps": 12, "batch_size": 8, "max_length": 16, "eval_every": 4, "seed": 0,
            "val_size": 16, "out": str(out) if out else None, "progress": False}
    return TrainConfig(**{**base, **kw})


def _deltas(system) -> dict[str, torch.Tensor]:
    return {c.name: c.param.detach().clone() for c in system.controls()}


@pytest.fixture
def scored_by_norm(task, monkeypatch):
    """Validation 'accuracy' = minus the norm of the deltas moved since the start (0 before training, growing
    with it): the earliest evaluation is the best, so the selected deltas are not the last ones.  Dev keeps
    its real scores.  Records which split each evaluation scored and the deltas it saw."""
    _, _, dev = task
    real = train_module.evaluate
    calls: list[dict] = []
    start: dict[str, torch.Tensor] = {}

    def fake(system, examples, task_spec, *args, **kwargs):
        scores = real(system, examples, task_spec, *args, **kwargs)
        deltas = _deltas(system)
        which = "dev" if examples is dev else "val"
        calls.append({"split": which, "deltas": deltas})
        if which == "val":
            scores["accuracy"] = -sum(float((v - start[n]).norm()) for n, v in deltas.items())
        return scores

    def begin(system) -> None:
        start.clear()
        start.update(_deltas(system))

    monkeypatch.setattr(train_module, "evaluate", fake)
    return calls, begin


# --- the hold-out --------------------------------------------------------------------------
def test_validation_split_is_seeded_disjoint_and_sized(task):
    _, tr, _ = task
    fit, val = validation_split(tr, 16, seed=3)
    assert len(fit) == 48 and len(val) == 16
    assert sorted(map(id, fit + val)) == sorted(map(id, tr))  # every row once, no row on both sides
    assert validation_split(tr, 16, seed=3) == (fit, val) and validation_split(tr, 16, seed=4)[1] != val
    assert len(validation_split(tr, 0.25)[1]) == 16
    position = {id(ex): i for i, ex in enumerate(tr)}
    assert [position[id(ex)] for ex in val] == sorted(position[id(ex)] for ex in val)  # original order kept
    for bad in (64, 0.001, 100):
        with pytest.raises(ValueError, match="at least one row on each side"):
            validation_split(tr, bad)
    with pytest.raises(ValueError, match="val_size"):
        TrainConfig(val_size=2.5)


# --- selection --------------------------------------------------------------------------------
def test_selection_uses_validation_rows_only_and_reports_dev_at_the_best(task, tmp_path, scored_by_norm):
    spec, tr, dev = task
    calls, begin = scored_by_norm
    system = _system()
    begin(system)
    result = train(system, tr, dev, spec, _config(tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "done" and saved["config"]["n_train"] == 48 and saved["config"]["n_val"] == 16
    assert [r["step"] for r in saved["curves"]["val"]] == [4, 8, 12]
    # dev is scored only after training: the last deltas, then the selected ones (which are then also scored on
    # training rows, the sixth call: train_score_size)
    assert [c["split"] for c in calls][:5] == ["val", "val", "val", "dev", "dev"] and len(calls) == 6
    assert saved["train_scores"]["step"] == 4  # the selected deltas
    best = saved["best_val"]
    assert best["step"] == 4 and best["accuracy"] == max(r["accuracy"] for r in saved["curves"]["val"])
    assert saved["final"]["step"] == 12 and saved["dev_at_best_val"]["step"] == 4
    assert saved["best"] == saved["dev_at_best_val"] and saved["curves"]["dev"] == [saved["final"]]
    assert saved["selection"]["split"] == "validation" and saved["selection"]["n_val"] == 16
    assert set(saved["selection"]["keys"]) == {"best_val", "dev_at_best_val", "best", "final"}
    # the system holds the deltas of step 4 (the first validation), and best.safetensors holds them too
    at_step_4 = calls[0]["deltas"]
    for name, value in _deltas(system).items():
        assert torch.equal(value, at_step_4[name]), name
    assert not all(torch.equal(at_step_4[n], v) for n, v in calls[2]["deltas"].items())
    other = _system()
    ckpt.load(other, tmp_path / BEST_DELTAS)
    for name, value in _deltas(other).items():
        assert torch.equal(value, at_step_4[name])
    real = evaluate(system, dev, spec, offline_tokenizer(), max_length=16)
    assert real["accuracy"] == saved["dev_at_best_val"]["accuracy"] == result["dev_at_best_val"]["accuracy"]


def test_the_last_step_can_be_the_selected_one_and_dev_is_then_scored_once(task, tmp_path):
    spec, tr, dev = task
    result = train(_system(), tr, dev, spec, _config(tmp_path, eval_every=None))
    assert [r["step"] for r in result["curves"]["val"]] == [12]
    assert result["best_val"]["step"] == 12 and result["dev_at_best_val"] == result["final"]
    assert (tmp_path / BEST_DELTAS).is_file() and (tmp_path / "deltas.safetensors").is_file()


def test_explicit_validation_rows_and_no_validation_keep_the_old_report(task):
    spec, tr, dev = task
    fit, val = validation_split(tr, 16)
    a = train(_system(), tr, dev, spec, _config())
    b = train(_system(), fit, dev, spec, _config(val_size=None), val_examples=val)
    assert a["best_val"] == b["best_val"] and a["dev_at_best_val"] == b["dev_at_best_val"]
    with pytest.raises(ValueError, match="either as val_examples or as config.val_size"):
        train(_system(), tr, dev, spec, _config(), val_examples=val)
    plain = train(_system(), tr, dev, spec, _config(val_size=None))
    assert "best_val" not in plain and "val" not in plain["curves"] and plain["selection"]["split"] is None
    assert [r["step"] for r in plain["curves"]["dev"]] == [4, 8, 12]


def test_resume_keeps_the_best_deltas_of_before_the_stop(task, tmp_path, scored_by_norm):
    spec, tr, dev = task
    _, begin = scored_by_norm
    first = _system()
    begin(first)  # every system starts from the same deltas (seeded)
    reference = train(first, tr, dev, spec, _config(tmp_path / "a"))

    stopped = _system()
    fails_after(stopped, 9)
    with pytest.raises(KeyboardInterrupt):
        train(stopped, tr, dev, spec, _config(tmp_path / "b"))
    resumed_system = _system()
    resumed = train(resumed_system, tr, dev, spec, _config(tmp_path / "b", resume=True))
    assert resumed["best_val"]["step"] == 4  # chosen before the stop, kept in checkpoint.pt
    assert resumed["curves"]["val"] == reference["curves"]["val"]
    assert resumed["dev_at_best_val"] == reference["dev_at_best_val"] and resumed["final"] == reference["final"]
    a, b = (ckpt.read_header(p / BEST_DELTAS) for p in (tmp_path / "a", tmp_path / "b"))
    assert a["payload_sha256"] == b["payload_sha256"]


@pytest.mark.parametrize("written_as", ["tensors", "bytes"])
def test_a_state_holds_its_delta_files_as_tensors_and_one_of_before_still_resumes(task, tmp_path, scored_by_norm,
                                                                                  written_as):
    """The state keeps both delta files as uint8 tensors (torch.save streams them; bytes were pickled in memory
    first); a state whose delta files are ``bytes``, as written before, resumes to the same result."""
    spec, tr, dev = task
    _, begin = scored_by_norm
    first = _system()
    begin(first)
    reference = train(first, tr, dev, spec, _config(tmp_path / "a"))
    stopped = _system()
    fails_after(stopped, 9)
    with pytest.raises(KeyboardInterrupt):
        train(stopped, tr, dev, spec, _config(tmp_path / "b"))
    path = tmp_path / "b" / CHECKPOINT
    state = torch.load(path, weights_only=False)
    assert all(state[k].dtype == torch.uint8 and state[k].dim() == 1 for k in ("deltas", "best_deltas"))
    if written_as == "bytes":
        state.update({k: state[k].numpy().tobytes() for k in ("deltas", "best_deltas")})
        torch.save(state, path)
    resumed = train(_system(), tr, dev, spec, _config(tmp_path / "b", resume=True))
    assert resumed["best_val"]["step"] == 4
    assert resumed["dev_at_best_val"] == reference["dev_at_best_val"] and resumed["final"] == reference["final"]
    a, b = (ckpt.read_header(p / BEST_DELTAS) for p in (tmp_path / "a", tmp_path / "b"))
    assert a["payload_sha256"] == b["payload_sha256"]


def test_a_diverged_run_reports_no_validation_score(task, tmp_path):
    spec, tr, dev = task
    with pytest.raises(TrainingDiverged):
        train(_system(), tr, dev, spec, _config(tmp_path, lr=1e30))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "diverged" and saved["best_val"] is None and saved["dev_at_best_val"] is None
    assert saved["final"] is None and saved["best"] is None


# --- command line and sweeps -------------------------------------------------------------------
def test_train_cli_val_size(task, tmp_path, capsys):
    spec, _, _ = task
    code = main(["train", "--model", "random:bert", "--method", "lora", "--task", str(spec.folder), "--opt", "rank=2",
                 "--steps", "4", "--batch-size", "8", "--max-length", "16", "--eval-every", "2", "--val-size", "0.25",
                 "--val-seed", "1", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "dev at best validation (step " in out and "dev after the last step: accuracy=" in out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["val_size"] == 0.25 and saved["config"]["val_seed"] == 1 and saved["config"]["n_val"] == 16
    assert [r["step"] for r in saved["curves"]["val"]] == [2, 4]


def test_sweep_overrides_and_validation_settings(task, tmp_path):
    spec, _, _ = task
    data = {"grid": {"model": "random:bert", "method": ["lora", "bitfit"], "task": str(spec.folder), "lr": 1e-2},
            "per_method": {"lora": {"options": {"rank": 2, "targets": ["q", "v"]}}},
            "train": {"steps": 4, "batch_size": 8, "max_length": 16, "eval_every": 2, "val_size": 16},
            "overrides": [{"where": {"method": "bitfit"}, "set": {"lr": [1e-2, 3e-2], "steps": 6}},
                          {"where": {"method": "bitfit", "lr": 3e-2}, "set": {"seed": [0, 1]}}]}
    cells = expand(parse_spec(data))
    got = sorted((c["method"], c["lr"], c["steps"], c["seed"]) for c in cells)
    assert got == [("bitfit", 1e-2, 6, 0), ("bitfit", 3e-2, 6, 0), ("bitfit", 3e-2, 6, 1), ("lora", 1e-2, 4, 0)]
    assert all(c["val_size"] == 16 for c in cells)
    plain = expand(parse_spec({**data, "train": {"steps": 4}, "overrides": []}))
    assert all("val_size" not in c and "val_seed" not in c for c in plain)  # old cells keep their identity
    kept = expand(parse_spec({**data, "exclude": [{"method": "bitfit", "lr": 3e-2, "seed": 1}]}))
    assert sorted((c["method"], c["lr"], c["seed"]) for c in kept) == [
        ("bitfit", 1e-2, 0), ("bitfit", 3e-2, 0), ("lora", 1e-2, 0)]  # matched after the overrides gave it
    assert [c["method"] for c in expand(parse_spec({**data, "exclude": [{"method": "bitfit"}]}))] == ["lora"]
    for bad, message in (({"method": "bitfit"}, "list of"), ([{}], "exclude\\[0\\] must map"),
                         ([{"colour": 1}], "unknown axis 'colour'")):
        with pytest.raises(ValueError, match=message):
            parse_spec({**data, "exclude": bad})
    for bad, message in (([{"where": {"task": "x"}}], "exactly the keys"),
                         ([{"where": {"task": "x"}, "set": {"method": "lora"}}], "may not change"),
                         ([{"where": {"colour": 1}, "set": {"lr": 1}}], "unknown axis")):
        with pytest.raises(ValueError, match=message):
            parse_spec({**data, "overrides": bad})

    out = tmp_path / "rows.jsonl"
    one = parse_spec({**data, "grid": {**data["grid"], "method": ["lora"]}, "overrides": []})
    assert run_sweep(one, out, executor="local", echo=lambda _: None)["done"] == 1
    row = read_jsonl(out)[0]
    assert row["config"]["val_size"] == 16 and row["best_val"]["step"] in (2, 4)
    assert row["val_score"] == row["best_val"]["accuracy"]
    assert row["score_at_best_val"] == row["dev_at_best_val"]["accuracy"]
    assert row["score"] == row["scores"]["accuracy"]


def test_design_rows_never_include_a_runs_validation_rows(tmp_path):
    """A controller designed while its run is built draws its design rows outside the rows the run is selected on."""
    from controltune.data import load_split
    from controltune.design.linearize import design_batch, withheld_from_design
    from controltune.evaluation import validation_rows
    from controltune.zoo import offline_tokenizer

    spec, train_rows, _ = toy_task(tmp_path, n_train=40, n_dev=8)
    system = ResidualSystem(load_model("random:bert"))
    tok = offline_tokenizer()

    def ids(rows):
        return tok([e.text_a for e in rows], padding=True, truncation=True, max_length=64,
                   return_tensors="pt")["input_ids"]

    val = validation_rows(train_rows, 0.25, seed=3)
    assert len(val) == 10 and validation_rows(train_rows, None) == []
    # outside the context: load_split's own seeded draw, as before
    assert torch.equal(design_batch(system, str(tmp_path), n=12, seed=1)["input_ids"],
                       ids(load_split(spec, "train", n=12, seed=1)))
    with withheld_from_design(val):
        batch = design_batch(system, str(tmp_path), n=30, seed=1)  # all 30 rows that are not withheld
    held = {(e.text_a, e.text_b, e.label) for e in val}
    kept = [e for e in train_rows if (e.text_a, e.text_b, e.label) not in held]
    assert torch.equal(batch["input_ids"], ids(kept))
