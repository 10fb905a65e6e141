"""Batches of labelled examples: tokenisation, padding, batch order and loaders.

A batch is the dict every system takes: ``input_ids`` and ``attention_mask`` (S×T long),
``token_type_ids`` when the tokenizer makes them, and ``labels`` (S long).  Padding is to
the longest sequence of the batch, never to ``max_length``.

Two ways to make batches: :class:`Collator` tokenises a list of examples on the spot;
:func:`encode` tokenises a whole split once (cached in memory per tokenizer, examples and
``max_length``, optionally on disk) and :meth:`Encoded.batch` pads any selection of it.
Batch orders (:func:`length_grouped_batches`, :func:`shuffled_batches`) are functions of a
``torch.Generator`` only, so a seeded run draws the same batches after a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data import Example
from .results import atomic_file
from .smollm2 import cache_root

__all__ = ["Collator", "Encoded", "clear_token_cache", "encode", "labelled_batch", "length_grouped_batches",
           "length_order", "make_loader", "shuffled_batches", "token_cache_dir", "tokenizer_fingerprint"]


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


# --- tokenised once ----------------------------------------------------------------------
TOKEN_CACHE_FORMAT = "controltune-tokens/1"
"""Format tag of a tokenised split stored on disk by :func:`encode`."""
MEMORY_ENTRIES = 8
"""How many tokenised splits :func:`encode` keeps in memory (least recently used dropped first)."""
ENCODE_CHUNK = 2048
"""Examples handed to the tokenizer at once when encoding a split."""
GROUP_BATCHES = 50
"""Batches per length group in :func:`length_grouped_batches` (the group is sorted by length, then cut)."""

_MEMORY: OrderedDict[str, Encoded] = OrderedDict()
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Encoded:
    """The token ids of a list of examples, tokenised once, truncated but not padded.

    The ids of example ``i`` are ``input_ids[offsets[i]:offsets[i + 1]]`` (one flat int32
    tensor for the whole split, so it is cheap to keep and to store); ``token_type_ids``
    likewise, or None when the tokenizer makes none.  :meth:`batch` pads a selection to
    its longest sequence, exactly as :class:`Collator` does.
    """

    input_ids: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None
    pad_token_id: int
    pad_token_type_id: int = 0
    padding_side: str = "right"

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def lengths(self) -> list[int]:
        """Tokens of each example (after truncation)."""
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The examples ``indices`` as a batch padded to the longest of them (keys as :class:`Collator`)."""
        if not len(indices):
            raise ValueError("cannot batch an empty selection")
        starts, ends = self.offsets[list(indices)].tolist(), self.offsets[[i + 1 for i in indices]].tolist()
        width = max(e - s for s, e in zip(starts, ends))
        ids = torch.full((len(indices), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        types = None if self.token_type_ids is None else torch.full_like(ids, self.pad_token_type_id)
        for row, (s, e) in enumerate(zip(starts, ends)):
            cols = slice(0, e - s) if self.padding_side == "right" else slice(width - (e - s), width)
            ids[row, cols] = self.input_ids[s:e]
            mask[row, cols] = 1
            if types is not None:
                types[row, cols] = self.token_type_ids[s:e]
        batch = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        batch["labels"] = self.labels[list(indices)]
        return batch

    def to_state(self) -> dict[str, Any]:
        """Plain tensors and numbers (what :func:`encode` stores on disk)."""
        return {"format": TOKEN_CACHE_FORMAT, "input_ids": self.input_ids, "offsets": self.offsets,
                "labels": self.labels, "token_type_ids": self.token_type_ids, "pad_token_id": self.pad_token_id,
                "pad_token_type_id": self.pad_token_type_id, "padding_side": self.padding_side}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Encoded:
        if state.get("format") != TOKEN_CACHE_FORMAT:
            raise ValueError(f"not a tokenised split of format {TOKEN_CACHE_FORMAT}")
        return cls(**{k: v for k, v in state.items() if k != "format"})


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short sha256 of everything that decides a tokenizer's ids (its full serialised form where it has one)."""
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and special tokens
        body = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    meta = [type(tokenizer).__name__, getattr(tokenizer, "padding_side", "right"),
            getattr(tokenizer, "truncation_side", "right"), tokenizer.pad_token_id]
    digest = hashlib.sha256((json.dumps(meta) + body).encode()).hexdigest()[:16]
    with contextlib.suppress(TypeError):
        _FINGERPRINTS[tokenizer] = digest
    return digest


def examples_digest(examples: Sequence[Example]) -> str:
    """A short sha256 of the examples' texts and labels, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.text_a}\x1f{ex.text_b}\x1f{ex.label}\x1e".encode())
    return h.hexdigest()[:16]


def token_cache_dir() -> Path:
    """Where :func:`encode` stores tokenised splits on disk: ``<controltune cache>/tokens``."""
    return cache_root() / "tokens"


def encode(examples: Sequence[Example], tokenizer: Any, max_length: int = 128,
           cache_dir: str | Path | None = None) -> Encoded:
    """Tokenise ``examples`` once (truncated to ``max_length``, not padded); cached.

    The result is kept in memory, keyed by the tokenizer's fingerprint, the examples
    (texts and labels) and ``max_length``, so the same split is tokenised once per
    process.  With ``cache_dir`` (e.g. :func:`token_cache_dir`) it is also stored there
    as ``<key>.pt`` and read back by later processes.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if not examples:
        raise ValueError("cannot encode an empty example list")
    key = f"{tokenizer_fingerprint(tokenizer)}-{examples_digest(examples)}-{max_length}"
    path = Path(cache_dir) / f"{key}.pt" if cache_dir is not None else None
    encoded = _MEMORY.get(key)
    store = path is not None and not path.is_file()
    if encoded is None and path is not None and not store:
        encoded = _read_cached(path)
        store = encoded is None  # damaged: replace it
    if encoded is None:
        encoded = _tokenize(examples, tokenizer, max_length)
    if store:
        with atomic_file(path) as fh:
            torch.save(encoded.to_state(), fh)
    _MEMORY[key] = encoded
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)
    return encoded


def clear_token_cache() -> None:
    """Forget every tokenised split kept in memory (the disk cache is left alone)."""
    _MEMORY.clear()


def _read_cached(path: Path) -> Encoded | None:
    """The tokenised split stored at ``path``, or None if absent or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        return Encoded.from_state(torch.load(path, weights_only=True))
    except Exception:  # a damaged or foreign cache file is not an error: tokenise again
        return None


def _tokenize(examples: Sequence[Example], tokenizer: Any, max_length: int) -> Encoded:
    """Tokenise in chunks; flatten the ids of every example into one tensor with offsets."""
    is_pair = _pair_kind(examples)
    ids: list[int] = []
    types: list[int] = []
    lengths: list[int] = []
    with_types = False
    for start in range(0, len(examples), ENCODE_CHUNK):
        chunk = examples[start:start + ENCODE_CHUNK]
        text_b = [ex.text_b for ex in chunk] if is_pair else None
        out = tokenizer([ex.text_a for ex in chunk], text_b, truncation=True, max_length=max_length)
        with_types = "token_type_ids" in out
        for row, seq in enumerate(out["input_ids"]):
            ids.extend(seq)
            lengths.append(len(seq))
            if with_types:
                types.extend(out["token_type_ids"][row])
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no padding token: batches of unequal lengths cannot be padded")
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return Encoded(input_ids=torch.tensor(ids, dtype=torch.int32), offsets=offsets,
                   labels=torch.tensor([ex.label for ex in examples], dtype=torch.long),
                   token_type_ids=torch.tensor(types, dtype=torch.int32) if with_types else None,
                   pad_token_id=int(tokenizer.pad_token_id),
                   pad_token_type_id=int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
                   padding_side=getattr(tokenizer, "padding_side", "right"))


def _pair_kind(examples: Sequence[Example]) -> bool:
    kinds = {ex.text_b is not None for ex in examples}
    if len(kinds) > 1:
        raise ValueError("the examples mix single-sentence and pair examples")
    return kinds.pop()


# --- batch order ---------------------------------------------------------------------------
def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                           group: int = GROUP_BATCHES) -> list[list[int]]:
    """Batches of similar length, in random order, drawn from ``generator`` only.

    The examples are shuffled, cut into groups of ``group`` batches, each group is sorted
    by length (longest first; a stable sort, so equal lengths keep their shuffled order)
    and cut into batches of ``batch_size``, and the batches of all groups are shuffled.
    Every example is in exactly one batch; only the last group may end in a short batch,
    so there are ``ceil(n / batch_size)`` batches, as with plain shuffling.
    """
    if batch_size < 1 or group < 1:
        raise ValueError(f"batch_size and group must be positive, got {batch_size} and {group}")
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(perm), span):
        members = sorted(perm[start:start + span], key=lambda i: -lengths[i])
        batches.extend(members[j:j + batch_size] for j in range(0, len(members), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[k] for k in shuffle]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Consecutive batches of one random permutation of ``range(n)`` (the last one may be short)."""
    perm = torch.randperm(n, generator=generator).tolist()
    return [perm[j:j + batch_size] for j in range(0, n, batch_size)]


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices sorted by length (stable): batches cut from it pad little."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)
