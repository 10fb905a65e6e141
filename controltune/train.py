"""Gradient training of the controls: minimise ``J(u) = (1/S) Σ_s Φ + Σ_l R_l(u)`` with AdamW.

The loss of a step is ``system.cost(batch)``, so a controller's running cost R
(weight decay written into J, an L0 penalty of diff pruning, ...) is optimised
with the task loss.  AdamW's own *decoupled* weight decay (``weight_decay``)
shrinks every control by ``lr·λ·u`` per step; it is an optimiser choice, not a
term of J, and is recorded as such.

Schedule: linear warm-up to ``lr`` then linear decay to 0 at the last step.
Batches are drawn in an order fixed by ``(seed, epoch)`` (:func:`~controltune.schedule.epoch_batches`), so a
run resumed from its checkpoint (deltas, optimiser, scheduler, step, RNG) sees the same
batches it would have seen without the stop.  After the last step each controller's
:meth:`~controltune.controllers.base.Controller.finalize` runs (e.g. diff pruning's
projection onto its sparsity budget), and the dev set is scored again.

Throughput: each split is tokenised once (:func:`~controltune.batching.encode`, cached in
memory and, with ``token_cache``, on disk); training batches are grouped by length
(``group_by_length``: similar lengths in a batch, batches in random order) and padded to
their longest sequence; evaluation runs in length order; ``threads`` sets torch's
intra-op threads for the run and restores them after (None: torch's own setting, which is
every core, or ``$OMP_NUM_THREADS``; :func:`~controltune.resources.default_threads` says that number).

Model selection on held-out training rows, never on dev: with ``val_size`` (or
``val_examples``) a seeded part of the training rows is held out (:func:`validation_split`,
drawn with ``val_seed``, disjoint from the rows trained on and the same for every
``seed`` and learning rate).  Every ``eval_every`` steps and after the last step the
validation rows are scored (not dev); the deltas with the best validation score of the
task's main metric (the earliest on ties) are kept, in memory and in the resume state.
After training, dev is scored twice: on the last step's deltas (``final``) and on the
best-on-validation deltas (``dev_at_best_val``, also ``best``); ``best_val`` holds their
validation scores and ``selection`` says which key is which.  The system is left holding
the best-on-validation deltas (``best.safetensors`` in ``out``; ``deltas.safetensors``
stays the last step's).  Without validation rows, periodic evaluations score dev and
``best`` is the best of them (chosen on dev: a curve, not a model selection).

A failed run is a failure: a non-finite loss, gradient or updated control stops
training at once; ``metrics.json`` then has ``status: "diverged"``, the step and
what was non-finite, no score (``final`` and ``best`` are null), and
:class:`TrainingDiverged` is raised after it is written.

Nothing is lost: the resume state (deltas, optimiser, scheduler, step, RNG, log
and the run's configuration) is one file, ``checkpoint.pt``, replaced atomically
every ``checkpoint_every`` steps, every ``checkpoint_minutes`` of wall time and at
each dev evaluation, so a kill at any moment leaves the previous checkpoint whole.
Resuming checks the configuration against the checkpoint's and refuses a change
not allowed by name (``allow_config_change``).  An output folder holding results
is not reused without ``resume`` or ``overwrite``, and a lock file keeps a second
process out of a folder in use.

Output (``out``): ``metrics.json`` (configuration, versions, curves, final and
best dev scores, wall time, peak memory, trainable-parameter count),
``deltas.safetensors`` (final deltas), ``best.safetensors`` (best-on-validation deltas,
with validation rows only), ``checkpoint.pt`` (resume state) and the lock file
``.controltune-train.lock``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .batching import encode, token_cache_dir
from .data import Example
from .divergence import TrainingDiverged, control_names, describe_nonfinite, nonfinite
from .evaluation import evaluate, to_device, validation_split
from .fingerprint import n_base_parameters
from .resources import peak_memory_mb, using_threads
from .results import stamp, write_json
from .run_folder import (
    BEST_DELTAS,
    CHECKPOINT,
    DELTAS,
    check_output_folder,
    checkpoint_due,
    clear_output_folder,
    finished_run,
    load_state,
    locked_output_folder,
    reported_deltas,
    run_config,
    save_state,
)
from .schedule import epoch_batches, linear_schedule, parameter_groups, total_steps, trainable_parameters, warmup_steps
from .train_config import TrainConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .controllers.composition import Sequential
    from .data import TaskSpec
    from .system import ResidualSystem


# --- pieces ----------------------------------------------------------------------------
def training_mode(system: ResidualSystem, dropout: bool) -> None:
    """The system's mode for training steps: the controllers' deltas in training mode (diff pruning samples its
    hard-concrete gates), the base model and the readout in training mode (dropout on) only with ``dropout``.

    Dropout is a property of the base model; a controller's stochastic control is part of its method and must
    not be switched off with it.
    """
    system.train(dropout)
    system.controllers.train(True)


def finalize(system: ResidualSystem, budget: float | None = None) -> list[str]:
    """:meth:`Controller.finalize` of each controller (e.g. diff pruning's projection onto
    ``budget`` entries, a fraction if < 1); returns the methods that changed their deltas."""
    if budget is not None and budget >= 1:
        budget = int(budget)
    return [c.method for c in system.controllers if c.finalize(budget)]


def design_reports(system: ResidualSystem) -> dict[str, Any] | None:
    """What each designed controller recorded of its design (chosen sites and ranks, the start's step and its
    trust-region trials, the fitted feedback), by method; None when no controller designed anything."""
    reports = {c.method: c.report for c in system.controllers if getattr(c, "report", None)}
    return reports or None


# --- the loop --------------------------------------------------------------------------------
def train(system: ResidualSystem, train_examples: Sequence[Example], dev_examples: Sequence[Example] | None,
          task_spec: TaskSpec, config: TrainConfig, tokenizer: PreTrainedTokenizerBase | None = None,
          val_examples: Sequence[Example] | None = None) -> dict[str, Any]:
    """Train the controls of ``system`` on ``train_examples``; returns the metrics dict.

    Args:
        system: a ResidualSystem with its controllers attached (classification readout).
        train_examples, dev_examples: lists of :class:`~controltune.data.Example`
            (``dev_examples`` None or empty: no evaluation).
        task_spec: the :class:`~controltune.data.TaskSpec` (its ``metrics`` are reported).
        config: :class:`TrainConfig`.
        tokenizer: defaults to the offline MiniLM tokenizer (that of every built-in model).
        val_examples: validation rows given explicitly (instead of ``config.val_size``):
            periodic evaluations score them and the best deltas on them are selected.

    Returns:
        the dict written to ``metrics.json`` (see module docstring).

    Raises:
        OutputFolderError: ``config.out`` is a file, holds results without ``resume``/``overwrite``,
            has no checkpoint to resume, or (:class:`OutputLockedError`) is in use by another process.
        ConfigMismatchError: resuming with a configuration the checkpoint does not allow.
        TrainingDiverged: a non-finite loss, gradient or control (after ``metrics.json`` is written).
        ValueError: no training rows, both ``val_examples`` and ``config.val_size``, or a hold-out
            that leaves nothing on one side.
    """
    if not train_examples:
        raise ValueError("no training examples")
    if val_examples is not None and config.val_size is not None:
        raise ValueError("give validation rows either as val_examples or as config.val_size, not both")
    if config.val_size is not None:
        train_examples, val_examples = validation_split(train_examples, config.val_size, config.val_seed)
    elif val_examples is not None and not val_examples:
        raise ValueError("val_examples is empty: pass None for no validation rows")
    out = Path(config.out) if config.out else None
    if out is None:
        with using_threads(config.threads):
            return _train(system, train_examples, dev_examples, task_spec, config, tokenizer, None, val_examples)
    check_output_folder(out, config.resume, config.overwrite)
    with locked_output_folder(out), using_threads(config.threads):
        check_output_folder(out, config.resume, config.overwrite)  # again under the lock: another run may have ended
        clear_output_folder(out, config.overwrite)
        return _train(system, train_examples, dev_examples, task_spec, config, tokenizer, out, val_examples)


def _selection(task_spec: TaskSpec, config: TrainConfig, val_examples: Sequence[Example] | None) -> dict[str, Any]:
    """What ``metrics.json``'s score keys mean, and how the reported checkpoint was chosen."""
    if val_examples is None:
        return {"split": None, "keys": {
            "final": "dev scores of the deltas after the last step",
            "best": "the best dev evaluation of the curve (chosen on dev: not a model selection)"}}
    return {"split": "validation", "metric": task_spec.metric, "n_val": len(val_examples),
            "val_size": config.val_size, "val_seed": config.val_seed if config.val_size is not None else None,
            "rule": f"the deltas with the highest validation {task_spec.metric} among the evaluations every "
                    "eval_every steps and after the last step (the earliest on ties); dev is never used to choose",
            "keys": {"best_val": "validation scores of the selected deltas (and their step)",
                     "dev_at_best_val": "dev scores of the selected deltas: the run's reported score",
                     "best": "the same as dev_at_best_val",
                     "final": "dev scores of the deltas after the last step"}}


def _train(system: ResidualSystem, train_examples: Sequence[Example], dev_examples: Sequence[Example] | None,
           task_spec: TaskSpec, config: TrainConfig, tokenizer: PreTrainedTokenizerBase, out: Path | None,
           val_examples: Sequence[Example] | None = None) -> dict[str, Any]:
    """The loop of :func:`train`, with ``out`` checked and locked by the caller."""
    if tokenizer is None:
        from .zoo import offline_tokenizer

        tokenizer = offline_tokenizer()
    params = trainable_parameters(system)
    if not params:
        raise ValueError("the system has no trainable controls: attach a controller (or keep the readout head)")
    device = params[0].device
    names = control_names(system)
    validating = val_examples is not None
    total, per_epoch = total_steps(config, len(train_examples))
    warm = warmup_steps(config, total)
    schedule = linear_schedule(warm, total, config.schedule == "linear")
    optimizer = torch.optim.AdamW(parameter_groups(system, config), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    spec = dict(config.extra)
    current = run_config(config, system, task_spec, train_examples, val_examples)
    log: dict[str, Any] = {"train_loss": [], "lr": [], "dev": [], "wall_time_s": 0.0}
    if validating:
        log.update(val=[], best_val=None)
    best_deltas: bytes | None = None  # the best-on-validation deltas (a delta file's bytes)
    step = 0
    torch.manual_seed(config.seed)
    if config.resume and out is not None:
        step, log, best_deltas = load_state(out / CHECKPOINT, system, optimizer, scheduler, config, current,
                                            schedule)
    n_trainable = sum(p.numel() for p in params)
    n_base = n_base_parameters(system)
    header = stamp({**asdict(config), "total_steps": total, "warmup_steps": warm, "steps_per_epoch": per_epoch,
                    "n_train": len(train_examples), "n_dev": len(dev_examples or []), "task": task_spec.name,
                    "model": system.name, "methods": [c.method for c in system.controllers],
                    "loss": "J = mean CE + sum of running costs R (AdamW decoupled weight decay is not part of J)",
                    **({"n_val": len(val_examples)} if validating else {})})
    selection = _selection(task_spec, config, val_examples)
    designs = design_reports(system)  # designed at attachment, before the first step

    def report(status: str) -> dict[str, Any]:
        dev = log["dev"]
        scored = status != "diverged"  # a diverged run reports no score, not even its best before diverging
        curves = {"train_loss": log["train_loss"], "lr": log["lr"], "dev": dev}
        extra: dict[str, Any] = {}
        if validating:
            best = log.get("dev_at_best_val") if scored else None
            curves["val"] = log["val"]
            extra = {"best_val": log["best_val"] if scored else None, "dev_at_best_val": best}
        else:
            best = max(dev, key=lambda r: r[task_spec.metric]) if dev and scored else None
        return {**header, "status": status, "step": step, "total_steps": total,
                "n_trainable": n_trainable, "n_base_params": n_base, "trainable_fraction": n_trainable / n_base,
                "curves": curves, "final": log.get("final") if scored else None, "best": best, **extra,
                "selection": selection, "diverged": log.get("diverged"),
                "train_scores": log.get("train_scores") if scored else None,
                "config_changes": log.get("config_changes", []), "finalized": log.get("finalized", []),
                "designs": designs, "wall_time_s": log["wall_time_s"], "peak_memory_mb": peak_memory_mb(device)}

    cache_dir = token_cache_dir() if config.token_cache else None

    def scores_on(examples: Sequence[Example] | None) -> dict[str, float] | None:
        if not examples:
            return None
        return {"step": step, **evaluate(system, examples, task_spec, tokenizer, config.eval_batch_size,
                                         config.max_length, cache_dir)}

    def validate() -> dict[str, float]:
        """Score the validation rows; keep the deltas if they are the best so far (strictly better)."""
        nonlocal best_deltas
        scores = scores_on(val_examples)
        log["val"].append(scores)
        best = log["best_val"]
        if best is None or scores[task_spec.metric] > best[task_spec.metric]:
            log["best_val"] = scores
            best_deltas = checkpoint.to_bytes(system, spec)
        return scores

    def save_checkpoint() -> None:
        log["wall_time_s"] = time.perf_counter() - t0
        save_state(out / CHECKPOINT, system, optimizer, scheduler, step, log, spec, current, best_deltas)

    def diverge(info: dict[str, Any]) -> None:
        """Record the failure, write metrics.json, raise: nothing after this step is trained or scored."""
        log["diverged"] = {"step": step + 1, **info}
        log["wall_time_s"] = time.perf_counter() - t0
        result = report("diverged")
        if out is not None:
            write_json(out / "metrics.json", result)
        where = f" of {info['control']}" if "control" in info else ""
        raise TrainingDiverged(f"training diverged at step {step + 1} of {total}: non-finite {info['what']}{where} "
                               f"({info['value']}); no score is reported", result)

    training_mode(system, config.dropout)
    t0 = time.perf_counter() - log["wall_time_s"]
    last_saved = time.monotonic()
    encoded = encode(train_examples, tokenizer, config.max_length, cache_dir)
    lengths, batches, batches_epoch = encoded.lengths, [], -1
    with tqdm(total=total, initial=step, disable=not config.progress, desc="train", dynamic_ncols=True) as bar:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            if epoch != batches_epoch:
                batches, batches_epoch = epoch_batches(lengths, config.batch_size, config.seed, epoch,
                                                       config.group_by_length), epoch
            batch = to_device(encoded.batch(batches[offset]), device)
            loss = system.cost(batch)
            value = loss.item()
            if not math.isfinite(value):
                diverge({"what": "loss", "value": describe_nonfinite(value)})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bad = nonfinite("gradient", [p.grad for p in params], params, names)
            if bad:
                diverge(bad)
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            # the base rate (a part of a combination trains at it times its scale)
            log["lr"].append(scheduler.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0))
            optimizer.step()
            bad = nonfinite("parameter", list(params), params, names)  # a finite step can still overflow
            if bad:
                log["lr"].pop()
                diverge(bad)
            scheduler.step()
            step += 1
            log["train_loss"].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            evaluated = bool(config.eval_every and step % config.eval_every == 0 and step < total)
            if evaluated:
                scored = validate() if validating else scores_on(dev_examples)
                if not validating:
                    log["dev"].append(scored)
                training_mode(system, config.dropout)
                if scored is not None:
                    bar.set_postfix(loss=f"{value:.4f}", **{task_spec.metric: f"{scored[task_spec.metric]:.4f}"})
            if out is not None and step < total and (evaluated or checkpoint_due(config, step, last_saved)):
                save_checkpoint()
                write_json(out / "metrics.json", report("running"))
                last_saved = time.monotonic()
    if validating and not (log["val"] and log["val"][-1]["step"] == total):  # not already scored (resumed at the end)
        validate()
    if out is not None:
        save_checkpoint()
    log["finalized"] = finalize(system, config.budget)
    system.eval()
    final = scores_on(dev_examples)
    if final is not None:
        log["dev"].append(final)
        log["final"] = final
    if out is not None:
        checkpoint.save(system, out / DELTAS, spec)
    if validating:
        log["dev_at_best_val"] = _restore_best(system, log["best_val"]["step"], best_deltas, total, final,
                                               config.budget, lambda: scores_on(dev_examples))
        if out is not None:
            checkpoint.save(system, out / BEST_DELTAS, spec)
    if config.train_score_size:  # the reported deltas on rows they were trained on (the generalisation gap)
        picked = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(config.seed))
        rows = [train_examples[i] for i in picked[:config.train_score_size].tolist()]
        # not through the token cache: a subsample per seed would leave a cache file per run
        reported = log["best_val"]["step"] if validating else step  # the step of the deltas scored
        log["train_scores"] = {"step": reported, **evaluate(system, rows, task_spec, tokenizer,
                                                            config.eval_batch_size, config.max_length, None)}
    log["wall_time_s"] = time.perf_counter() - t0
    result = report("done")
    if out is not None:
        write_json(out / "metrics.json", result)
    return result


def _restore_best(system: ResidualSystem, best_step: int, best_deltas: bytes | None, total: int, final: dict[str,
                  float] | None,
                  budget: float | None, score_dev: Callable[[], dict[str, float] | None]) -> dict[str, float] | None:
    """Leave ``system`` holding the best-on-validation deltas of ``best_step`` (finalised as the last ones
    were) and return their dev scores (None without dev rows).

    When the last step is the best, those are the deltas already scored (``final``).
    """
    if best_step == total:
        return final
    if best_deltas is None:
        raise RuntimeError(f"the best-on-validation deltas of step {best_step} were not kept")
    checkpoint.load_bytes(system, best_deltas, "the best-on-validation deltas")
    finalize(system, budget)
    system.eval()
    scores = score_dev()
    return None if scores is None else {**scores, "step": best_step}


def train_stages(system: ResidualSystem, sequential: Sequential, train_examples: Sequence[Example],
                 dev_examples: Sequence[Example] | None, task_spec: TaskSpec, configs: Sequence[TrainConfig],
                 tokenizer: PreTrainedTokenizerBase | None = None, reuse_finished: bool = False
                 ) -> list[dict[str, Any]]:
    """Stage-wise training of a :class:`~controltune.controllers.composition.Sequential` controller.

    Stage i is trained with ``configs[i]`` (give each its own ``out``), then frozen
    and the next stage attached (:meth:`Sequential.advance`).  Returns each stage's metrics.
    With ``reuse_finished`` a stage whose ``out`` holds a finished run is not trained again:
    its deltas are loaded (with the checkpoint's checks) and its saved metrics returned, so a
    stopped sequential run continues at the stage it stopped in.
    """
    if len(configs) != len(sequential.stages):
        raise ValueError(f"{len(sequential.stages)} stages need as many configurations, got {len(configs)}")
    results = []
    for i, config in enumerate(configs):
        if i:
            sequential.advance()
        done = finished_run(config.out) if reuse_finished else None
        if done is not None:
            checkpoint.load(system, reported_deltas(config.out))
            results.append(done)
            continue
        results.append(train(system, train_examples, dev_examples, task_spec, config, tokenizer))
    return results
