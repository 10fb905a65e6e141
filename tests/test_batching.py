"""Throughput pieces of training (issue 14): tokenised-once splits, length-grouped batch order, threads."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from controltune import batching
from controltune.batching import (
    Collator,
    Encoded,
    clear_token_cache,
    encode,
    length_grouped_batches,
    length_order,
    shuffled_batches,
)
from controltune.data import Example, load_split, resolve_task
from controltune.resources import default_threads, using_threads
from controltune.schedule import batch_order, epoch_batches
from controltune.train import TrainConfig, train
from controltune.zoo import offline_tokenizer

WORDS = ["good", "bad", "film", "plot", "dull", "superb", "acting", "moving", "thin", "a", "the", "extraordinarily"]


@pytest.fixture(scope="module")
def tokenizer():
    return offline_tokenizer()


def _examples(n: int, pair: bool = False, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
    return [Example(text(), text() if pair else None, rng.randint(0, 1)) for _ in range(n)]


@pytest.mark.parametrize("pair", [False, True])
def test_encoded_batches_equal_the_collator_batches(tokenizer, pair):
    examples = _examples(20, pair=pair)
    encoded = encode(examples, tokenizer, max_length=24)
    assert len(encoded) == 20 and max(encoded.lengths) == 24  # truncated
    for idx in ([0], [3, 1, 7], list(range(20))[::-1]):
        expected = Collator(tokenizer, max_length=24)([examples[i] for i in idx])
        got = encoded.batch(idx)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_left_padding_matches_the_tokenizer(tokenizer):
    left = offline_tokenizer()
    left.padding_side = "left"
    examples = _examples(6)
    got = encode(examples, left, max_length=32).batch(range(6))
    expected = Collator(left, max_length=32)(examples)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert batching.tokenizer_fingerprint(left) != batching.tokenizer_fingerprint(tokenizer)


def test_a_split_is_tokenised_once_in_memory_and_on_disk(tokenizer, tmp_path, monkeypatch):
    examples = _examples(30)
    clear_token_cache()
    first = encode(examples, tokenizer, 16, cache_dir=tmp_path)
    assert encode(examples, tokenizer, 16) is first  # memory
    assert [p.suffix for p in tmp_path.iterdir()] == [".pt"]
    assert encode(examples, tokenizer, 17) is not first  # another max length is another entry

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(batching, "_tokenize", no_tokenizing)
    clear_token_cache()
    again = encode(examples, tokenizer, 16, cache_dir=tmp_path)  # read back from disk
    assert again is not first and torch.equal(again.input_ids, first.input_ids)
    assert again.batch([2, 5])["input_ids"].equal(first.batch([2, 5])["input_ids"])
    other = [Example(ex.text_a, None, 1 - ex.label) for ex in examples]  # other labels: another key
    with pytest.raises(AssertionError, match="tokenised again"):
        encode(other, tokenizer, 16, cache_dir=tmp_path)


def test_a_damaged_disk_cache_is_rebuilt(tokenizer, tmp_path):
    examples = _examples(5)
    clear_token_cache()
    first = encode(examples, tokenizer, 16, cache_dir=tmp_path)
    path = next(tmp_path.iterdir())
    path.write_bytes(b"not a tensor file")
    clear_token_cache()
    assert torch.equal(encode(examples, tokenizer, 16, cache_dir=tmp_path).input_ids, first.input_ids)
    assert Encoded.from_state(torch.load(path, weights_only=True)).labels.tolist() == [e.label for e in examples]


def test_length_grouped_batches_partition_the_data_and_are_seeded():
    lengths = [random.Random(i).randint(1, 100) for i in range(1000)]

    def draw(seed: int) -> list[list[int]]:
        return length_grouped_batches(lengths, 32, torch.Generator().manual_seed(seed), group=4)
    batches = draw(0)
    assert len(batches) == math.ceil(1000 / 32)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sum(len(b) < 32 for b in batches) == 1
    assert draw(0) == batches and draw(1) != batches

    def padded(bs: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)
    plain = shuffled_batches(1000, 32, torch.Generator().manual_seed(0))
    assert padded(batches) < 0.75 * padded(plain)
    first_lengths = [max(lengths[i] for i in b) for b in batches[:10]]
    assert first_lengths != sorted(first_lengths) and first_lengths != sorted(first_lengths, reverse=True)


def test_epoch_batches_are_a_function_of_seed_and_epoch_and_can_be_ungrouped():
    lengths = [random.Random(i).randint(1, 50) for i in range(100)]
    grouped = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert grouped == epoch_batches(lengths, 8, seed=3, epoch=1)
    assert grouped != epoch_batches(lengths, 8, seed=3, epoch=2) != epoch_batches(lengths, 8, seed=4, epoch=1)
    plain = epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)
    order = batch_order(100, seed=3, epoch=1)
    assert plain == [order[i:i + 8] for i in range(0, 100, 8)]  # the order before grouping, unchanged
    assert length_order([3, 1, 2, 1]) == [1, 3, 2, 0]


def test_threads_are_set_for_the_run_and_restored(monkeypatch):
    before = torch.get_num_threads()
    with using_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == cores
    for unusable in ("0", "x", " "):  # not a positive integer: every core this process may run on
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert default_threads() == cores
    with pytest.raises(ValueError, match="threads=0"):
        TrainConfig(threads=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    for split, n in (("train", 40), ("dev", 12)):
        with (folder / f"{split}.jsonl").open("w") as fh:
            for _ in range(n):
                y = rng.randint(0, 1)
                words = ["good", "fine"] if y else ["bad", "dull"]
                fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))),
                                     "label": y}) + "\n")
    spec = resolve_task(str(folder))
    return spec, load_split(spec, "train"), load_split(spec, "dev")


def _system():
    from controltune import ResidualSystem, load_model
    from controltune.controllers import build

    system = ResidualSystem(load_model("random:bert"), seed=0)
    build("lora", system, rank=2, targets=["q", "v"])
    return system


def test_training_draws_grouped_batches_and_the_old_order_on_request(toy, one_thread):
    spec, tr, dev = toy
    seen: dict[bool, list[int]] = {}
    for grouped in (True, False):
        system = _system()
        widths: list[int] = []
        cost = system.cost
        system.cost = lambda b, cost=cost, widths=widths: (widths.append(b["input_ids"].shape[1]), cost(b))[1]
        config = TrainConfig(lr=1e-2, steps=10, batch_size=4, max_length=16, progress=False, threads=1,
                             group_by_length=grouped)
        result = train(system, tr, dev, spec, config)
        assert result["status"] == "done" and result["config"]["group_by_length"] is grouped
        seen[grouped] = widths
    lengths = encode(tr, offline_tokenizer(), 16).lengths
    expect = [max(lengths[i] for i in b) for b in epoch_batches(lengths, 4, 0, 0, group_by_length=True)]
    assert seen[True] == expect and sum(seen[True]) < sum(seen[False])
