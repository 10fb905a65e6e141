"""JSON results with the exact configuration and versions that produced them."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: appends are not locked
    fcntl = None  # type: ignore[assignment]


def versions() -> dict[str, str]:
    """Versions of Python, torch, transformers, numpy and controltune."""
    import numpy
    import torch
    import transformers

    from . import __version__

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "controltune": __version__, "platform": platform.platform()}


def stamp(config: dict[str, Any]) -> dict[str, Any]:
    """The header every JSON result carries: configuration, versions, time."""
    return {"config": config, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_default) + "\n")
    return path


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row to a JSONL file (sweeps append as they go, so a stop loses nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, default=_default) + "\n").encode()
    # One O_APPEND write under an exclusive lock: parallel workers of one sweep share the file.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (empty if missing); a torn last line from a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
