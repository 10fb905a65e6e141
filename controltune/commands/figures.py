"""``controltune figures``: rebuild the paper's theory figures from the committed results.

Every figure registered in :mod:`controltune.figures` is drawn from its result files
(``--results``, default ``experiments/results``) and written as ``<name>.pdf``,
``<name>.png`` and ``<name>.caption.md`` into ``--out`` (default ``paper_figs``); this
takes seconds.  A figure whose sources are missing is reported (with the command that
writes them) and the others are still built; the exit status is then 1.

``--recompute`` first reruns the experiments that write the selected figures' sources
(minutes to hours: see each experiment script's docstring), from the current directory,
which must be the repository root.  Examples::

    controltune figures --list
    controltune figures --only pmp_agreement msa_toy
    controltune figures --recompute --only msa_toy
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from ..results import stamp, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="experiments/results", help="folder of the result files the figures read")
    parser.add_argument("--out", default="paper_figs", help="folder the figures are written to")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these figures (see --list)")
    parser.add_argument("--list", action="store_true", help="list the figures, their titles and sources, and exit")
    parser.add_argument("--recompute", action="store_true",
                        help="first rerun the commands that write the selected figures' sources (slow)")


def select(names: list[str] | None, available: dict) -> list[str]:
    """The figure names to build: all of them, or ``names`` checked against the registry."""
    if not names:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; accepted: {', '.join(sorted(available))}")
    return list(dict.fromkeys(names))  # keep the order given, drop repeats


def resolve_command(argv: tuple[str, ...]) -> list[str]:
    """``argv`` runnable from this interpreter: ``python`` is this Python, ``controltune`` this package's CLI.

    The recompute commands are written for a shell with the project's environment active;
    here they run under the interpreter running this command, whether or not its ``bin``
    folder is on ``PATH``.
    """
    head, *rest = argv
    if head == "python":
        return [sys.executable, *rest]
    if head == "controltune" and shutil.which("controltune") is None:
        return [sys.executable, "-m", "controltune.cli", *rest]
    return list(argv)


def recompute(specs: list, runner=subprocess.run) -> int:
    """Run every (distinct) recompute command of ``specs`` in order; the exit status of the first failure, else 0."""
    from ..figures import command_line

    done: set[tuple[str, ...]] = set()
    for spec in specs:
        for argv in spec.recompute:
            if argv in done:
                continue  # two figures from one experiment: run it once
            done.add(argv)
            print(f"[{spec.name}] $ {command_line(argv)}", flush=True)
            result = runner(resolve_command(argv), check=False)
            if result.returncode != 0:
                print(f"controltune figures: error: the recompute command for figure {spec.name!r} failed with "
                      f"exit status {result.returncode}: {command_line(argv)}", file=sys.stderr)
                return result.returncode
    return 0


def run(args: argparse.Namespace) -> int:
    from ..figures import registry, render

    figures = registry()
    names = select(args.only, figures)
    if args.list:
        for name in names:
            spec = figures[name]
            print(f"{name:<24} {spec.title}\n{'':<24} sources: {', '.join(spec.sources)}")
        return 0
    specs = [figures[n] for n in names]
    if args.recompute and (status := recompute(specs)) != 0:
        return status
    written, missing = [], []
    for spec in specs:
        try:
            paths = render(spec, Path(args.results), Path(args.out))
        except FileNotFoundError as err:  # build the others, then report every missing source at once
            missing.append(spec.name)
            print(f"controltune figures: {spec.name}: not built: {err}", file=sys.stderr, flush=True)
            continue
        written.append({"name": spec.name, "files": [str(p) for p in paths], "sources": list(spec.sources)})
        print(f"{spec.name:<24} -> {', '.join(str(p) for p in paths)}", flush=True)
    if args.json:
        config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json(args.json, {**stamp(config), "figures": written, "missing_sources": missing})
    if missing:
        print(f"controltune figures: {len(written)} built, {len(missing)} not built for missing sources: "
              f"{', '.join(missing)}", file=sys.stderr)
        return 1
    return 0
