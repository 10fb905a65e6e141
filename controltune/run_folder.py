"""The folder of a training run and its resume state.

``out`` holds ``metrics.json``, ``deltas.safetensors`` and the resume state ``checkpoint.pt``
(deltas, optimiser, scheduler, step, RNG, log and the run's configuration, written as one
unit: a kill at any moment leaves the previous complete file).  A folder holding results is
never overwritten without ``resume`` or ``overwrite``; a lock keeps a second process out;
resuming compares the saved configuration with the current one key by key and refuses a
difference unless it is explicitly allowed (and then recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint
from .data import Example
from .results import atomic_file, to_strict_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from .data import TaskSpec
    from .system import ResidualSystem
    from .train_config import TrainConfig

try:
    import fcntl
except ImportError:  # Windows: the output folder is not locked
    fcntl = None  # type: ignore[assignment]

CHECKPOINT = "checkpoint.pt"
"""Resume state inside ``out``: one file, so it is replaced as one unit."""
DELTAS = "deltas.safetensors"
"""The deltas at the run's last step."""
BEST_DELTAS = "best.safetensors"
"""The best-on-validation deltas of a run with validation rows."""
LOCK = ".controltune-train.lock"
RESULTS = ("metrics.json", DELTAS, CHECKPOINT, "checkpoint")
"""What makes ``out`` hold a run (``checkpoint`` is the folder of the resume state before ``checkpoint.pt``)."""
STATE_FORMAT = "controltune-train-state/1"
NOT_COMPARED = ("out", "resume", "overwrite", "progress", "checkpoint_every", "checkpoint_minutes",
                "allow_config_change", "threads", "token_cache", "train_score_size")
"""Configuration fields that may differ on resume: where and how a run is saved and shown, not what it trains
(``train_score_size`` only adds a score of the finished deltas)."""


class OutputFolderError(ValueError):
    """An output folder that cannot be used as asked (a file, holds results, nothing to resume)."""


class OutputLockedError(OutputFolderError):
    """Another process is writing the output folder."""


class ConfigMismatchError(ValueError):
    """Resuming with a configuration that differs from the checkpoint's (``differences``: key, old, new)."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        self.differences = differences


# --- the output folder ------------------------------------------------------------------
def check_output_folder(out: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output folder that cannot be used as asked; cheap, so a CLI runs it before loading a model.

    Raises:
        OutputFolderError: ``out`` is an existing file; ``resume`` without a checkpoint
            in it; or, without ``resume``/``overwrite``, it already holds a run's results.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output folder {out} is an existing file, not a folder: choose another --out")
    if resume and overwrite:
        raise OutputFolderError("--resume and --overwrite exclude each other: continue the run in "
                                f"{out}, or replace it")
    if resume:
        if (out / CHECKPOINT).is_file():
            return
        if (out / "checkpoint" / "trainer.pt").is_file():
            raise OutputFolderError(f"cannot resume: {out} holds a checkpoint in the older checkpoint/ format, "
                                    f"which this version cannot resume (it records no configuration)")
        raise OutputFolderError(f"nothing to resume: {out} holds no checkpoint ({CHECKPOINT}); "
                                "run without --resume to start a new run")
    held = [name for name in RESULTS if (out / name).exists()]
    if held and not overwrite:
        raise OutputFolderError(f"{out} already holds results of a run ({', '.join(held)}): pass --resume to "
                                "continue it, --overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def locked_output_folder(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (created if needed) for the block; a second process is refused at once."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                raise OutputLockedError(f"output folder {out} is in use by another training process"
                                        f"{f' (pid {holder})' if holder else ''}: wait for it to finish or "
                                        "choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # names the holder in the message above
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting process)


def clear_output_folder(out: Path, overwrite: bool) -> None:
    """Under the lock: remove temporary files of killed writers and, with ``overwrite``, the old results."""
    for tmp in out.glob("*.tmp-*"):
        if tmp.is_file() and tmp.name.split(".tmp-")[0] in RESULTS:
            tmp.unlink()
    if not overwrite:
        return
    for name in RESULTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


# --- the configuration a checkpoint records -------------------------------------------------
def _data_digest(examples: Sequence[Example]) -> str:
    """A short sha256 of the training examples (text and label), so changed data is seen on resume."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.text_a}\x1f{ex.text_b}\x1f{ex.label}\x1e".encode())
    return h.hexdigest()[:16]


def run_config(config: TrainConfig, system: ResidualSystem, task_spec: TaskSpec, train_examples: Sequence[Example],
               val_examples: Sequence[Example] | None = None) -> dict[str, Any]:
    """What a run computes: the configuration (``extra`` merged in) and the task, model and data it ran on.

    Saved in every checkpoint and compared on resume; fields of :data:`NOT_COMPARED` are left out,
    and so are the validation settings of a run without validation rows (its configuration is
    then the one a run recorded before they existed).
    """
    fields = {k: v for k, v in asdict(config).items() if k not in NOT_COMPARED and k != "extra"}
    if config.part_lr_scales is None:  # a run without part rates keeps the configuration it had before them
        fields.pop("part_lr_scales", None)
    if val_examples is None:
        fields.pop("val_size", None)
        fields.pop("val_seed", None)
    for key, value in config.extra.items():
        fields[f"extra.{key}" if key in fields else key] = value
    fields.update({"task_name": task_spec.name, "base_model": system.name,
                   "methods": [c.method for c in system.controllers], "n_train": len(train_examples),
                   "train_data": _data_digest(train_examples)})
    if val_examples is not None:
        fields.update({"n_val": len(val_examples), "val_data": _data_digest(val_examples)})
    return json.loads(to_strict_json(fields))  # tuples -> lists, as stored: comparisons see equal values equal


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


_ABSENT = "<absent>"


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every flattened key (``options.rank``) whose value differs."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _is_allowed(key: str, allowed: Sequence[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


# --- resume state ------------------------------------------------------------------------
def save_state(path: Path, system: ResidualSystem, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, log: dict[str, Any], spec: dict,
               config: dict[str, Any], best_deltas: bytes | None = None) -> None:
    """Write the whole resume state as one file, atomically (temporary name, fsync, rename).

    ``best_deltas``: the best-on-validation deltas so far (a delta file's bytes), kept with the
    rest so a resumed run selects among every evaluation of the uninterrupted one.
    """
    state = {"format": STATE_FORMAT, "config": config, "step": step, "log": log,
             "deltas": _as_tensor(checkpoint.to_bytes(system, spec)), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if best_deltas is not None:
        state["best_deltas"] = _as_tensor(best_deltas)
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_file(path) as fh:
        torch.save(state, fh)


def _as_tensor(blob: bytes) -> torch.Tensor:
    """``blob`` as a uint8 tensor sharing its memory (no copy).

    ``torch.save`` writes a tensor's storage straight into the file but pickles a ``bytes``
    object into an in-memory buffer first: with full fine-tuning on SmolLM2 the two delta files
    of a state made writing it cost ~12× the deltas' size in transient memory
    (``experiments/bench_checkpoint_memory.py``).
    """
    with warnings.catch_warnings():  # the buffer is read-only and the tensor is only ever read
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(blob, dtype=torch.uint8)


def _as_bytes(value: bytes | torch.Tensor | None) -> bytes | None:
    """A delta file held in a state: a uint8 tensor (now) or ``bytes`` (states written before)."""
    return value.numpy().tobytes() if isinstance(value, torch.Tensor) else value


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # any unpickling failure means the same thing to the user: unusable file
        raise checkpoint.CorruptCheckpointError(f"{path} cannot be read as a training checkpoint: {err}") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise checkpoint.CorruptCheckpointError(f"{path} is not a training checkpoint of format {STATE_FORMAT}")
    return state


def _config_changes(path: Path, saved: dict[str, Any], current: dict[str, Any], allowed: Sequence[str],
                    step: int) -> list[dict[str, Any]]:
    """The allowed differences from the checkpoint's configuration; refuses any other.

    Raises:
        ConfigMismatchError: naming every key not allowed, as ``key: old -> new``.
    """
    diffs = config_differences(saved, current)
    refused = [d for d in diffs if not _is_allowed(d[0], allowed)]
    if refused:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused)
        raise ConfigMismatchError(f"cannot resume {path}: the configuration differs from the checkpoint's ({listed}); "
                                  "resume with the same settings, or allow a change with --allow-config-change KEY",
                                  refused)
    return [{"step": step, "key": k, "old": o, "new": n} for k, o, n in diffs]


def load_state(path: Path, system: ResidualSystem, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, current: dict[str, Any],
                schedule: Callable[[int], float]) -> tuple[int, dict[str, Any], bytes | None]:
    """Restore deltas, optimiser, scheduler and RNG from ``path``; returns ``(step, log, best deltas or None)``.

    Learning rate and weight decay are set from ``config`` afterwards (the optimiser's
    saved groups carry the old ones), so an allowed change of either takes effect.
    """
    state = _read_state(path)
    step, log = int(state["step"]), state["log"]
    changes = _config_changes(path, state["config"], current, config.allow_config_change, step)
    log["config_changes"] = log.get("config_changes", []) + changes
    checkpoint.load_bytes(system, _as_bytes(state["deltas"]), f"{path} (deltas)")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    scheduler.base_lrs = [config.lr * k for k in scales]
    for group, k in zip(optimizer.param_groups, scales):
        group.update(initial_lr=config.lr * k, lr=config.lr * k * schedule(step), weight_decay=config.weight_decay)
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step, log, _as_bytes(state.get("best_deltas"))


def checkpoint_due(config: TrainConfig, step: int, last_saved: float) -> bool:
    """True when the step cadence hits ``step`` or ``checkpoint_minutes`` passed since ``last_saved`` (monotonic)."""
    if config.checkpoint_every and step % config.checkpoint_every == 0:
        return True
    return config.checkpoint_minutes is not None and time.monotonic() - last_saved >= 60 * config.checkpoint_minutes


# --- reading a run folder ------------------------------------------------------------------
def reported_deltas(out: str | Path) -> Path:
    """The delta file of the deltas a finished run reports (and leaves in the system): the best-on-validation
    ones (``best.safetensors``) when it had validation rows, else the last step's (``deltas.safetensors``)."""
    best = Path(out) / BEST_DELTAS
    return best if best.is_file() else Path(out) / DELTAS


def drop_resume_state(out: str | Path) -> int:
    """Delete the resume state (``checkpoint.pt``) of the finished run in ``out`` and of its stages' folders
    (``out/<stage>/``, a sequential run's); returns the bytes freed.

    A finished run (``metrics.json`` status ``done`` or ``diverged``) is never resumed: what is read
    afterwards is its ``metrics.json`` and delta files, which stay.  Its state is the largest file it
    leaves (deltas, best deltas and AdamW's two moments: ~4× the trainable parameters' bytes, 2.7 GB
    for full fine-tuning of SmolLM2).  A folder whose run did not finish keeps its state.
    """
    folder = Path(out)
    freed = 0
    for path in [folder / CHECKPOINT, *sorted(folder.glob(f"*/{CHECKPOINT}"))]:
        try:
            status = json.loads((path.parent / "metrics.json").read_text()).get("status")
        except (OSError, ValueError):
            continue  # no readable metrics: nothing says the run finished
        if status in ("done", "diverged") and path.is_file():
            freed += path.stat().st_size
            path.unlink()
    return freed


def finished_run(out: str | Path | None) -> dict[str, Any] | None:
    """The result in ``out/metrics.json`` when that run finished (status ``done`` and its reported deltas saved),
    else None."""
    if out is None:
        return None
    folder = Path(out)
    metrics = folder / "metrics.json"
    if not metrics.is_file() or not reported_deltas(folder).is_file():
        return None
    try:
        result = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("status") == "done" else None
