"""Figure ``costate_norms``: the co-state norm ‖p_l‖ across the depth of MiniLM, per delta method.

Source: ``costate_profile.json`` (``experiments/costate_profile.py``): for each method a
``before`` row (at initialisation) and an ``after`` row (after a short AdamW training), each
with ``mean_seq`` = ``Σ_s ‖p_{l,s}‖_F`` for l = 0..L (the mean over sequences of the norm of the
per-sequence co-state ``−∂Φ_s/∂x_l``; DESIGN.md §1 sign convention).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import argv_from_config, load_json, versions_line

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SOURCE = "costate_profile.json"
COLOURS = {"lora": "tab:blue", "adapter": "tab:orange", "prefix": "tab:green", "prompt": "tab:red",
           "bitfit": "tab:purple", "ia3": "tab:brown", "full": "black"}
LOG_SPAN = 10.0
"""Use a log y axis when the plotted norms span more than this factor."""


def _rows(payload: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["method"], r["phase"]): r for r in payload["rows"]}


def _same(a: list[float], b: list[float], rtol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b))


def init_groups(payload: dict[str, Any]) -> list[list[str]]:
    """Methods whose ``before`` profiles coincide (identity-at-init methods share the pretrained trajectory)."""
    groups: list[list[str]] = []
    rows = _rows(payload)
    for method in dict.fromkeys(r["method"] for r in payload["rows"]):
        if (method, "before") not in rows:
            continue
        curve = rows[(method, "before")]["mean_seq"]
        for g in groups:
            if _same(rows[(g[0], "before")]["mean_seq"], curve):
                g.append(method)
                break
        else:
            groups.append([method])
    return groups


def draw(results_dir: Path) -> Figure:
    """Left: ‖p_l‖ vs l, after training (solid) and at init (dashed); right: after/before ratio per layer."""
    payload = load_json(results_dir, SOURCE)
    rows = _rows(payload)
    methods = list(dict.fromkeys(r["method"] for r in payload["rows"]))
    fig = new_figure(9.0, 3.6)
    ax, ax_ratio = fig.subplots(1, 2, width_ratios=(1.4, 1.0))
    values: list[float] = []
    for group in init_groups(payload):
        curve = rows[(group[0], "before")]["mean_seq"]
        shared = len(group) > 1
        colour = "0.45" if shared else COLOURS.get(group[0], None)
        label = f"init: {', '.join(group)}" if shared else f"init: {group[0]}"
        ax.plot(range(len(curve)), curve, linestyle="--", color=colour, linewidth=1.4 if shared else 1.0,
                marker=".", label=label)
        values += curve
    for method in methods:
        if (method, "after") not in rows:
            continue
        after = rows[(method, "after")]["mean_seq"]
        colour = COLOURS.get(method)
        ax.plot(range(len(after)), after, color=colour, linewidth=1.4, marker="o", markersize=3,
                label=f"trained: {method}")
        values += after
        if (method, "before") in rows:
            before = rows[(method, "before")]["mean_seq"]
            ax_ratio.plot(range(len(after)), [a / b for a, b in zip(after, before)], color=colour, marker="o",
                          markersize=3, label=method)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_yscale("log")
        _plain_log_ticks(ax, min(positive), max(positive))
    else:
        ax.set_ylim(bottom=0)
    n_layers = len(payload["rows"][0]["mean_seq"]) - 1
    for a in (ax, ax_ratio):
        a.set_xticks(range(n_layers + 1))
        a.set_xlabel(r"layer $l$  ($x_l$ enters block $l$; $x_L$ enters the readout)")
        a.grid(True, alpha=0.3)
    cfg = payload["config"]
    ax.set_ylabel(r"$\Vert p_l\Vert$ = mean over sequences of $\Vert\partial\Phi_s/\partial x_l\Vert_F$")
    ax.set_title(f"co-state norm at init (dashed) and after {cfg['steps']} AdamW steps (solid)")
    # One legend for both panels (same colours), below them: the curves fill the axes.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=5, frameon=False, fontsize=7)
    ax_ratio.axhline(1.0, color="0.6", linewidth=0.8)
    ax_ratio.set_ylabel(r"$\Vert p_l\Vert$ trained / $\Vert p_l\Vert$ at init")
    ax_ratio.set_title("change of the co-state norm by training")
    ax_ratio.set_yscale("log")  # ratios are multiplicative: ×4 and ÷4 equally far from 1
    ratios = [y for line in ax_ratio.get_lines() for y in line.get_ydata() if y > 0]
    if ratios:
        _plain_log_ticks(ax_ratio, min(ratios), max(ratios))
    fig.suptitle(f"Co-state norms across the depth of all-MiniLM-L6-v2 on SST-2 ({cfg['n_measure']} held-out "
                 "training sentences)", fontsize=9)
    return fig


def _plain_log_ticks(ax: Axes, low: float, high: float) -> None:
    """Label a log axis at 1-2-5 steps in plain numbers (a short log axis would show only one power of 10)."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5)]
    ax.set_yticks([t for t in ticks if low / 1.3 <= t <= high * 1.3])
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _ratio_table(payload: dict[str, Any]) -> str:
    rows = _rows(payload)
    parts = []
    for method in dict.fromkeys(r["method"] for r in payload["rows"]):
        cells = []
        for phase in ("before", "after"):
            r = rows.get((method, phase))
            if r is not None:
                p = r["mean_seq"]
                cells.append(f"{phase} ‖p_0‖/‖p_L‖ = {p[0] / p[-1]:.2f} (‖p_L‖ {p[-1]:.3g}, loss {r['loss']:.3f}, "
                             f"acc {r['accuracy']:.2f})")
        parts.append(f"{method}: " + "; ".join(cells))
    return ". ".join(parts)


def _text(value: Any) -> str:
    return "/".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    cfg = payload["config"]
    command = argv_from_config(["python", "experiments/costate_profile.py"], cfg,
                               ("model", "steps", "n_train", "n_measure", "batch_size", "max_length", "seed"))
    methods = list(dict.fromkeys(r["method"] for r in payload["rows"]))
    command += ["--methods", ",".join(methods)]
    options = "; ".join(f"{m}: " + (", ".join(f"{k} {_text(v)}" for k, v in cfg["options"][m].items()) or "defaults")
                        + f", lr {cfg['lr'][m]}" for m in methods)
    groups = init_groups(payload)
    shared = " and ".join(", ".join(g) for g in groups if len(g) > 1)
    own = [g[0] for g in groups if len(g) == 1]
    init_note = (f"At initialisation {shared} share one profile (identity at init: the pretrained trajectory)"
                 if shared else "")
    if own:
        verb = "changes" if len(own) == 1 else "change"
        init_note += ("; " if init_note else "") + f"{', '.join(own)} {verb} the trajectory from the start"
    return (
        f"all-MiniLM-L6-v2 ({cfg['dtype']}, {payload['rows'][0]['n_layers']} post-LN blocks) with one delta method "
        f"plus the classification head (seed {cfg['seed']}), on SST-2. The co-state p_l = −∂J/∂x_l "
        "(controltune.pmp.solve_costate) is measured on a fixed batch of "
        f"{cfg['n_measure']} training sentences held out from the {cfg['n_train']} training sentences "
        f"(≤{cfg['max_length']} tokens), at initialisation (dashed) and after {cfg['steps']} AdamW steps "
        f"(solid; batch {cfg['batch_size']}, constant learning rate, no weight decay, dropout off). "
        "Plotted norm: ‖p_l‖ = Σ_s ‖p_(l,s)‖_F, i.e. the mean over sequences of the Frobenius norm over tokens "
        "and features of the per-sequence co-state −∂Φ_s/∂x_l (independent of the batch size). "
        + (f"{init_note}. " if init_note else "")
        + f"Methods and rates: {options}. Measured: {_ratio_table(payload)}. One seed, one short training: "
        f"a profile, not a converged optimum. Command: `{' '.join(command)}` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="costate_norms",
        title="Co-state norm ‖p_l‖ per layer of MiniLM for seven delta methods, at init and after training",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/costate_profile.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw", "init_groups"]
