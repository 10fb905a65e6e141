"""Figure ``pmp_agreement``: the Pontryagin co-states and Hamiltonian gradients agree with autograd and FD.

Source: ``verify_minilm_{float64,float32}.json`` written by ``controltune verify`` (one row
per method with ``costate_autograd`` / ``costate_fd``: per-layer relative errors of
``p_l`` for l = 0..L, and ``control_autograd`` / ``control_fd``: per-control relative
errors of ``∇_u H``).  Controls are placed in columns by where they act: the layer
index in their name (``adapter.3.o.W_up`` → layer 3), the readout head (``head.*``) →
``term``, otherwise the method's ``init`` or ``shared`` kind; a column shows the largest
error of its controls.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm

from controltune.figures import FigureSpec, new_figure

from ._common import argv_from_config, load_json, sci, versions_line

DTYPES = ("float64", "float32")
SOURCES = tuple(f"verify_minilm_{d}.json" for d in DTYPES)
REFERENCES = (("autograd", "autograd"), ("fd", "finite differences"))
VERIFY_FLAGS = ("model", "methods", "dtype", "batch_size", "seq_len", "weight_decay", "perturb", "mode",
                "state_directions", "fd_steps", "no_fd", "seed", "device", "json")
NO_CONTROL_COLOUR = "#c8c8c8"


def control_column(name: str, kinds: list[str]) -> int | str:
    """Where control ``name`` acts: a layer index, ``"init"``, ``"shared"`` or ``"term"``.

    Args:
        name: the control's name (``<method>.<layer>.<site>...`` for per-layer controls).
        kinds: the control kinds of the method (``layer``, ``shared``, ``init``, ``term``).
    Raises:
        ValueError: the name carries no layer index and the method's kinds do not say where it acts.
    """
    parts = name.split(".")
    for part in parts:
        if part.isdigit():
            return int(part)
    if parts[0] == "head":
        return "term"  # the classification head: the readout's control
    if "init" in parts:
        return "init"
    candidates = set(kinds) - {"layer"}
    if len(candidates) > 1:
        candidates.discard("term")  # the head is the usual term control and was matched by name
    if len(candidates) == 1:
        return candidates.pop()
    raise ValueError(f"cannot tell where control {name!r} acts: no layer index in its name and its method has "
                     f"kinds {kinds} (expected exactly one of init, shared, term besides layer)")


def control_columns(n_layers: int) -> list[int | str]:
    """Columns of the control panels: ``init``, layers 0..L-1, ``shared``, ``term``."""
    return ["init", *range(n_layers), "shared", "term"]


def error_matrices(payload: dict[str, Any], reference: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(methods, costate errors M × (L+1), control errors M × (L+3))`` against ``reference``.

    ``reference`` is ``"autograd"`` or ``"fd"``.  A control column is the largest error of
    the method's controls that act there; NaN where a method has no control (or did not run).
    """
    rows = payload["results"]
    n_layers = max((r["n_layers"] for r in rows if "n_layers" in r), default=0)
    if n_layers == 0:
        raise ValueError("no method in the verify result ran (no row has n_layers)")
    columns = control_columns(n_layers)
    costate = np.full((len(rows), n_layers + 1), np.nan)
    control = np.full((len(rows), len(columns)), np.nan)
    for i, row in enumerate(rows):
        layers = row.get(f"costate_{reference}") or []
        costate[i, :len(layers)] = layers
        for name, err in (row.get(f"control_{reference}") or {}).items():
            j = columns.index(control_column(name, row.get("kinds", [])))
            control[i, j] = err if math.isnan(control[i, j]) else max(control[i, j], err)
    return [r["method"] for r in rows], costate, control


def _scale(values: list[np.ndarray], tolerances: list[float]) -> tuple[float, float]:
    """``(floor, top)`` of the log colour scale: a decade below the smallest non-zero error, above everything."""
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values])
    positive = finite[finite > 0]
    floor = min(1e-17, 10.0 ** (math.floor(math.log10(positive.min())) - 1)) if positive.size else 1e-17
    top = max([*tolerances, float(finite.max()) if finite.size else 0.0])
    return floor, 10.0 ** (math.floor(math.log10(top)) + 1)  # strictly above: the top tolerance line stays visible


def _label_column(c: int | str) -> str:
    return f"$u_{{{c}}}$" if isinstance(c, int) else c


def draw(results_dir: Path):
    """Methods × layers heat maps: rows = reference (autograd, FD), columns = dtype × (co-states, ∇_u H)."""
    payloads = {d: load_json(results_dir, s) for d, s in zip(DTYPES, SOURCES)}
    panels = {(d, ref): error_matrices(payloads[d], ref) for d in DTYPES for ref, _ in REFERENCES}
    tolerances = [r[k] for p in payloads.values() for r in p["results"] for k in ("tol_autograd", "tol_fd") if k in r]
    floor, top = _scale([m for _, c, u in panels.values() for m in (c, u)], tolerances)
    norm = LogNorm(vmin=floor, vmax=top)
    methods = panels[(DTYPES[0], "autograd")][0]
    n_layers = panels[(DTYPES[0], "autograd")][1].shape[1] - 1
    columns = control_columns(n_layers)

    fig = new_figure(15.5, 0.23 * len(methods) * 2 + 2.2)
    grid = fig.add_gridspec(2, 5, width_ratios=[n_layers + 1, len(columns), n_layers + 1, len(columns), 0.35])
    image = None
    for r, (ref, ref_label) in enumerate(REFERENCES):
        for d_index, dtype in enumerate(DTYPES):
            names, costate, control = panels[(dtype, ref)]
            if names != methods:
                raise ValueError(f"verify results for {DTYPES} list different methods; rerun both")
            for k, (matrix, xlabels, what) in enumerate((
                    (costate, [f"$p_{{{i}}}$" for i in range(n_layers + 1)], "co-states $p_l$"),
                    (control, [_label_column(c) for c in columns], r"$\nabla_u H$ (max per column)"))):
                ax = fig.add_subplot(grid[r, 2 * d_index + k])
                shown = np.where(np.isfinite(matrix), np.maximum(matrix, floor), np.nan)
                image = ax.imshow(np.ma.masked_invalid(shown), norm=norm, cmap=_cmap(), aspect="auto",
                                  interpolation="nearest")
                _annotate(ax, matrix, norm)
                ax.set_xticks(range(len(xlabels)), xlabels)
                ax.set_yticks(range(len(methods)), methods if k == 0 else [""] * len(methods))
                ax.tick_params(length=0)
                # White cell borders: a reader can count rows and columns across a wide panel.
                ax.set_xticks(np.arange(-0.5, len(xlabels)), minor=True)
                ax.set_yticks(np.arange(-0.5, len(methods)), minor=True)
                ax.grid(which="minor", color="white", linewidth=0.6)
                ax.tick_params(which="minor", length=0)
                ax.set_title(f"{dtype}: {what} vs {ref_label}", fontsize=8)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                _failed_rows(ax, payloads[dtype]["results"], k == 0)
    cax = fig.add_subplot(grid[:, 4])
    bar = fig.colorbar(image, cax=cax)
    tols = sorted(set(tolerances))
    bar.set_label(f"relative error  (exact 0 shown as {sci(floor, 0)}; grey: no control there; "
                  f"cyan lines: pass tolerances {', '.join(sci(t, 0) for t in tols)})")
    for tol in tols:
        bar.ax.axhline(tol, color="#00d0ff", linewidth=2)
    fig.suptitle("PMP co-states and Hamiltonian gradients vs autograd and finite differences — "
                 f"MiniLM (all-MiniLM-L6-v2), {len(methods)} delta methods", fontsize=10)
    return fig


def _cmap():
    from matplotlib import colormaps

    # light = small: the (many) exact zeros recede, the errors stand out
    return colormaps["magma_r"].with_extremes(bad=NO_CONTROL_COLOUR)


def _annotate(ax, matrix: np.ndarray, norm: LogNorm) -> None:
    """Print the non-zero errors in their cells (the zeros are the floor colour)."""
    for (i, j), v in np.ndenumerate(matrix):
        if np.isfinite(v) and v > 0:
            dark = norm(max(v, norm.vmin)) > 0.4  # dark cell under magma_r: white text
            ax.text(j, i, sci(v, 0), ha="center", va="center", fontsize=5.5, color="white" if dark else "black")


def _failed_rows(ax, rows: list[dict], first: bool) -> None:
    """Mark methods that were skipped or failed to run (no errors to show)."""
    for i, row in enumerate(rows):
        if row.get("status") in ("skipped", "failed") and not row.get("costate_autograd") and first:
            ax.text(0, i, f"{row['status']}: {row.get('reason', '')[:60]}", fontsize=5, va="center")


def caption(results_dir: Path) -> str:
    """What was run and what the cells are."""
    parts = []
    for dtype, source in zip(DTYPES, SOURCES):
        p = load_json(results_dir, source)
        cfg = p["config"]
        rows = p["results"]
        passed = sum(r.get("status") == "passed" for r in rows)
        worst_ag = max((r.get("max_rel_err_costate") or 0.0, r.get("max_rel_err_control_grad") or 0.0, r["method"])
                       for r in rows)
        worst_fd = max(((r.get("max_rel_err_fd") or 0.0), r["method"]) for r in rows)
        parts.append(
            f"- **{dtype}** (`{source}`): model `{p['model']}`, {len(rows)} methods ({passed} passed), a batch of "
            f"{cfg['batch_size']} sequences × ≤{cfg['seq_len']} tokens from {p['batch_source']}, weight decay "
            f"{cfg['weight_decay']}, controls perturbed by N(0, {cfg['perturb']}²), co-state mode `{cfg['mode']}`, "
            f"{cfg['state_directions']} FD directions per state, FD steps {cfg['fd_steps']}; tolerances: autograd "
            f"{sci(rows[0].get('tol_autograd'), 0)}, FD {sci(rows[0].get('tol_fd'), 0)}. Largest autograd error "
            f"{sci(max(worst_ag[:2]))} ({worst_ag[2]}), largest FD error {sci(worst_fd[0])} ({worst_fd[1]}). "
            f"Command: `{' '.join(argv_from_config(['controltune', 'verify'], cfg, VERIFY_FLAGS))}` "
            f"({versions_line(p)}).")
    return (
        "Agreement of the Pontryagin solution with two independent references on the real "
        "all-MiniLM-L6-v2 (BERT, post-LN, 6 layers, d = 384) for every registered delta method. "
        "Top row: relative error ‖a − b‖/‖b‖ of the co-state p_l (l = 0..6) and of ∇_u H against "
        "autograd (p_l = −∂J/∂x_l, ∇_u H = −∂J/∂u). Bottom row: −⟨p_l, v⟩ and −⟨∇_u H, v⟩ along random unit "
        "directions v against central differences of J, on a float64 copy of the system (also for the "
        "float32 panels); the error counted is the part beyond the quotient's float64 rounding resolution, "
        "so 0 means agreement to within rounding. Control columns: `init` (x_0: prompt, embedding deltas), "
        "u_l (controls of block l, from the layer index in the control's name), `shared` (a control of "
        "several layers), `term` (the classification head); each cell is the largest error of the "
        "controls in that column, grey where a method has no control. Exact zeros are drawn at the floor "
        "of the log colour scale, which the colour-bar label states; cyan lines on the colour bar are the "
        "pass tolerances.\n\n" + "\n".join(parts))


FIGURES = [FigureSpec(
    name="pmp_agreement",
    title="PMP co-states and ∇_u H agree with autograd and finite differences on MiniLM for every delta method",
    sources=SOURCES,
    draw=draw,
    caption=caption,
    recompute=tuple(("controltune", "verify", "--model", "minilm", "--methods", "all", "--dtype", d,
                     "--json", f"experiments/results/{s}") for d, s in zip(DTYPES, SOURCES)),
)]
