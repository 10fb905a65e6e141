"""Shared fixtures: offline switches, tiny batches, cached models."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

FAMILY_MODELS = ["random:bert", "random:roberta", "random:gpt2", "random:llama"]
SENTENCES = ["a gripping , funny and moving film .", "dull", "the plot is thin but the acting is superb ."]


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="the peft extra is not installed (pip install -e '.[peft]')")
"""Tests that load or train through peft itself (``make test`` installs the extra; ``.[test]`` alone does not)."""


def make_batch(tokenizer, n: int = 3, labels: bool = True, family: str | None = None) -> dict:
    """A padded batch of ``n`` real sentences (S×T) with labels."""
    texts = (SENTENCES * n)[:n]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    if labels:
        batch["labels"] = torch.arange(n) % 2
    return batch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up dominates, and the machine's cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def batch_of():
    return make_batch


def toy_task(folder, n_train: int = 48, n_dev: int = 16):
    """A separable toy sentiment task (positive and negative words) written to ``folder``.

    Returns ``(spec, train examples, dev examples)``.
    """
    import json
    import random

    from controltune.data import load_split, resolve_task

    rng = random.Random(0)
    words = (["bad", "awful", "sad", "poor", "ugly"], ["good", "great", "fine", "nice", "happy"])
    for split, n in (("train", n_train), ("dev", n_dev)):
        with (folder / f"{split}.jsonl").open("w") as fh:
            for _ in range(n):
                y = rng.randint(0, 1)
                fh.write(json.dumps({"text": " ".join(rng.choice(words[y]) for _ in range(4)), "label": y}) + "\n")
    spec = resolve_task(str(folder))
    return spec, load_split(spec, "train"), load_split(spec, "dev")


def fails_after(system, steps: int, error: BaseException | type[BaseException] = KeyboardInterrupt) -> None:
    """Make call ``steps + 1`` of ``system.cost`` raise ``error`` (by default a run killed mid-training)."""
    cost, calls = system.cost, {"n": 0}

    def cost_or_fail(batch):
        calls["n"] += 1
        if calls["n"] > steps:
            raise error
        return cost(batch)

    system.cost = cost_or_fail
