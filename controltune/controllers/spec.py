"""Method specifications from text: ``--method a+b`` and ``--opt key=value`` into a registry name and options.

One place for the command line (``controltune train``, ``msa``) and for sweeps: ``a+b``
becomes a ``combination`` whose part options are written ``a.key``; a controller that takes
a ``seed`` gets the run's seed unless one is given; every option is checked against the
controller's constructor (the message lists what it accepts).
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any

from .base import REGISTRY, canonical, check_options

if TYPE_CHECKING:
    from ..system import ResidualSystem
    from .base import Controller


def parse_value(text: str) -> Any:
    """``8`` -> 8, ``0.5`` -> 0.5, ``true`` -> True, ``none`` -> None, ``q,v`` -> ["q", "v"], JSON as JSON."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if text.startswith(("[", "{")):  # not text[:1] in "[{": that is True for ""
        return json.loads(text)
    if "," in text:
        return [parse_value(t) for t in text.split(",") if t]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["rank=8", "targets=q,v"]`` -> ``{"rank": 8, "targets": ["q", "v"]}``.

    Raises:
        ValueError: an item that is not ``KEY=VALUE``, or a value starting with ``[``/``{``
            that is not valid JSON (the message names the item).
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--opt {item!r} is not KEY=VALUE (e.g. --opt rank=8 --opt targets=q,v)")
        try:
            out[key.strip()] = parse_value(value.strip())
        except json.JSONDecodeError as err:
            raise ValueError(f"--opt {item!r}: the value is not valid JSON ({err.msg} at column {err.colno}); "
                             "lists can also be written without brackets: targets=q,v") from err
    return out


def controller_spec(method: str, options: dict[str, Any], seed: int,
                    task: str | None = None) -> tuple[str, dict[str, Any]]:
    """Registry name and options for ``--method`` (``a+b`` becomes a ``combination``).

    A controller that takes a ``seed`` option gets the run's seed unless one is given; a
    control-designed one (it takes a ``task`` option: its design rows) gets the run's ``task``
    unless one is given, so it designs on the task it is trained on.
    """

    names = [canonical(m.strip()) for m in method.split("+")]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(sorted(REGISTRY))}")

    def seeded(name: str, opts: dict[str, Any]) -> dict[str, Any]:
        accepted = inspect.signature(REGISTRY[name]).parameters
        if "seed" in accepted and "seed" not in opts:
            opts = {**opts, "seed": seed}
        if task is not None and "task" in accepted and "task" not in opts:
            opts = {**opts, "task": task}
        return opts

    if len(names) == 1:
        check_options(names[0], options)
        return names[0], seeded(names[0], options)
    parts: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in options.items():
        part, dot, sub = key.partition(".")
        if not dot or part not in parts:
            raise ValueError(f"option {key!r}: with a combination, prefix each option with its part "
                             f"({', '.join(f'{n}.KEY' for n in names)})")
        parts[part][sub] = value
    for name, opts in parts.items():
        check_options(name, opts, where=f"{name}.")
    return "combination", {"parts": [[n, seeded(n, o)] for n, o in parts.items()]}


def build_spec(system: ResidualSystem, method: str, options: dict[str, Any], seed: int, task: str | None = None
               ) -> Controller:
    """Attach ``method`` (a name or ``a+b``) with ``options`` to ``system``; returns the controller."""
    from .base import build

    name, opts = controller_spec(method, dict(options), seed, task)
    return build(name, system, **opts)


__all__ = ["build_spec", "controller_spec", "parse_options", "parse_value"]
