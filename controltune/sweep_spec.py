"""The sweep spec: a grid of training runs, and its cells (one full configuration each).

Running the cells is :mod:`controltune.sweep`.

A *spec* (YAML or JSON) names the grid::

    grid:                       # every axis: a list of values, or one value
      model: minilm
      method: [lora, bitfit]
      task: [sst2, rte]
      seed: [0, 1, 2]
      lr: [1e-3, 5e-4]
    per_method:                 # optional: axes that differ by method (override grid)
      lora: {options: {rank: 8, targets: [q, v]}}
      full: {lr: [5e-5, 2e-5]}
    train: {epochs: 3, batch_size: 32, max_length: 128, train_size: 5000, val_size: 500, eval_every: 100}
    overrides:                  # optional: axes for the cells that match `where` (override all above)
      - where: {task: sst2}
        set: {train_size: 20000, epochs: 2}
      - where: {task: rte, method: full}
        set: {lr: [3e-5, 1e-4]}
    exclude:                    # optional: cells matching any entry are not in the grid
      - {task: rte, method: bitfit}
    out: glue.jsonl             # optional: the JSONL (relative to the spec's folder)

Axes are ``model``, ``method`` (a registered controller, or several joined by ``+``),
``options`` (a dict of controller options, or a list of them), ``task``, ``seed``, ``lr``
and any setting of :data:`TRAIN_SETTINGS`, :data:`OPTIONAL_SETTINGS`, :data:`STAGE_SETTINGS` or
:data:`HEAD_SETTINGS` (``head_init: probe``: the head fitted first); ``train`` holds
settings shared by every cell; ``overrides`` (applied in order, each to the cells whose values
match its ``where``) give settings per task, or per task and method; ``exclude`` drops the cells
(after the overrides) whose values equal every entry of one of its mappings, e.g. a pair a study
could not rate.  A *cell* is one point of the grid with every setting filled in (:func:`expand`),
and its configuration is what identifies it.  With ``val_size`` a cell holds out that many
training rows (a fraction if < 1) and selects its deltas on them (:func:`controltune.train.train`); its row then carries
``val_score`` (the selecting validation score) and ``score_at_best_val`` (the dev score of
the selected deltas) besides ``score`` (dev after the last step).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import to_strict_json
from .train_config import TrainConfig

CELL_AXES = ("model", "task", "method", "options", "lr", "seed")
"""The axes every cell has (in the order cells are enumerated)."""
TRAIN_SETTINGS = ("epochs", "steps", "batch_size", "eval_batch_size", "max_length", "warmup", "schedule",
                  "weight_decay", "grad_clip", "eval_every", "dropout", "budget", "group_by_length")
""":class:`~controltune.train_config.TrainConfig` fields a spec may set (what a run computes)."""
RUN_SETTINGS = {"train_size": None, "data_seed": 0, "dev_size": None, "pooling": "mean", "dtype": "float32",
                "device": "cpu"}
"""Data and model settings a spec may set, with their defaults."""
OPTIONAL_SETTINGS = ("val_size", "val_seed", "part_lr_scales")
""":class:`~controltune.train_config.TrainConfig` fields in a cell's configuration only when the spec sets them (so the
cells of a spec without them are the cells they were before these settings existed).  ``part_lr_scales``, a
list, is given as a one-value axis: ``[[25.0, 1.0]]``."""
STAGE_SETTINGS = ("sequential", "stage_lrs")
"""Sequential combination (``controltune train --sequential``), in a cell's configuration only when set:
``sequential: true`` trains the parts of ``method`` (``a+b+c``) one after another, each for the cell's
``epochs``/``steps``, frozen before the next is added, each in ``<run>/stage<i>-<part>``; ``stage_lrs`` gives
each stage its own peak rate (default: the cell's ``lr`` for every stage)."""
HEAD_SETTINGS = ("head_init",)
"""How a cell's classification head starts, in its configuration only when set: ``head_init: probe`` fits it as a
linear probe on the cell's training rows before the method attaches (:func:`controltune.probe.init_head`; a
control-designed method then designs through the fitted head), ``random`` (the default) keeps the seeded head."""
SPEC_KEYS = ("grid", "per_method", "overrides", "exclude", "train", "out", "name")


@dataclass
class SweepSpec:
    """A parsed spec: the grid, per-method overrides, shared settings and the JSONL path (None: caller decides)."""

    grid: dict[str, list[Any]]
    per_method: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    name: str = "sweep"
    overrides: list[tuple[dict[str, Any], dict[str, list[Any]]]] = field(default_factory=list)
    """``(where, axes)`` pairs: a cell whose values equal every ``where`` entry takes ``axes``."""
    exclude: list[dict[str, Any]] = field(default_factory=list)
    """Mappings ``{axis: value}``: a cell (overrides applied) whose values equal every entry of one is dropped."""


# --- the spec -------------------------------------------------------------------------------
def _axes() -> tuple[str, ...]:
    return CELL_AXES + TRAIN_SETTINGS + OPTIONAL_SETTINGS + STAGE_SETTINGS + HEAD_SETTINGS + tuple(RUN_SETTINGS)


def _values(axis: str, value: Any, where: str) -> list[Any]:
    """An axis as a list: one value (an ``options`` dict, or any scalar) becomes a list of one."""
    if axis not in _axes():
        raise ValueError(f"{where}: unknown axis {axis!r}; accepted: {', '.join(_axes())}")
    if axis == "options":
        values = [value] if isinstance(value, dict) or value is None else value
        if not isinstance(values, list) or not all(isinstance(v, dict) or v is None for v in values):
            raise ValueError(f"{where}: options must be a dict of controller options or a list of such dicts")
        values = [v or {} for v in values]
    else:
        values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{where}: axis {axis!r} has no values")
    return values


def parse_spec(data: Any, source: str = "spec", folder: Path | None = None) -> SweepSpec:
    """A :class:`SweepSpec` from the loaded YAML/JSON mapping; ``out`` is taken relative to ``folder``.

    Raises:
        ValueError: naming what is wrong (unknown keys or axes, an empty axis, no method, task or lr).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a sweep spec is a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; accepted: {', '.join(SPEC_KEYS)}")
    grid_in = data.get("grid") or {}
    if not isinstance(grid_in, dict):
        raise ValueError(f"{source}: grid must map axes to values")
    grid = {axis: _values(axis, v, f"{source}: grid") for axis, v in grid_in.items()}
    per_method: dict[str, dict[str, list[Any]]] = {}
    for method, axes in (data.get("per_method") or {}).items():
        if not isinstance(axes, dict) or "method" in axes:
            raise ValueError(f"{source}: per_method.{method} must map axes (not method) to values")
        per_method[str(method)] = {a: _values(a, v, f"{source}: per_method.{method}") for a, v in axes.items()}
    train_in = data.get("train") or {}
    if not isinstance(train_in, dict):
        raise ValueError(f"{source}: train must map settings to values")
    settings = TRAIN_SETTINGS + OPTIONAL_SETTINGS + STAGE_SETTINGS + HEAD_SETTINGS + tuple(RUN_SETTINGS)
    for key in train_in:
        if key not in settings:
            raise ValueError(f"{source}: unknown train setting {key!r}; accepted: {', '.join(settings)}")
    for needed in ("method", "task"):
        if needed not in grid:
            raise ValueError(f"{source}: the grid needs a {needed!r} axis")
    overrides = _parse_overrides(data.get("overrides"), source)
    exclude = _parse_exclude(data.get("exclude"), source)
    lr_given = "lr" in grid or "lr" in train_in or any("lr" in axes for _, axes in overrides)
    if not lr_given and not all("lr" in per_method.get(m, {}) for m in grid["method"]):
        raise ValueError(f"{source}: give lr in the grid (or per method for every method, or in overrides)")
    out = data.get("out")
    out_path = None if out is None else (folder / out if folder is not None and not Path(out).is_absolute()
                                          else Path(out))
    return SweepSpec(grid=grid, per_method=per_method, train=dict(train_in), out=out_path,
                     name=str(data.get("name", "sweep")), overrides=overrides, exclude=exclude)


def _parse_overrides(entries: Any, source: str) -> list[tuple[dict[str, Any], dict[str, list[Any]]]]:
    """``overrides``: a list of ``{where: {axis: value}, set: {axis: values}}`` as ``(where, axes)`` pairs."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{source}: overrides must be a list of {{where: ..., set: ...}} entries")
    parsed = []
    for i, entry in enumerate(entries):
        where_text = f"{source}: overrides[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"where", "set"}:
            raise ValueError(f"{where_text} must have exactly the keys 'where' and 'set'")
        where, axes = entry["where"], entry["set"]
        if not isinstance(where, dict) or not where or not isinstance(axes, dict) or not axes:
            raise ValueError(f"{where_text}: 'where' and 'set' must map axes to values")
        for axis in where:
            if axis not in _axes():
                raise ValueError(f"{where_text}: unknown axis {axis!r} in where; accepted: {', '.join(_axes())}")
        if "method" in axes or "task" in axes:
            raise ValueError(f"{where_text}: set may not change the method or the task")
        parsed.append((dict(where), {a: _values(a, v, where_text) for a, v in axes.items()}))
    return parsed


def _parse_exclude(entries: Any, source: str) -> list[dict[str, Any]]:
    """``exclude``: a list of non-empty mappings ``{axis: value}``."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{source}: exclude must be a list of {{axis: value}} mappings")
    for i, where in enumerate(entries):
        if not isinstance(where, dict) or not where:
            raise ValueError(f"{source}: exclude[{i}] must map axes to values")
        for axis in where:
            if axis not in _axes():
                raise ValueError(f"{source}: exclude[{i}]: unknown axis {axis!r}; accepted: {', '.join(_axes())}")
    return [dict(w) for w in entries]


def load_spec(path: str | Path) -> SweepSpec:
    """Read a spec from a ``.yaml``/``.yml`` or ``.json`` file (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: another suffix, unparsable text, or an invalid spec.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from err
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ValueError("YAML specs need PyYAML: pip install 'controltune[sweep]' (or write the spec as JSON)"
                             ) from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML ({err})") from err
    else:
        raise ValueError(f"sweep spec {path}: expected a .yaml, .yml or .json file")
    return parse_spec(data, str(path), path.parent)


# --- cells ----------------------------------------------------------------------------------
def _defaults() -> dict[str, Any]:
    """Every setting of a cell the spec does not give (the optional settings are left out)."""
    base = TrainConfig()
    return {**{k: getattr(base, k) for k in TRAIN_SETTINGS}, **RUN_SETTINGS, "model": "minilm", "options": {},
            "seed": 0}


def expand(spec: SweepSpec, defaults: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every cell of the grid, each a full configuration (unset settings take their defaults).

    ``defaults`` override the built-in defaults (e.g. ``dtype`` from the command line);
    the spec's ``train`` settings override both; grid and per-method axes override those.
    """
    base = {**_defaults(), **(defaults or {}), **spec.train}
    cells, seen = [], set()
    for method in spec.grid["method"]:
        axes = {**spec.grid, **spec.per_method.get(method, {}), "method": [method]}
        for cell in _product(base, axes):
            for overridden in _apply_overrides(cell, spec.overrides):
                if any(_matches(overridden, where) for where in spec.exclude):
                    continue
                if overridden.get("lr") is None:
                    raise ValueError(f"cell {overridden['method']} on {overridden['task']} has no lr")
                key = canonical_config(overridden)
                if key not in seen:  # a value listed twice (or overridden alike) is one cell
                    seen.add(key)
                    cells.append(overridden)
    order = {m: i for i, m in enumerate(spec.grid["method"])}
    return sorted(cells, key=lambda c: (str(c["model"]), str(c["task"]), order[c["method"]]))


def _product(base: dict[str, Any], axes: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """``base`` with every combination of the axes' values (cell axes first, in their order)."""
    names = [a for a in CELL_AXES if a in axes] + sorted(a for a in axes if a not in CELL_AXES)
    for values in itertools.product(*(axes[a] for a in names)):
        yield {**base, **dict(zip(names, values))}


def _matches(cell: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(canonical_config({"v": cell.get(k)}) == canonical_config({"v": v}) for k, v in where.items())


def _apply_overrides(cell: dict[str, Any], overrides: list[tuple[dict[str, Any], dict[str, list[Any]]]]
                     ) -> list[dict[str, Any]]:
    """The cells ``cell`` becomes under the overrides, each applied in turn (a list of values multiplies)."""
    cells = [cell]
    for where, axes in overrides:
        cells = [new for c in cells for new in (_product(c, axes) if _matches(c, where) else [c])]
    return cells


def canonical_config(config: dict[str, Any]) -> str:
    """The configuration as canonical JSON (sorted keys): equal for equal configurations."""
    return json.dumps(json.loads(to_strict_json(config)), sort_keys=True)


def cell_id(config: dict[str, Any]) -> str:
    """A short sha256 of the configuration (names the cell's run folder)."""
    return hashlib.sha256(canonical_config(config).encode()).hexdigest()[:12]


def describe(config: dict[str, Any], varying: Iterable[str]) -> str:
    """``lora task=sst2 seed=0 lr=0.001``: the method and the settings that vary across the sweep."""
    parts = [str(config["method"])]
    for key in varying:
        if key != "method":
            value = config[key]
            parts.append(f"{key}={json.dumps(value, sort_keys=True) if isinstance(value, dict) else value}")
    return " ".join(parts)


def varying_keys(cells: list[dict[str, Any]]) -> list[str]:
    """Configuration keys whose value differs between cells (grid axes first, ``options`` last)."""
    keys = sorted(cells[0], key=lambda k: (k == "options", k not in CELL_AXES)) if cells else []
    return [k for k in keys if len({canonical_config({"v": c[k]}) for c in cells}) > 1]
