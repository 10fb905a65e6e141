"""The optimisation schedule of a training run: its length, the warm-up and linear decay of the rate,
the batches of each epoch, and AdamW's parameter groups (one rate per part of a combination).

Every function here is pure in its arguments (a seeded run draws the same batches after a resume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .batching import length_grouped_batches, shuffled_batches

if TYPE_CHECKING:
    from collections.abc import Callable

    from .system import ResidualSystem
    from .train_config import TrainConfig


def total_steps(config: TrainConfig, n_train: int) -> tuple[int, int]:
    """``(total optimiser steps, steps per epoch)``; the last, partial batch of an epoch is kept."""
    per_epoch = math.ceil(n_train / config.batch_size)
    if config.steps is not None:
        return config.steps, per_epoch
    return max(1, round((config.epochs or 1.0) * per_epoch)), per_epoch


def warmup_steps(config: TrainConfig, total: int) -> int:
    return int(round(config.warmup * total)) if config.warmup < 1 else int(config.warmup)


def linear_schedule(warmup: int, total: int, decay: bool = True) -> Callable[[int], float]:
    """Multiplier of the peak rate at step t: ``(t+1)/warmup`` rising, then ``(total−t)/(total−warmup)``
    (``decay``) or 1."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup)) if decay else 1.0
    return factor


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))


def batch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Example indices of one epoch, a permutation fixed by ``(seed, epoch)`` (the order without grouping)."""
    return torch.randperm(n, generator=_epoch_generator(seed, epoch)).tolist()


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The batches (example indices) of one epoch: a pure function of the lengths, ``(seed, epoch)`` and settings.

    ``group_by_length``: :func:`~controltune.batching.length_grouped_batches`; otherwise
    consecutive slices of :func:`batch_order`.  Both give ``ceil(n / batch_size)`` batches.
    """
    generator = _epoch_generator(seed, epoch)
    if group_by_length:
        return length_grouped_batches(lengths, batch_size, generator)
    return shuffled_batches(len(lengths), batch_size, generator)


def parameter_groups(system: ResidualSystem, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's parameter groups, each ``{"params", "lr", "lr_scale"}`` with ``lr = config.lr × lr_scale``.

    One group at scale 1 unless ``config.part_lr_scales`` is set; then the system's one simultaneous
    combination gives a group per part (its controls at ``part_lr_scales[i]``) and one for every other
    control (the head) at scale 1.
    """
    from .controllers.composition import Simultaneous

    params = trainable_parameters(system)
    scales = config.part_lr_scales
    if scales is None:
        return [{"params": params, "lr": config.lr, "lr_scale": 1.0}]
    combos = [c for c in system.controllers if isinstance(c, Simultaneous)]
    if len(combos) != 1 or len(combos[0].parts) != len(scales):
        found = [f"{c.method} ({len(c.parts)} parts)" if isinstance(c, Simultaneous) else c.method
                 for c in system.controllers]
        raise ValueError(f"part_lr_scales {list(scales)} needs one simultaneous combination with {len(scales)} parts "
                         f"(--method a+b+...); the system has {found or 'no controller'}")
    trainable = {id(p) for p in params}
    seen: set[int] = set()
    groups = []
    for part, scale in zip(combos[0].parts, scales):
        mine = [c.param for c in part.controls() if id(c.param) in trainable and id(c.param) not in seen]
        seen.update(id(p) for p in mine)
        groups.append({"params": mine, "lr": config.lr * float(scale), "lr_scale": float(scale)})
    rest = [p for p in params if id(p) not in seen]
    groups.append({"params": rest, "lr": config.lr, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]


def trainable_parameters(system: ResidualSystem) -> list[torch.nn.Parameter]:
    """The distinct parameters of ``system.controls()`` (what the optimiser updates)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for c in system.controls():
        seen.setdefault(id(c.param), c.param)
    return list(seen.values())


__all__ = ["batch_order", "epoch_batches", "linear_schedule", "parameter_groups", "total_steps",
           "trainable_parameters", "warmup_steps"]
