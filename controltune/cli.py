"""The ``controltune`` console script.

Each sub-command lives in ``controltune/commands/<name>.py`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; every command gets the common
options ``--device``, ``--dtype``, ``--seed`` and ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "models": "list the model zoo (family, layers, width, parameters)",
    "rollout": "run a batch through the residual-stream system and check it against HF",
    "methods": "list every registered controller and where it acts on a model",
    "train": "train a delta method on a task",
    "verify": "check the PMP co-states and Hamiltonian gradients against autograd and finite differences",
    "msa": "train with the method of successive approximations (E-MSA)",
    "bound": "Lipschitz bounds and the error of low-dimensional delta approximations",
    "figures": "rebuild the paper's theory figures (pdf, png, caption) from the committed results",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controltune",
        description="Optimal-control theory of delta tuning of pretrained Transformers: residual-stream "
                    "systems, delta controllers, Pontryagin co-states, Lipschitz bounds.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"controltune.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"controltune.commands.{name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import controltune  # noqa: F401  (sets the offline switches first)

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"controltune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
