"""``controltune bound --reference DIR``: the reference u* is a finished ``controltune train`` run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from controltune import bounds
from controltune.cli import main

ROWS = [{"text": f"sentence number {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(16)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("task")
    for split, rows in (("train", ROWS), ("dev", ROWS[:6])):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(folder)


def _train(out: Path, task: str, method: str, *opts: str) -> Path:
    argv = ["train", "--model", "random:bert", "--method", method, "--task", task, "--steps", "2",
            "--batch-size", "4", "--max-length", "16", "--lr", "1e-2", "--no-progress", "--out", str(out)]
    for opt in opts:
        argv += ["--opt", opt]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, task) -> Path:
    return _train(tmp_path_factory.mktemp("runs") / "lora", task, "lora", "rank=2", "targets=q,v")


def _bound(capsys, reference: Path, tmp_path: Path, *extra: str) -> tuple[int, str, dict | None]:
    out = tmp_path / "bound.json"
    code = main(["bound", "--reference", str(reference), "--structure", "rank", "--sizes", "0,1", "--dtype",
                 "float64", "--eval-size", "3", "--dev-size", "4", "--max-length", "16", "--iters", "2",
                 "--no-progress", "--json", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err, json.loads(out.read_text()) if out.exists() else None


def test_reference_is_the_trained_lora_as_weight_deltas(lora_run) -> None:
    ref = bounds.load_reference(lora_run)
    assert ref.info["method"] == "lora" and ref.info["run"] == str(lora_run)
    assert sorted(ref.values) == sorted(f"{layer}.{r}" for layer in range(3) for r in ("q", "v"))
    # u* is s·BA of the saved factors, and the system computes with it.
    from safetensors.torch import load_file

    saved = load_file(lora_run / "deltas.safetensors")
    a, b = saved["lora.1.v.A"].double(), saved["lora.1.v.B"].double()
    assert torch.allclose(ref.values["1.v"], (16.0 / 2) * b @ a, rtol=1e-5, atol=1e-7)  # alpha 16, rank 2
    assert ref.system.controllers[0].values()["1.v"].equal(ref.values["1.v"])
    assert next(ref.system.parameters()).dtype == torch.float64


def test_bound_prints_and_writes_every_bound(capsys, lora_run, tmp_path) -> None:
    code, text, result = _bound(capsys, lora_run, tmp_path)
    assert code == 0, text
    assert f"reference lora run {lora_run}" in text
    assert [r["size"] for r in result["rows"]] == [0, 1]
    assert result["reference"]["run"] == str(lora_run)
    for row in result["rows"]:
        assert set(row["bounds"]) == {"certified", "global", "local", "sampled", "adjoint", "tangent", "costate_cs"}
        assert row["certified_holds"] and row["global_holds"]
        costs = {k: b["cost"] for k, b in row["bounds"].items()}
        assert all(math.isfinite(c) and c >= 0 for c in costs.values()), costs
        # the two sound bounds, read from the numbers themselves (not only the flags the command computes)
        assert costs["certified"] >= row["gap"] >= 0 and costs["global"] >= row["gap"]


def test_full_reference_takes_its_targets(capsys, tmp_path, task) -> None:
    run = _train(tmp_path / "full", task, "full")
    ref = bounds.load_reference(run, targets=["o"])
    assert sorted(ref.values) == ["0.o", "1.o", "2.o"]
    assert all(float(v.abs().max()) > 0 for v in ref.values.values())  # θ − θ₀ of a trained map


def _error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("controltune bound: error:")]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_a_folder_that_is_not_a_run_is_refused(capsys, tmp_path, lora_run, task) -> None:
    code, text, _ = _bound(capsys, tmp_path / "nowhere", tmp_path)
    assert code == 2 and "is not a folder" in _error_line(text)
    half = tmp_path / "half"
    half.mkdir()
    (half / "metrics.json").write_text(json.dumps({"status": "running"}))
    code, text, _ = _bound(capsys, half, tmp_path)
    assert code == 2 and "deltas.safetensors missing" in _error_line(text)
    bitfit = _train(tmp_path / "bitfit", task, "bitfit")
    code, text, _ = _bound(capsys, bitfit, tmp_path)
    assert code == 2 and "trained 'bitfit'" in _error_line(text)
    code, text, _ = _bound(capsys, lora_run, tmp_path, "--targets", "o")
    assert code == 2 and "full fine-tuning" in _error_line(text)


def test_json_never_replaces_a_file_of_the_run(capsys, lora_run) -> None:
    metrics = (lora_run / "metrics.json").read_text()
    code = main(["bound", "--reference", str(lora_run), "--structure", "rank", "--sizes", "1",
                 "--json", str(lora_run / "metrics.json")])
    assert code == 2 and "a file of the reference run" in _error_line(capsys.readouterr().err)
    assert (lora_run / "metrics.json").read_text() == metrics
