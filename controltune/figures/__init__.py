"""The theory figures of the paper, each rebuilt in seconds from committed results.

Every module of this package whose name does not start with ``_`` and that defines a
module-level ``FIGURES: list[FigureSpec]`` contributes its figures; :func:`registry`
collects them (a name registered twice is an error) and :func:`render` writes one
figure as ``<out>/<name>.pdf``, ``<name>.png`` and ``<name>.caption.md``.

    from controltune.figures import registry, render
    for spec in registry().values():
        render(spec, "experiments/results", "paper_figs")

The command line is ``controltune figures`` (``--list``, ``--only``, ``--recompute``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import pkgutil
import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files: never open a window, identical output on every machine

from ._spec import FigureSpec  # noqa: E402
from ._style import STYLE  # noqa: E402

PNG_DPI = 150


def _figure_modules() -> list[str]:
    """Names of the public (non-underscore) modules of this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def registry() -> dict[str, FigureSpec]:
    """``name -> FigureSpec`` for every figure registered by a module of this package.

    Raises:
        TypeError: a module's ``FIGURES`` is not a list of :class:`FigureSpec`.
        ValueError: two figures (in one module or in two) share a name.
    """
    found: dict[str, FigureSpec] = {}
    origin: dict[str, str] = {}
    for module_name in _figure_modules():
        module = importlib.import_module(f"{__name__}.{module_name}")
        figures = getattr(module, "FIGURES", None)
        if figures is None:
            continue  # a helper module without figures
        if not isinstance(figures, (list, tuple)) or not all(isinstance(f, FigureSpec) for f in figures):
            raise TypeError(f"{module.__name__}.FIGURES must be a list of FigureSpec, got {figures!r:.120}")
        for spec in figures:
            if spec.name in found:
                raise ValueError(f"figure name {spec.name!r} is registered twice: by {origin[spec.name]} and by "
                                 f"{module.__name__}; figure names must be unique")
            found[spec.name] = spec
            origin[spec.name] = module.__name__
    return found


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
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    check_sources(spec, results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / spec.name
    paths = [stem.with_name(f"{spec.name}.pdf"), stem.with_name(f"{spec.name}.png")]
    with matplotlib.rc_context(STYLE), _quiet_font_subsetting():
        fig = spec.draw(results_dir)
        # Fixed metadata so that rebuilding unchanged results gives byte-identical files (clean git diffs).
        fig.savefig(paths[0], metadata={"CreationDate": None, "ModDate": None})
        fig.savefig(paths[1], dpi=PNG_DPI, metadata={"Software": None})
    _close(fig)
    caption = stem.with_name(f"{spec.name}.caption.md")
    caption.write_text(caption_markdown(spec, results_dir))
    return [*paths, caption]


@contextlib.contextmanager
def _quiet_font_subsetting():
    """Silence fontTools' warning about the zeroed font timestamps of reproducible PDFs (harmless, every save)."""
    logger = logging.getLogger("fontTools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _close(fig) -> None:
    """Release a figure drawn through pyplot (a no-op for a bare ``Figure``)."""
    import matplotlib.pyplot as plt

    plt.close(fig)


__all__ = ["FigureSpec", "caption_markdown", "check_sources", "command_line", "registry", "render"]
