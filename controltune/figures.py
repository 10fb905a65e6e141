"""Figures rebuilt from result files: the record, the house style, discovery of figure scripts, rendering.

The figures themselves live outside the library, as plain Python scripts in a folder (the
project keeps its paper's figures in ``paper_figs/figures/``).  Every script of that folder
whose name does not start with ``_`` and that defines a module-level
``FIGURES: list[FigureSpec]`` contributes its figures; a script names the result files it
reads (``sources``) and the commands that rewrite them (``recompute``), the library names
none.  Scripts of one folder are imported as one package, so they may share helpers with a
relative import (``from ._common import load_json``).

:func:`registry` collects the figures of a folder (a name registered twice is an error) and
:func:`render` writes one figure as ``<out>/<name>.pdf``, ``<name>.png`` and
``<name>.caption.md``::

    from controltune.figures import registry, render
    for spec in registry("paper_figs/figures").values():
        render(spec, "experiments/results", "paper_figs")

Drawing needs matplotlib, an optional extra (``pip install 'controltune[figures]'``); this
module imports it only inside the functions that draw.  The command line is
``controltune figures`` (``--list``, ``--only``, ``--recompute``, ``--source``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_DPI = 150
EXTRA_HINT = "install controltune[figures] (pip install 'controltune[figures]') to draw figures"

STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.grid": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # embed TrueType: the PDF text stays editable and searchable
}
"""rcParams every figure is drawn and saved under (see :func:`render`)."""


@dataclass(frozen=True)
class FigureSpec:
    """One figure, rebuilt from result files.

    Attributes:
        name: file stem; the figure is written as ``<out>/<name>.pdf``, ``<name>.png`` and
            ``<name>.caption.md``.
        title: one line saying what the figure shows.
        sources: result files (relative to the results folder) the figure reads; a missing
            source is an error that names the ``recompute`` commands.
        draw: ``results_dir -> Figure``; must only read ``sources`` (fast: seconds).
        caption: ``results_dir -> markdown``: what was run (model, data, sizes, seeds), what is
            plotted, and the exact commands that produced the sources.
        recompute: commands (argv lists, run from the project root) that regenerate the
            sources at the documented size.
    """

    name: str
    title: str
    sources: tuple[str, ...]
    draw: Callable[[Path], Figure]
    caption: Callable[[Path], str]
    recompute: tuple[tuple[str, ...], ...] = ()


def require_matplotlib() -> ModuleType:
    """matplotlib, switched to the file-only Agg backend.

    Raises:
        ImportError: matplotlib is not installed; the message says which extra to install.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"matplotlib is not installed: {EXTRA_HINT}") from err
    matplotlib.use("Agg")  # figures are files: never open a window, identical output on every machine
    return matplotlib


def new_figure(width: float, height: float) -> Figure:
    """A bare Agg figure (no pyplot state) of ``width × height`` inches, constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


# --- figure scripts ------------------------------------------------------------------------------------
def _package_name(folder: Path) -> str:
    """A module name, unique per folder, under which the scripts of ``folder`` are imported."""
    return "_figure_scripts_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]


def _script_package(folder: Path) -> str:
    """Register ``folder`` as a package (once) and return its module name."""
    name = _package_name(folder)
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return name


def script_names(folder: str | Path) -> list[str]:
    """The stems of the public (non-underscore) ``*.py`` scripts of ``folder``, sorted."""
    return sorted(p.stem for p in Path(folder).glob("*.py") if not p.stem.startswith("_"))


def load_scripts(folder: str | Path) -> dict[str, ModuleType]:
    """``stem -> module`` for every public script of ``folder``, imported as one package.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
        ImportError: matplotlib is missing (see :func:`require_matplotlib`).
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise NotADirectoryError(f"figure scripts folder {folder} does not exist")
    require_matplotlib()
    package = _script_package(folder)
    return {stem: importlib.import_module(f"{package}.{stem}") for stem in script_names(folder)}


def _figures_of(module: ModuleType) -> list[FigureSpec]:
    """The ``FIGURES`` of one script (empty for a helper without figures), type-checked."""
    figures = getattr(module, "FIGURES", None)
    if figures is None:
        return []
    if not isinstance(figures, (list, tuple)) or not all(isinstance(f, FigureSpec) for f in figures):
        raise TypeError(f"{_script(module)}: FIGURES must be a list of FigureSpec, got {figures!r:.120}")
    return list(figures)


def _script(module: ModuleType) -> str:
    """The file name of a figure script, for messages."""
    return Path(module.__file__ or module.__name__).name


def registry(folder: str | Path) -> dict[str, FigureSpec]:
    """``name -> FigureSpec`` for every figure registered by a script of ``folder``.

    Raises:
        TypeError: a script's ``FIGURES`` is not a list of :class:`FigureSpec`.
        ValueError: two figures (in one script or in two) share a name.
    """
    found: dict[str, FigureSpec] = {}
    origin: dict[str, str] = {}
    for module in load_scripts(folder).values():
        for spec in _figures_of(module):
            if spec.name in found:
                raise ValueError(f"figure name {spec.name!r} is registered twice: by {origin[spec.name]} and by "
                                 f"{_script(module)}; figure names must be unique")
            found[spec.name] = spec
            origin[spec.name] = _script(module)
    return found


# --- rendering -----------------------------------------------------------------------------------------
def command_line(argv: tuple[str, ...] | list[str]) -> str:
    """An argv list as one shell-quoted line."""
    return shlex.join(list(argv))


def check_sources(spec: FigureSpec, results_dir: str | Path) -> list[Path]:
    """The paths of ``spec.sources`` under ``results_dir``.

    Raises:
        FileNotFoundError: a source is missing; the message names the file and the commands that write it.
    """
    results_dir = Path(results_dir)
    paths = [results_dir / s for s in spec.sources]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        how = "; ".join(command_line(c) for c in spec.recompute) or "(no recompute command registered)"
        raise FileNotFoundError(f"figure {spec.name!r} needs {', '.join(str(p) for p in missing)}, which does not "
                                f"exist; recompute it (from the repository root) with: {how}")
    return paths


def _created(path: Path) -> str | None:
    """The ``created`` stamp of a JSON result (see ``controltune.results.stamp``), if it has one."""
    if path.suffix != ".json":
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return payload.get("created") if isinstance(payload, dict) else None


def caption_markdown(spec: FigureSpec, results_dir: str | Path) -> str:
    """The caption file: title, the figure's caption, how to recompute, and the sources with their stamps."""
    results_dir = Path(results_dir)
    lines = [f"# {spec.title}", "", spec.caption(results_dir).strip(), "", "## Recompute the sources", ""]
    if spec.recompute:
        lines += ["From the repository root (or `controltune figures --recompute --only "
                  f"{spec.name}`):", "", "```"] + [command_line(c) for c in spec.recompute] + ["```"]
    else:
        lines.append("No recompute command is registered.")
    lines += ["", "## Sources", ""]
    for source in spec.sources:
        created = _created(results_dir / source)
        lines.append(f"- `{results_dir / source}`" + (f" (created {created})" if created else ""))
    return "\n".join(lines) + "\n"


def render(spec: FigureSpec, results_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw ``spec`` from ``results_dir`` and write ``<out_dir>/<name>.{pdf,png,caption.md}``.

    Returns:
        the three paths written, in the order pdf, png, caption.
    Raises:
        FileNotFoundError: a source is missing (see :func:`check_sources`).
        ImportError: matplotlib is missing (see :func:`require_matplotlib`).
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    check_sources(spec, results_dir)
    matplotlib = require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{spec.name}.pdf", out_dir / f"{spec.name}.png"]
    with matplotlib.rc_context(STYLE), _quiet_font_subsetting():
        fig = spec.draw(results_dir)
        # Fixed metadata so that rebuilding unchanged results gives byte-identical files (clean git diffs).
        fig.savefig(paths[0], metadata={"CreationDate": None, "ModDate": None})
        fig.savefig(paths[1], dpi=PNG_DPI, metadata={"Software": None})
    _close(fig)
    caption = out_dir / f"{spec.name}.caption.md"
    caption.write_text(caption_markdown(spec, results_dir))
    return [*paths, caption]


@contextlib.contextmanager
def _quiet_font_subsetting() -> Iterator[None]:
    """Silence fontTools' warning about the zeroed font timestamps of reproducible PDFs (harmless, every save)."""
    logger = logging.getLogger("fontTools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _close(fig: Figure) -> None:
    """Release a figure drawn through pyplot (a no-op for a bare ``Figure``)."""
    import matplotlib.pyplot as plt

    plt.close(fig)


__all__ = ["EXTRA_HINT", "STYLE", "FigureSpec", "caption_markdown", "check_sources", "command_line", "load_scripts",
           "new_figure", "registry", "render", "require_matplotlib", "script_names"]
