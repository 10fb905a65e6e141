"""Evaluation: the validation rows a run is selected on, and a system's task metrics on a set of examples.

Validation rows are a seeded hold-out of the training rows (never dev rows): :func:`validation_split`.
:func:`evaluate` scores a system (a :class:`~controltune.system.ResidualSystem` with its readout) in eval mode,
batched in order of token length.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .batching import encode, length_order
from .data import Example
from .metrics import compute_metrics, top_class_share

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from .data import TaskSpec


def validation_split(examples: Sequence[Example], size: float, seed: int = 0) -> tuple[list[Example],
                                                                                       list[Example]]:
    """``(rows to train on, validation rows)``: a seeded hold-out of the training rows, disjoint from the rest.

    ``size`` rows are held out (``round(size * n)`` if ``size`` < 1), drawn with
    ``random.Random(seed)``: which rows depends only on their number and ``seed``.  Both
    parts keep the original order.

    Raises:
        ValueError: the hold-out would be empty or leave no row to train on.
    """
    n = len(examples)
    k = int(round(size * n)) if size < 1 else int(size)
    if not 1 <= k < n:
        raise ValueError(f"val_size={size} holds out {k} of {n} training rows; it must leave at least one row "
                         "on each side (a fraction < 1 or a number of rows below the training-set size)")
    held = set(random.Random(seed).sample(range(n), k))
    fit = [ex for i, ex in enumerate(examples) if i not in held]
    return fit, [examples[i] for i in sorted(held)]


def validation_rows(examples: Sequence[Example], size: float | None, seed: int = 0) -> list[Example]:
    """The rows :func:`validation_split` holds out (none when ``size`` is None): what a run is selected on."""
    return [] if size is None else validation_split(examples, size, seed)[1]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and every submodule in eval mode (no dropout) within the block, each put back in *its own* mode
    after it: ``module.train(was_training)`` would set every submodule alike, and turn on the dropout of a model
    that was in eval mode inside a module that was not (an HF model inside a freshly built system)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(system: nn.Module, examples: Sequence[Example], task_spec: TaskSpec,
             tokenizer: PreTrainedTokenizerBase, batch_size: int = 128,
             max_length: int = 128, cache_dir: str | Path | None = None) -> dict[str, float]:
    """Dev metrics of the task (``compute_metrics``), the mean terminal cost ``loss`` and the share of rows given
    the most predicted class ``top_class_share`` (1.0: one class for every row).

    The examples are tokenised once (:func:`~controltune.batching.encode`, cached; on disk
    too with ``cache_dir``) and batched in order of token length (padding to the longest in
    a batch is then cheap); predictions are put back in the original order before scoring.
    """
    if not examples:
        raise ValueError("cannot evaluate on an empty example list")
    encoded = encode(examples, tokenizer, max_length, cache_dir)
    device = next(system.model.parameters()).device
    order = length_order(encoded.lengths)
    preds = torch.empty(len(examples), dtype=torch.long)
    loss_sum = 0.0
    with eval_mode(system):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = to_device(encoded.batch(idx), device)
            logits = system(batch)
            loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            preds[idx] = logits.argmax(-1).cpu()
    labels = torch.tensor([ex.label for ex in examples])
    scores = compute_metrics(task_spec, preds, labels)
    scores["loss"] = loss_sum / len(examples)
    scores["top_class_share"] = top_class_share(preds)
    return scores
