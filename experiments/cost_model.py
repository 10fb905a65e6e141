"""What a cell that has never run will cost, from the step times measured on cells that have.

A study's ``--plan`` times each kind of cell by the finished rows of that kind
(:func:`observed_core_hours`, :func:`sweep_hours`); a kind with no finished row had no estimate, so a grid could not
be sized to an issue's budget before it ran.  This module estimates those cells from the GLUE table's rows
(MiniLM, batch 32, length 128; the four tasks, six methods) with a two-term model of a cell's wall time at one
thread:

    T ≈ s_{task,m} · (batch/32) · (steps + E/96) · f_model,m

- ``steps`` training steps (``steps``, or ⌈n_train/batch⌉ · epochs, times the stages of a sequential cell);
- ``E`` rows scored without a backward pass: the validation rows at every evaluation and at the end, dev twice
  at the end (last and best-on-validation deltas), and the training rows scored for the generalisation gap.
  A row forward costs about a third of a row's forward and backward: 96 scored rows ≈ one step of 32;
- ``s_{task,m}`` the median over the GLUE rows of (task, m) of ``wall / (steps + E/96)``, where ``m`` is the
  method itself or the GLUE method whose cost it resembles (:data:`RESEMBLES`; a combination: its dearest part);
- ``f_model,m`` the ratio of SmolLM2's step time to MiniLM's for m at batch 8 (``efficiency.jsonl``; the median
  over methods where m was not measured), 1 for MiniLM.

Truncation below 128 tokens and other models are not modelled: for SmolLM2 at length 64 the estimate errs
high.  The model is checked against cells that ran in :func:`calibration`.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from controltune.data import load_split, resolve_task
from controltune.results import read_jsonl
from controltune.sweep import FINISHED
from controltune.sweep_spec import canonical_config

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_ROWS = ("glue_table.jsonl", "glue_select.jsonl", "glue_gaps.jsonl")
SCORED_PER_STEP = 96
"""Rows scored forward-only that cost about one training step of 32 rows."""

# linear_probe: no backward through the blocks, so bitfit's step time bounds it from above
RESEMBLES = {"last_layer": "bitfit", "selective": "bitfit", "arbitrary": "bitfit", "layernorm": "bitfit",
             "linear_probe": "bitfit",
             "unipelt": "adapter", "pfeiffer": "adapter", "houlsby": "adapter", "unified_subspace": "lora",
             "peft_lora": "lora", "costate_lora": "lora", "gramian_lora": "lora", "recommended_lora": "lora",
             "riccati_feedback": "adapter", "closed_loop_prefix": "prefix", "parallel_control": "adapter",
             "subspace": "lora", "fastfood": "lora"}
"""A method that is not in the GLUE table -> the GLUE method whose step it costs about as much as (its
backward runs through the whole network in every case: what differs is the cost of the delta itself)."""


def cell_seconds(row: dict[str, Any]) -> float | None:
    """A finished cell's whole time: the run's own clock, which a resumed run carries over its stops
    (``train_time_s``), or the row's wall time when that is longer (loading the model and data)."""
    times = [float(t) for t in (row.get("train_time_s"), row.get("wall_time_s")) if t]
    return max(times) if times else None


@cache
def _split_size(task: str, split: str) -> int:
    return len(load_split(resolve_task(task), split))


def _rows(size: float | int | None, n: int) -> int:
    """``train_size``/``val_size``/``dev_size`` as a row count out of ``n`` (a fraction, a count, or None: all)."""
    if size is None:
        return n
    return min(n, round(size * n)) if isinstance(size, float) and size < 1 else min(n, int(size))


def _parts(config: dict[str, Any]) -> list[str]:
    return str(config["method"]).split("+")


def cell_steps(config: dict[str, Any]) -> int:
    """Training steps of a cell (every stage of a sequential one)."""
    if config.get("steps"):
        per_stage = int(config["steps"])
    else:
        n = _rows(config.get("train_size"), _split_size(config["task"], "train"))
        n_train = n - (_rows(config.get("val_size"), n) if config.get("val_size") else 0)
        per_stage = math.ceil(n_train / config["batch_size"]) * int(config.get("epochs") or 1)
    return per_stage * (len(_parts(config)) if config.get("sequential") else 1)


def scored_rows(config: dict[str, Any], steps: int | None = None) -> int:
    """Rows scored without a backward pass: validation at every evaluation and the end, dev twice (without
    validation rows: dev at every evaluation and the end), and the training rows of the generalisation gap."""
    steps = cell_steps(config) if steps is None else steps
    stages = len(_parts(config)) if config.get("sequential") else 1
    n = _rows(config.get("train_size"), _split_size(config["task"], "train"))
    n_val = _rows(config.get("val_size"), n) if config.get("val_size") else 0
    evals = (steps // config["eval_every"] if config.get("eval_every") else 0) + stages
    n_dev = _rows(config.get("dev_size"), _split_size(config["task"], "dev"))
    if not n_val:  # without validation rows every evaluation scores dev
        return evals * n_dev + int(config.get("train_score_size") or 0)
    return evals * n_val + 2 * stages * n_dev + int(config.get("train_score_size") or 0)


def reference_method(method: str) -> str:
    """The GLUE method whose step cost stands for ``method``'s (a combination: its dearest part, see
    :func:`step_seconds`)."""
    return RESEMBLES.get(method, method)


@cache
def reference_step_seconds() -> dict[tuple[str, str], float]:
    """(task, GLUE method) -> s: seconds per training step of 32 rows at one thread, evaluations included at
    one step per 96 scored rows; the median over the GLUE rows (MiniLM)."""
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name in REFERENCE_ROWS:
        for row in read_jsonl(RESULTS / name):
            c = row.get("config") or {}
            if row.get("status") != "done" or row.get("copied_from") or c.get("model") != "minilm" \
                    or (row.get("threads") or 1) != 1 or not cell_seconds(row):
                continue
            steps = int(row["total_steps"])
            units = (steps + scored_rows(c, steps) / SCORED_PER_STEP) * c["batch_size"] / 32
            per[(c["task"], c["method"])].append(cell_seconds(row) / units)
    return {k: statistics.median(v) for k, v in per.items()}


@cache
def model_factors() -> dict[str, dict[str, float]]:
    """model -> method -> its step time over MiniLM's at batch 8 (``efficiency.jsonl``); ``"*"``: the median."""
    step = {(r["model"], r["method"], r["batch"]): r["step_s"] for r in read_jsonl(RESULTS / "efficiency.jsonl")
            if r.get("status", "done") == "done"}
    out: dict[str, dict[str, float]] = {"minilm": {"*": 1.0}}
    for (model, method, batch), s in step.items():
        if model != "minilm" and batch == 8:
            base = step.get(("minilm", method, 8)) or step.get(("minilm", reference_method(method), 8))
            if base:
                out.setdefault(model, {})[method] = s / base
    for factors in out.values():
        factors.setdefault("*", statistics.median(factors.values()))
    return out


def step_seconds(config: dict[str, Any]) -> float:
    """s_{task,m} · (batch/32) · f_model,m for one cell (m: the dearest part of a combination)."""
    ref, factors = reference_step_seconds(), model_factors()
    if config["model"] not in factors:
        raise ValueError(f"no step times of model {config['model']!r} in efficiency.jsonl: "
                         f"estimates cover {sorted(factors)}")
    per_model = factors[config["model"]]
    costs = []
    for part in _parts(config):
        key = (config["task"], reference_method(part))
        if key not in ref:
            raise ValueError(f"no GLUE rows of {key} to time method {part!r} on: "
                             f"RESEMBLES maps a method to one of {sorted({m for _, m in ref})}")
        costs.append(ref[key] * per_model.get(part, per_model["*"]))
    return max(costs) * config["batch_size"] / 32


def estimated_seconds(config: dict[str, Any]) -> float:
    """T ≈ s · (steps + E/96): a cell's wall time at one thread, before it has run."""
    steps = cell_steps(config)
    return step_seconds(config) * (steps + scored_rows(config, steps) / SCORED_PER_STEP)


def calibration(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Measured over estimated wall time of finished one-thread rows of kinds the model was not fit on:
    ``{n, median, min, max}`` of the ratio (1: exact)."""
    ratios = [cell_seconds(r) / estimated_seconds(r["config"]) for r in rows
              if r.get("status") == "done" and not r.get("copied_from") and (r.get("threads") or 1) == 1
              and cell_seconds(r) and "config" in r]
    if not ratios:
        return {"n": 0}
    return {"n": len(ratios), "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# --- a study's core-hours: measured on its finished rows, estimated for the kinds not run yet ----------
def observed_core_hours(planned: dict[Any, int], rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any],
                        seconds: Callable[[dict[str, Any]], float | None] = cell_seconds,
                        done: dict[Any, int] | None = None) -> dict[str, Any]:
    """A study's time from its own finished rows: ``planned`` counts the cells of each kind (``key`` of a row's
    config or row); a kind's cells still to run take the mean time of its finished rows.  ``done``: how many of
    each kind need not run again (default: its finished rows; fewer when their outputs are gone).

    Returns ``{spent, remaining, unknown}``: core-hours spent on the planned kinds, core-hours still to run for
    the kinds that have a finished row, and the number of cells of kinds that have none (no estimate for them yet).
    """
    times: dict[Any, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("status", "done") in FINISHED and (s := seconds(row)):
            times[key(row)].append(float(s))
    remaining, unknown = 0.0, 0
    for kind, n in planned.items():
        left = max(0, n - (len(times.get(kind, [])) if done is None else done.get(kind, 0)))
        if times.get(kind):
            remaining += left * sum(times[kind]) / len(times[kind])
        else:
            unknown += left
    spent = sum(sum(v) for kind, v in times.items() if kind in planned)
    return {"spent": spent / 3600, "remaining": remaining / 3600, "unknown": unknown}


def describe_hours(name: str, est: dict[str, Any]) -> str:
    """``cells: 1.4 core-h spent, ~0.5 core-h to run (3 cells of kinds not timed yet)``, and with an
    ``estimated`` entry (:func:`sweep_hours`) ``(+ ~2.0 core-h for 3 cells of kinds not timed yet, estimated
    from the GLUE table's step times)``."""
    if not est["unknown"]:
        tail = ""
    elif est.get("estimated") is not None:
        scaled = ", ".join(f"{t} ×{f:.2f}" for t, f in (est.get("scale") or {}).items())
        tail = (f" (+ ~{est['estimated']:.1f} core-h for {est['unknown']} cells of kinds not timed yet, "
                "estimated from the GLUE table's step times"
                + (f", scaled as this sweep's timed cells ran on the same task: {scaled}" if scaled else "") + ")")
    else:
        tail = f" ({est['unknown']} cells of kinds not timed yet)"
    return f"{name}: {est['spent']:.1f} core-h spent, ~{est['remaining']:.1f} core-h to run{tail}"


def cell_kind(config: dict[str, Any]) -> str:
    """A cell's configuration without its rate and seed: cells of one kind take about the same time."""
    return canonical_config({k: v for k, v in config.items() if k not in ("lr", "seed")})


def with_estimate(est: dict[str, Any], planned: dict[Any, int], cells: list[dict[str, Any]],
                  key: Callable[[dict[str, Any]], Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``est`` (:func:`observed_core_hours` of ``planned``) with ``estimated``: the core-hours of the planned cells
    of kinds that have no finished row, each kind at the mean :func:`cost_model.estimated_seconds` of its
    ``cells`` (configs; ``key(config)`` is the kind) times ``scale[task]``, how this sweep's own finished rows on
    the kind's task ran against the same estimate (:func:`calibration`'s median, with at least
    :data:`MIN_CALIBRATION_ROWS` rows; 1 without); None, with ``estimate_error``, if the cost model cannot time
    one of them (a model, task or method it has no step times for)."""
    finished = {key(r["config"]) for r in rows
                if "config" in r and r.get("status", "done") in FINISHED and cell_seconds(r)}
    per_kind: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        per_kind[key(cell)].append(cell)
    try:
        scale = sweep_scale(rows)
        seconds = sum(n * sum(estimated_seconds(c) * scale.get(c.get("task"), 1.0) for c in per_kind[k])
                      / len(per_kind[k]) for k, n in planned.items() if k not in finished)
    except (ValueError, KeyError, OSError, ZeroDivisionError) as err:
        return {**est, "estimated": None, "estimate_error": str(err)}
    used = {c.get("task") for k, n in planned.items() if k not in finished for c in per_kind[k]}
    return {**est, "estimated": seconds / 3600, "scale": {t: scale[t] for t in sorted(used & set(scale))}}


MIN_CALIBRATION_ROWS = 3
"""Finished rows of a task a sweep needs before its own timing rescales the estimate on that task."""


def sweep_scale(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per task, the median measured-over-estimated wall time of a sweep's finished one-thread rows
    (:func:`calibration`), for tasks with at least :data:`MIN_CALIBRATION_ROWS` of them: the cost model's
    step times come from the GLUE table's cells, and a sweep's other kinds run faster or slower on the same
    machine (the design table's MRPC cells took ~0.6× the estimate)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if "config" in r and r["config"].get("task") is not None:
            by_task[r["config"]["task"]].append(r)
    out = {}
    for task, mine in by_task.items():
        found = calibration(mine)
        if found["n"] >= MIN_CALIBRATION_ROWS:
            out[task] = found["median"]
    return out


def sweep_hours(cells: list[dict[str, Any]], rows: list[dict[str, Any]], seeds_after: int = 0) -> dict[str, Any]:
    """:func:`observed_core_hours` of a sweep's expanded ``cells`` (plus ``seeds_after`` table cells per kind:
    the further seeds at the chosen rate), timed by the finished ``rows`` of the same kind (copied rows excluded),
    :func:`with_estimate` for the kinds not timed yet.

    ``cells`` should be the selection as it stands (:func:`extended_spec` of the selection rows): only rows that
    are cells of the plan count as done, each once (a copied row and its source are one cell), and at most
    ``seeds_after`` further-seed rows per kind.  Counting every finished row of a kind as done while planning
    only the grid made edge rates' rows hide cells still to run (APET's ``--plan`` had said 0.7 core-hours for
    ~2.4)."""
    planned: dict[str, int] = defaultdict(int)
    for cell in cells:
        planned[cell_kind(cell)] += 1
    for kind in list(planned):
        planned[kind] += seeds_after
    wanted = {canonical_config(c) for c in cells}
    seen: set[str] = set()
    done: dict[str, int] = defaultdict(int)
    further: dict[str, int] = defaultdict(int)
    for row in rows:
        if "config" not in row or row.get("status") not in FINISHED:
            continue
        key, kind = canonical_config(row["config"]), cell_kind(row["config"])
        if key in seen or kind not in planned:
            continue
        seen.add(key)
        if key in wanted:
            done[kind] += 1
        elif row["config"].get("seed", 0) != 0:
            further[kind] += 1
    for kind, n in further.items():
        done[kind] += min(n, seeds_after)
    timed = [r for r in rows if not r.get("copied_from") and "config" in r]
    est = observed_core_hours(dict(planned), timed, lambda r: cell_kind(r["config"]), done=dict(done))
    return with_estimate(est, dict(planned), cells, cell_kind, timed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Write ``results/cost_model.json``: the reference step times, the model factors, and the calibration of
    the estimate on every committed sweep whose rows were not used to fit it."""
    import argparse

    from controltune.results import stamp, write_json

    p = argparse.ArgumentParser(description="the cost model's references and its calibration on other sweeps")
    p.add_argument("--check", nargs="*", default=["unified_select.jsonl", "unified_table.jsonl"],
                   help="sweep JSONL files (in experiments/results) to calibrate on")
    args = p.parse_args(argv)
    checks = {name: calibration(read_jsonl(RESULTS / name)) for name in args.check if (RESULTS / name).exists()}
    payload = {**stamp({"reference_rows": list(REFERENCE_ROWS), "scored_per_step": SCORED_PER_STEP,
                        "resembles": RESEMBLES, "command": "python experiments/cost_model.py"}),
               "step_seconds": [{"task": t, "method": m, "seconds": s}
                                for (t, m), s in sorted(reference_step_seconds().items())],
               "model_factors": model_factors(), "calibration": checks}
    write_json(RESULTS / "cost_model.json", payload)
    for name, c in checks.items():
        print(f"{name}: {c['n']} cells" + (f", measured/estimated median {c['median']:.2f} "
                                          f"(range {c['min']:.2f}-{c['max']:.2f})" if c["n"] else ""))
    return payload


if __name__ == "__main__":
    main()
