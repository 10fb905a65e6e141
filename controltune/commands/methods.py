"""``controltune methods``: every registered controller, built on a fresh copy of a model.

For each method: its group, where it acts (layers and modules), its control
form (the one-line G), the kinds of its controls, its trainable-parameter count
and that count as a fraction of the base model's parameters (the classification
head, common to all methods, is not counted).  A method that refuses the model
is listed with its reason.
"""

from __future__ import annotations

import argparse
import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..zoo import LoadedModel

EXAMPLE_OPTIONS: dict[str, dict[str, Any]] = {
    "combination": {"parts": [["lora", {}], ["bitfit", {}]]},
    "sequential": {"stages": [["bitfit", {}], ["lora", {}]]},
}
"""Options for methods that have no sensible default (a combination needs parts)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm, random:<family> or a checkpoint folder")
    parser.add_argument("--method", action="append", default=None, help="only these methods (repeatable)")


def describe_all(loaded: LoadedModel, methods: list[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One row per method: ``describe()`` of the controller on a fresh system, or the refusal reason."""
    from ..controllers import REGISTRY, UnsupportedMethodError
    from ..fingerprint import n_base_parameters
    from ..system import ResidualSystem

    names = methods or sorted(REGISTRY, key=lambda m: (REGISTRY[m].group, m))
    unknown = [m for m in names if m not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown method(s) {unknown}; registered: {', '.join(sorted(REGISTRY))}")
    rows = []
    for name in names:
        cls = REGISTRY[name]
        row: dict[str, Any] = {"method": name, "group": cls.group, "form": cls.form}
        system = ResidualSystem(copy.deepcopy(loaded), seed=seed)
        n_base = n_base_parameters(system)
        try:
            controller = system.add(cls(**EXAMPLE_OPTIONS.get(name, {})))
        except (UnsupportedMethodError, TypeError, ValueError, RuntimeError) as err:
            row.update(supported=False, reason=f"{type(err).__name__}: {err}")
            rows.append(row)
            continue
        info = controller.describe()
        row.update(info, supported=True, options=EXAMPLE_OPTIONS.get(name, {}), n_base_params=n_base,
                   fraction=info["n_trainable"] / n_base)
        row.pop("parts", None), row.pop("stages", None)
        rows.append(row)
    return rows


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def run(args: argparse.Namespace) -> int:
    from ..results import stamp, write_json
    from ..zoo import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    rows = describe_all(loaded, args.method, args.seed)
    print(f"{'method':<20} {'group':<19} {'layers':<8} {'kinds':<18} {'trainable':>11} {'fraction':>9}  modules")
    for r in rows:
        if not r["supported"]:
            print(f"{r['method']:<20} {r['group']:<19} refused: {r['reason']}")
            continue
        print(f"{r['method']:<20} {r['group']:<19} {_layers(r['layers']):<8} {','.join(r['kinds']):<18} "
              f"{r['n_trainable']:>11,} {100 * r['fraction']:>8.3f}%  {','.join(r['modules']) or '-'}")
    if args.json:
        write_json(args.json, {**stamp({"model": args.model, "dtype": args.dtype, "seed": args.seed}),
                               "methods": rows})
    return 0
