"""The ``controltune`` console script.

Each sub-command lives in ``controltune/commands/<name>.py`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; every command gets the common
options ``--device``, ``--dtype``, ``--seed``, ``--json`` and ``--debug``.

A bad input (unknown model, task, method or option, a missing file, a device the
machine lacks, ...) ends the command with exit status 2 and one line on stderr,
``controltune <command>: error: <what was wrong and what is accepted>``, instead of
a traceback; ``--debug`` (before or after the command name) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
    FileExistsError,
)
"""Exceptions that mean a bad input, not a bug: every package error type (UnknownModelError,
DataError, UnsupportedMethodError, CheckpointMismatchError, ...) is a ValueError subclass."""

COMMANDS = {
    "models": "list the model zoo (family, layers, width, parameters)",
    "rollout": "run a batch through the residual-stream system and check it against HF",
    "methods": "list every registered controller and where it acts on a model",
    "train": "train a delta method on a task",
    "sweep": "run a grid of training runs (on Ray), one JSONL row per cell, resumable",
    "verify": "check the PMP co-states and Hamiltonian gradients against autograd and finite differences",
    "msa": "train with the method of successive approximations (E-MSA)",
    "bound": "Lipschitz bounds and the error of low-dimensional delta approximations",
    "subspace": "a unified optimisation subspace of several delta methods: approximate, optimize, transfer, landscape",
    "recommend": "LoRA targets, ranks and initial weights from the co-state, written as a peft adapter folder",
    "figures": "rebuild the paper's theory figures (pdf, png, caption) from the committed results",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    # SUPPRESS: an unset sub-command flag must not overwrite `controltune --debug <command>`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controltune",
        description="Optimal-control theory of delta tuning of pretrained Transformers: residual-stream "
                    "systems, delta controllers, Pontryagin co-states, Lipschitz bounds.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
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
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            from .zoo import check_device

            check_device(args.device)  # before any data or model is loaded
        return int(args._run(args) or 0)
    except INPUT_ERRORS as err:
        if args.debug:
            raise
        print(f"controltune {args.command}: error: {error_message(err)}", file=sys.stderr)
        return 2


def error_message(err: BaseException) -> str:
    """One line saying what went wrong.

    A KeyError's ``str`` is the repr of its argument (``"'x'"``), so its argument is used
    as is; an OSError without a package message gets its file name; newlines are folded.
    """
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    elif isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
