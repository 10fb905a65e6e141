"""Figure ``recommend_peft``: the recommender's peft folder and peft's LoRA, each trained in a plain PyTorch loop,
per seed, at the best validation step and at the last step.

Source: ``recommend_peft.json`` (``experiments/recommend_peft.py``, issue 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import load_json, versions_line
from ._variant import TASK_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "recommend_peft.json"
ROWS = "recommend_peft.jsonl"
ARMS = (("recommended", "recommender (its peft folder)", "tab:red"), ("lora", "peft LoRA", "tab:blue"))
REPORTS = (("best", "score", "at the best validation step"), ("end", "score_end", "at the last step"))


def seed_scores(rows: list[dict[str, Any]], pair: dict[str, Any], arm: str, field: str) -> list[float]:
    """The finished seeds' dev scores (``score`` at the best validation step, ``score_end`` at the last) of one arm
    of one (task, budget)."""
    return [r[field] for r in rows if r["status"] == "done" and r["config"]["arm"] == arm
            and (r["config"]["task"], r["config"]["budget"]) == (pair["task"], pair["budget"])]


def draw(results_dir: Path) -> Figure:
    """Per (task, budget) and report, each seed's dev score (dots) and the arm's mean ± two standard errors."""
    import math

    from controltune.results import read_jsonl

    payload = load_json(results_dir, SOURCE)
    rows = read_jsonl(results_dir / ROWS)
    pairs = payload["pairs"]
    fig = new_figure(max(4.0, 2.6 * len(pairs)), 3.2)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, pair in zip(axes, pairs):
        for j, (key, field, _where) in enumerate(REPORTS):
            for k, (arm, name, colour) in enumerate(ARMS):
                x = 2 * j + 0.35 * (k - 0.5)
                values = seed_scores(rows, pair, arm, field)
                ax.plot([x] * len(values), values, "o", markersize=3, alpha=0.5, color=colour)
                cell = pair["cells"][arm][key]
                if cell["mean"] is not None and cell["std"] is not None:
                    ax.errorbar([x], [cell["mean"]], yerr=[2 * cell["std"] / math.sqrt(cell["n_seeds"])], fmt="_",
                                markersize=10, capsize=3, color=colour, label=name if j == 0 else None)
        ax.set_xticks([0, 2], [where for _, _, where in REPORTS], fontsize=7)
        ax.set(title=f"{TASK_NAMES.get(pair['task'], pair['task'])} {pair['budget']}" +
               ("" if pair["complete"] else " (incomplete)"), ylabel="dev F1" if pair["task"] == "mrpc" else "dev")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=6, frameon=False)
    return fig


def _pair(pair: dict[str, Any]) -> str:
    def said(key: str) -> str:
        rec, lora, v = pair["cells"]["recommended"][key], pair["cells"]["lora"][key], pair["verdict"][key]
        if v["verdict"] is None:
            return "not judged yet"
        return (f"{rec['mean']:.3f} ± {rec['std']:.3f} against {lora['mean']:.3f} ± {lora['std']:.3f}, "
                f"{v['verdict']} ({v['difference']:+.3f} against {2 * v['se']:.3f})")

    state = "" if pair["complete"] else " (incomplete)"
    return (f"{TASK_NAMES.get(pair['task'], pair['task'])} {pair['budget']}{state}: at the best validation step "
            f"{said('best')}; at the last step {said('end')}")


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    return (
        "The recommender as a peft user trains it: per seed its folder (`controltune recommend`'s defaults, the "
        "validation rows withheld from its design rows) loaded by `PeftModel.from_pretrained` into MiniLM's "
        "`BertForSequenceClassification` and trained in a plain PyTorch loop (AdamW, linear warm-up and decay, "
        "gradient clipping, dropout on) with the GLUE harness's batch size, epochs, validation rows and cadence at "
        "the design table's rate; peft's LoRA on query and value at the same budget runs the same loop from the "
        "same seeded head. Dots: seeds; bars: mean ± two standard errors. Verdicts by the two-standard-error rule, "
        "recommender − LoRA. " + "; ".join(_pair(p) for p in payload["pairs"])
        + f". Command: `python experiments/recommend_peft.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="recommend_peft",
        title="The recommender's peft folder against peft's LoRA, trained in plain peft",
        sources=(SOURCE, ROWS),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/recommend_peft.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw", "seed_scores"]
