"""``controltune figures``: rebuild the project's figures from the committed results.

The figures are plain Python scripts (see :mod:`controltune.figures`) in the project's
``paper_figs/figures/`` folder, found from the current directory or one of its parents, or
in the folder given with ``--source``.  Every figure they register is drawn from its result
files (``--results``, default ``experiments/results``) and written as ``<name>.pdf``,
``<name>.png`` and ``<name>.caption.md`` into ``--out`` (default ``paper_figs``); this takes
seconds.  When the scripts are found in a parent folder, the command runs from that project
root (relative ``--results``, ``--out`` and ``--json`` still mean the current directory).  A
figure whose sources are missing is reported (with the command that writes them) and the
others are still built; the exit status is then 1.

``--recompute`` first reruns the commands each selected figure script registers as writing
its sources (minutes to hours: see each experiment script's docstring), from the project root
(the current directory with ``--source``).  Drawing needs matplotlib: install
``controltune[figures]``.  Examples::

    controltune figures --list
    controltune figures --only pmp_agreement msa_toy
    controltune figures --recompute --only msa_toy
    controltune figures --source my_figs --results my_results --out my_out
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..results import stamp, write_json

if TYPE_CHECKING:
    from collections.abc import Callable

SCRIPTS = Path("paper_figs") / "figures"
"""Where a project keeps its figure scripts, relative to its root."""
RESULTS = "experiments/results"
OUT = "paper_figs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=None, metavar="DIR",
                        help=f"folder of the figure scripts (default: {SCRIPTS}/ in the current directory or a parent)")
    parser.add_argument("--results", default=None, help=f"folder of the result files the figures read "
                                                        f"(default: {RESULTS})")
    parser.add_argument("--out", default=None, help=f"folder the figures are written to (default: {OUT})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these figures (see --list)")
    parser.add_argument("--list", action="store_true", help="list the figures, their titles and sources, and exit")
    parser.add_argument("--recompute", action="store_true",
                        help="first rerun the commands that write the selected figures' sources (slow)")


def find_scripts(source: str | None, start: Path | None = None) -> tuple[Path, Path | None]:
    """The figure-scripts folder and the project root it belongs to (``None`` for ``--source``).

    Raises:
        ValueError: ``source`` is not a folder, or no ``paper_figs/figures/`` is in ``start``
            (default: the current directory) or any of its parents.
    """
    if source is not None:
        if not Path(source).is_dir():
            raise ValueError(f"--source {source}: no such folder of figure scripts")
        return Path(source), None
    start = (start or Path.cwd()).resolve()
    for root in (start, *start.parents):
        if (root / SCRIPTS).is_dir():
            return root / SCRIPTS, root
    raise ValueError(f"no figure scripts: looked for {SCRIPTS}/ in {start} and its parents; run inside the "
                     "project or pass --source DIR")


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


def recompute(specs: list, runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """Run every (distinct) recompute command of ``specs`` in order; the exit status of the first failure, else 0.

    The commands are those the figure scripts register (``FigureSpec.recompute``); they run
    from the current directory.
    """
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


def _paths_from_here(args: argparse.Namespace, root: Path | None) -> None:
    """Fill the defaults of ``--results``/``--out`` and, when running from another ``root``, make given paths absolute.

    The defaults are relative to the project root; paths the user typed are relative to the
    current directory, so they are anchored here before the command moves to the root.
    """
    moving = root is not None and root != Path.cwd().resolve()
    for key, default in (("results", RESULTS), ("out", OUT), ("json", None)):
        value = getattr(args, key, None)
        if value is None:
            setattr(args, key, default)
        elif moving:
            setattr(args, key, str(Path(value).resolve()))


@contextlib.contextmanager
def _working_directory(path: Path | None) -> Iterator[None]:
    """Run the body in ``path`` (the project root), then come back; ``None`` stays where we are."""
    here = Path.cwd()
    if path is not None and path != here.resolve():
        print(f"controltune figures: working in the project root {path}", file=sys.stderr, flush=True)
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(here)


def _registry(folder: Path) -> dict:
    """The figures of ``folder``; a missing matplotlib becomes one clear input error."""
    from ..figures import registry, require_matplotlib

    try:
        require_matplotlib()
    except ImportError as err:
        raise ValueError(str(err)) from None
    return registry(folder)


def run(args: argparse.Namespace) -> int:
    folder, root = find_scripts(args.source)
    _paths_from_here(args, root)
    figures = _registry(folder.resolve())
    names = select(args.only, figures)
    if args.list:
        for name in names:
            spec = figures[name]
            print(f"{name:<24} {spec.title}\n{'':<24} sources: {', '.join(spec.sources)}")
        return 0
    with _working_directory(root):
        return _build([figures[n] for n in names], args)


def _build(specs: list, args: argparse.Namespace) -> int:
    """Recompute (when asked), render every spec, write ``--json``; the exit status."""
    from ..figures import render

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
