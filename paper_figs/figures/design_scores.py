"""Figure ``design_scores``: where a delta can act, per block and module of MiniLM, by two control scores.

Source: ``design_scores.json`` (``experiments/design_scores.py``): for every linear map (block l,
role r) the readout-weighted controllability-Gramian trace ``tr(CᵀHC)/S`` (Hutchinson mean and
standard error), the co-state energy ``‖∇_W H‖_F²``, the LoRA rank the greedy budget allocation
gives it under each score, and per block ``‖p_{l+1}‖²`` (an additive control on the block output).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.colors import LogNorm

from controltune.figures import FigureSpec, new_figure

from ._common import argv_from_config, load_json, sci, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

SOURCE = "design_scores.json"
SCORES = (("gramian", r"controllability-Gramian trace $\mathrm{tr}(C^\top H C)/S$"),
          ("costate", r"co-state energy $\Vert\nabla_W H\Vert_F^2$"))


def score_grid(payload: dict[str, Any], score: str) -> list[list[float]]:
    """``grid[l][j]`` = score of role ``roles[j]`` in block l divided by the largest score (max = 1)."""
    roles, n = payload["roles"], payload["n_layers"]
    grid = [[float("nan")] * len(roles) for _ in range(n)]
    for row in payload["sites"]:
        grid[row["layer"]][roles.index(row["role"])] = row[score]
    top = max(v for line in grid for v in line)
    if not top > 0:
        raise ValueError(f"design_scores: every {score} score is {top}; nothing to normalise")
    return [[v / top for v in line] for line in grid]


def _ranks(payload: dict[str, Any], score: str) -> dict[tuple[int, str], int]:
    return {(r["layer"], r["role"]): r[f"rank_{score}"] for r in payload["sites"]}


def draw(results_dir: Path) -> Figure:
    """Two heat maps (blocks × roles, normalised, log colour) with the allocated LoRA ranks, and the
    per-block co-state energy of an additive control on the block output."""
    payload = load_json(results_dir, SOURCE)
    roles, n = payload["roles"], payload["n_layers"]
    fig = new_figure(10.0, 3.6)
    axes = fig.subplots(1, 3, width_ratios=(1.0, 1.0, 0.55))
    grids = {score: score_grid(payload, score) for score, _ in SCORES}
    low = min(v for g in grids.values() for line in g for v in line if v > 0)
    norm = LogNorm(vmin=max(low, 1e-4), vmax=1.0)
    image = None
    for ax, (score, title) in zip(axes[:2], SCORES):
        grid, ranks = grids[score], _ranks(payload, score)
        image = ax.imshow(grid, norm=norm, cmap="magma", aspect="auto", origin="upper")
        for layer in range(n):
            for j, role in enumerate(roles):
                value, rank = grid[layer][j], ranks[(layer, role)]
                text_colour = "black" if value > 0.1 else "white"
                label = f"{value:.2g}" + (f"\nr={rank}" if rank else "")
                ax.text(j, layer, label, ha="center", va="center", fontsize=6.5, color=text_colour,
                        fontweight="bold" if rank else "normal")
                if rank:
                    ax.add_patch(_cell_frame(j, layer))
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(n), [str(i) for i in range(n)])
        ax.set(xlabel="module (role)", ylabel="block l",
               title=f"{title}\n(÷ max; framed: LoRA r={payload['config']['rank']} placed)")
    fig.colorbar(image, ax=axes[:2], shrink=0.9, label="score ÷ largest score (log)")
    energy = payload["layer_energy"]
    top = max(energy)
    axes[2].barh(range(n), [e / top for e in energy], color="tab:gray")
    axes[2].set_yticks(range(n), [str(i) for i in range(n)])
    axes[2].invert_yaxis()  # block 0 on top, as in the heat maps
    axes[2].set(xlabel=r"$\Vert p_{l+1}\Vert^2$ ÷ max", ylabel="block l", title="additive control on\nthe block output")
    axes[2].grid(True, axis="x", alpha=0.3)
    fig.suptitle("Where can a delta act? Control scores of every linear map of all-MiniLM-L6-v2 on an SST-2 batch",
                 fontsize=9)
    return fig


def _cell_frame(col: int, row: int) -> Rectangle:
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1.0, 1.0, fill=False, edgecolor="tab:cyan", linewidth=1.6)


def _top(payload: dict[str, Any], score: str, k: int = 5) -> str:
    rows = sorted(payload["sites"], key=lambda r: -r[score])[:k]
    return ", ".join(f"{r['layer']}.{r['role']} ({sci(r[score], 2)})" for r in rows)


def _chosen(payload: dict[str, Any], score: str) -> str:
    return ", ".join(f"{r['layer']}.{r['role']}" for r in payload["sites"] if r[f"rank_{score}"])


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (no ties expected among float scores)."""
    def ranks(v: list[float]) -> list[int]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0] * len(v)
        for rank, i in enumerate(order):
            out[i] = rank
        return out

    n = len(a)
    if n < 2 or n != len(b):
        raise ValueError(f"spearman needs two lists of the same length >= 2, got {len(a)} and {len(b)}")
    d2 = sum((x - y) ** 2 for x, y in zip(ranks(a), ranks(b)))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    cfg = payload["config"]
    command = argv_from_config(["python", "experiments/design_scores.py"], cfg,
                               ("model", "n_batch", "max_length", "rank", "n_probes", "seed"))
    rel_se = max(r["gramian_se"] / r["gramian"] for r in payload["sites"] if r["gramian"] > 0)
    energy = ", ".join(sci(e, 2) for e in payload["layer_energy"])
    rho = spearman([r["gramian"] for r in payload["sites"]], [r["costate"] for r in payload["sites"]])
    return (
        f"all-MiniLM-L6-v2 ({cfg['dtype']}) at its pretrained weights with a seeded (seed {cfg['seed']}) "
        f"classification head; a batch of {cfg['n_batch']} seeded SST-2 training sentences (≤{cfg['max_length']} "
        f"tokens). Each cell is a linear map (block l, role: {', '.join(payload['roles'])}) taken as a full-rank "
        "control ΔW. Left: the readout-weighted controllability-Gramian trace tr(CᵀHC)/S with C = G Φ B the "
        "linearised map from ΔW to the logits and H the Gauss–Newton curvature of the cross-entropy "
        "(controltune.design.gramian.module_gramian_scores, reverse-mode Hutchinson, mean of "
        f"{cfg['n_probes']} one-probe estimates; largest relative standard error {rel_se:.0%}). Middle: the "
        "co-state energy ‖∇_W H‖_F² = ‖∂J/∂W‖_F² (costate_energy). Each map is divided by its largest entry "
        "(log colour scale; cell text = normalised score). Framed cells carry the LoRA rank r the greedy "
        "allocation (controltune.design.placement.greedy_allocate, score per parameter, as gramian_lora) "
        f"places under the budget of rank-{cfg['rank']} LoRA on q and v of every block ({payload['budget']} "
        f"parameters; used {payload['used_gramian']} by the Gramian and {payload['used_costate']} by the "
        f"co-state energy). Right: ‖p_(l+1)‖² (layer_costate_energy), the co-state energy of an additive "
        f"per-token control on the output of block l, ÷ max (raw: {energy}). Spearman rank correlation of the "
        f"two scores over the {len(payload['sites'])} maps: {rho:.3f}. Largest Gramian scores: "
        f"{_top(payload, 'gramian')}; largest co-state energies: {_top(payload, 'costate')}. Placed by the "
        f"Gramian: {_chosen(payload, 'gramian')}; by the co-state energy: {_chosen(payload, 'costate')}. "
        f"One batch, one head seed. Command: `{' '.join(command)}` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="design_scores",
        title="Controllability-Gramian and co-state-energy scores of every linear map of MiniLM, with the "
              "greedy LoRA placement",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/design_scores.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw", "score_grid", "spearman"]
