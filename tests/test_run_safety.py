"""A failed run is a failure, nothing is lost (issue 11): divergence, strict JSON, atomic checkpoints,
resume checks, output-folder protection, torn JSONL lines, delta checksums, and a kill -9 mid-run.

Tiny random models and a toy task keep every test to a few seconds.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails_after, toy_task
from safetensors.torch import load_file, save_file

import controltune
from controltune import ResidualSystem, load_model
from controltune import checkpoint as ckpt
from controltune.cli import main
from controltune.controllers import build
from controltune.divergence import TrainingDiverged
from controltune.results import CorruptResultsError, append_jsonl, read_jsonl, write_json
from controltune.run_folder import (
    CHECKPOINT,
    ConfigMismatchError,
    OutputFolderError,
    OutputLockedError,
    locked_output_folder,
)
from controltune.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def strict_loads(text: str):
    """``json.loads`` that fails on the bare NaN/Infinity tokens strict JSON forbids."""
    def refuse(token: str):
        raise AssertionError(f"non-strict JSON token {token}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A separable toy sentiment task (48 train, 16 dev rows)."""
    return toy_task(tmp_path_factory.mktemp("toy"), 48, 16)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """One thread: fast on tiny models, and the same arithmetic as the single-threaded subprocesses."""


def _system(seed: int = 0, rank: int = 2) -> ResidualSystem:
    system = ResidualSystem(load_model("random:bert", seed=seed), seed=0)
    build("lora", system, rank=rank, targets=["q", "v"])
    return system


def _config(out, **kw) -> TrainConfig:
    base = {"lr": 1e-2, "steps": 6, "batch_size": 8, "max_length": 16, "seed": 0, "out": str(out) if out else None,
            "progress": False}
    return TrainConfig(**{**base, **kw})


def _cli(task_folder, out, *extra: str) -> list[str]:
    return ["train", "--model", "random:bert", "--method", "lora", "--task", str(task_folder), "--opt", "rank=2",
            "--steps", "4", "--batch-size", "8", "--max-length", "16", "--no-progress",
            *(["--out", str(out)] if out is not None else []), *extra]


# --- a failed run is a failure ---------------------------------------------------------------
def test_nan_loss_stops_training_with_a_diverged_status_and_no_score(task, tmp_path):
    spec, tr, dev = task
    system = _system()
    cost, calls = system.cost, {"n": 0}

    def nan_at_step_3(batch):
        calls["n"] += 1
        loss = cost(batch)
        return loss * float("nan") if calls["n"] == 3 else loss
    system.cost = nan_at_step_3
    with pytest.raises(TrainingDiverged, match="step 3 of 6: non-finite loss") as err:
        train(system, tr, dev, spec, _config(tmp_path, eval_every=2))
    assert calls["n"] == 3  # stopped at once
    text = (tmp_path / "metrics.json").read_text()
    saved = strict_loads(text)
    assert saved == strict_loads(json.dumps(err.value.result))  # written before raising, the same dict
    assert saved["status"] == "diverged" and saved["step"] == 2
    assert saved["diverged"] == {"step": 3, "what": "loss", "value": "nan"}
    assert saved["final"] is None and saved["best"] is None
    assert len(saved["curves"]["train_loss"]) == 2 and not (tmp_path / "deltas.safetensors").exists()
    assert isinstance(err.value, FloatingPointError)


def test_nonfinite_gradient_names_the_control(task, tmp_path):
    spec, tr, dev = task
    system = _system()
    control = system.controls()[1]
    control.param.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(TrainingDiverged, match=f"non-finite gradient of {control.name}"):
        train(system, tr, dev, spec, _config(tmp_path))
    saved = strict_loads((tmp_path / "metrics.json").read_text())
    assert saved["diverged"] == {"step": 1, "what": "gradient", "control": control.name, "value": "inf"}
    assert saved["status"] == "diverged" and saved["final"] is None


def test_cli_exits_3_on_divergence_and_prints_no_score(task, tmp_path, capsys):
    spec, _, _ = task
    report = tmp_path / "report.json"
    code = main(_cli(spec.folder, tmp_path / "run", "--lr", "1e30", "--json", str(report)))
    captured = capsys.readouterr()
    assert code == 3
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "diverged at step" in lines[0] and "Traceback" not in captured.err
    assert "accuracy" not in captured.out
    for path in (report, tmp_path / "run" / "metrics.json"):
        saved = strict_loads(path.read_text())
        assert saved["status"] == "diverged" and saved["final"] is None


def test_json_outputs_are_strict_and_say_what_was_nulled(tmp_path):
    payload = {"loss": float("nan"), "curve": [1.0, float("inf"), np.float32("-inf")],
               "t": torch.tensor([0.5, float("nan")]), "ok": 2.5}
    text = write_json(tmp_path / "r.json", payload).read_text()
    saved = strict_loads(text)
    assert saved["loss"] is None and saved["curve"] == [1.0, None, None] and saved["t"] == [0.5, None]
    assert saved["nonfinite"] == {"loss": "NaN", "curve[1]": "Infinity", "curve[2]": "-Infinity", "t[1]": "NaN"}
    assert saved["ok"] == 2.5 and not list(tmp_path.glob("*.tmp-*"))  # written via a temporary file
    append_jsonl(tmp_path / "rows.jsonl", {"score": float("nan")})
    row = strict_loads((tmp_path / "rows.jsonl").read_text())
    assert row == {"score": None, "nonfinite": {"score": "NaN"}}


# --- nothing lost: JSONL and delta files -----------------------------------------------------------
def test_append_repairs_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2, "b": [1, 2')  # a kill cut the second append
    append_jsonl(path, {"a": 3})
    assert path.read_text() == '{"a": 1}\n{"a": 3}\n'
    assert (tmp_path / "rows.jsonl.torn").read_text() == '{"a": 2, "b": [1, 2\n'
    assert "torn" in capsys.readouterr().err
    path.write_text('{"a": 1}\n{"a": 2}')  # only the newline was lost: the row is kept
    append_jsonl(path, {"a": 3})
    assert [r["a"] for r in read_jsonl(path)] == [1, 2, 3]


def test_read_jsonl_skips_a_torn_last_line_but_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": 2, "b"{"a": 3}\n{"a": 4}\n')
    with pytest.raises(CorruptResultsError, match=r"rows\.jsonl, line 2"):
        read_jsonl(path)


def test_delta_files_refuse_truncation_and_corruption_but_old_files_load(tmp_path):
    system = _system()
    path = ckpt.save(system, tmp_path / "d.safetensors", {"method": "lora"})
    assert len(ckpt.read_header(path)["payload_sha256"]) == 64
    blob = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[:-10])
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"cut\.safetensors is truncated"):
        ckpt.load(_system(), cut)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0x01]))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"flipped\.safetensors is corrupt: checksum mismatch"):
        ckpt.read_header(flipped)
    with pytest.raises(ckpt.CheckpointMismatchError):  # the base class callers already catch
        ckpt.load(_system(), flipped)
    # A file written before checksums existed: same header without payload_sha256.
    header = ckpt.read_header(path)
    del header["payload_sha256"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"controltune": json.dumps(header)})
    other = _system()
    ckpt.load(other, old)
    assert all(torch.equal(a.param, b.param) for a, b in zip(other.controls(), system.controls()))


# --- nothing lost: checkpoints -------------------------------------------------------------------
def test_step_cadence_checkpoints_without_evaluation(task, tmp_path):
    spec, tr, dev = task
    system = _system()
    fails_after(system, 5, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train(system, tr, dev, spec, _config(tmp_path, checkpoint_every=2, checkpoint_minutes=None))
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["step"] == 4  # steps 2 and 4 were saved; the crash came in step 6
    assert {"deltas", "optimizer", "scheduler", "step", "log", "torch_rng", "config"} <= set(state)
    assert len(state["log"]["train_loss"]) == 4 and state["config"]["lr"] == 1e-2
    assert strict_loads((tmp_path / "metrics.json").read_text())["status"] == "running"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, "metrics.json", ".controltune-train.lock"])
    (tmp_path / f"{CHECKPOINT}.tmp-99999").write_bytes(b"half a checkpoint from a killed writer")
    result = train(_system(), tr, dev, spec, _config(tmp_path, checkpoint_every=2, resume=True))
    assert result["status"] == "done" and not list(tmp_path.glob("*.tmp-*"))


def test_time_cadence_checkpoints(task, tmp_path):
    spec, tr, dev = task
    system = _system()
    fails_after(system, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train(system, tr, dev, spec, _config(tmp_path, checkpoint_minutes=1e-9))  # due after every step
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 3


def test_resume_without_a_checkpoint_is_an_error(task, tmp_path, capsys):
    spec, tr, dev = task
    with pytest.raises(OutputFolderError, match="nothing to resume"):
        train(_system(), tr, dev, spec, _config(tmp_path / "empty", resume=True))
    assert main(_cli(spec.folder, tmp_path / "empty", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_configuration_unless_allowed(task, tmp_path, capsys):
    spec, tr, dev = task
    train(_system(), tr, dev, spec, _config(tmp_path, steps=4))
    with pytest.raises(ConfigMismatchError, match=r"batch_size: 8 -> 4.*lr: 0\.01 -> 0\.02") as err:
        train(_system(), tr, dev, spec, _config(tmp_path, steps=4, lr=2e-2, batch_size=4, resume=True))
    assert [d[0] for d in err.value.differences] == ["batch_size", "lr"]
    with pytest.raises(ConfigMismatchError, match="batch_size") as err:
        train(_system(), tr, dev, spec, _config(tmp_path, steps=4, lr=2e-2, batch_size=4, resume=True,
                                               allow_config_change=["lr"]))
    assert "lr:" not in str(err.value)
    result = train(_system(), tr, dev, spec, _config(tmp_path, steps=6, resume=True, allow_config_change=["steps"]))
    assert result["status"] == "done" and len(result["curves"]["train_loss"]) == 6
    saved = strict_loads((tmp_path / "metrics.json").read_text())
    assert saved["config_changes"] == [{"step": 4, "key": "steps", "old": 4, "new": 6}]
    # Through the CLI: a method option differs; named, refused with exit 2.
    assert main(_cli(spec.folder, tmp_path / "cli")) == 0
    assert main(_cli(spec.folder, tmp_path / "cli", "--resume", "--opt", "rank=4")) == 2
    assert "options.rank: 2 -> 4" in capsys.readouterr().err


def test_existing_results_are_not_overwritten(task, tmp_path, capsys):
    spec, tr, dev = task
    train(_system(), tr, dev, spec, _config(tmp_path, steps=2))
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(OutputFolderError, match="already holds results"):
        train(_system(), tr, dev, spec, _config(tmp_path, steps=3))
    assert main(_cli(spec.folder, tmp_path)) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "metrics.json").read_text() == before
    result = train(_system(), tr, dev, spec, _config(tmp_path, steps=3, overwrite=True))
    assert result["total_steps"] == 3 and strict_loads((tmp_path / "metrics.json").read_text())["step"] == 3


def test_an_out_that_is_a_file_or_a_json_onto_an_input_is_refused_before_loading(task, tmp_path, monkeypatch,
                                                                                   capsys):
    spec, _, _ = task

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(controltune, "load_model", no_model)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert main(_cli(spec.folder, a_file)) == 2
    assert "is an existing file" in capsys.readouterr().err and a_file.read_text() == "keep me"
    train_file = spec.folder / "train.jsonl"
    data = train_file.read_text()
    assert main(_cli(spec.folder, None, "--json", str(train_file))) == 2
    assert "input of this run" in capsys.readouterr().err and train_file.read_text() == data


def test_a_second_process_cannot_write_a_folder_in_use(task, tmp_path, capsys):
    spec, tr, dev = task
    out = tmp_path / "busy"
    with locked_output_folder(out):  # a new open file description: the same conflict as another process
        with pytest.raises(OutputLockedError, match=f"{out} is in use by another training process"):
            train(_system(), tr, dev, spec, _config(out))
        assert main(_cli(spec.folder, out)) == 2
        assert f"{out} is in use" in capsys.readouterr().err
    train(_system(), tr, dev, spec, _config(out, steps=2))  # free again once released


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from controltune.system import ResidualSystem
    from controltune.cli import main

    cost = ResidualSystem.cost
    ResidualSystem.cost = lambda self, batch: (time.sleep(0.05), cost(self, batch))[1]  # time to be killed in
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_deltas(task, tmp_path):
    spec, _, _ = task
    args = ["--steps", "40", "--checkpoint-every", "2"]
    reference = tmp_path / "reference"
    assert main([*_cli(spec.folder, reference), *args]) == 0

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, *_cli(spec.folder, out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / CHECKPOINT).exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.01)
    delay = random.uniform(0.0, 1.2)  # 38 steps of >= 50 ms remain: the kill lands mid-run
    time.sleep(delay)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, f"the run ended before the kill (delay {delay:.3f} s)"
    state = torch.load(out / CHECKPOINT, weights_only=False)  # the previous checkpoint is whole
    assert 2 <= state["step"] < 40 and not (out / "deltas.safetensors").exists()

    assert main([*_cli(spec.folder, out), *args, "--resume"]) == 0
    resumed = load_file(str(out / "deltas.safetensors"))
    uninterrupted = load_file(str(reference / "deltas.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), f"{name} differs (killed after {delay:.3f} s)"
    a, b = (strict_loads((p / "metrics.json").read_text()) for p in (out, reference))
    assert a["curves"]["train_loss"] == b["curves"]["train_loss"] and a["final"] == b["final"]


# --- the sweeps record a diverged run as such ------------------------------------------------------
def test_design_eval_records_a_diverged_run_and_never_chooses_or_retries_it(task, tmp_path, monkeypatch):
    from experiments import design_eval

    spec, _, _ = task
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "SST-2").symlink_to(spec.folder)  # the sweep names tasks: the toy task plays SST-2
    monkeypatch.setenv("CONTROLTUNE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(design_eval, "load_model", lambda name, seed=0: load_model("random:bert", seed=seed))
    monkeypatch.setattr(design_eval, "DEFAULT_GRID", (1e30, 1e-2))
    out = tmp_path / "design.jsonl"
    argv = ["--methods", "lora", "--budgets", "b18k", "--tasks", "sst2", "--seeds", "1", "--n-train", "sst2=32",
            "--n-val", "8", "--batch-size", "8", "--max-length", "16", "--curve-points", "2", "--out", str(out)]
    design_eval.main(argv)
    rows = {r["lr"]: r for r in read_jsonl(out)}
    assert rows[1e30]["status"] == "diverged" and rows[1e30]["val"] is None and rows[1e30]["dev"] is None
    assert rows[1e30]["diverged"]["step"] >= 1 and rows[1e-2]["status"] == "done"
    assert design_eval.choose_lr(list(rows.values()), "b18k", "sst2", "lora") == 1e-2
    design_eval.main(argv)  # resume: nothing left to run, the diverged job included
    assert len(read_jsonl(out)) == 2
    for line in out.read_text().splitlines():
        strict_loads(line)
    legacy = {**rows[1e-2]}
    legacy.pop("status")  # committed rows predate the key: they count as done
    assert design_eval.choose_lr([rows[1e30], legacy], "b18k", "sst2", "lora") == 1e-2
    assert design_eval.choose_lr([rows[1e30], {**rows[1e-2], "status": "diverged"}], "b18k", "sst2", "lora") is None


def test_sweep_glue_records_a_diverged_run_and_leaves_it_out_of_the_table(task, tmp_path, monkeypatch):
    from experiments import sweep_glue

    spec, _, _ = task
    key = str(spec.folder)
    monkeypatch.setattr(sweep_glue, "load_model", lambda name: load_model("random:bert"))
    monkeypatch.setattr(sweep_glue, "TASKS", {key: {"train_size": None, "max_length": 16}})
    monkeypatch.setattr(sweep_glue, "METHODS", {"lora": {"rank": 2, "targets": ["q", "v"]}, "bitfit": {}})
    monkeypatch.setattr(sweep_glue, "LR", {"lora": 1e30, "bitfit": 1e-2})
    out = tmp_path / "sweep.jsonl"
    monkeypatch.setattr(sys, "argv", ["sweep_glue", "--tasks", key, "--seeds", "0", "--no-progress",
                                      "--out", str(out)])
    sweep_glue.main()
    rows = {r["method"]: r for r in read_jsonl(out)}
    assert rows["lora"]["status"] == "diverged" and rows["lora"]["score"] is None
    assert rows["lora"]["diverged"]["step"] >= 1 and rows["bitfit"]["status"] == "done"
    table = strict_loads((tmp_path / "sweep_table.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["bitfit"]
    assert table["all_diverged"] == [{"method": "lora", "task": key, "budget": 1.0, "diverged_seeds": [0]}]
    sweep_glue.main()  # resume: both runs are done, neither is repeated
    assert len(read_jsonl(out)) == 2
