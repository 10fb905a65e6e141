"""The training configuration: every hyper-parameter of :func:`~controltune.train.train`, checked on creation.

A :class:`TrainConfig` is what a run's ``metrics.json`` records and what resuming compares against the
checkpoint's (:func:`~controltune.run_folder.run_config`); the optimisation schedule it implies (steps, warm-up,
decay, parameter groups) is :mod:`~controltune.schedule`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCHEDULES = ("linear", "constant")
"""The rate after warm-up: ``linear`` decay to 0 at the last step, or ``constant`` at the peak."""


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (all recorded in ``metrics.json``).

    Attributes:
        lr: peak learning rate of AdamW.
        epochs: passes over the training set (ignored when ``steps`` is set); 1 if both unset.
        steps: total optimiser steps.
        batch_size: training sequences per step (S).
        eval_batch_size: sequences per dev batch.
        max_length: tokens per sequence after truncation.
        warmup: warm-up length: a fraction of the total steps if < 1, else a number of steps.
        schedule: after warm-up, ``linear`` decay to 0 at the last step, or ``constant``.
        weight_decay: AdamW's decoupled weight decay λ on every control (not part of J).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        eval_every: score the dev set every this many steps (None: only at the end).
        seed: seeds batch order and the torch RNG (dropout, if enabled).
        out: output folder (None: nothing written).
        resume: continue from ``out/checkpoint`` if it exists.
        dropout: train with the model's dropout on (``model.train()``); off by default so
            the trained system is the deterministic system of the PMP analysis.
        progress: show a tqdm progress bar.
        budget: passed to every controller's ``finalize(budget)`` after training: diff pruning
            projects onto this many entries (or this fraction if < 1); others ignore it.
        extra: free-form description recorded with the configuration (model, method, options).
        checkpoint_every: also write the resume state every this many steps (None: no step cadence).
        checkpoint_minutes: also write the resume state when this much wall time passed since the
            last one (None: no time cadence).  Both are independent of ``eval_every``.
        overwrite: replace the results an existing ``out`` holds (else they are never overwritten).
        allow_config_change: configuration keys (or key prefixes: ``options``) that may differ from
            the checkpoint's on resume; each change made is recorded in ``metrics.json``.
        group_by_length: draw batches of similar length (:func:`~controltune.batching.length_grouped_batches`);
            False: consecutive slices of one random permutation per epoch (the order before grouping).
        threads: torch intra-op threads during the run (None: leave torch's setting); restored afterwards.
        token_cache: also keep the tokenised splits on disk (:func:`~controltune.batching.token_cache_dir`).
        val_size: hold out this many training rows (a fraction of them if < 1) as validation rows
            (:func:`validation_split`): periodic evaluations score them, not dev, and the deltas
            best on them are selected (None: no validation rows).
        val_seed: seed of the validation hold-out, independent of ``seed`` (every seed and learning
            rate of a sweep then selects on the same rows).
        train_score_size: after training, the reported deltas (best on validation, else the last)
            are also scored on a seeded subsample of this many of the rows they were trained on
            (``train_scores``: the generalisation gap is these minus the dev scores); 0: not scored.
            Only reported, never used to choose: it may differ on resume.
        part_lr_scales: with a simultaneous combination ``a+b+…``, part i trains at ``lr × part_lr_scales[i]``
            and everything outside the parts (the head) at ``lr`` (None: every control at ``lr``), so parts
            whose own best rates differ by orders of magnitude (prompt tuning against an adapter) each train at
            theirs (:func:`parameter_groups`).
    """

    lr: float = 5e-4
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    warmup: float = 0.0
    schedule: str = "linear"
    weight_decay: float = 0.0
    grad_clip: float | None = None
    eval_every: int | None = None
    seed: int = 0
    out: str | None = None
    resume: bool = False
    dropout: bool = False
    progress: bool = True
    budget: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 5.0
    overwrite: bool = False
    allow_config_change: list[str] = field(default_factory=list)
    group_by_length: bool = True
    threads: int | None = None
    token_cache: bool = False
    val_size: float | None = None
    val_seed: int = 0
    train_score_size: int = 1000
    part_lr_scales: list[float] | None = None

    def __post_init__(self) -> None:
        checks = [("lr", self.lr, self.lr > 0), ("batch_size", self.batch_size, self.batch_size >= 1),
                  ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1),
                  ("max_length", self.max_length, self.max_length >= 1), ("warmup", self.warmup, self.warmup >= 0),
                  ("weight_decay", self.weight_decay, self.weight_decay >= 0)]
        checks += [("epochs", self.epochs, self.epochs is None or self.epochs > 0),
                   ("steps", self.steps, self.steps is None or self.steps >= 1),
                   ("eval_every", self.eval_every, self.eval_every is None or self.eval_every >= 1),
                   ("grad_clip", self.grad_clip, self.grad_clip is None or self.grad_clip > 0),
                   ("checkpoint_every", self.checkpoint_every, self.checkpoint_every is None
                    or self.checkpoint_every >= 1),
                   ("checkpoint_minutes", self.checkpoint_minutes, self.checkpoint_minutes is None
                    or self.checkpoint_minutes > 0),
                   ("threads", self.threads, self.threads is None or self.threads >= 1),
                   ("val_size", self.val_size, self.val_size is None or (self.val_size > 0 and (
                       self.val_size < 1 or float(self.val_size).is_integer()))),
                   ("train_score_size", self.train_score_size, self.train_score_size >= 0),
                   ("part_lr_scales", self.part_lr_scales, self.part_lr_scales is None or (
                       len(self.part_lr_scales) >= 1 and all(float(x) > 0 for x in self.part_lr_scales)))]
        bad = [f"{name}={value!r}" for name, value, ok in checks if not ok]
        if bad:
            raise ValueError(f"invalid training configuration: {', '.join(bad)} (rates, sizes and counts must be "
                             "positive; warmup and weight_decay non-negative; val_size a fraction < 1 or a whole "
                             "number of rows)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.resume and self.out is None:
            raise ValueError("resume needs an output folder (out) holding the checkpoint")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run in out, or replace it")
