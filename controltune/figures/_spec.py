"""The record every theory figure registers (see ``controltune.figures``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the paper, rebuilt from committed results.

    Attributes:
        name: file stem; the figure is written as ``<out>/<name>.pdf``, ``<name>.png`` and
            ``<name>.caption.md``.
        title: one line saying what the figure shows.
        sources: result files (relative to the results folder, normally
            ``experiments/results``) the figure reads; a missing source is an error that names
            the ``recompute`` command.
        draw: ``results_dir -> Figure``; must only read ``sources`` (fast: seconds).
        caption: ``results_dir -> markdown``: what was run (model, data, sizes, seeds), what is
            plotted, and the exact commands that produced the sources.
        recompute: commands (argv lists, run from the repository root) that regenerate the
            sources at the documented size.
    """

    name: str
    title: str
    sources: tuple[str, ...]
    draw: Callable[[Path], Figure]
    caption: Callable[[Path], str]
    recompute: tuple[tuple[str, ...], ...] = ()
