"""Batches of labelled examples: tokenisation, padding and loaders.

A batch is the dict every system takes: ``input_ids`` and ``attention_mask`` (S×T long),
``token_type_ids`` when the tokenizer makes them, and ``labels`` (S long).  Padding is to
the longest sequence of the batch, never to ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data import Example

__all__ = ["Collator", "labelled_batch", "make_loader"]

class Collator:
    """Tokenise a list of examples into a padded batch.

    Padding is to the longest sequence in the batch (not ``max_length``), so
    short batches stay cheap; sequences longer than ``max_length`` tokens are
    truncated (pairs: longest-first).
    """

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Batch S examples.

        Returns:
            ``input_ids`` (SxT long), ``attention_mask`` (SxT long),
            ``token_type_ids`` (SxT long, only if the tokenizer produces
            them) and ``labels`` (S long), where T is the longest tokenised
            length in the batch, at most ``max_length``.
        """
        if not examples:
            raise ValueError("cannot collate an empty batch")
        pairs = {ex.text_b is not None for ex in examples}
        if len(pairs) > 1:
            raise ValueError("batch mixes single-sentence and pair examples")
        text_b = [ex.text_b for ex in examples] if pairs.pop() else None
        encoded = self.tokenizer(
            [ex.text_a for ex in examples],
            text_b,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {
            key: encoded[key].long()
            for key in ("input_ids", "attention_mask", "token_type_ids")
            if key in encoded
        }
        batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return batch


def make_loader(
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    max_length: int = 128,
) -> DataLoader:
    """DataLoader yielding :class:`Collator` batches of ``batch_size`` examples.

    With ``shuffle`` the order comes from a ``torch.Generator`` seeded with
    ``seed``, so runs are reproducible regardless of the global torch seed.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=Collator(tokenizer, max_length=max_length),
    )


def labelled_batch(tokenizer: Any, texts: Sequence[str | tuple[str, str]], labels: Sequence[int] | None = None,
                   max_length: int = 128) -> dict[str, torch.Tensor]:
    """A batch from raw texts (or ``(text_a, text_b)`` pairs) and their labels (default all 0).

    ``tokenizer`` is a HF tokenizer or a loaded model (its ``.tokenizer``).  Example::

        batch = ct.labelled_batch(loaded, ["a fine film", "dull"], [1, 0])
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    labels = [0] * len(texts) if labels is None else list(labels)
    if len(labels) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    examples = [Example(t[0], t[1], int(y)) if isinstance(t, tuple) else Example(t, None, int(y))
                for t, y in zip(texts, labels)]
    return Collator(tokenizer, max_length)(examples)
