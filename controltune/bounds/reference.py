"""The reference control ``u*`` of an approximation study, held as weight deltas in a system.

A reference is a trained delta written as ``{"<layer>.<role>": ΔW}``
(:mod:`controltune.bounds.weight_deltas`) inside a frozen system with one
:class:`~controltune.bounds.weight_deltas.DeltaWeights` at ``u*``.  It comes from
a trained run — :func:`load_reference` reads an output folder of
``controltune train`` (``metrics.json`` + ``deltas.safetensors``) — or from any
system holding a trained LoRA / full fine-tuning controller (:func:`as_reference`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .weight_deltas import DeltaWeights, full_to_deltas, key_layer, key_role, lora_to_deltas

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..data import TaskSpec
    from ..system import ResidualSystem

RUN_FILES = ("metrics.json", "deltas.safetensors")
"""What an output folder of ``controltune train`` holds once the run is done."""
WEIGHT_DELTA_METHODS = ("lora", "full")
"""Trained methods whose control is a weight delta ``W -> W + ΔW`` on linear maps."""


class NotATrainedRunError(ValueError):
    """A folder that is not the output of a finished ``controltune train`` run of a weight-delta method."""


@dataclass
class Reference:
    """A trained reference u* as weight deltas in a system ready for the comparison.

    Attributes:
        system: the ResidualSystem with one :class:`DeltaWeights` at u* (and the trained head).
        values: ``{"<layer>.<role>": ΔW}``, u*.
        spec: the task's :class:`~controltune.data.TaskSpec`.
        tokenizer: the model's tokenizer.
        info: how it was trained (method, steps, train metrics).
    """

    system: Any
    values: dict[str, torch.Tensor]
    spec: Any
    tokenizer: Any
    info: dict[str, Any]


def as_reference(system: ResidualSystem, roles: Sequence[str], values: dict[str, torch.Tensor], spec: TaskSpec,
                 tokenizer: PreTrainedTokenizerBase,
                 info: dict[str, Any], dtype: str = "float64") -> Reference:
    """Attach ``DeltaWeights(roles)`` at ``values`` to ``system`` (its trained controllers already removed,
    e.g. by :func:`lora_to_deltas`), cast it to ``dtype`` and freeze everything but the deltas."""
    from ..zoo import DTYPES

    layers = sorted({key_layer(k) for k in values})
    dw = system.add(DeltaWeights(roles, layers))
    system.to(DTYPES[dtype])
    for p in system.parameters():
        p.requires_grad_(False)
    for c in system.controls():
        c.param.requires_grad_(True)
    values = {k: v.to(DTYPES[dtype]) for k, v in values.items()}
    dw.assign(values)
    system.eval()
    return Reference(system, values, spec, tokenizer, info)


def trained_deltas(system: ResidualSystem, targets: Sequence[str] | None = None) -> tuple[list[str], dict[str,
                   torch.Tensor]]:
    """``(roles, {"<layer>.<role>": ΔW})`` of the trained LoRA or full controller of ``system`` (removed from it).

    ``targets`` name the linear maps whose ``θ − θ₀`` is the control of a full
    fine-tuning run (default ``q, v``); a LoRA carries its own targets.
    """
    methods = [c.method for c in system.controllers]
    if "lora" in methods:
        if targets is not None:
            raise ValueError("targets apply to a full fine-tuning reference; a LoRA reference's deltas sit on the "
                             "maps it was trained on")
        return lora_to_deltas(system)
    if "full" in methods:
        values = full_to_deltas(system, tuple(targets) if targets is not None else ("q", "v"))
        return list(dict.fromkeys(key_role(k) for k in values)), values
    raise ValueError(f"the system's controllers {methods} are not a weight-space delta "
                     f"({', '.join(WEIGHT_DELTA_METHODS)})")


def _run_record(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, header)`` of a finished ``controltune train`` run in ``folder``; a clear error otherwise."""
    from ..checkpoint import CheckpointMismatchError, read_header

    what = "an output folder of `controltune train` (metrics.json + deltas.safetensors)"
    if not folder.is_dir():
        raise NotATrainedRunError(f"reference {folder} is not a folder; give {what}")
    missing = [f for f in RUN_FILES if not (folder / f).is_file()]
    if missing:
        raise NotATrainedRunError(f"reference {folder} is not {what}: {' and '.join(missing)} missing"
                                  + (" (the run has not finished?)" if "metrics.json" not in missing else ""))
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except ValueError as err:
        raise NotATrainedRunError(f"reference {folder}: metrics.json is not valid JSON ({err})") from err
    status = metrics.get("status", "done") if isinstance(metrics, dict) else None
    if status != "done":
        raise NotATrainedRunError(f"reference {folder}: the run's status is {status!r}, not 'done'")
    try:
        header = read_header(folder / "deltas.safetensors")
    except CheckpointMismatchError as err:
        raise NotATrainedRunError(f"reference {folder}: {err}") from err
    spec = header.get("spec") or {}
    absent = [k for k in ("model", "method", "options", "task") if k not in spec]
    if absent:
        raise NotATrainedRunError(f"reference {folder}: deltas.safetensors records no {', '.join(absent)} in its "
                                  "spec; it was not written by `controltune train`")
    if spec["method"] not in WEIGHT_DELTA_METHODS:
        raise NotATrainedRunError(f"reference {folder} trained {spec['method']!r}; the approximation study compares "
                                  f"weight deltas W -> W + ΔW: train {' or '.join(WEIGHT_DELTA_METHODS)}")
    return metrics, header


def load_reference(run: str | Path, targets: Sequence[str] | None = None, dtype: str = "float64",
                   device: str = "cpu") -> Reference:
    """The reference u* of a finished ``controltune train`` run of ``lora`` or ``full`` in folder ``run``.

    The base model, task, method and options come from the ``spec`` recorded in the
    header of ``deltas.safetensors``; the deltas are loaded onto a freshly built
    system (refused if the base model's fingerprint differs), turned into weight
    deltas (:func:`trained_deltas`, ``targets`` for a full run) and cast to ``dtype``.

    Raises:
        NotATrainedRunError: ``run`` is not such a folder (what is missing is named).
    """
    from .. import checkpoint
    from ..controllers import build
    from ..data import resolve_task
    from ..system import ResidualSystem
    from ..zoo import load_model

    folder = Path(run)
    metrics, header = _run_record(folder)
    spec = header["spec"]
    seed = int((metrics.get("config") or {}).get("seed", 0))
    task = resolve_task(spec["task"], holdout_seed=int(spec.get("data_seed", 0)))
    loaded = load_model(spec["model"], dtype=spec.get("dtype", "float32"), device=device, seed=seed)
    system = ResidualSystem(loaded, num_labels=task.num_labels, pooling=spec.get("pooling", "mean"), seed=seed)
    build(spec["method"], system, **spec["options"])
    checkpoint.load(system, folder / "deltas.safetensors")
    roles, values = trained_deltas(system, targets)
    config = metrics.get("config") or {}
    info = {"run": str(folder), "model": spec["model"], "task": task.name, "method": spec["method"],
            "options": spec["options"], "steps": metrics.get("step"), "lr": config.get("lr"),
            "train_size": spec.get("train_size"), "seed": seed, "final": metrics.get("final"),
            "final_train_loss": ((metrics.get("curves") or {}).get("train_loss") or [None])[-1],
            "wall_time_s": metrics.get("wall_time_s")}
    return as_reference(system, roles, values, task, loaded.tokenizer, info, dtype)


def evaluation_batch(ref: Reference, size: int = 32, max_length: int = 64, seed: int = 0) -> dict:
    """A fixed batch of ``size`` dev examples on which J, the gap and the bounds are computed."""
    from ..batching import Collator
    from ..data import load_split

    return Collator(ref.tokenizer, max_length)(load_split(ref.spec, "dev", n=size, seed=seed))


def dev_scorer(ref: Reference, size: int | None = None, max_length: int = 64, seed: int = 0
               ) -> Callable[[], dict[str, float]]:
    """``() -> dev metrics`` of the system as it currently is (``size`` dev rows; None: all)."""
    from ..data import load_split
    from ..evaluation import evaluate

    examples = load_split(ref.spec, "dev", n=size, seed=seed)
    return lambda: evaluate(ref.system, examples, ref.spec, ref.tokenizer, batch_size=64, max_length=max_length)


__all__ = ["RUN_FILES", "WEIGHT_DELTA_METHODS", "NotATrainedRunError", "Reference", "as_reference", "dev_scorer",
           "evaluation_batch", "load_reference", "trained_deltas"]
