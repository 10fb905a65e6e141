"""Metrics per class count (accuracy; macro-F1 above two classes; binary F1 when a 2-class task asks), the
majority-class level, and a 3-class JSONL task trained end to end through ``controltune train``."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from controltune.cli import main
from controltune.data import resolve_task
from controltune.metrics import (
    compute_metrics,
    f1_binary,
    f1_macro,
    majority_baseline,
    metrics_for_classes,
    top_class_share,
)


def _reference_macro_f1(p: list[int], y: list[int], classes: list[int]) -> float:
    """Per-class precision and recall, then F1, averaged: the textbook route."""
    f1s = []
    for k in classes:
        tp = sum(a == k and b == k for a, b in zip(p, y))
        pred_k, gold_k = p.count(k), y.count(k)
        precision = tp / pred_k if pred_k else 0.0
        recall = tp / gold_k if gold_k else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(f1s) / len(f1s)


def test_macro_f1_matches_the_textbook_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 4, 50).tolist()
        p = rng.integers(0, 4, 50).tolist()
        assert f1_macro(p, y) == pytest.approx(_reference_macro_f1(p, y, sorted(set(p) | set(y))))
        assert f1_macro(p, y, num_labels=5) == pytest.approx(_reference_macro_f1(p, y, [0, 1, 2, 3, 4]))
    assert f1_macro([0, 1, 2], [0, 1, 2]) == 1.0
    y = [0, 1, 1, 0, 1]
    p = [0, 1, 0, 0, 1]
    assert f1_macro(p, y) == pytest.approx((f1_binary(p, y) + f1_binary([1 - v for v in p], [1 - v for v in y])) / 2)
    with pytest.raises(ValueError, match="< num_labels=2"):
        f1_macro([0, 2], [0, 1], num_labels=2)


def test_metrics_per_class_count():
    assert metrics_for_classes(2) == ("accuracy",)
    assert metrics_for_classes(2, binary_f1=True) == ("accuracy", "f1")
    assert metrics_for_classes(3) == ("accuracy", "macro_f1")
    with pytest.raises(ValueError, match="binary F1 needs a 2-class task"):
        metrics_for_classes(3, binary_f1=True)
    with pytest.raises(ValueError, match="at least 2 classes"):
        metrics_for_classes(1)
    with pytest.raises(ValueError, match="use macro_f1"):
        compute_metrics("f1", [0, 2], [0, 1])


def test_majority_baseline_predicts_the_most_frequent_class():
    assert majority_baseline(("accuracy", "mcc"), [1, 1, 0, 1]) == {"accuracy": 0.75, "mcc": 0.0}
    assert majority_baseline(("accuracy", "f1"), [1, 0, 1])["f1"] == pytest.approx(0.8)
    assert majority_baseline(("macro_f1",), [2, 2, 0, 1])["macro_f1"] == pytest.approx((0 + 0 + 2 / 3) / 3)


def _write_three_class(path, n: int, rng: random.Random) -> None:
    words = (["bad", "awful", "sad"], ["table", "chair", "door"], ["good", "great", "fine"])
    with path.open("w") as fh:
        for _ in range(n):
            y = rng.randint(0, 2)
            fh.write(json.dumps({"text": " ".join(rng.choice(words[y]) for _ in range(3)), "label": y}) + "\n")


def test_a_three_class_jsonl_task_trains_end_to_end(tmp_path, capsys, one_thread):
    rng = random.Random(0)
    folder = tmp_path / "three"
    folder.mkdir()
    _write_three_class(folder / "train.jsonl", 60, rng)
    _write_three_class(folder / "dev.jsonl", 15, rng)
    spec = resolve_task(str(folder))
    assert spec.num_labels == 3 and spec.metrics == ("accuracy", "macro_f1") and spec.metric == "accuracy"
    args = ["--model", "random:bert", "--method", "lora", "--opt", "rank=2", "--steps", "6", "--batch-size", "8",
            "--max-length", "16", "--eval-every", "3", "--no-progress"]
    assert main(["train", "--task", str(folder), *args, "--val-size", "12", "--out", str(tmp_path / "run")]) == 0
    assert "macro_f1=" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("final", "dev_at_best_val", "best_val"):
        assert set(saved[key]) == {"step", "accuracy", "macro_f1", "loss", "top_class_share"}
        assert 0 <= saved[key]["macro_f1"] <= 1 and 1 / 3 <= saved[key]["top_class_share"] <= 1
    # a single 3-class file: dev held out of it, validation held out of the rest
    single = tmp_path / "three.jsonl"
    _write_three_class(single, 80, rng)
    report = tmp_path / "single.json"
    assert main(["train", "--task", str(single), *args, "--val-size", "0.2", "--json", str(report)]) == 0
    saved = json.loads(report.read_text())
    assert saved["config"]["n_dev"] == 8 and saved["config"]["n_val"] == 14 and saved["config"]["n_train"] == 58
    assert "macro_f1" in saved["final"]


def test_a_two_class_task_that_asks_for_binary_f1_reports_it(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                                                       for t, y in (("good", 1), ("bad", 0), ("fine", 1))))
    spec = resolve_task(str(folder))
    assert spec.metrics == ("accuracy",)
    asks = dataclasses.replace(spec, metric="f1", metrics=metrics_for_classes(2, binary_f1=True))
    assert compute_metrics(asks, [1, 1, 1], [1, 0, 1]) == {"accuracy": pytest.approx(2 / 3), "f1": 0.8}
    from controltune.data import BUILTIN_TASKS

    # MRPC asks for binary F1 (checked on its registry entry: the GLUE copies may not be on this machine).
    assert BUILTIN_TASKS["mrpc"].metrics == ("accuracy", "f1")


def test_top_class_share_counts_the_most_predicted_class():
    assert top_class_share([1, 1, 1]) == 1.0 and top_class_share(np.array([0, 1, 1, 2])) == 0.5
    with pytest.raises(ValueError, match="empty"):
        top_class_share([])


def test_a_run_that_predicts_one_class_says_so(tmp_path, capsys, one_thread):
    """Training rows of one class teach the head to predict it everywhere: the dev score is the constant
    prediction's, and the CLI and a sweep row both say that the deltas predict one class."""
    folder = tmp_path / "one"
    folder.mkdir()
    words = (["bad", "awful", "sad"], ["good", "great", "fine"])
    for split, labels in (("train", [0] * 40), ("dev", [0, 1] * 8)):
        with (folder / f"{split}.jsonl").open("w") as fh:
            for i, y in enumerate(labels):
                fh.write(json.dumps({"text": f"{words[y][i % 3]} {words[y][(i + 1) % 3]}", "label": y}) + "\n")
    args = ["train", "--task", str(folder), "--model", "random:bert", "--method", "lora", "--opt", "rank=2",
            "--steps", "10", "--batch-size", "8", "--lr", "0.01", "--max-length", "8", "--no-progress",
            "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "predict one class for every dev row" in err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["final"]["top_class_share"] == 1.0 and result["final"]["accuracy"] == 0.5

    from controltune import sweep_spec
    from controltune.sweep import progress_line, run_sweep

    spec = sweep_spec.parse_spec({"grid": {"model": "random:bert", "method": "lora", "task": str(folder), "lr": 1e-2,
                                           "options": {"rank": 2}},
                                  "train": {"steps": 10, "batch_size": 8, "max_length": 8}})
    out = tmp_path / "rows.jsonl"
    run_sweep(spec, out, executor="local", runs_dir=tmp_path / "runs")
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["status"] == "done" and row["predicts_one_class"] is True
    assert "[predicts one class for every dev row]" in progress_line(1, 1, row, [])
