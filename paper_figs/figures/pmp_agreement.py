"""Figure ``pmp_agreement``: the Pontryagin co-states and Hamiltonian gradients agree with three independent checks.

Source: ``verify_minilm_{float64,float32}.json`` written by ``controltune verify`` (one row
per method).  The three legs of the check and the fields drawn (rows of the figure):

* reverse-mode **autograd**: ``costate_autograd`` (per-layer relative errors of ``p_l``,
  l = 0..L) and ``control_autograd`` (per-control relative errors of ``∇_u H``);
* **forward**-mode AD: ``costate_forward`` (per layer, the largest over the state
  directions), ``control_forward`` (one direction per control) and ``forward_joint`` (one
  direction over all controls);
* **finite differences** (directional, Richardson): ``costate_fd`` / ``fd_directions``, the
  errors beyond the quotient's resolution, per layer and per control *group* (``all``,
  ``layer <l>``, ``shared <name>``, ``init``, ``term``), and ``costate_fd_raw`` /
  ``fd_directions_raw``, the raw errors held to the ceiling ``fd_raw_ceiling``.

Control columns: ``init``, the layers, ``shared``, ``term`` and ``all`` (the joint
direction of the forward and FD legs).  An autograd or forward-mode control goes to the
column of where it acts: the layer index in its name (``adapter.3.o.W_up`` → layer 3), the
readout head (``head.*``) → ``term``, otherwise the method's ``init`` or ``shared`` kind;
an FD group goes to the column its label names.  A column shows the largest error it holds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import LogNorm

from controltune.figures import FigureSpec, new_figure

from ._common import argv_from_config, load_json, sci, versions_line

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

DTYPES = ("float64", "float32")
SOURCES = tuple(f"verify_minilm_{d}.json" for d in DTYPES)
LEGS = (("autograd", "autograd"), ("forward", "forward-mode AD"), ("fd", "FD beyond δ"),
        ("fd_raw", "FD raw"))
"""Rows of the figure: ``(leg, label)``; ``fd_raw`` is the FD leg without its resolution allowance."""
TOLERANCE_KEYS = {"autograd": "tol_autograd", "forward": "tol_forward", "fd": "tol_fd", "fd_raw": "fd_raw_ceiling"}
VERIFY_FLAGS = ("model", "methods", "dtype", "batch_size", "seq_len", "weight_decay", "perturb", "mode",
                "state_directions", "fd_state_directions", "fd_mode", "fd_step", "fd_steps", "no_fd", "no_forward",
                "design_examples", "seed", "device", "json")
NO_CONTROL_COLOUR = "#c8c8c8"
JOINT = "all"


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


def group_column(label: str) -> int | str:
    """The column of an FD direction: ``layer 3`` → 3, ``shared <name>`` → ``shared``; ``init``, ``term``, ``all``.

    Raises:
        ValueError: a label of none of these forms (e.g. a control name of ``--fd-mode legacy``).
    """
    head, _, rest = label.partition(" ")
    if head == "layer" and rest.isdigit():
        return int(rest)
    if head == "shared" and rest:
        return "shared"
    if label in ("init", "term", JOINT):
        return label
    raise ValueError(f"FD direction {label!r} is not a control group (all, layer <l>, shared <name>, init, term); "
                     "this figure expects `controltune verify --fd-mode directional`")


def control_columns(n_layers: int) -> list[int | str]:
    """Columns of the control panels: ``init``, layers 0..L-1, ``shared``, ``term``, ``all`` (joint direction)."""
    return ["init", *range(n_layers), "shared", "term", JOINT]


def _control_errors(row: dict[str, Any], leg: str) -> list[tuple[int | str, float]]:
    """``(column, error)`` of every control check of ``row`` in ``leg``."""
    if leg == "autograd":
        return [(control_column(n, row.get("kinds", [])), e) for n, e in (row.get("control_autograd") or {}).items()]
    if leg == "forward":
        out = [(control_column(n, row.get("kinds", [])), e) for n, e in (row.get("control_forward") or {}).items()]
        return out + ([(JOINT, row["forward_joint"])] if row.get("forward_joint") is not None else [])
    field = {"fd": "fd_directions", "fd_raw": "fd_directions_raw"}[leg]
    return [(group_column(label), e) for label, e in (row.get(field) or {}).items()]


def error_matrices(payload: dict[str, Any], leg: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(methods, costate errors M × (L+1), control errors M × (L+4))`` of ``leg``.

    ``leg`` is one of :data:`LEGS` (``autograd``, ``forward``, ``fd``, ``fd_raw``).  A control
    column is the largest error of the checks placed there (controls for autograd and forward
    mode, control groups for FD); NaN where a method has no such check (or did not run).
    """
    if leg not in TOLERANCE_KEYS:
        raise ValueError(f"unknown leg {leg!r}; expected one of {tuple(TOLERANCE_KEYS)}")
    rows = payload["results"]
    n_layers = max((r["n_layers"] for r in rows if "n_layers" in r), default=0)
    if n_layers == 0:
        raise ValueError("no method in the verify result ran (no row has n_layers)")
    columns = control_columns(n_layers)
    costate = np.full((len(rows), n_layers + 1), np.nan)
    control = np.full((len(rows), len(columns)), np.nan)
    costate_field = {"autograd": "costate_autograd", "forward": "costate_forward", "fd": "costate_fd",
                     "fd_raw": "costate_fd_raw"}[leg]
    for i, row in enumerate(rows):
        layers = row.get(costate_field) or []
        costate[i, :len(layers)] = layers
        for column, err in _control_errors(row, leg):
            j = columns.index(column)
            control[i, j] = err if math.isnan(control[i, j]) else max(control[i, j], err)
    return [r["method"] for r in rows], costate, control


def leg_tolerance(payload: dict[str, Any], leg: str) -> float | None:
    """The tolerance of ``leg`` (the raw ceiling for ``fd_raw``) the rows of ``payload`` were checked at.

    Raises:
        ValueError: rows checked at different tolerances.
    """
    found = {r[TOLERANCE_KEYS[leg]] for r in payload["results"] if r.get(TOLERANCE_KEYS[leg]) is not None}
    if len(found) > 1:
        raise ValueError(f"rows of one verify result have different {TOLERANCE_KEYS[leg]}: {sorted(found)}")
    return found.pop() if found else None


def _scale(values: list[np.ndarray], tolerances: list[float]) -> tuple[float, float]:
    """``(floor, top)`` of the log colour scale: a decade below the smallest non-zero error, above everything."""
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values])
    positive = finite[finite > 0]
    floor = min(1e-17, 10.0 ** (math.floor(math.log10(positive.min())) - 1)) if positive.size else 1e-17
    top = max([*tolerances, float(finite.max()) if finite.size else 0.0])
    return floor, 10.0 ** (math.floor(math.log10(top)) + 1)  # strictly above: the top tolerance line stays visible


def _label_column(c: int | str) -> str:
    return f"$u_{{{c}}}$" if isinstance(c, int) else c


def draw(results_dir: Path) -> Figure:
    """Methods × layers heat maps: rows = legs (autograd, forward mode, FD, FD raw), columns = dtype × (p_l, ∇_u H)."""
    payloads = {d: load_json(results_dir, s) for d, s in zip(DTYPES, SOURCES)}
    panels = {(d, leg): error_matrices(payloads[d], leg) for d in DTYPES for leg, _ in LEGS}
    tolerances = {(d, leg): leg_tolerance(payloads[d], leg) for d in DTYPES for leg, _ in LEGS}
    floor, top = _scale([m for _, c, u in panels.values() for m in (c, u)],
                        [t for t in tolerances.values() if t is not None])
    norm = LogNorm(vmin=floor, vmax=top)
    methods = panels[(DTYPES[0], "autograd")][0]
    n_layers = panels[(DTYPES[0], "autograd")][1].shape[1] - 1
    columns = control_columns(n_layers)

    fig = new_figure(15.5, 0.18 * len(methods) * len(LEGS) + 2.4)
    grid = fig.add_gridspec(len(LEGS), 5, width_ratios=[n_layers + 1, len(columns), n_layers + 1, len(columns), 0.35])
    image = None
    for r, (leg, leg_label) in enumerate(LEGS):
        for d_index, dtype in enumerate(DTYPES):
            names, costate, control = panels[(dtype, leg)]
            if names != methods:
                raise ValueError(f"verify results for {DTYPES} list different methods; rerun both")
            tol = tolerances[(dtype, leg)]
            bound = "ceiling" if leg == "fd_raw" else "tol"
            for k, (matrix, xlabels, what) in enumerate((
                    (costate, [f"$p_{{{i}}}$" for i in range(n_layers + 1)], "co-states $p_l$"),
                    (control, [_label_column(c) for c in columns],
                     r"$\nabla_u H$, max per column" if leg in ("autograd", "forward") else
                     r"$\nabla_u H$ per control group"))):
                ax = fig.add_subplot(grid[r, 2 * d_index + k])
                shown = np.where(np.isfinite(matrix), np.maximum(matrix, floor), np.nan)
                image = ax.imshow(np.ma.masked_invalid(shown), norm=norm, cmap=_cmap(), aspect="auto",
                                  interpolation="nearest")
                _annotate(ax, matrix, norm)
                _all_zero_note(ax, matrix)
                if k == 1 and leg == "autograd":
                    _not_checked(ax, columns.index(JOINT), len(methods))
                ax.set_xticks(range(len(xlabels)), xlabels)
                ax.set_yticks(range(len(methods)), methods if k == 0 else [""] * len(methods))
                ax.tick_params(length=0)
                # White cell borders: a reader can count rows and columns across a wide panel.
                ax.set_xticks(np.arange(-0.5, len(xlabels)), minor=True)
                ax.set_yticks(np.arange(-0.5, len(methods)), minor=True)
                ax.grid(which="minor", color="white", linewidth=0.6)
                ax.tick_params(which="minor", length=0)
                ax.set_title(f"{dtype}: {what} — {leg_label} ({bound} {sci(tol, 0)})", fontsize=7.5)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                _failed_rows(ax, payloads[dtype]["results"], k == 0)
    cax = fig.add_subplot(grid[:, 4])
    bar = fig.colorbar(image, cax=cax)
    bounds = sorted({t for t in tolerances.values() if t is not None})
    bar.set_label(f"relative error  (exact 0 shown as {sci(floor, 0)}; grey: no control there; cyan lines: "
                  f"pass bounds {', '.join(sci(t, 0) for t in bounds)}, each panel's in its title)")
    for tol in bounds:
        bar.ax.axhline(tol, color="#00d0ff", linewidth=2)
    fig.suptitle("PMP co-states and Hamiltonian gradients vs autograd, forward-mode AD and finite differences — "
                 f"MiniLM (all-MiniLM-L6-v2), {len(methods)} delta methods", fontsize=10)
    return fig


def _cmap() -> Colormap:
    from matplotlib import colormaps

    # light = small: the (many) exact zeros recede, the errors stand out
    return colormaps["magma_r"].with_extremes(bad=NO_CONTROL_COLOUR)


def _annotate(ax: Axes, matrix: np.ndarray, norm: LogNorm) -> None:
    """Print the non-zero errors in their cells (the zeros are the floor colour)."""
    for (i, j), v in np.ndenumerate(matrix):
        if np.isfinite(v) and v > 0:
            dark = norm(max(v, norm.vmin)) > 0.4  # dark cell under magma_r: white text
            ax.text(j, i, sci(v, 0), ha="center", va="center", fontsize=5, color="white" if dark else "black")


def _all_zero_note(ax: Axes, matrix: np.ndarray) -> None:
    """Say so on a panel whose every check is an exact 0 (a uniform floor colour reads as missing data)."""
    finite = matrix[np.isfinite(matrix)]
    if finite.size and not finite.any():
        rows, cols = matrix.shape
        ax.text((cols - 1) / 2, (rows - 1) / 2, "every error exactly 0", ha="center", va="center", fontsize=7,
                color="#404040", zorder=4, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85})


def _not_checked(ax: Axes, column: int, n_rows: int) -> None:
    """Blank a column the leg has no check for (autograd has no joint direction)."""
    ax.axvspan(column - 0.5, column + 0.5, color="white", zorder=2)
    ax.text(column, (n_rows - 1) / 2, "no joint check", rotation=90, ha="center", va="center", fontsize=6.5,
            color="#707070", zorder=3)


def _failed_rows(ax: Axes, rows: list[dict], first: bool) -> None:
    """Mark methods that were skipped or failed to run (no errors to show)."""
    for i, row in enumerate(rows):
        if row.get("status") in ("skipped", "failed") and not row.get("costate_autograd") and first:
            ax.text(0, i, f"{row['status']}: {row.get('reason', '')[:60]}", fontsize=5, va="center")


def _worst(rows: list[dict], key: str) -> tuple[float, str]:
    """The largest error ``key`` over ``rows`` and its method (``every check`` when it is 0, ``-`` when none ran)."""
    found = [(r[key], r["method"]) for r in rows if r.get(key) is not None]
    worst = max(found, default=(0.0, "-"))
    return (0.0, "every check") if found and worst[0] == 0 else worst


def _seconds(rows: list[dict], leg: str) -> float:
    return sum((r.get("seconds") or {}).get(leg) or 0.0 for r in rows)


def _command(config: dict[str, Any]) -> str:
    flags = [f for f in VERIFY_FLAGS if f != "fd_steps" or config.get("fd_mode") == "legacy"]  # legacy-only flag
    return " ".join(argv_from_config(["controltune", "verify"], config, flags))


def _dtype_line(dtype: str, source: str, p: dict[str, Any]) -> str:
    cfg, rows = p["config"], p["results"]
    passed = sum(r.get("status") == "passed" for r in rows)
    failed = [r["method"] for r in rows if r.get("status") == "failed"]
    skipped = [r["method"] for r in rows if r.get("status") == "skipped"]
    ran = [r for r in rows if "n_layers" in r]
    autograd = max(_worst(ran, "max_rel_err_costate"), _worst(ran, "max_rel_err_control_grad"))
    forward, fd, raw = (_worst(ran, k) for k in ("max_rel_err_forward", "max_rel_err_fd", "max_rel_err_fd_raw"))
    refined = [f"{r['method']} ({', '.join(r['fd_refined'])})" for r in ran if r.get("fd_refined")]
    first = ran[0] if ran else {}
    status = f"{len(rows)} methods ({passed} passed"
    status += f"; failed: {', '.join(failed)}" if failed else ""
    status += f"; skipped: {', '.join(skipped)}" if skipped else ""
    return (
        f"- **{dtype}** (`{source}`): model `{p['model']}`, {status}), a batch of {cfg['batch_size']} sequences × "
        f"≤{cfg['seq_len']} tokens from {p['batch_source']}, weight decay {cfg['weight_decay']}, controls perturbed "
        f"by N(0, {cfg['perturb']}²), co-state mode `{cfg['mode']}`; forward mode: {cfg['state_directions']} "
        f"directions per state; FD: mode `{first.get('fd_mode')}`, step h = {sci(first.get('fd_step'), 0)}, "
        f"{cfg['fd_state_directions']} direction(s) per state, σ = {sci(first.get('zero_scale'), 0)}·|J|; "
        f"step refined (h/10 or finer) for {', '.join(refined) if refined else 'no direction'}. Bounds: autograd "
        f"{sci(first.get('tol_autograd'), 0)}, forward {sci(first.get('tol_forward'), 0)}, FD "
        f"{sci(first.get('tol_fd'), 0)}, FD raw ceiling {sci(first.get('fd_raw_ceiling'), 0)}. Largest errors: "
        f"autograd {sci(autograd[0])} ({autograd[1]}), forward {sci(forward[0])} ({forward[1]}), FD beyond δ "
        f"{sci(fd[0])} ({fd[1]}), FD raw {sci(raw[0])} ({raw[1]}). Time over all methods (s): co-state solves "
        f"{_seconds(ran, 'solve'):.0f}, autograd {_seconds(ran, 'autograd'):.0f}, forward "
        f"{_seconds(ran, 'forward'):.0f}, FD {_seconds(ran, 'fd'):.0f}, total with builds "
        f"{_seconds(rows, 'total'):.0f}. "
        f"Command: `{_command(cfg)}` ({versions_line(p)}).")


def caption(results_dir: Path) -> str:
    """What was run and what the cells are."""
    from controltune.verification.report import FD_ROUNDING_ULPS

    payloads = [load_json(results_dir, s) for s in SOURCES]
    parts = [_dtype_line(d, s, p) for d, s, p in zip(DTYPES, SOURCES, payloads)]
    methods = {r["method"] for p in payloads for r in p["results"]}
    n_layers = max(r["n_layers"] for p in payloads for r in p["results"] if "n_layers" in r)
    straight_through = (" Straight-through controls (`masking`) are checked by the forward and FD legs under the "
                        "estimator's linearisation at the current control, whose derivative is the "
                        "straight-through gradient." if "masking" in methods else "")
    return (
        "Agreement of the Pontryagin solution (co-states p_l and ∇_u H) with three independent legs on the real "
        f"all-MiniLM-L6-v2 (BERT, post-LN, L = {n_layers} layers) for every registered delta method. "
        "**Row 1, autograd** (reverse mode): relative error ‖a − b‖/‖b‖ (Frobenius) of p_l "
        f"(l = 0..{n_layers}) and of ∇_u H per control against one reverse pass through a plain rollout "
        "(p_l = −∂J/∂x_l, ∇_u H = −∂J/∂u), in the system's dtype. **Row 2, forward-mode AD** (no reverse "
        "pass): −⟨p_l, v⟩ and −⟨∇_u H, v⟩ against "
        "the directional derivative of J, exact to rounding, along random directions v: per state the largest "
        "error over its directions, one direction per control (a cell is the largest over the controls in its "
        "column), and one joint direction over all controls from the embedding (column `all`, which assumes "
        "nothing about where a control acts). **Rows 3–4, finite differences** (no AD): the same directional "
        "derivatives against Richardson-extrapolated central differences D = (4 D(h/2) − D(h))/3, "
        "D(h) = (J(+h) − J(−h))/2h, along directions per state x_l (blocks l..L−1 re-run) and one direction per "
        "control *group* — the layer controls of block l together, each shared control alone, the initial "
        "controls, the terminal controls — plus the joint direction `all`; an FD cell is its group's error (the "
        "JSON's `control_fd` maps each control to its group's error), not a per-control error. A direction whose "
        "D(h) and D(h/2) disagree beyond rounding, or whose fourth difference J(−h) − 4J(−h/2) + 6J(0) − 4J(h/2) + "
        "J(h) is beyond rounding (a kink within the step; the first test misses one at the point), is redone at "
        "h/10, then h/100 and h/1000; a kink still there at h/1000 is checked against the nearer one-sided slope, "
        "and a fourth difference that does not shrink with the step is an offset of J(0), not a kink. Row 3 is the "
        "error counted against the FD tolerance, the part beyond the quotient's resolution "
        f"δ = 3·k·ε·max|J(±h)|/h (k = {FD_ROUNDING_ULPS:g} ulps of rounding per cost evaluation, controltune's "
        "FD_ROUNDING_ULPS; ε the float64 machine epsilon; 3 bounds the noise gain of the Richardson combination): "
        "max(|a − D| − δ, 0)/max(|D|, σ), so 0 means agreement within the resolution; row 4 is the raw error "
        "|a − D|/max(|D|, σ), which must stay under the raw ceiling whatever δ allows. Directions are relative: a "
        "control direction has the norm of its control, a state direction has, token by token, the norm of that "
        "token's state, so a step h moves every control or token by h relative to its size. Scalar errors of "
        "directional derivatives use the denominator floor σ (a fixed fraction of |J|), below which they are "
        "absolute. The float32 panels: autograd runs in float32 at its own tolerance, while the forward and FD "
        "legs run on a float64 copy of the system, with that copy's own co-state solve, at the float64 "
        f"tolerances.{straight_through} Control columns: `init` (x_0: prompt, embedding deltas), u_l (block l), "
        "`shared` (a control of several layers), `term` (the classification head), `all` (joint direction; the "
        "autograd leg has none); grey where a method has no control there. Exact zeros are drawn at the floor of "
        "the log colour scale, which the colour-bar label states; cyan lines on the colour bar are the pass "
        "bounds (tolerances and the raw ceiling), each panel title names its own.\n\n" + "\n".join(parts))


FIGURES = [FigureSpec(
    name="pmp_agreement",
    title="PMP co-states and ∇_u H agree with autograd, forward-mode AD and finite differences on MiniLM for every "
          "delta method",
    sources=SOURCES,
    draw=draw,
    caption=caption,
    recompute=tuple(("controltune", "verify", "--model", "minilm", "--methods", "all", "--dtype", d,
                     "--json", f"experiments/results/{s}") for d, s in zip(DTYPES, SOURCES)),
)]
