"""Figure ``efficiency``: peak training memory and step time per method at batch sizes 1, 8, 32 (issue 15).

Source: ``efficiency.json`` (``experiments/efficiency.py``): per (model, batch, method) the peak resident
memory of a fresh one-thread process over its training steps (above its memory before the model was
loaded), the activation bytes autograd saves for backward, and the median step time; the claims section
compares the savings with the Delta Tuning paper's (up to 3/4 of peak memory at small batch sizes, at least
1/3 at large ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import load_json, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "efficiency.json"
MODELS = (("minilm", "MiniLM (22.7M)"), ("smollm2", "SmolLM2 (134.5M)"))
COLOURS = {"full": "tab:gray", "lora": "tab:blue", "adapter": "tab:orange", "prefix": "tab:green",
           "prompt": "tab:purple", "bitfit": "tab:red", "layernorm": "tab:brown"}


def _rows(payload: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return [r for r in payload["rows"] if r["model"] == model and r["peak_mb"] is not None]


def draw(results_dir: Path) -> Figure:
    """Per model: peak memory (MB) against batch size per method (top), and step time (bottom); log axes."""
    payload = load_json(results_dir, SOURCE)
    models = [(m, t) for m, t in MODELS if _rows(payload, m)]
    fig = new_figure(4.2 * max(len(models), 1), 5.6)
    axes = fig.subplots(2, max(len(models), 1), squeeze=False)
    for col, (model, title) in enumerate(models):
        rows = _rows(payload, model)
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["batch"])
            batches = [r["batch"] for r in mine]
            style = {"color": COLOURS.get(method, "black"), "marker": "o", "label": method,
                     "linewidth": 2.0 if method == "full" else 1.2}
            axes[0][col].plot(batches, [r["peak_mb"] for r in mine], **style)
            axes[1][col].plot(batches, [r["step_s"] for r in mine], **style)
        axes[0][col].set(title=title, ylabel="peak training memory (MB)" if col == 0 else None, xscale="log",
                         yscale="log")
        axes[1][col].set(xlabel="batch size (sequences of 64 positions)",
                         ylabel="step time (s, one thread)" if col == 0 else None, xscale="log", yscale="log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks([1, 8, 32], ["1", "8", "32"])
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=6.5, frameon=False)
    fig.suptitle("Training memory and step time (AdamW, float32, CPU)", fontsize=9)
    return fig


def _claim(c: dict[str, Any]) -> str:
    small, large = c["largest_saving_small_batch"], c["smallest_saving_large_batch"]
    s = "–" if small is None else f"{100 * small:.0f} %"
    lg = "–" if large is None else f"{100 * large:.0f} %"
    held = ("holds" if c["up_to_three_quarters_at_small"] and c["at_least_one_third_at_large"]
            else "does not hold" if c["up_to_three_quarters_at_small"] is not None else "inconclusive")
    return (f"{c['model']}: the largest saving at batch 1 is {s} (paper: up to 75 %), the smallest at batch 32 "
            f"is {lg} (paper: at least 33 %) — the claim {held} here")


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    cells = []
    for model, title in MODELS:
        rows = _rows(payload, model)
        for b in sorted({r["batch"] for r in rows}):
            parts = ", ".join(f"{r['method']} {r['peak_mb']:.0f} MB ({r['peak_vs_full']:.2f}×)"
                              for r in rows if r["batch"] == b and r["peak_vs_full"] is not None)
            cells.append(f"{title} batch {b}: {parts}.")
    claims = "; ".join(_claim(c) for c in payload.get("claims", []))
    return (
        "Each (model, method, batch size) ran in a fresh Python process with one torch thread (float32, CPU): "
        "the model loaded, the method attached (LoRA r=8 on q,v; adapter bottleneck 64; prefix 10; prompt 20; "
        "BitFit on MiniLM, LayerNorm tuning on SmolLM2, which has no biases), seeded SST-2 training rows padded "
        "to 64 positions, 2 warm-up and 5 timed AdamW steps over the method's controls and the classification "
        "head. Peak memory: the process's peak resident memory during the steps minus its memory before the "
        "model was loaded (weights, gradients, optimiser states, activations); in parentheses, as a fraction of "
        "full fine-tuning's at the same batch size. Step time: median of the 5 steps; the machine was shared "
        "with a training sweep, so times compare methods within this run only. " + " ".join(cells)
        + f" Claim (Ding et al. 2023): {claims}. "
        f"Command: `python experiments/efficiency.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(
        name="efficiency",
        title="Peak training memory and step time of full fine-tuning and delta methods at batch sizes 1, 8, 32",
        sources=(SOURCE,),
        draw=draw,
        caption=caption,
        recompute=(("python", "experiments/efficiency.py"),),
    ),
]

__all__ = ["FIGURES", "caption", "draw"]
