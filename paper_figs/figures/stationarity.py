"""Figures ``stationarity`` and ``max_condition``: first-order PMP and the maximum condition along training.

Source: ``stationarity.json`` (``experiments/stationarity.py``): per method a ``curve`` (every
k AdamW steps: ``layer`` = ``‖∇_{u_l} H_l‖`` for l = 0..L-1 on a fixed training batch, ``term`` =
that of the classification head, the batch cost and the dev loss/accuracy) and a ``probe``
before and after training (:func:`controltune.diagnostics.maximum_condition_probe`: per layer
the fraction of random probes ``u*_l ± ε‖u*_l‖ v`` at which ``H_l`` did not increase, per radius ε).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib import colormaps

from controltune.figures import FigureSpec, new_figure

from ._common import argv_from_config, load_json, sci, versions_line

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SOURCE = "stationarity.json"
LABELS = {"lora": "LoRA", "adapter": "adapter"}
RADIUS_COLOURS = ("tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple")


def _label(method: str, cfg: dict[str, Any]) -> str:
    opts = cfg["options"].get(method, {})
    detail = ", ".join(f"{k} {'/'.join(v) if isinstance(v, list) else v}" for k, v in opts.items())
    return f"{LABELS.get(method, method)} ({detail})" if detail else LABELS.get(method, method)


def draw_stationarity(results_dir: Path) -> Figure:
    """One panel per method: ‖∇_{u_l} H_l‖ against step, one line per layer (log y); last panel: losses."""
    payload = load_json(results_dir, SOURCE)
    cfg, methods = payload["config"], payload["methods"]
    fig = new_figure(3.4 * (len(methods) + 1), 3.4)
    axes = fig.subplots(1, len(methods) + 1, sharex=True)
    for ax in axes[1:-1]:  # the methods' panels on one scale, so their gradients compare
        ax.sharey(axes[0])
    for ax, (method, entry) in zip(axes, methods.items()):
        curve = entry["curve"]
        steps = [r["step"] for r in curve]
        n_layers = len(curve[0]["layer"])
        cmap = colormaps["viridis"]
        for layer in range(n_layers):
            ax.plot(steps, [r["layer"][layer] for r in curve], color=cmap(layer / max(1, n_layers - 1)),
                    marker="o", markersize=2.5, linewidth=1.1, label=f"block {layer}")
        ax.plot(steps, [r["term"] for r in curve], color="black", linestyle="--", linewidth=1.0,
                label="head (terminal control)")
        ax.set_yscale("log")
        ax.set(xlabel="AdamW step", title=_label(method, cfg))
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(r"$\Vert\nabla_{u_l} H_l\Vert = \Vert\partial J/\partial u_l\Vert$ on the fixed batch")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize=7)
    loss_ax = axes[-1]
    for i, (method, entry) in enumerate(methods.items()):
        curve = entry["curve"]
        steps = [r["step"] for r in curve]
        colour = f"C{i}"
        loss_ax.plot(steps, [r["fixed_batch_loss"] for r in curve], color=colour, marker="o", markersize=2.5,
                     label=f"{LABELS.get(method, method)}: J on fixed training batch")
        if "dev_loss" in curve[0]:
            loss_ax.plot(steps, [r["dev_loss"] for r in curve], color=colour, linestyle="--",
                         label=f"{LABELS.get(method, method)}: dev loss ({cfg['n_dev']} sentences)")
    loss_ax.set(xlabel="AdamW step", ylabel="cross-entropy (nats)", title="losses")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(frameon=False, fontsize=6)
    fig.suptitle("First-order PMP stationarity along AdamW training of all-MiniLM-L6-v2 on SST-2", fontsize=9)
    return fig


def draw_max_condition(results_dir: Path) -> Figure:
    """Per method (columns): top, per block and radius, the fraction of probes that are local maxima of H_l
    at init (hatched) and after training (filled); bottom (when recorded), ``H_l(u* + t‖u*_l‖v) − H_l(u*)``
    along one random direction per block, at init (dashed) and trained (solid)."""
    payload = load_json(results_dir, SOURCE)
    methods = payload["methods"]
    cfg = payload["config"]
    with_lines = all(layer.get("lines") for e in methods.values() for ph in ("before", "after")
                     for layer in e["probe"][ph]["layers"])
    fig = new_figure(4.6 * len(methods), 6.4 if with_lines else 3.4)
    grid = fig.subplots(2 if with_lines else 1, len(methods), squeeze=False)
    for ax, (method, entry) in zip(grid[0], methods.items()):
        _fraction_bars(ax, entry)
        ax.set_title(_label(method, cfg))
    grid[0][0].set_ylabel(f"fraction of {cfg['n_directions']} directions $v$ with\n"
                          r"$H_l(u^*\pm\varepsilon v) \leq H_l(u^*)$ (local maximum)")
    for ax in grid[0][1:]:
        ax.sharey(grid[0][0])
    handles, labels = grid[0][0].get_legend_handles_labels()
    # Column-major legend: put each radius's init bar above its trained bar.
    n = len(labels) // 2
    order = [i + k * n for i in range(n) for k in (0, 1)]
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center", ncol=n,
               frameon=False, fontsize=7)
    if with_lines:
        for ax, entry in zip(grid[1], methods.values()):
            _line_profiles(ax, entry)
        fig.legend(*grid[1][0].get_legend_handles_labels(), loc="outside right lower", frameon=False, fontsize=7,
                   title="lines: block l\nsolid trained\ndashed init", title_fontsize=7)
        grid[1][0].set_ylabel(r"$\Delta H_l(t) = H_l(u^* + t\,\Vert u^*_l\Vert\, v) - H_l(u^*)$" "\n"
                              r"$\div \max_t |\Delta H_l(t)|$ (per line)")
    fig.suptitle("Maximum condition of the PMP, probed per block (x*, p* fixed) at init and after training",
                 fontsize=9)
    return fig


def _fraction_bars(ax: Axes, entry: dict[str, Any]) -> None:
    radii = entry["probe"]["after"]["radii"]
    n_bars = 2 * len(radii)
    width = 0.8 / n_bars
    for p_index, phase in enumerate(("before", "after")):
        layers = entry["probe"][phase]["layers"]
        for r_index, eps in enumerate(radii):
            offset = (2 * r_index + p_index - (n_bars - 1) / 2) * width
            xs = [row["layer"] + offset for row in layers]
            ys = [row["per_radius"][_radius_key(row["per_radius"], eps)] for row in layers]
            colour = RADIUS_COLOURS[r_index % len(RADIUS_COLOURS)]
            style = ({"color": colour} if phase == "after"
                     else {"facecolor": "white", "edgecolor": colour, "hatch": "////"})
            when = "init" if phase == "before" else "trained"
            # A zero fraction is drawn as a sliver so that it reads as measured, not missing.
            ax.bar(xs, [max(y, 0.006) for y in ys], width=width * 0.95, linewidth=0.6,
                   label=rf"$\varepsilon$ = {eps:g}$\,\Vert u^*_l\Vert$, {when}", **style)
    ax.set_xticks(range(len(entry["probe"]["after"]["layers"])))
    ax.set(xlabel="block l", ylim=(0, 1.05))
    ax.grid(True, axis="y", alpha=0.3)


def _line_profiles(ax: Axes, entry: dict[str, Any]) -> None:
    """Each line divided by its own largest |ΔH|: blocks differ by decades, the shape is what matters
    (a straight line through 0 = first-order term dominates; ∩ = local maximum along v)."""
    n_layers = len(entry["probe"]["after"]["layers"])
    cmap = colormaps["viridis"]
    for phase, style in (("before", "--"), ("after", "-")):
        for row in entry["probe"][phase]["layers"]:
            line = row["lines"][0]
            peak = max(abs(v) for v in line["dH"]) or 1.0
            colour = cmap(row["layer"] / max(1, n_layers - 1))
            label = f"block {row['layer']}" if phase == "after" else None
            ax.plot(line["t"], [v / peak for v in line["dH"]], linestyle=style, color=colour,
                    linewidth=1.1 if phase == "after" else 0.8, marker="." if phase == "after" else None,
                    markersize=3, label=label)
    ax.axhline(0.0, color="0.5", linewidth=0.6)
    ax.axvline(0.0, color="0.5", linewidth=0.6)
    ax.set_xlabel(r"$t$ (step along a random unit direction $v$, in units of $\Vert u^*_l\Vert$)")
    ax.grid(True, alpha=0.3)


def _radius_key(per_radius: dict[str, float], eps: float) -> str:
    """JSON turns the float keys into strings: find the key of ``eps``."""
    for k in per_radius:
        if abs(float(k) - eps) <= 1e-12 * max(1.0, abs(eps)):
            return k
    raise KeyError(f"radius {eps} not in probe result (radii {list(per_radius)})")


def _command(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    argv = argv_from_config(["python", "experiments/stationarity.py"], cfg,
                            ("model", "steps", "every", "n_train", "n_fixed", "n_dev", "n_directions", "batch_size",
                             "max_length", "seed"))
    return " ".join(argv + ["--methods", ",".join(payload["methods"])])


def _setup(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    methods = "; ".join(f"{_label(m, cfg)} with lr {cfg['lr'][m]}" for m in payload["methods"])
    return (f"all-MiniLM-L6-v2 ({cfg['dtype']}) plus the classification head, seed {cfg['seed']}, trained on "
            f"{cfg['n_train']} seeded SST-2 training sentences (≤{cfg['max_length']} tokens) for {cfg['steps']} "
            f"AdamW steps of batch {cfg['batch_size']} (linear decay to 0, no weight decay, dropout off): "
            f"{methods}. The fixed batch is the first {cfg['n_fixed']} of those training sentences.")


def caption_stationarity(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    cfg = payload["config"]
    parts = []
    for method, entry in payload["methods"].items():
        c0, c1 = entry["curve"][0], entry["curve"][-1]
        per_layer = ", ".join(f"{sci(a)}→{sci(b)}" for a, b in zip(c0["layer"], c1["layer"]))
        parts.append(f"{LABELS.get(method, method)}: all controls {sci(c0['total'])}→{sci(c1['total'])}, "
                     f"per block {per_layer}, head {sci(c0['term'])}→{sci(c1['term'])}; J on the fixed batch "
                     f"{c0['fixed_batch_loss']:.3f}→{c1['fixed_batch_loss']:.3f}; dev accuracy "
                     f"{c0.get('dev_accuracy', float('nan')):.3f}→{c1.get('dev_accuracy', float('nan')):.3f}")
    return (
        f"{_setup(payload)} Every {cfg['every']} steps the co-state is solved on the fixed batch and "
        "‖∇_{u_l} H_l‖ (controltune.diagnostics.stationarity; by the PMP identity equal to ‖∂J/∂u_l‖ over "
        "every control acting in block l) is drawn per block, with that of the head (dashed), log scale. "
        f"The dev loss is on {cfg['n_dev']} seeded SST-2 dev sentences. Measured (step 0 → "
        f"{cfg['steps']}): {'. '.join(parts)}. {_trend(payload)} One seed. "
        f"Command: `{_command(payload)}` ({versions_line(payload)})."
    )


def _trend(payload: dict[str, Any]) -> str:
    """One sentence on whether training moved towards first-order stationarity (read from the data)."""
    grew = [m for m, e in payload["methods"].items() if e["curve"][-1]["total"] > e["curve"][0]["total"]]
    if not grew:
        return "‖∇_u H‖ over all controls fell for every method: training moved towards ∇_u H_l = 0."
    names = ", ".join(LABELS.get(m, m) for m in grew)
    return (f"For {names} ‖∇_u H‖ over all controls grew while J fell: the run leaves the identity-at-init "
            f"point towards larger gradients, and {payload['config']['steps']} steps do not reach a stationary "
            "point ∇_u H_l = 0.")


def _by_radius(payload: dict[str, Any]) -> str:
    """How many probes passed at each radius, over all methods, blocks and both phases."""
    cfg = payload["config"]
    parts = []
    for eps in cfg["radii"]:
        passed = total = 0
        for entry in payload["methods"].values():
            for phase in ("before", "after"):
                for row in entry["probe"][phase]["layers"]:
                    passed += round(row["per_radius"][_radius_key(row["per_radius"], eps)] * cfg["n_directions"])
                    total += cfg["n_directions"]
        parts.append(f"ε = {eps:g}: {passed} of {total}")
    return "Probes that were local maxima, by radius (all methods, blocks, init and trained): " + "; ".join(parts) + "."


def caption_max_condition(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    cfg = payload["config"]
    parts = []
    for method, entry in payload["methods"].items():
        fr = {ph: entry["probe"][ph] for ph in ("before", "after")}
        per_layer = {ph: ", ".join(f"{r['fraction_local_max']:.2f}" for r in fr[ph]["layers"]) for ph in fr}
        parts.append(f"{LABELS.get(method, method)}: overall {fr['before']['fraction_local_max']:.2f} at init "
                     f"(per block {per_layer['before']}) and {fr['after']['fraction_local_max']:.2f} trained "
                     f"(per block {per_layer['after']})")
    radii = ", ".join(f"{r:g}" for r in cfg["radii"])
    return (
        f"{_setup(payload)} Maximum-condition probe (controltune.diagnostics.maximum_condition_probe) on the "
        f"fixed batch at initialisation (hatched) and after training (filled): for each block l, "
        f"{cfg['n_directions']} random unit directions v over all controls acting in block l, at radii "
        f"ε ∈ {{{radii}}} relative to ‖u*_l‖ (the probe moves u*_l by ε‖u*_l‖ v), with x*_l and p*_(l+1) fixed; "
        "a probe counts as a local maximum when H_l(u* + εv) ≤ H_l(u*) and H_l(u* − εv) ≤ H_l(u*). "
        "The bar height is the fraction of directions that pass (bars of height 0 are drawn as thin slivers). "
        "Bottom row: ΔH_l(t) = H_l(u* + t‖u*_l‖v) − H_l(u*) along the first probe direction of each block, "
        f"t ∈ [−{max(cfg['radii']):g}, {max(cfg['radii']):g}], each line divided by its largest |ΔH_l| (blocks "
        "differ by decades); u* is a local maximiser along v only where the line is ∩-shaped around t = 0. "
        f"Measured fractions: {'. '.join(parts)}. {_by_radius(payload)} "
        "The maximum condition needs concavity of H_l in u, which "
        "Transformer blocks do not have, and is violated along any direction with a non-zero first-order term "
        "v·∇_u H_l at small ε; it is a diagnostic here, not an assumption. "
        f"Command: `{_command(payload)}` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="stationarity",
        title="Per-block stationarity ‖∇_{u_l} H_l‖ along AdamW training of LoRA and adapters on MiniLM, SST-2",
        sources=(SOURCE,),
        draw=draw_stationarity,
        caption=caption_stationarity,
        recompute=(("python", "experiments/stationarity.py"),),
    ),
    FigureSpec(
        name="max_condition",
        title="Maximum-condition probe per block of MiniLM, at init and after training",
        sources=(SOURCE,),
        draw=draw_max_condition,
        caption=caption_max_condition,
        recompute=(("python", "experiments/stationarity.py"),),
    ),
]

__all__ = ["FIGURES", "caption_max_condition", "caption_stationarity", "draw_max_condition", "draw_stationarity"]
