"""Sweeps: a grid of training runs (:mod:`controltune.sweep_spec`), run in parallel (on Ray) and recorded as one
JSONL of rows.

:func:`run_sweep` runs the cells not yet finished: on an embedded local Ray (no server to
start) or an existing cluster (``address``), each cell in its own worker process with
``cpus_per_cell`` CPUs and as many torch threads, so parallel cells never oversubscribe
the cores.  Without Ray (not installed, or it cannot start) the cells run one by one in
this process, with a notice.  As each cell ends, the driver alone appends its row
(configuration, versions, scores, wall time, peak memory, status ``done``/``diverged``/
``failed`` with the reason) to the JSONL and prints a progress line.  Rerunning the same
spec skips the cells with a ``done`` or ``diverged`` row (matched by their full
configuration), so a stopped sweep continues where it stopped; ``failed`` cells are
tried again.  With ``runs_dir`` every cell also writes its run folder (metrics, deltas,
checkpoints) and a cell stopped midway resumes from its checkpoint; once a finished cell's row is
written, its resume state is deleted (its metrics and deltas stay) unless ``keep_checkpoints``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .divergence import TrainingDiverged
from .resources import peak_memory_mb, peak_rss_mb, reset_peak_rss, using_threads
from .results import append_jsonl, read_jsonl, stamp
from .run_folder import drop_resume_state
from .sweep_spec import (
    HEAD_SETTINGS,
    OPTIONAL_SETTINGS,
    RUN_SETTINGS,
    STAGE_SETTINGS,
    TRAIN_SETTINGS,
    SweepSpec,
    canonical_config,
    cell_id,
    describe,
    expand,
    varying_keys,
)
from .train import train
from .train_config import TrainConfig

if TYPE_CHECKING:
    import torch

    from .controllers.base import Controller
    from .system import ResidualSystem

__all__ = ["FINISHED", "CellSetup", "build_cell", "finished_configs", "run_cell", "run_cells", "run_sweep",
           "train_loss_end"]

FINISHED = ("done", "diverged")
"""Row statuses of a cell that is not run again (a ``failed`` cell is)."""
EXECUTORS = ("auto", "ray", "local")


# --- one cell (runs in a worker) ----------------------------------------------------------------
def build_method(system: ResidualSystem, method: str, options: dict[str, Any], seed: int, task: str | None = None,
                 sequential: bool = False) -> Controller:
    """Attach ``method`` (a registered controller or ``a+b``, options of part ``a`` as ``a.key``) to ``system``
    (:func:`controltune.controllers.spec.build_spec`; a control-designed controller designs on ``task``);
    with ``sequential`` the parts of ``a+b`` become the stages of a ``sequential`` controller.  Returns it."""
    from .controllers.base import build
    from .controllers.spec import build_spec, controller_spec

    if not sequential:
        return build_spec(system, method, options, seed, task)
    name, opts = controller_spec(method, dict(options), seed, task)
    if name != "combination":
        raise ValueError(f"sequential: true trains the parts of a combination one after another; method {method!r} "
                         "has one part (join several with '+')")
    return build("sequential", system, stages=opts["parts"])


def _stage_lrs(config: dict[str, Any], n: int) -> list[float]:
    rates = config.get("stage_lrs")
    if rates is None:
        return [float(config["lr"])] * n
    if not isinstance(rates, list) or len(rates) != n:
        raise ValueError(f"stage_lrs must list one rate per stage ({n}), got {rates!r}")
    return [float(r) for r in rates]


@dataclass
class CellSetup:
    """What a cell trains: its task, rows, loaded model and the system with the method attached."""

    spec: Any
    train_examples: list
    dev_examples: list
    loaded: Any
    system: Any
    controller: Any
    head_fit: dict[str, Any] | None = None
    """The linear probe's report when the cell's ``head_init`` is ``probe`` (:func:`controltune.probe.init_head`)."""


def build_cell(config: dict[str, Any]) -> CellSetup:
    """Load a cell's data and model, start its head (``head_init``) and attach its method, exactly as its training
    does (a control-designed method designs on the cell's training rows with its validation rows withheld);
    nothing is trained.  A probed head's features are kept in :func:`~controltune.probe.probe_cache_dir`, so the
    cells of a task that differ in seed, method or rate compute them once."""
    from .data import load_split, resolve_task
    from .design.linearize import withheld_from_design
    from .evaluation import validation_rows
    from .probe import init_head, probe_cache_dir
    from .system import ResidualSystem
    from .zoo import check_length, load_model

    spec = resolve_task(config["task"], holdout_seed=config["data_seed"])
    train_ex = load_split(spec, "train", n=config["train_size"], seed=config["data_seed"])
    dev_ex = load_split(spec, "dev", n=config["dev_size"], seed=config["data_seed"])
    loaded = load_model(config["model"], dtype=config["dtype"], device=config["device"], seed=config["seed"])
    check_length(loaded, config["max_length"], "max_length")
    system = ResidualSystem(loaded, num_labels=spec.num_labels, pooling=config["pooling"], seed=config["seed"])
    head_fit = init_head(system, config.get("head_init", "random"), train_ex, loaded.tokenizer,
                         val_size=config.get("val_size"), val_seed=config.get("val_seed", 0),
                         max_length=config["max_length"], batch_size=config.get("eval_batch_size") or 128,
                         cache_dir=probe_cache_dir())
    with withheld_from_design(validation_rows(train_ex, config.get("val_size"), config.get("val_seed", 0))):
        controller = build_method(system, config["method"], config["options"], config["seed"], config["task"],
                                  bool(config.get("sequential")))
    return CellSetup(spec, train_ex, dev_ex, loaded, system, controller, head_fit)


def _train_cell(config: dict[str, Any], threads: int, out: Path | None) -> dict[str, Any]:
    """Build the cell (:func:`build_cell`) and train; returns :func:`~controltune.train.train`'s result (for a
    sequential cell: the last stage's, with every stage's under ``stages``)."""
    from .train import train_stages

    cell = build_cell(config)
    spec, system = cell.spec, cell.system
    sequential = bool(config.get("sequential"))
    settings = {k: config[k] for k in TRAIN_SETTINGS + OPTIONAL_SETTINGS if k in config}
    extra = {k: config[k] for k in ("model", "method", "options", "task", *RUN_SETTINGS, *STAGE_SETTINGS,
                                                *HEAD_SETTINGS)
             if k in config}

    def train_config(lr: float, where: Path | None, **more: Any) -> TrainConfig:
        resume = where is not None and (where / "checkpoint.pt").is_file()
        return TrainConfig(**settings, lr=lr, seed=int(config["seed"]), progress=False, threads=threads,
                           out=str(where) if where else None, resume=resume,
                           overwrite=where is not None and not resume, extra={**extra, **more})

    if not sequential:
        result = train(system, cell.train_examples, cell.dev_examples, spec,
                       train_config(float(config["lr"]), out), tokenizer=cell.loaded.tokenizer)
        return {**result, "metric": spec.metric, "head_fit": cell.head_fit}
    parts = [s.method for s in cell.controller.stages]
    configs = [train_config(lr, None if out is None else out / f"stage{i}-{part}", stage=i, stage_method=part)
               for i, (part, lr) in enumerate(zip(parts, _stage_lrs(config, len(parts))))]
    results = train_stages(system, cell.controller, cell.train_examples, cell.dev_examples, spec, configs,
                           tokenizer=cell.loaded.tokenizer, reuse_finished=True)
    return {**results[-1], "metric": spec.metric, "stages": results, "head_fit": cell.head_fit}


def train_loss_end(losses: list[float], share: float = 0.1) -> float | None:
    """Mean minibatch training loss J over the last ``share`` of the steps (None without steps)."""
    if not losses:
        return None
    tail = losses[-max(1, int(len(losses) * share)):]
    return float(sum(tail) / len(tail))


def run_cell(config: dict[str, Any], threads: int = 1, runs_dir: str | None = None) -> dict[str, Any]:
    """Train one cell with ``threads`` torch threads; its row (never raises for a failed run).

    ``status`` is ``done`` (``scores``: final dev metrics, ``score``: the task's main metric;
    with validation rows also ``best_val``/``val_score``: the validation scores of the selected
    deltas, and ``dev_at_best_val``/``score_at_best_val``: their dev scores),
    ``diverged`` (``reason``, ``diverged``: where; no score) or ``failed`` (``reason``:
    the error, ``traceback``).  ``peak_memory_mb`` is the peak resident memory of the cell
    (on Linux the process's peak is reset when the cell starts; elsewhere, and on a GPU,
    the process's peak so far, ``peak_memory_scope`` says which).  ``curves`` holds the validation and
    dev evaluations (``{"val": [{step, metric...}], "dev": [...]}``) and ``train_loss_end`` the mean
    training loss over the last 10 % of steps, so that a row is complete without its run folder.
    """
    start = time.perf_counter()
    per_cell = config.get("device", "cpu") == "cpu" and reset_peak_rss()
    out = Path(runs_dir) / cell_id(config) if runs_dir else None
    row: dict[str, Any] = {**stamp(config), "cell": cell_id(config), "threads": threads,
                           "worker": {"host": socket.gethostname(), "pid": os.getpid()}}
    result: dict[str, Any] | None = None
    try:
        with using_threads(threads):
            result = _train_cell(config, threads, out)
        row.update(status="done", reason=None)
    except TrainingDiverged as err:
        result = err.result
        row.update(status="diverged", reason=str(err))
    except Exception as err:  # a failed cell is a row, not the end of the sweep
        row.update(status="failed", reason=f"{type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=-8))
    final = (result or {}).get("final") or {}
    scores = {k: v for k, v in final.items() if k != "step"} if row["status"] == "done" else None
    selected = {key: (result or {}).get(key) if row["status"] == "done" else None
                for key in ("best_val", "dev_at_best_val")}
    metric = (result or {}).get("metric")
    reported = selected["dev_at_best_val"] or scores or {}  # the dev scores of the deltas the row reports
    share = reported.get("top_class_share")
    row.update(**selected, val_score=(selected["best_val"] or {}).get(metric),
               score_at_best_val=(selected["dev_at_best_val"] or {}).get(metric),
               predicts_one_class=None if share is None else share == 1.0,
               train_scores=(result or {}).get("train_scores") if row["status"] == "done" else None)
    row.update(scores=scores, score=scores.get(result["metric"]) if scores else None,
               metric=(result or {}).get("metric"), best=(result or {}).get("best"),
               diverged=(result or {}).get("diverged"), step=(result or {}).get("step"),
               total_steps=(result or {}).get("total_steps"), n_trainable=(result or {}).get("n_trainable"),
               trainable_fraction=(result or {}).get("trainable_fraction"),
               train_time_s=(result or {}).get("wall_time_s"), wall_time_s=time.perf_counter() - start,
               peak_memory_mb=(peak_rss_mb() if per_cell else None) or peak_memory_mb(_device(config)),
               peak_memory_scope="cell" if per_cell else "process", run_dir=str(out) if out else None)
    # The evaluation curves travel in the row: run folders stay on the machine that trained, rows are committed.
    curves = (result or {}).get("curves") or {}
    row["curves"] = {k: curves[k] for k in ("val", "dev") if curves.get(k)} or None
    row["train_loss_end"] = train_loss_end(curves.get("train_loss") or [])
    row["designs"] = (result or {}).get("designs")  # a designed controller's sites, ranks and start, per cell
    if config.get("head_init") is not None:
        row["head_fit"] = (result or {}).get("head_fit")
    if row["status"] == "done" and (result or {}).get("stages"):
        row["stages"] = [{"stage": i, "method": r.get("config", {}).get("extra", {}).get("stage_method"),
                          "val_score": (r.get("best_val") or {}).get(metric),
                          "score_at_best_val": (r.get("dev_at_best_val") or {}).get(metric),
                          "score": (r.get("final") or {}).get(metric), "n_trainable": r.get("n_trainable")}
                         for i, r in enumerate(result["stages"])]
    return row


def _device(config: dict[str, Any]) -> torch.device:
    import torch

    return torch.device(config.get("device", "cpu"))


# --- executors --------------------------------------------------------------------------------
def machine_cpus() -> int:
    """Cores this process may run on (the embedded Ray's CPUs unless told otherwise)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

Cell = dict[str, Any]
Row = dict[str, Any]


def local_rows(cells: list[Cell], cpus_per_cell: int, runs_dir: str | None) -> Iterator[Row]:
    """Run the cells one by one in this process (``cpus_per_cell`` torch threads each)."""
    for cell in cells:
        yield run_cell(cell, cpus_per_cell, runs_dir)


def start_ray(address: str | None, cpus: int | None) -> Any:
    """Connect to the cluster at ``address``, or start an embedded local Ray with ``cpus`` CPUs; returns ``ray``."""
    import ray

    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=cpus or machine_cpus(), include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    return ray


def ray_rows(ray: Any, cells: list[Cell], cpus_per_cell: int, runs_dir: str | None) -> Iterator[Row]:
    """Submit every cell as a Ray task of ``cpus_per_cell`` CPUs; yield rows as they finish.

    Each cell runs in a fresh worker process (``max_calls=1``), so no cell inherits what earlier cells left in
    memory: in reused workers that had run 14 MiniLM cells each, two SmolLM2 cells reached 10–11 GB and Ray's
    memory monitor killed one, while a fresh worker running the retried cell held 2.9 GB.
    """
    remote = ray.remote(num_cpus=cpus_per_cell, max_calls=1)(run_cell)
    pending = {remote.remote(cell, cpus_per_cell, runs_dir): cell for cell in cells}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            cell = pending.pop(ref)
            try:
                yield ray.get(ref)
            except Exception as err:  # the worker itself died (killed, out of memory): the cell failed
                yield {**stamp(cell), "cell": cell_id(cell), "status": "failed",
                       "reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                       "scores": None, "score": None, "threads": cpus_per_cell}


# --- the sweep ---------------------------------------------------------------------------------
def finished_configs(rows: Iterable[Row]) -> set[str]:
    """Canonical configurations of the rows whose cell is finished (:data:`FINISHED`)."""
    return {canonical_config(r["config"]) for r in rows if r.get("status") in FINISHED and "config" in r}


def progress_line(i: int, n: int, row: Row, varying: list[str]) -> str:
    """``[3/8] done lora task=sst2 lr=0.001: accuracy=0.8812 (45.2 s)``, one per finished cell."""
    what = describe(row["config"], varying)
    if row["status"] == "done":
        detail = ", ".join(f"{k}={v:.4f}" for k, v in (row.get("scores") or {}).items()
                           if isinstance(v, (int, float)) and k != "top_class_share")
        if row.get("predicts_one_class"):
            detail += " [predicts one class for every dev row]"
    else:
        detail = row.get("reason") or ""
    took = f" ({row['wall_time_s']:.1f} s)" if row.get("wall_time_s") is not None else ""
    return f"[{i}/{n}] {row['status']} {what}: {detail}{took}"


def _open_executor(executor: str, address: str | None, cpus: int | None,
                   notice: Callable[[str], None]) -> tuple[str, Any]:
    """``("ray", ray)`` or ``("local", None)``; ``auto`` falls back to local with a notice when Ray cannot start."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    if executor == "local":
        if address:
            raise ValueError("--address needs the ray executor; the local executor runs in this process")
        return "local", None
    try:
        return "ray", start_ray(address, cpus)
    except Exception as err:
        if executor == "ray" or address:
            raise ValueError(f"Ray could not start{f' at {address}' if address else ''}: "
                             f"{type(err).__name__}: {err}") from err
        notice(f"notice: Ray could not start ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
               "); running the cells one at a time in this process")
        return "local", None


def run_sweep(spec: SweepSpec, out: str | Path, *, address: str | None = None, cpus_per_cell: int = 1,
              cpus: int | None = None, executor: str = "auto", runs_dir: str | Path | None = None,
              defaults: dict[str, Any] | None = None, echo: Callable[[str], None] | None = None,
              keep_checkpoints: bool = False) -> dict[str, Any]:
    """Run the cells of ``spec`` not finished in ``out`` (a JSONL); append a row per cell as it ends.

    Args:
        spec: the parsed spec (:func:`controltune.sweep_spec.load_spec`).
        out: the sweep's JSONL; its finished rows are skipped, new rows appended by this driver only.
        address: an existing Ray cluster (``ray://host:10001`` or ``host:6379``); None: embedded local Ray.
        cpus_per_cell: CPUs Ray reserves for a cell, and its torch threads.
        cpus: CPUs of the embedded local Ray (default: every core this process may use).
        executor: ``auto`` (Ray, else in-process with a notice), ``ray`` (Ray or an error) or ``local``.
        runs_dir: if given, each cell's run folder ``runs_dir/<cell id>`` (metrics, deltas, checkpoints).
        defaults: settings every cell takes unless the spec sets them (e.g. ``dtype``).
        echo: where progress lines go (default: stdout).
        keep_checkpoints: keep the resume state (``checkpoint.pt``) of finished cells' run folders; by default
            it is deleted once the cell's row is appended (:func:`~controltune.run_folder.drop_resume_state`).

    Returns:
        ``{cells, skipped, ran, done, diverged, failed, executor, out}``.
    """
    return run_cells(expand(spec, defaults), out, name=spec.name, address=address, cpus_per_cell=cpus_per_cell,
                     cpus=cpus, executor=executor, runs_dir=runs_dir, echo=echo, keep_checkpoints=keep_checkpoints)


def run_cells(cells: list[Cell], out: str | Path, *, name: str, address: str | None = None, cpus_per_cell: int = 1,
              cpus: int | None = None, executor: str = "auto", runs_dir: str | Path | None = None,
              echo: Callable[[str], None] | None = None, skip_finished: bool = True,
              keep_checkpoints: bool = False) -> dict[str, Any]:
    """Run expanded ``cells`` (:func:`expand`) as :func:`run_sweep` does, appending their rows to ``out``.

    ``skip_finished=False`` runs every cell even if ``out`` has a finished row of it (to rebuild a run
    folder that was lost, or to check that a cell reproduces its row); the new row is appended.
    """
    say = echo or (lambda line: print(line, flush=True))
    if cpus_per_cell < 1:
        raise ValueError(f"cpus_per_cell must be at least 1, got {cpus_per_cell}")
    local_cpus = cpus or machine_cpus()
    if not address and cpus_per_cell > local_cpus:
        raise ValueError(f"cpus_per_cell={cpus_per_cell} exceeds the {local_cpus} CPUs of this machine")
    done_before = finished_configs(read_jsonl(out)) if skip_finished else set()
    todo = [c for c in cells if canonical_config(c) not in done_before]
    summary: dict[str, Any] = {"cells": len(cells), "skipped": len(cells) - len(todo), "ran": 0, "done": 0,
                               "diverged": 0, "failed": 0, "executor": None, "out": str(out)}
    say(f"sweep {name}: {len(cells)} cells, {summary['skipped']} finished before, {len(todo)} to run -> {out}")
    if not todo:
        return summary
    kind, ray = _open_executor(executor, address, local_cpus, lambda line: print(line, file=sys.stderr))
    summary["executor"] = kind
    runs = str(runs_dir) if runs_dir is not None else None
    varying = varying_keys(cells)
    rows = ray_rows(ray, todo, cpus_per_cell, runs) if ray is not None else local_rows(todo, cpus_per_cell, runs)
    try:
        for i, row in enumerate(rows, 1):
            append_jsonl(out, row)
            if not keep_checkpoints and row["status"] in FINISHED and row.get("run_dir"):
                drop_resume_state(row["run_dir"])  # after the row is on disk: the cell is never resumed now
            summary["ran"] += 1
            summary[row["status"]] += 1
            say(progress_line(summary["skipped"] + i, len(cells), row, varying))
    finally:
        if ray is not None:
            ray.shutdown()
    return summary
