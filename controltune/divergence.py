"""Divergence: a training run that meets a non-finite loss, gradient or control stops and says where.

A diverged run reports no score (not even its best before diverging): :class:`TrainingDiverged` carries the
run's result dict, and :func:`nonfinite` names the first non-finite tensor's control and value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .system import ResidualSystem


class TrainingDiverged(FloatingPointError):
    """Training met a non-finite loss, gradient or control; ``result`` is the dict written to ``metrics.json``."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def control_names(system: ResidualSystem) -> dict[int, str]:
    """id(parameter) -> the name of the (first) control holding it, to name a non-finite gradient."""
    names: dict[int, str] = {}
    for c in system.controls():
        names.setdefault(id(c.param), c.name)
    return names


def _first_nonfinite(tensors: Sequence[torch.Tensor | None]) -> int | None:
    """Index of the first tensor with a NaN or ±inf entry (one device sync for all), or None."""
    present = [(i, t) for i, t in enumerate(tensors) if t is not None]
    if not present:
        return None
    bad = torch.stack([~torch.isfinite(t).all() for _, t in present]).cpu()
    hits = bad.nonzero().flatten().tolist()
    return present[hits[0]][0] if hits else None


def describe_nonfinite(value: float | torch.Tensor) -> str:
    """``nan``, ``inf`` or ``-inf`` (the first non-finite entry of a tensor)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        value = flat[~torch.isfinite(flat)][0].item()
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def nonfinite(what: str, tensors: Sequence[torch.Tensor | None], params: Sequence[torch.nn.Parameter],
               names: dict[int, str]) -> dict[str, Any] | None:
    """``{what, control, value}`` for the first non-finite tensor (a gradient or a control's value), or None."""
    i = _first_nonfinite(tensors)
    if i is None:
        return None
    return {"what": what, "control": names.get(id(params[i]), f"parameter {i}"),
            "value": describe_nonfinite(tensors[i])}
