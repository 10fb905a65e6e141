"""Figure ``design_ablation``: the recommender taken apart, its placement with LoRA's own start between LoRA on q and
v and the whole recommender, and where the placement puts its ranks.

Source: ``design_ablation.json`` (``experiments/design_ablation.py``): ``recommended_lora`` with ``init: standard``
(the co-state's maps and ranks, ``B = 0`` at the start) at the recommender's chosen rates, judged against the design
table's LoRA (the placement's share) and against the recommender (the start's share; issue 18).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import chance_text, load_json, versions_line
from ._variant import TASK_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "design_ablation.json"
ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
BARS = (("lora", "LoRA on q, v", "tab:blue"), ("placement", "placement, LoRA's start", "tab:orange"),
        ("recommended_lora", "placement + co-state start", "tab:green"))


def bars(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (task, budget) with a scored placement cell: ``{task, budget, lora, placement, recommended_lora}``, each
    ``(mean, std, n_seeds)`` (LoRA's and the recommender's from the rows' baseline cells)."""
    out = []
    for c in payload["cells"]:
        if not c["n_seeds"]:
            continue
        entry: dict[str, Any] = {"task": c["task"], "budget": c["budget"],
                                 "placement": (c["mean"], c["std"], c["n_seeds"])}
        for r in payload["rows"]:
            if (r["task"], r["budget"]) == (c["task"], c["budget"]) and "baseline_mean" in r:
                entry[r["baseline"]] = (r["baseline_mean"], r["baseline_std"], r["baseline_n_seeds"])
        out.append(entry)
    return out


def role_shares(ranks: list[dict[str, int] | None]) -> dict[str, float]:
    """The share of the rank units each role (``q`` … ``ffn_out``, summed over layers) gets, averaged over seeds;
    ``ranks`` maps ``"<layer>_<role>"`` to a rank, one dict per seed."""
    seeds = [r for r in ranks if r]
    shares = {role: 0.0 for role in ROLES}
    for r in seeds:
        total = sum(r.values())
        for site, rank in r.items():
            role = site.split("_", 1)[1]
            shares[role] = shares.get(role, 0.0) + rank / total / len(seeds)
    return shares


def difference(a: tuple[float, float | None, int], b: tuple[float, float | None, int]) -> tuple[float, float]:
    """``(mean_a − mean_b, se)`` of two ``(mean, std, n_seeds)`` cells, ``se = (s_a²/n_a + s_b²/n_b)^{1/2}``."""
    return a[0] - b[0], math.sqrt((a[1] or 0.0) ** 2 / a[2] + (b[1] or 0.0) ** 2 / b[2])


def draw(results_dir: Path) -> Figure:
    """Left: the placement alone and the whole recommender minus LoRA on q and v per (task, budget), ± two standard
    errors of the difference (the rule's margin).  Right: the placement's rank units per role."""
    payload = load_json(results_dir, SOURCE)
    shown = [e for e in bars(payload) if e.get("lora")]
    fig = new_figure(10.0, 3.6)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    for k, (key, name, colour) in enumerate(BARS[1:]):
        found = [(i, difference(e[key], e["lora"])) for i, e in enumerate(shown) if e.get(key) and e[key][2] >= 2]
        left.errorbar([i + 0.15 * (2 * k - 1) for i, _ in found], [d for _, (d, _) in found],
                      yerr=[2 * se for _, (_, se) in found], fmt="o", markersize=4, capsize=2, color=colour,
                      label=name)
    left.axhline(0.0, color=BARS[0][2], linewidth=0.8, label=BARS[0][1])
    left.set_xticks(range(len(shown)), [f"{TASK_NAMES.get(e['task'], e['task'])}\n{e['budget']}" for e in shown],
                    fontsize=7)
    left.set(ylabel="dev score − LoRA's (task metric)", title="recommender taken apart")
    left.legend(fontsize=6, frameon=False)
    left.grid(True, axis="y", alpha=0.3)
    cells = [c for c in payload["cells"] if any(c.get("ranks") or [])]
    for i, c in enumerate(cells):
        bottom = 0.0
        for j, (role, share) in enumerate(role_shares(c["ranks"]).items()):
            right.bar(i, share, 0.7, bottom=bottom, color=f"C{j}", label=role if i == 0 else None)
            bottom += share
    right.set_xticks(range(len(cells)), [f"{TASK_NAMES.get(c['task'], c['task'])}\n{c['budget']}" for c in cells],
                     fontsize=7)
    right.set(ylabel="share of rank units", title="where the placement puts its ranks", ylim=(0, 1))
    if cells:
        right.legend(fontsize=6, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _verdicts(rows: list[dict[str, Any]], meaning: str) -> str:
    """``SST-2/b74k tie (+0.004 against 0.011)`` for each judged row of ``meaning``."""
    parts = [f"{TASK_NAMES.get(r['task'], r['task'])}/{r['budget']} {r['verdict']} ({r['difference']:+.3f} against "
             f"{2 * r['se']:.3f})" for r in rows if r["meaning"] == meaning and r["verdict"] in ("win", "tie", "loss")]
    return "; ".join(parts) or "none judged yet"


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    runs = sum(c["n_seeds"] for c in payload["cells"])
    state = ("complete (3 seeds in every cell)" if payload["complete"] else
             f"running: {runs} of {3 * len(payload['cells'])} runs finished, so every verdict is provisional")
    return (
        "The recommender (`recommended_lora`) is a placement (the maps and ranks its co-state scores allocate under "
        "the budget, any linear map) and a start (a trust-region step along the co-state). Its placement alone, with "
        "LoRA's own start (B = 0), trained at the recommender's chosen rate on the design table's harness (seeds 0, "
        "1, 2), beside the table's LoRA on q and v and the table's recommender (left: each minus LoRA, ± two "
        "standard errors of the difference; right: the placement's rank units per role, summed over layers, mean "
        "over seeds). Verdicts by the "
        f"two-standard-error rule (difference against the margin 2·se). State: {state}. The placement against LoRA "
        f"(a win is the placement's): {_verdicts(payload['rows'], 'placement')}. The placement against the "
        f"recommender (a loss is the co-state start's gain): {_verdicts(payload['rows'], 'start')}."
        + chance_text(payload.get("chance"), "the placement no better than LoRA's q and v")
        + f" Command: `python experiments/design_ablation.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="design_ablation",
        title="The recommender's placement with LoRA's own start",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/design_ablation.py"),),
    ),
]

__all__ = ["FIGURES", "bars", "caption", "difference", "draw", "role_shares"]
