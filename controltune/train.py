"""Gradient training of the controls: minimise ``J(u) = (1/S) Σ_s Φ + Σ_l R_l(u)`` with AdamW.

The loss of a step is ``system.cost(batch)``, so a controller's running cost R
(weight decay written into J, an L0 penalty of diff pruning, ...) is optimised
with the task loss.  AdamW's own *decoupled* weight decay (``weight_decay``)
shrinks every control by ``lr·λ·u`` per step; it is an optimiser choice, not a
term of J, and is recorded as such.

Schedule: linear warm-up to ``lr`` then linear decay to 0 at the last step.
Batches are drawn in an order fixed by ``(seed, epoch)``, so a run resumed from
its checkpoint (deltas, optimiser, scheduler, step, RNG) sees the same batches
it would have seen without the stop.  After the last step each controller's
``finalize()`` is called when it has one (e.g. diff pruning's projection onto
its sparsity budget), and the dev set is scored again.

Output (``out``): ``metrics.json`` (configuration, versions, curves, final and
best dev scores, wall time, peak memory, trainable-parameter count),
``deltas.safetensors`` (final deltas) and ``checkpoint/`` (resume state).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .data import Collator, Example
from .metrics import compute_metrics
from .results import stamp, write_json

SCHEDULES = ("linear", "constant")


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
        budget: after training, controllers without ``finalize()`` but with ``project(budget)``
            (diff pruning) are projected onto this budget (a count, or a fraction if < 1).
        extra: free-form description recorded with the configuration (model, method, options).
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

    def __post_init__(self) -> None:
        checks = [("lr", self.lr, self.lr > 0), ("batch_size", self.batch_size, self.batch_size >= 1),
                  ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1),
                  ("max_length", self.max_length, self.max_length >= 1), ("warmup", self.warmup, self.warmup >= 0),
                  ("weight_decay", self.weight_decay, self.weight_decay >= 0)]
        checks += [("epochs", self.epochs, self.epochs is None or self.epochs > 0),
                   ("steps", self.steps, self.steps is None or self.steps >= 1),
                   ("eval_every", self.eval_every, self.eval_every is None or self.eval_every >= 1),
                   ("grad_clip", self.grad_clip, self.grad_clip is None or self.grad_clip > 0)]
        bad = [f"{name}={value!r}" for name, value, ok in checks if not ok]
        if bad:
            raise ValueError(f"invalid training configuration: {', '.join(bad)} (rates, sizes and counts must be "
                             "positive; warmup and weight_decay non-negative)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.resume and self.out is None:
            raise ValueError("resume needs an output folder (out) holding the checkpoint")


# --- pieces ----------------------------------------------------------------------------
def trainable_parameters(system) -> list[torch.nn.Parameter]:
    """The distinct parameters of ``system.controls()`` (what the optimiser updates)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for c in system.controls():
        seen.setdefault(id(c.param), c.param)
    return list(seen.values())


def total_steps(config: TrainConfig, n_train: int) -> tuple[int, int]:
    """``(total optimiser steps, steps per epoch)``; the last, partial batch of an epoch is kept."""
    per_epoch = math.ceil(n_train / config.batch_size)
    if config.steps is not None:
        return config.steps, per_epoch
    return max(1, round((config.epochs or 1.0) * per_epoch)), per_epoch


def warmup_steps(config: TrainConfig, total: int) -> int:
    return int(round(config.warmup * total)) if config.warmup < 1 else int(config.warmup)


def linear_schedule(warmup: int, total: int, decay: bool = True):
    """Multiplier of the peak rate at step t: ``(t+1)/warmup`` rising, then ``(total−t)/(total−warmup)``
    (``decay``) or 1."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup)) if decay else 1.0
    return factor


def batch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Example indices of one epoch, a permutation fixed by ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(system, examples: Sequence[Example], task_spec, tokenizer, batch_size: int = 128,
             max_length: int = 128) -> dict[str, float]:
    """Dev metrics of the task (``compute_metrics``) and the mean terminal cost ``loss``.

    Examples are batched in order of length (padding to the longest in a batch is
    then cheap); predictions are put back in the original order before scoring.
    """
    if not examples:
        raise ValueError("cannot evaluate on an empty example list")
    was_training = system.training
    system.eval()
    collate = Collator(tokenizer, max_length)
    device = next(system.model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text_a) + len(examples[i].text_b or ""))
    preds = torch.empty(len(examples), dtype=torch.long)
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = _to(collate([examples[i] for i in idx]), device)
        logits = system(batch)
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        preds[idx] = logits.argmax(-1).cpu()
    system.train(was_training)
    labels = torch.tensor([ex.label for ex in examples])
    scores = compute_metrics(task_spec, preds, labels)
    scores["loss"] = loss_sum / len(examples)
    return scores


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def finalize(system, budget: float | None = None) -> list[str]:
    """The post-training step of each controller; returns the methods that had one.

    ``finalize()`` when a controller has it; otherwise ``project(budget)`` (diff
    pruning's magnitude projection) when it has that and a budget is given.
    """
    done = []
    for c in system.controllers:
        fn, project = getattr(c, "finalize", None), getattr(c, "project", None)
        if callable(fn):
            fn()
        elif callable(project) and budget is not None:
            project(int(budget) if budget >= 1 else budget)
        else:
            continue
        done.append(c.method)
    return done


# --- resume state ------------------------------------------------------------------------
def _save_state(folder: Path, system, optimizer, scheduler, step: int, log: dict[str, Any], spec: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.save(system, folder / "deltas.safetensors", spec)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "log": log,
             "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = folder / "trainer.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(folder / "trainer.pt")  # atomic: a kill mid-write leaves the previous state


def _load_state(folder: Path, system, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    checkpoint.load(system, folder / "deltas.safetensors")
    state = torch.load(folder / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), state["log"]


# --- the loop --------------------------------------------------------------------------------
def train(system, train_examples: Sequence[Example], dev_examples: Sequence[Example] | None, task_spec,
          config: TrainConfig, tokenizer=None) -> dict[str, Any]:
    """Train the controls of ``system`` on ``train_examples``; returns the metrics dict.

    Args:
        system: a ResidualSystem with its controllers attached (classification readout).
        train_examples, dev_examples: lists of :class:`~controltune.data.Example`
            (``dev_examples`` None or empty: no evaluation).
        task_spec: the :class:`~controltune.data.TaskSpec` (its ``metrics`` are reported).
        config: :class:`TrainConfig`.
        tokenizer: defaults to the offline MiniLM tokenizer (that of every built-in model).

    Returns:
        the dict written to ``metrics.json`` (see module docstring).
    """
    if not train_examples:
        raise ValueError("no training examples")
    if tokenizer is None:
        from .zoo import offline_tokenizer

        tokenizer = offline_tokenizer()
    params = trainable_parameters(system)
    if not params:
        raise ValueError("the system has no trainable controls: attach a controller (or keep the readout head)")
    device = params[0].device
    total, per_epoch = total_steps(config, len(train_examples))
    warm = warmup_steps(config, total)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warm, total,
                                                                              config.schedule == "linear"))
    out = Path(config.out) if config.out else None
    spec = dict(config.extra)
    log: dict[str, Any] = {"train_loss": [], "lr": [], "dev": [], "wall_time_s": 0.0}
    step = 0
    torch.manual_seed(config.seed)
    if config.resume and out is not None and (out / "checkpoint" / "trainer.pt").is_file():
        step, log = _load_state(out / "checkpoint", system, optimizer, scheduler)
    n_trainable = sum(p.numel() for p in params)
    n_base = checkpoint.n_base_parameters(system)
    header = stamp({**asdict(config), "total_steps": total, "warmup_steps": warm, "steps_per_epoch": per_epoch,
                    "n_train": len(train_examples), "n_dev": len(dev_examples or []), "task": task_spec.name,
                    "model": system.name, "methods": [c.method for c in system.controllers],
                    "loss": "J = mean CE + sum of running costs R (AdamW decoupled weight decay is not part of J)"})

    def report(status: str) -> dict[str, Any]:
        dev = log["dev"]
        best = max(dev, key=lambda r: r[task_spec.metric]) if dev else None
        return {**header, "status": status, "step": step, "total_steps": total,
                "n_trainable": n_trainable, "n_base_params": n_base, "trainable_fraction": n_trainable / n_base,
                "curves": {"train_loss": log["train_loss"], "lr": log["lr"], "dev": dev},
                "final": log.get("final"), "best": best, "finalized": log.get("finalized", []),
                "wall_time_s": log["wall_time_s"], "peak_memory_mb": peak_memory_mb(device)}

    def dev_eval() -> dict[str, float] | None:
        if not dev_examples:
            return None
        return {"step": step, **evaluate(system, dev_examples, task_spec, tokenizer, config.eval_batch_size,
                                         config.max_length)}

    collate = Collator(tokenizer, config.max_length)
    system.train(config.dropout)
    bar = tqdm(total=total, initial=step, disable=not config.progress, desc="train", dynamic_ncols=True)
    t0 = time.perf_counter() - log["wall_time_s"]
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        order = batch_order(len(train_examples), config.seed, epoch)
        idx = order[offset * config.batch_size:(offset + 1) * config.batch_size]
        batch = _to(collate([train_examples[i] for i in idx]), device)
        loss = system.cost(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        log["lr"].append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        step += 1
        log["train_loss"].append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if config.eval_every and step % config.eval_every == 0 and step < total:
            log["dev"].append(dev_eval())
            system.train(config.dropout)
            bar.set_postfix(loss=f"{loss.item():.4f}", **{task_spec.metric: f"{log['dev'][-1][task_spec.metric]:.4f}"})
            if out is not None:
                log["wall_time_s"] = time.perf_counter() - t0
                _save_state(out / "checkpoint", system, optimizer, scheduler, step, log, spec)
                write_json(out / "metrics.json", report("running"))
    bar.close()
    if out is not None:
        log["wall_time_s"] = time.perf_counter() - t0
        _save_state(out / "checkpoint", system, optimizer, scheduler, step, log, spec)
    log["finalized"] = finalize(system, config.budget)
    system.eval()
    final = dev_eval()
    if final is not None:
        log["dev"].append(final)
        log["final"] = final
    log["wall_time_s"] = time.perf_counter() - t0
    result = report("done")
    if out is not None:
        checkpoint.save(system, out / "deltas.safetensors", spec)
        write_json(out / "metrics.json", result)
    return result


def train_stages(system, sequential, train_examples: Sequence[Example], dev_examples: Sequence[Example] | None,
                 task_spec, configs: Sequence[TrainConfig], tokenizer=None) -> list[dict[str, Any]]:
    """Stage-wise training of a :class:`~controltune.controllers.composition.Sequential` controller.

    Stage i is trained with ``configs[i]`` (give each its own ``out``), then frozen
    and the next stage attached (:meth:`Sequential.advance`).  Returns each stage's metrics.
    """
    if len(configs) != len(sequential.stages):
        raise ValueError(f"{len(sequential.stages)} stages need as many configurations, got {len(configs)}")
    results = []
    for i, config in enumerate(configs):
        if i:
            sequential.advance()
        results.append(train(system, train_examples, dev_examples, task_spec, config, tokenizer))
    return results
