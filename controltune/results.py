"""JSON results with the exact configuration and versions that produced them.

Every file written here is *strict* JSON: a non-finite float (NaN, ±Infinity,
which ``json`` would emit as bare tokens other parsers reject) is written as
``null``, and the payload gains a ``"nonfinite"`` map from the replaced value's
path (``curves.train_loss[3]``) to what it was (``"NaN"``), so the reason for a
null is never lost.  ``metrics.json``-style files are replaced atomically;
JSONL files are appended under a lock and repaired when a kill tore their last line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ._version import __version__

try:
    import fcntl
except ImportError:  # Windows: appends are not locked
    fcntl = None  # type: ignore[assignment]

NONFINITE_KEY = "nonfinite"


class CorruptResultsError(ValueError):
    """A JSONL file with an unreadable line before its last one (not a torn append: data is damaged)."""


def versions() -> dict[str, str]:
    """Versions of Python, torch, transformers, numpy and controltune."""
    import numpy
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "controltune": __version__, "platform": platform.platform()}


def stamp(config: dict[str, Any]) -> dict[str, Any]:
    """The header every JSON result carries: configuration, versions, time."""
    return {"config": config, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def row_done(row: dict[str, Any]) -> bool:
    """True for a finished run with a score; rows without ``status`` predate the key and are finished runs."""
    return row.get("status", "done") == "done"


# --- strict JSON ---------------------------------------------------------------------------
def _nonfinite_name(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _finite_only(obj: Any, path: str, replaced: dict[str, str]) -> Any:
    """``obj`` with every non-finite float set to None (recorded in ``replaced``), tensors and paths made JSON."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        replaced[path or "."] = _nonfinite_name(obj)
        return None
    if isinstance(obj, dict):
        return {k: _finite_only(v, f"{path}.{k}" if path else str(k), replaced) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v, f"{path}[{i}]", replaced) for i, v in enumerate(obj)]
    if hasattr(obj, "tolist"):  # tensors and numpy arrays/scalars (numpy floats become Python floats here)
        return _finite_only(obj.tolist(), path, replaced)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_strict_json(payload: Any, indent: int | None = None) -> str:
    """``payload`` as strict JSON text (see module docstring); a dict gains ``"nonfinite"`` when values were nulled."""
    replaced: dict[str, str] = {}
    clean = _finite_only(payload, "", replaced)
    if replaced:
        if isinstance(clean, dict):
            clean[NONFINITE_KEY] = {**(clean.get(NONFINITE_KEY) or {}), **replaced}
        else:  # no place for the record in the payload itself: say it where a person will see it
            print(f"controltune: non-finite values written as null at {sorted(replaced)}", file=sys.stderr)
    return json.dumps(clean, indent=indent, allow_nan=False, default=_default)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` only when the block ends without error.

    Written to ``<name>.tmp-<pid>`` in the same folder, flushed to disk, then renamed over
    ``path``: a kill at any moment leaves the old file or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the block failed: leave no half-written file behind
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented strict JSON, atomically, creating parent folders."""
    return atomic_write_bytes(path, (to_strict_json(payload, indent=2) + "\n").encode())


STAMP_KEYS = ("created", "versions")


def write_json_unless_same(path: str | Path, payload: dict[str, Any]) -> Path:
    """:func:`write_json` for a summary rebuilt from rows: when the file already holds the same results (everything
    but :data:`STAMP_KEYS`), it is left as it is, stamp included — a rebuild that changes nothing is not a new
    result, and rewriting only the stamp would make every resumed study look changed."""
    path = Path(path)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        new = json.loads(to_strict_json(payload))
        if isinstance(old, dict) and _results_part(old) == _results_part(new):
            return path
    return write_json(path, payload)


def _results_part(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in STAMP_KEYS}


# --- JSONL ---------------------------------------------------------------------------------
def _repair_torn_tail(fd: int, path: Path) -> None:
    """Before an append: end the file with a newline, so a new row is never glued onto a torn one.

    A last line without its newline is a row cut by a kill.  If it is complete JSON
    only the newline was lost and it is terminated; otherwise it is moved to
    ``<file>.torn`` (kept, not deleted) and cut from the file.  Runs under the append lock.
    """
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start, chunk = size, 4096
    while start > 0:  # find the last newline, reading backwards
        lo = max(0, start - chunk)
        cut = os.pread(fd, start - lo, lo).rfind(b"\n")
        if cut >= 0:
            start = lo + cut + 1
            break
        start = lo
    tail = os.pread(fd, size - start, start)
    try:
        json.loads(tail)
    except ValueError:
        torn = path.with_name(path.name + ".torn")
        with open(torn, "ab") as fh:
            fh.write(tail + b"\n")
        os.ftruncate(fd, start)
        print(f"controltune: {path} ended in a torn line ({len(tail)} bytes, from an interrupted write); "
              f"moved it to {torn}", file=sys.stderr)
        return
    os.write(fd, b"\n")


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row (strict JSON) to a JSONL file; sweeps append as they go, so a stop loses nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (to_strict_json(row) + "\n").encode()
    # One O_APPEND write under an exclusive lock: parallel workers of one sweep share the file.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        _repair_torn_tail(fd, path)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (empty if missing).

    A torn *last* line (a kill during an append) is skipped; an unreadable line
    before it is damage, not a torn append, and raises :class:`CorruptResultsError`
    naming the file and line.  Blank lines are ignored.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == last:
                continue
            raise CorruptResultsError(f"{path}, line {i + 1}: not valid JSON ({err.msg} at column {err.colno}); "
                                      "only a torn last line is skipped, so this file needs repair") from err
    return rows


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
