"""Labelled text-classification tasks read from JSONL files.

A task is a folder holding ``train.jsonl`` and ``dev.jsonl`` (optionally a
``labels.json`` mapping label ids to names), or a single ``.jsonl`` file.
A single file has no dev split of its own, so one is held out: a seeded 10%
of its rows (at least one; the file needs two) is the dev split and the rest
the train split.  The two are disjoint, and which rows are held out depends
only on the file and the hold-out seed (``resolve_task(path, holdout_seed=...)``,
the data seed of a run), never on the seed of a ``load_split`` subsample; a
notice on stderr says so whenever such a task is resolved.
Each non-blank line is one example, either single-sentence
``{"text": ..., "label": ...}`` or sentence-pair
``{"text_a": ..., "text_b": ..., "label": ...}``. Labels are ints
``0..C-1``; when a ``labels.json`` sits beside the file, a label may also be
given as its name (``"positive"``) or as its id written as a string (``"1"``).

The built-in names ``sst2``, ``mrpc``, ``rte`` and ``cola`` (case-insensitive,
``-``/``_`` ignored, so ``SST-2`` works) resolve to the GLUE copies under a
``shared/data`` folder; see :func:`resolve_task` for the search order.  The row format and its checks live
in :mod:`controltune.jsonl_examples`.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .jsonl_examples import DataError, Example, nonblank_lines, read_examples, schema_name, sniff_is_pair
from .metrics import metrics_for_classes

__all__ = [
    "ACCEPTED_TASKS",
    "BUILTIN_TASKS",
    "DataError",
    "Example",
    "TaskSpec",
    "load_split",
    "resolve_task",
    "split_path",
]

ENV_VAR = "CONTROLTUNE_DATA"
SPLITS = ("train", "dev")
HOLDOUT_FRACTION = 0.1
"""Fraction of a single-file task's rows held out as its dev split (at least one row)."""
ACCEPTED_TASKS = (
    "sst2, mrpc, rte, cola, or a path to a folder with train.jsonl/dev.jsonl or a .jsonl file "
    "(of which a seeded 10% is held out as dev)"
)


@dataclass(frozen=True)
class _Builtin:
    folder: str
    metric: str
    metrics: tuple[str, ...]


# Keys are names after _normalise_name; folder names match /work/shared/data.
BUILTIN_TASKS: dict[str, _Builtin] = {
    "sst2": _Builtin("SST-2", "accuracy", ("accuracy",)),
    "mrpc": _Builtin("MRPC", "f1", ("accuracy", "f1")),
    "rte": _Builtin("RTE", "accuracy", ("accuracy",)),
    "cola": _Builtin("CoLA", "mcc", ("mcc",)),
}


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to load a task and score predictions on it.

    Attributes:
        name: short task name (``"sst2"`` for built-ins, else the folder
            name or file stem).
        folder: folder holding ``{split}.jsonl``; None for a single-file task.
        num_labels: number of classes C; labels are ``0..C-1``.
        label_names: C names, index i naming label i.
        is_pair: True when examples carry ``text_a``/``text_b``.
        metric: name of the main metric (one of ``metrics``; accuracy for a task given by path).
        metrics: names of all metrics reported for the task: a task given by path reports
            accuracy, plus macro-F1 when it has more than two classes
            (:func:`~controltune.metrics.metrics_for_classes`); the built-ins add GLUE's metrics
            (binary F1 for MRPC, MCC for CoLA).
        file: the one ``.jsonl`` file of a single-file task; None for folder
            tasks.  Its dev split is a seeded ``HOLDOUT_FRACTION`` (10%, at
            least one row) of the file's rows and its train split the other
            rows: disjoint, and fixed by the file and ``holdout_seed``.
        holdout_seed: seed of the rows held out as dev from ``file`` (the
            data seed); unused by folder tasks.
    """

    name: str
    folder: Path | None
    num_labels: int
    label_names: list[str]
    is_pair: bool
    metric: str = "accuracy"
    metrics: tuple[str, ...] = ("accuracy",)
    file: Path | None = None
    holdout_seed: int = 0


# ---------------------------------------------------------------- resolving


def resolve_task(name_or_path: str | os.PathLike[str], holdout_seed: int = 0) -> TaskSpec:
    """Turn a built-in task name or a path into a :class:`TaskSpec`.

    Built-in names (``sst2``, ``mrpc``, ``rte``, ``cola``; case, ``-`` and
    ``_`` ignored) are looked up as ``<root>/{SST-2,MRPC,RTE,CoLA}`` where
    ``<root>`` is tried in order: ``$CONTROLTUNE_DATA``; ``../shared/data``
    relative to the working directory and to each of its parents;
    ``../shared/data`` relative to each parent of this source file.

    Anything else is a path: a folder with ``train.jsonl``/``dev.jsonl`` or
    a single ``.jsonl`` file, of which a 10% hold-out drawn with
    ``holdout_seed`` becomes the dev split (disjoint from train; a notice is
    printed on stderr). Without a ``labels.json`` the number of classes is
    inferred from the largest label found in the files, so every line is
    validated here.

    Raises:
        DataError: unknown name, missing folder/file, malformed content, or a
            single file with fewer than two examples.
    """
    if isinstance(name_or_path, str):
        key = _normalise_name(name_or_path)
        if key in BUILTIN_TASKS:
            return _resolve_builtin(key)
    return _resolve_path(Path(name_or_path).expanduser(), int(holdout_seed))


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def _candidate_roots() -> list[Path]:
    """Folders that may contain the built-in task folders, in search order."""
    roots: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    cwd = Path.cwd()
    roots.extend(base.parent / "shared" / "data" for base in (cwd, *cwd.parents))
    source = Path(__file__).resolve()
    roots.extend(base.parent / "shared" / "data" for base in source.parents)
    # Parents of cwd and of the source tree often coincide.
    return list(dict.fromkeys(roots))


def _resolve_builtin(key: str) -> TaskSpec:
    info = BUILTIN_TASKS[key]
    tried = []
    for root in _candidate_roots():
        folder = root / info.folder
        if folder.is_dir():
            return _spec_from_folder(key, folder, info.metric, info.metrics)
        tried.append(str(folder))
    raise DataError(
        f"task {key!r}: could not find its data folder {info.folder!r}; tried "
        f"{', '.join(tried)}. Set {ENV_VAR} to a folder containing "
        f"{info.folder}/, or pass a path. Accepted tasks: {ACCEPTED_TASKS}"
    )


def _resolve_path(path: Path, holdout_seed: int) -> TaskSpec:
    if path.is_dir():
        if not any((path / f"{s}.jsonl").is_file() for s in SPLITS):
            raise DataError(
                f"folder {path.resolve()} has neither train.jsonl nor dev.jsonl. "
                f"Accepted tasks: {ACCEPTED_TASKS}"
            )
        return _spec_from_folder(path.resolve().name, path, "accuracy", None)
    if path.is_file() and path.suffix == ".jsonl":
        return _spec_from_file(path, holdout_seed)
    problem = "is not a .jsonl file" if path.is_file() else "does not exist"
    raise DataError(
        f"{str(path)!r} is not a built-in task and {path.resolve()} {problem}. "
        f"Accepted tasks: {ACCEPTED_TASKS}"
    )


def _spec_from_folder(name: str, folder: Path, metric: str, metrics: tuple[str, ...] | None) -> TaskSpec:
    """The spec of a folder task; ``metrics`` None: those of its class count (:func:`metrics_for_classes`)."""
    files = [folder / f"{s}.jsonl" for s in SPLITS if (folder / f"{s}.jsonl").is_file()]
    if not files:
        raise DataError(f"task {name!r}: {folder} has neither train.jsonl nor dev.jsonl")
    label_names = _label_names_for(folder, files)
    if metrics is None:
        metrics = metrics_for_classes(len(label_names))
    return TaskSpec(
        name=name,
        folder=folder,
        num_labels=len(label_names),
        label_names=label_names,
        is_pair=_common_schema(files),
        metric=metric,
        metrics=metrics,
    )


def _spec_from_file(path: Path, holdout_seed: int) -> TaskSpec:
    label_names = _label_names_for(path.parent, [path])
    is_pair = _common_schema([path])
    n_rows = sum(1 for _ in nonblank_lines(path))
    if n_rows < 2:
        raise DataError(
            f"{path} has only {n_rows} example; a single-file task needs at least 2, since "
            f"{HOLDOUT_FRACTION:.0%} of its rows are held out as the dev split. Pass a folder "
            "with train.jsonl and dev.jsonl to give the dev split yourself"
        )
    n_dev = len(_holdout_rows(n_rows, holdout_seed))
    print(
        f"controltune: note: {path} is a single file: holding out {n_dev} of its {n_rows} rows "
        f"({HOLDOUT_FRACTION:.0%}, seed {holdout_seed}) as the dev split and training on the other "
        f"{n_rows - n_dev}; pass a folder with train.jsonl and dev.jsonl to choose the dev split",
        file=sys.stderr,
    )
    return TaskSpec(
        name=path.stem,
        folder=None,
        num_labels=len(label_names),
        label_names=label_names,
        is_pair=is_pair,
        metrics=metrics_for_classes(len(label_names)),
        file=path,
        holdout_seed=holdout_seed,
    )


def _holdout_rows(n_rows: int, seed: int) -> list[int]:
    """Sorted indices of the rows of a single-file task held out as dev.

    ``round(HOLDOUT_FRACTION * n_rows)`` of them, at least 1 and at most
    ``n_rows - 1`` (so train keeps a row), drawn with ``random.Random(seed)``:
    a function of ``n_rows`` and ``seed`` only.
    """
    n_dev = min(max(1, round(HOLDOUT_FRACTION * n_rows)), n_rows - 1)
    return sorted(random.Random(seed).sample(range(n_rows), n_dev))


def _label_names_for(folder: Path, files: Sequence[Path]) -> list[str]:
    """Names from labels.json, else ``["0", ..., "C-1"]`` inferred from files."""
    names = _read_label_names(folder)
    if names is not None:
        return names
    largest = max(
        (ex.label for f in files for ex in read_examples(f, None, None)),
        default=0,
    )
    # A split may lack the top class (or be all zeros); a classifier still
    # needs at least two outputs.
    return [str(i) for i in range(max(largest + 1, 2))]


def _read_label_names(folder: Path) -> list[str] | None:
    """Parse ``folder/labels.json`` (``{"0": "negative", ...}``) if present."""
    path = folder / "labels.json"
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f'{path}: expected a non-empty object like {{"0": "negative"}}')
    expected = {str(i) for i in range(len(mapping))}
    if set(mapping) != expected:
        raise DataError(
            f"{path}: keys must be the ids 0..{len(mapping) - 1} as strings, got {sorted(mapping)}"
        )
    names = [mapping[str(i)] for i in range(len(mapping))]
    if not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: every label name must be a non-empty string")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: label names must be unique, got {names}")
    return names


def _common_schema(files: Sequence[Path]) -> bool:
    """is_pair shared by all files, judged from each file's first example."""
    seen: dict[Path, bool] = {}
    for path in files:
        is_pair = sniff_is_pair(path)
        if is_pair is not None:
            seen[path] = is_pair
    if not seen:
        raise DataError(f"no examples in {', '.join(map(str, files))}")
    if len(set(seen.values())) > 1:
        detail = ", ".join(f"{p} is {schema_name(v)}" for p, v in seen.items())
        raise DataError(f"mixed single/pair schema across splits: {detail}")
    return next(iter(seen.values()))


# ------------------------------------------------------------------ loading


def split_path(spec: TaskSpec, split: str) -> Path:
    """File holding ``split`` of ``spec`` (for a single-file task, the file
    holding both its train and its held-out dev rows)."""
    if spec.file is not None:
        if split not in SPLITS:
            raise DataError(
                f"task {spec.name!r}: split {split!r} not available; a single-file task has "
                f"{' and '.join(SPLITS)} (dev held out from {spec.file})"
            )
        return spec.file
    if spec.folder is None:
        raise DataError(f"task {spec.name!r} has neither a folder nor a file")
    path = spec.folder / f"{split}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in spec.folder.glob("*.jsonl"))
        raise DataError(
            f"task {spec.name!r}: split {split!r} not found at {path}; "
            f"available splits: {', '.join(present) or 'none'}"
        )
    return path


def load_split(
    spec_or_name: TaskSpec | str | os.PathLike[str],
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Read one split, optionally a seeded subsample of ``n`` rows.

    For a single-file task the split is first cut from the file: ``dev`` is
    the rows held out with ``spec.holdout_seed`` (10%, at least one), ``train``
    every other row, in file order; ``seed`` plays no part in that cut, so
    the two splits stay disjoint whatever seeds the subsamples use.

    The subsample draws ``n`` distinct row indices with
    ``random.Random(seed).sample`` and returns those rows in file order, so
    the same ``(n, seed)`` always gives the same rows. ``n`` of None, or at
    least the number of rows, returns every row.

    Returns:
        list of :class:`Example`, length ``min(n, rows)``.

    Raises:
        DataError: missing split, malformed line (message names the file and
            1-based line number), schema not matching ``spec.is_pair``, or an
            empty file.
    """
    spec = spec_or_name if isinstance(spec_or_name, TaskSpec) else resolve_task(spec_or_name)
    if n is not None and n < 0:
        raise DataError(f"n must be >= 0 or None, got {n}")
    path = split_path(spec, split)
    examples = read_examples(path, _read_label_names(path.parent), spec.num_labels)
    if not examples:
        raise DataError(f"{path}: contains no examples")
    if spec.file is not None:
        examples = _cut_single_file(examples, split, spec.holdout_seed)
    is_pair = examples[0].text_b is not None
    if is_pair != spec.is_pair:
        raise DataError(
            f"{path}: examples are {schema_name(is_pair)} but task "
            f"{spec.name!r} is {schema_name(spec.is_pair)}"
        )
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _cut_single_file(examples: list[Example], split: str, holdout_seed: int) -> list[Example]:
    """The ``split`` rows of a single-file task (dev: the seeded hold-out, train: the rest)."""
    if len(examples) < 2:
        raise DataError("a single-file task needs at least 2 examples to hold one out as dev")
    held_out = set(_holdout_rows(len(examples), holdout_seed))
    want_dev = split == "dev"
    return [ex for i, ex in enumerate(examples) if (i in held_out) == want_dev]


