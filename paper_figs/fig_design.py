"""Figures and table of the control-designed delta structures (reads experiments/results/design_eval.jsonl only).

Writes ``paper_figs/fig_design_pareto.{pdf,png}`` (dev score vs trainable parameters),
``paper_figs/fig_design_curves.{pdf,png}`` (validation accuracy and training loss vs step) and
``paper_figs/design_table.md`` (mean ± std over seeds of the ``main`` stage; ``method@lr`` rows are
``ablation`` runs at a fixed learning rate).

    PYTHONPATH=. .venv/bin/python paper_figs/fig_design.py
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT.parent / "experiments" / "results" / "design_eval.jsonl"
DESIGNED = {"costate_lora", "gramian_lora", "riccati_lora", "closed_loop_prefix"}
ORDER = ["lora", "costate_lora", "gramian_lora", "adapter", "riccati_lora", "prefix", "closed_loop_prefix",
         "bitfit", "full"]


def load_rows(path: Path = RESULTS) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from an interrupted run
    return rows


def label(row: dict) -> str:
    """``method`` for the main stage; ``method@lr`` for an ablation run at a fixed learning rate."""
    return row["method"] if row["stage"] == "main" else f"{row['method']}@{row['lr']:g}"


def grouped(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["stage"] in ("main", "ablation"):
            out[(r["task"], label(r))].append(r)
    return out


def ordered(groups: dict) -> list[str]:
    """Labels in ORDER of their method, ablations right after their method."""
    labels = {m for _, m in groups}
    return sorted(labels, key=lambda m: (ORDER.index(m.split("@")[0]) if m.split("@")[0] in ORDER else 99, m))


def _metric(task: str) -> str:
    return {"mrpc": "f1", "cola": "mcc"}.get(task, "accuracy")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def colours(groups: dict) -> dict[str, tuple]:
    """One distinct colour per label (more labels than the default 10-colour cycle)."""
    cmap = plt.get_cmap("tab20")
    return {m: cmap(i % 20) for i, m in enumerate(ordered(groups))}


def table(groups: dict) -> str:
    tasks = sorted({t for t, _ in groups})
    lines = ["| method | trainable | " + " | ".join(f"{t} dev {_metric(t)} (n seeds)" for t in tasks) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
    for m in ordered(groups):
        n_tr = next(r["n_trainable"] for t in tasks for r in groups.get((t, m), []))
        cells = []
        for t in tasks:
            rs = groups.get((t, m), [])
            if not rs:
                cells.append("–")
                continue
            mu, sd = _mean_std([r["dev"][_metric(t)] for r in rs])
            cells.append(f"{mu:.3f} ± {sd:.3f} ({len(rs)})" if len(rs) > 1 else f"{mu:.3f} (1)")
        name = f"**{m}**" if m.split("@")[0] in DESIGNED else m
        lines.append(f"| {name} | {n_tr:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto(groups: dict) -> None:
    tasks = sorted({t for t, _ in groups})
    colour = colours(groups)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for m in ordered(groups):
            rs = groups.get((t, m), [])
            if not rs or "@" in m:
                continue
            mu, sd = _mean_std([r["dev"][_metric(t)] for r in rs])
            ax.errorbar(rs[0]["n_trainable"], mu, yerr=0 if sd != sd else sd, fmt="o" if m in DESIGNED else "s",
                        capsize=3, label=m, color=colour[m], mfc="none" if m not in DESIGNED else None)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"dev {_metric(t)}")
        ax.set_title(t)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    for ext in ("pdf", "png"):
        fig.savefig(ROOT / f"fig_design_pareto.{ext}", dpi=150)
    plt.close(fig)


def curves(groups: dict) -> None:
    tasks = sorted({t for t, _ in groups})
    colour = colours(groups)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.4 * len(tasks), 6.0), squeeze=False)
    for col, t in enumerate(tasks):
        for m in ordered(groups):
            rs = groups.get((t, m), [])
            if not rs:
                continue
            style = "-" if m.split("@")[0] in DESIGNED else (":" if "@" in m else "--")
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in rs:
                for point in r["val_curve"]:
                    by_step[point["step"]].append(point[_metric(t)])
            steps = sorted(by_step)
            means = [statistics.fmean(by_step[s]) for s in steps]
            axes[0][col].plot(steps, means, style, marker=".", label=m, color=colour[m])
            n = min(len(r["train_loss"]) for r in rs)
            loss = [statistics.fmean(r["train_loss"][i] for r in rs) for i in range(n)]
            smooth = [statistics.fmean(loss[max(0, i - 3):i + 1]) for i in range(n)]
            axes[1][col].plot(range(1, n + 1), smooth, style, label=m, color=colour[m])
        axes[0][col].set_title(f"{t}: held-out validation")
        axes[0][col].set_ylabel(_metric(t))
        axes[1][col].set_ylabel("training loss (4-step mean)")
        axes[1][col].set_xlabel("step")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    for ext in ("pdf", "png"):
        fig.savefig(ROOT / f"fig_design_curves.{ext}", dpi=150)
    plt.close(fig)


def main() -> None:
    groups = grouped(load_rows())
    if not groups:
        raise SystemExit(f"no 'main' rows in {RESULTS}; run experiments/design_eval.py first")
    text = table(groups)
    (ROOT / "design_table.md").write_text(text)
    print(text)
    pareto(groups)
    curves(groups)


if __name__ == "__main__":
    main()
