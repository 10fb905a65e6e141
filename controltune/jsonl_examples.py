"""One labelled example per JSONL line: the row format of a task file, and its checks.

Each non-blank line is one example, single-sentence ``{"text": ..., "label": ...}`` or sentence-pair
``{"text_a": ..., "text_b": ..., "label": ...}``; a label is an int ``0..C-1``, or, when the task has
label names, a name or its id written as a string.  Every problem is a :class:`DataError` naming the
file, the line and what is accepted.  Which files make a task, and its splits: :mod:`controltune.data`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataError", "Example", "nonblank_lines", "read_examples", "schema_name", "sniff_is_pair"]


class DataError(ValueError):
    """A task name, task file or example line that cannot be used."""


@dataclass(frozen=True)
class Example:
    """One labelled example; ``text_b`` is None for single-sentence tasks."""

    text_a: str
    text_b: str | None
    label: int


def sniff_is_pair(path: Path) -> bool | None:
    # closing() so the file is released right after the first line.
    with closing(nonblank_lines(path)) as lines:
        first = next(lines, None)
    if first is None:
        return None
    lineno, text = first
    return _parse_line(text, path, lineno)[1] is not None


def schema_name(is_pair: bool) -> str:
    return "pair (text_a/text_b)" if is_pair else "single (text)"


def nonblank_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, decoded line)`` for non-blank lines."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot open {path}: {exc.strerror}") from exc
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            # utf-8-sig on line 1 tolerates files saved with a BOM.
            codec = "utf-8-sig" if lineno == 1 else "utf-8"
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError as exc:
                raise _line_error(path, lineno, f"not valid UTF-8 ({exc.reason})") from exc
            if text.strip():
                yield lineno, text


def read_examples(
    path: Path, label_names: list[str] | None, num_labels: int | None
) -> list[Example]:
    """Parse every line; ``num_labels`` None means no upper bound on ids."""
    examples: list[Example] = []
    first: tuple[bool, int] | None = None  # (is_pair, line) of first example
    for lineno, text in nonblank_lines(path):
        text_a, text_b, raw_label = _parse_line(text, path, lineno)
        is_pair = text_b is not None
        if first is None:
            first = (is_pair, lineno)
        elif is_pair != first[0]:
            raise _line_error(
                path,
                lineno,
                f"mixed single/pair schema: this line is {schema_name(is_pair)} "
                f"but line {first[1]} is {schema_name(first[0])}",
            )
        label = _label_id(raw_label, label_names, num_labels, path, lineno)
        examples.append(Example(text_a, text_b, label))
    return examples


def _line_error(path: Path, lineno: int, problem: str) -> DataError:
    return DataError(f"{path}, line {lineno}: {problem}")


def _parse_line(text: str, path: Path, lineno: int) -> tuple[str, str | None, Any]:
    """Return ``(text_a, text_b or None, raw label)`` of one JSONL line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _line_error(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise _line_error(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    has_single = "text" in obj
    has_pair = "text_a" in obj or "text_b" in obj
    if has_single and has_pair:
        raise _line_error(path, lineno, "has both 'text' and 'text_a'/'text_b'; use one schema")
    keys = ("text_a", "text_b") if has_pair else ("text",)
    for key in (*keys, "label"):
        if key not in obj:
            hint = " (or 'text_a' and 'text_b')" if key == "text" else ""
            raise _line_error(path, lineno, f"missing key {key!r}{hint}")
    for key in keys:
        if not isinstance(obj[key], str):
            raise _line_error(
                path, lineno, f"{key!r} must be a string, got {type(obj[key]).__name__}"
            )
    if has_pair:
        return obj["text_a"], obj["text_b"], obj["label"]
    return obj["text"], None, obj["label"]


def _label_id(
    raw: Any,
    label_names: list[str] | None,
    num_labels: int | None,
    path: Path,
    lineno: int,
) -> int:
    """Map a raw JSON label to its int id, validating range and names."""
    if isinstance(raw, str):
        if label_names is None:
            raise _line_error(
                path,
                lineno,
                f"label {raw!r} is a string but there is no labels.json in {path.parent}",
            )
        if raw in label_names:
            return label_names.index(raw)
        if raw.isascii() and raw.isdigit() and int(raw) < len(label_names):
            label = int(raw)
        else:
            raise _line_error(
                path,
                lineno,
                f"label {raw!r} not in {path.parent / 'labels.json'} "
                f"(names: {', '.join(label_names)})",
            )
    # bool is an int subclass, but true/false labels are almost surely a mistake.
    elif isinstance(raw, int) and not isinstance(raw, bool):
        label = raw
    else:
        raise _line_error(path, lineno, f"label must be an int, got {json.dumps(raw)}")
    upper = len(label_names) if label_names is not None else num_labels
    if label < 0 or (upper is not None and label >= upper):
        bound = f"0..{upper - 1}" if upper is not None else ">= 0"
        where = f" (from {path.parent / 'labels.json'})" if label_names is not None else ""
        raise _line_error(path, lineno, f"label {label} out of range {bound}{where}")
    return label
