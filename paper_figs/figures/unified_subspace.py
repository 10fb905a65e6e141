"""Figures ``unified_subspace`` and ``subspace_transfer`` (issue 16; Yi et al., 2022).

Source: ``unified_subspace.json`` (``experiments/unified_subspace.py``): per target task, method and subspace
dimension the stage-2 dev score (mean, std over seeds) and the method's original-space GLUE table score; the
transfer matrix (z found with one method, decoded by another); and ``unified_landscape.json``: every method's
dev score on the plane of a source task's intrinsic vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import edge_rate_note, load_json, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE, LANDSCAPE = "unified_subspace.json", "unified_landscape.json"
METHODS = ("lora", "adapter", "prefix")
TASKS = ("sst2", "mrpc", "rte", "cola")
COLOURS = {"original": "tab:gray", 4: "tab:blue", 32: "tab:orange"}
NEAR = 0.9
"""The subspace "nearly matches" the original space when it recovers at least this fraction, on average, of the
original space's gain over the base level (the head-only control, else the majority class)."""


def _cells(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in payload["cells"] if c["mean"] is not None]


def base_level(payload: dict[str, Any], task: str) -> tuple[float | None, str]:
    """The level a delta's gain is measured from on ``task``: the head-only control's mean (a linear probe of the
    frozen model in the stage-2 harness), else the majority class's score."""
    head = (payload.get("head_only") or {}).get(task) or {}
    if head.get("mean") is not None:
        return head["mean"], "head-only"
    return (payload.get("majority") or {}).get(task), "majority"


def recovered(payload: dict[str, Any]) -> tuple[dict[int, list[float]], list[str]]:
    """Per dimension, each cell's share of the original space's gain that the subspace recovers,
    ``(subspace − base) / (original − base)`` (:func:`base_level`), over the cells whose original space rises
    above the base by more than two standard errors of its mean; and the cells left out, named."""
    out: dict[int, list[float]] = {}
    left_out = []
    for c in _cells(payload):
        orig = c.get("original") or {}
        base, _ = base_level(payload, c["task"])
        if orig.get("mean") is None or base is None:
            continue
        se = (orig.get("std") or 0.0) / max(1, orig.get("n_seeds") or 1) ** 0.5
        gain = orig["mean"] - base
        if gain <= 2 * se or gain <= 0:
            left_out.append(f"{c['task']}/{c['method']} d={c['dim']}")
            continue
        out.setdefault(c["dim"], []).append((c["mean"] - base) / gain)
    return out, left_out


def draw_unified(results_dir: Path) -> Figure:
    """Per target task: original-space and subspace (each dimension) dev score per method, with std over seeds."""
    payload = load_json(results_dir, SOURCE)
    cells = _cells(payload)
    dims = sorted({c["dim"] for c in cells})
    tasks = [t for t in TASKS if any(c["task"] == t for c in cells)] or list(TASKS)
    fig = new_figure(max(2.6 * len(tasks), 5.0), 2.8)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    width = 0.8 / (1 + len(dims))
    for ax, task in zip(axes, tasks):
        mine = [c for c in cells if c["task"] == task]
        for i, method in enumerate(METHODS):
            at = [c for c in mine if c["method"] == method]
            orig = next((c["original"] for c in at if c.get("original")), None)
            if orig and orig.get("mean") is not None:
                ax.bar(i, orig["mean"], width, yerr=orig.get("std") or 0, color=COLOURS["original"],
                       label="original space" if i == 0 else None)
            for j, dim in enumerate(dims):
                c = next((c for c in at if c["dim"] == dim), None)
                if c:
                    ax.bar(i + (j + 1) * width, c["mean"], width, yerr=c["std"] or 0, color=COLOURS.get(dim, "k"),
                           label=f"subspace d={dim}" if i == 0 else None)
        level = payload.get("majority", {}).get(task)
        if level is not None:
            ax.axhline(level, color="k", linestyle=":", linewidth=0.8, label="majority class")
        head = (payload.get("head_only") or {}).get(task) or {}
        if head.get("mean") is not None:
            ax.axhline(head["mean"], color="tab:green", linestyle="--", linewidth=0.8, label="head only (z = 0)")
        metric = next((c["metric"] for c in mine if c.get("metric")), "")
        ax.set(title=f"target {task}", xticks=[i + width * len(dims) / 2 for i in range(len(METHODS))],
               ylabel=metric)
        ax.set_xticklabels(METHODS)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=6.5, frameon=False)
    fig.suptitle("Optimisation in a unified subspace learned on the other three tasks", fontsize=9)
    return fig


def _landscape(results_dir: Path) -> dict[str, Any] | None:
    path = Path(results_dir) / LANDSCAPE
    return load_json(results_dir, LANDSCAPE) if path.is_file() else None


def draw_transfer(results_dir: Path) -> Figure:
    """Transfer matrices (relative to the target method's original score, mean over targets) per dimension, and
    the landscape of every method on a source task's interpolation plane."""
    payload = load_json(results_dir, SOURCE)
    land = _landscape(results_dir)
    dims = sorted({t["dim"] for t in payload["transfer"]})
    n_cols = len(dims) + (len(land["methods"]) if land else 0)
    fig = new_figure(2.5 * max(n_cols, 1), 2.7)
    axes = fig.subplots(1, max(n_cols, 1), squeeze=False)[0]
    originals = {(c["task"], c["method"]): (c.get("original") or {}).get("mean") for c in payload["cells"]}
    for ax, dim in zip(axes, dims):
        grid = [[float("nan")] * len(METHODS) for _ in METHODS]
        for i, a in enumerate(METHODS):
            for j, b in enumerate(METHODS):
                vals = [t["mean"] / originals[(t["task"], b)] for t in payload["transfer"]
                        if (t["dim"], t["from"], t["to"]) == (dim, a, b) and originals.get((t["task"], b))]
                if vals:
                    grid[i][j] = sum(vals) / len(vals)
        im = ax.imshow(grid, vmin=0, vmax=1.1, cmap="viridis")
        for i in range(len(METHODS)):
            for j in range(len(METHODS)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set(title=f"transfer, d={dim}", xticks=range(len(METHODS)), yticks=range(len(METHODS)),
               xlabel="decoded by", ylabel="z found with")
        ax.set_xticklabels(METHODS, fontsize=7)
        ax.set_yticklabels(METHODS, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if land:
        grid = land["grid"]
        for ax, method in zip(axes[len(dims):], land["methods"]):
            z = [[next(p["scores"][method] for p in land["points"] if p["alpha"] == a and p["beta"] == b)
                  for a in grid] for b in grid]
            half = (grid[1] - grid[0]) / 2 if len(grid) > 1 else 0.5  # pixels centred on the grid points
            box = (grid[0] - half, grid[-1] + half)
            im = ax.imshow(z, origin="lower", extent=(*box, *box), cmap="magma")
            plane = land["plane"]
            for (x, y), name in zip(((1, 0), (0, 1), (0, 0)), plane):
                ax.plot(x, y, "c^", markersize=4)
                ax.annotate(name, (x, y), fontsize=6, color="c", xytext=(2, 2), textcoords="offset points")
            ax.set(title=f"{method} on {land['task']}", xlabel=f"α ({plane[0]})", ylabel=f"β ({plane[1]})")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Solution transfer across methods and the landscape of the interpolation plane", fontsize=9)
    return fig


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def caption_unified(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    cfg = payload["config"]
    rel, left_out = recovered(payload)
    parts = []
    for dim, vals in sorted(rel.items()):
        mean = sum(vals) / len(vals)
        verdict = "holds" if mean >= NEAR else "does not hold"
        parts.append(f"d={dim}: the subspace recovers {mean:.2f} of the original space's gain on average over "
                     f"{len(vals)} (task, method) cells (range {min(vals):.2f} to {max(vals):.2f}) — the claim "
                     f"{verdict} here (criterion ≥ {NEAR})")
    if left_out:
        parts.append(f"left out, the original space not above the base level by two standard errors: "
                     f"{', '.join(left_out)}")
    bases = "; ".join(f"{t}: {_fmt(base_level(payload, t)[0])} ({base_level(payload, t)[1]})" for t in TASKS
                      if any(c["task"] == t for c in _cells(payload)))
    cells = "; ".join(f"{c['task']}/{c['method']} d={c['dim']}: {_fmt(c['mean'])} ± {_fmt(c['std'])} "
                      f"(n={c['n_seeds']}; original {_fmt((c.get('original') or {}).get('mean'))})"
                      for c in _cells(payload))
    claim = "; ".join(parts) if parts else "inconclusive: no cell has both scores yet"
    return (
        "Leave one task out on MiniLM: for each target task, the projections of LoRA (r=8, q,v), the adapter "
        "(bottleneck 64) and prefix tuning (10 vectors) were trained on the seed-0 GLUE-table solutions of the "
        f"other three tasks ({cfg['approx']['steps']} steps of batch {cfg['approx']['batch_size']}, task loss at "
        "a random point of the intrinsic vectors' simplex plus the relative reconstruction error; "
        f"{_start(cfg['approx'])}; the encoder's first layer a fixed random map); then only z "
        f"(d = {', '.join(str(d) for d in cfg['dims'])}) and a fresh head were trained on the target through each "
        f"method's up-projection for {cfg['stage2_steps']} steps (the GLUE harness otherwise; the rate of z "
        "chosen on validation rows; seeds 0, 1, 2). Grey: the method trained in its original space (GLUE table, "
        "more steps); dotted: the majority class; dashed: the head-only control (z frozen at 0 through LoRA: only "
        "the head trains, a linear probe of the frozen model in the same harness, rate chosen the same way). A "
        "gain is measured from the base level (the head-only control where it ran, else the majority class): "
        f"{bases}. Claim (Yi et al. 2022, optimisation in the subspace nearly matches the original space): "
        f"{claim}. Cells: {cells}.{_edge_note(payload)} Cut to fit: one approximation per (target, d) (seed 0). "
        f"Command: `python experiments/unified_subspace.py` ({versions_line(payload)})."
    )


def _edge_note(payload: dict[str, Any]) -> str:
    """The cells and head-only controls whose chosen rate of z is the edge of the rates tried."""
    heads = [{"task": t, "method": "head-only control", **h}
             for t, h in sorted((payload.get("head_only") or {}).items()) if h]
    return edge_rate_note([*_cells(payload), *heads],
                          lambda c: f"{c['task']}/{c['method']}" + (f" d={c['dim']}" if "dim" in c else ""))


def _start(approx: dict[str, Any]) -> str:
    """How stage 1 started (``init``; runs from before the option started from random weights)."""
    if approx.get("init", "random") == "aligned":
        return "started aligned: each task's solutions encoded to one unit vector e_t, decoded exactly"
    return "started from small random weights, as the paper's code"


def caption_transfer(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    off = [t for t in payload["transfer"] if t["from"] != t["to"]]
    majority = payload.get("majority", {})
    above = [t for t in off if majority.get(t["task"]) is not None and t["mean"] > majority[t["task"]]]
    heads = payload.get("head_only") or {}
    with_head = [t for t in off if (heads.get(t["task"]) or {}).get("mean") is not None]
    above_head = [t for t in with_head if t["mean"] > heads[t["task"]]["mean"]]
    transfer = (f"{len(above)} of {len(off)} off-diagonal (dim, from, to, task) entries score above the "
                "majority-class level" + (f", {len(above_head)} of {len(with_head)} above the head-only control "
                                          "(a linear probe: the bar a transferred z must clear to have done "
                                          "anything)" if with_head else "") if off else "no transfer yet")
    overlap = payload.get("landscape_overlap")
    land = (f"landscape: each method's good region (at least halfway from the majority level to its best point) "
            f"covers {overlap['good']} of {overlap['n_points']} points; {overlap['shared']} are good for all "
            f"three (Jaccard {_fmt(overlap['jaccard'])})" if overlap else "landscape not computed yet")
    plane = "a plane α P_a + β P_b + (1 − α − β) P_c of intrinsic vectors"
    if (results_dir / LANDSCAPE).is_file():
        landscape = load_json(results_dir, LANDSCAPE)
        names = ", ".join(landscape.get("plane", []))
        plane = (f"the plane α P_a + β P_b + (1 − α − β) P_c through the intrinsic vectors of the source tasks "
                 f"{names} (each the mean over the methods; markers: the three points), scored on "
                 f"{landscape.get('task')}" if landscape.get("plane_kind") == "tasks" else
                 f"the plane α I_a + β I_b + (1 − α − β) I_c of the intrinsic vectors of {names} on "
                 f"{landscape.get('task')} (markers: the three solutions)")
    return (
        "Left: the z trained with one method (rows) decoded by each method's up-projection (columns) and scored on "
        "the target's dev set without further training, as a fraction of the column method's original-space score, "
        "averaged over target tasks and seeds; the diagonal is the stage-2 score itself. Right: dev score (256 "
        f"rows) of each method on {plane}, each method with its own source head. Claims (Yi et al. 2022): "
        f"solutions transfer across methods with non-trivial performance — {transfer}; the methods' good regions "
        f"overlap broadly — {land}. Command: `python experiments/unified_subspace.py` ({versions_line(payload)})."
    )


RECOMPUTE = (("python", "experiments/unified_subspace.py"),)
FIGURES = [
    FigureSpec(name="unified_subspace", title="Optimisation in a unified subspace of adapter, prefix and LoRA against "
                                              "the original space", sources=(SOURCE,), draw=draw_unified,
               caption=caption_unified, recompute=RECOMPUTE),
    FigureSpec(name="subspace_transfer", title="Transfer of subspace solutions across methods, and the landscape of "
                                               "the interpolation plane", sources=(SOURCE, LANDSCAPE),
               draw=draw_transfer, caption=caption_transfer, recompute=RECOMPUTE),
]

__all__ = ["FIGURES", "base_level", "recovered"]
