"""Control-designed delta structures against the standard ones (``experiments/design_eval.py``).

Reads ``design_eval.jsonl`` (one row per run: budget, task, method, seed, learning rate,
trainable count, validation curve, dev score).  Only runs at each method's *selected* learning
rate enter the table and the figures: the rate with the best seed-0 final validation accuracy
(ties: lower validation loss) on the selection cell (first budget, first task of the sweep),
exactly as the sweep chooses it.  Dev scores are never used for a choice.

A design *wins* (*loses*) against its matched baseline when the difference of the seed means
exceeds twice its standard error ``sqrt(sd_a²/n_a + sd_b²/n_b)``; otherwise it *ties*.  With three
seeds this is a coarse test; the table shows the numbers it is made from.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from controltune.figures import FigureSpec, new_figure
from controltune.results import read_jsonl, row_done

if TYPE_CHECKING:
    from collections.abc import Sequence

SOURCE = "design_eval.jsonl"
DESIGNED = ("costate_lora", "gramian_lora", "riccati_lora", "closed_loop_prefix")
ORDER = ("lora", "costate_lora", "gramian_lora", "adapter", "riccati_lora", "prefix", "closed_loop_prefix",
         "bitfit", "full")
MATCHED = {"costate_lora": ("lora",), "gramian_lora": ("lora",), "riccati_lora": ("lora", "adapter"),
           "closed_loop_prefix": ("prefix",)}
"""Each design's baselines: the standard method of the same structure at the same budget."""
TASK_ORDER = ("sst2", "mrpc", "rte", "cola")
TASK_NAME = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA"}
METRIC = {"sst2": "accuracy", "rte": "accuracy", "mrpc": "f1", "cola": "mcc"}
COMMAND = ("sh", "-c", "nice -n 10 env PYTHONPATH=. python experiments/design_eval.py --budget-min 600")


def load_rows(results_dir: Path) -> list[dict]:
    """Finished rows of ``design_eval.jsonl`` (diverged runs have no score and are left out)."""
    rows = [r for r in read_jsonl(Path(results_dir) / SOURCE) if row_done(r)]
    if not rows:
        raise ValueError(f"{Path(results_dir) / SOURCE} has no rows; run experiments/design_eval.py")
    return rows


def selection_cell(rows: list[dict]) -> tuple[str, str]:
    """(budget, task) on which the learning rates were chosen: the one cell whose seed-0 runs span a grid."""
    cells = defaultdict(set)
    for r in rows:
        if r["seed"] == 0:
            cells[(r["budget"], r["task"], r["method"])].add(r["lr"])
    grid_cells = {(b, t) for (b, t, _), lrs in cells.items() if len(lrs) > 1}
    if len(grid_cells) != 1:
        raise ValueError(f"expected one selection cell with a learning-rate grid, found {sorted(grid_cells)}")
    return grid_cells.pop()


def chosen_lr(rows: list[dict]) -> dict[str, float]:
    """method -> learning rate with the best seed-0 validation accuracy on the selection cell."""
    budget, task = selection_cell(rows)
    cands: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if (r["budget"], r["task"], r["seed"]) == (budget, task, 0):
            cands[r["method"]].append(r)
    return {m: max(rs, key=lambda r: (r["val"]["accuracy"], -r["val"]["loss"]))["lr"] for m, rs in cands.items()}


def cells(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(budget, task, method) -> runs at the method's chosen learning rate, one per seed."""
    lr = chosen_lr(rows)
    out: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] in lr and r["lr"] == lr[r["method"]]:
            out[(r["budget"], r["task"], r["method"])].append(r)
    return out


def score(row: dict) -> float:
    """The task's dev metric (accuracy; F1 for MRPC; Matthews correlation for CoLA)."""
    return row["dev"][METRIC[row["task"]]]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def verdict(design: list[float], baseline: list[float]) -> str:
    """``win``/``loss`` if |mean difference| > 2 standard errors, else ``tie`` (``n/a`` below 2 seeds each)."""
    if len(design) < 2 or len(baseline) < 2:
        return "n/a"
    (ma, sa), (mb, sb) = mean_std(design), mean_std(baseline)
    se = (sa**2 / len(design) + sb**2 / len(baseline)) ** 0.5
    diff = ma - mb
    return "tie" if abs(diff) <= 2 * se else ("win" if diff > 0 else "loss")


def _sorted_keys(groups: dict[tuple[str, str, str], list[dict]]) -> tuple[list[str], list[str]]:
    budgets = sorted({b for b, _, _ in groups}, key=lambda b: -int("".join(c for c in b if c.isdigit()) or 0))
    tasks = sorted({t for _, t, _ in groups}, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99)
    return budgets, tasks


def table_markdown(rows: list[dict]) -> str:
    """Mean ± std (n seeds) of the dev metric per budget × method × task, and the verdicts."""
    groups = cells(rows)
    budgets, tasks = _sorted_keys(groups)
    lr = chosen_lr(rows)
    head = ["| budget | method | lr | trainable | " + " | ".join(f"{t} ({METRIC[t]})" for t in tasks) + " |",
            "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
    lines = list(head)
    for b in budgets:
        for m in ORDER:
            runs = [groups.get((b, t, m), []) for t in tasks]
            if not any(runs):
                continue
            n_tr = next(r["n_trainable"] for rs in runs for r in rs)
            cells_ = []
            for rs in runs:
                if not rs:
                    cells_.append("–")
                    continue
                mu, sd = mean_std([score(r) for r in rs])
                cells_.append(f"{mu:.3f} ± {sd:.3f} ({len(rs)})" if len(rs) > 1 else f"{mu:.3f} (1)")
            name = f"**{m}**" if m in DESIGNED else m
            lines.append(f"| {b} | {name} | {lr[m]:g} | {n_tr:,} | " + " | ".join(cells_) + " |")
    lines += ["", "| budget | design | vs | " + " | ".join(tasks) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for b in budgets:
        for d, bases in MATCHED.items():
            for base in bases:
                out = []
                for t in tasks:
                    a = [score(r) for r in groups.get((b, t, d), [])]
                    c = [score(r) for r in groups.get((b, t, base), [])]
                    out.append(verdict(a, c) if a and c else "–")
                if any(v != "–" for v in out):
                    lines.append(f"| {b} | {d} | {base} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _colours(methods: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


TICKS = tuple(m * 10.0**e for e in range(2, 9) for m in (1, 2, 5))
"""Labelled parameter counts on the log axis: 1-2-5 per decade."""


def _count(x: float, _pos: int | None = None) -> str:
    """Tick label of a parameter count: 10k, 100k, 1M, ..."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:g}"


def draw_pareto(results_dir: Path) -> Figure:
    """Per task: mean dev score (± std over seeds) against trainable parameters, log x; a method's
    budgets joined by a line; designs filled markers, baselines open."""
    groups = cells(load_rows(results_dir))
    budgets, tasks = _sorted_keys(groups)
    colour = _colours(ORDER)
    fig = new_figure(2.6 * len(tasks), 2.9)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    counts = [r["n_trainable"] for (_, _, m), rs in groups.items() if m != "full" for r in rs]
    x_range = (min(counts) / 1.25, max(counts) * 1.25)  # one x range for every panel
    for ax, t in zip(axes, tasks):
        for m in ORDER:
            pts = []
            for b in budgets:
                rs = groups.get((b, t, m), [])
                if rs:
                    mu, sd = mean_std([score(r) for r in rs])
                    pts.append((rs[0]["n_trainable"], mu, 0.0 if sd != sd else sd))
            if not pts:
                continue
            xs, ys, es = zip(*sorted(pts))
            if m == "full":  # 300x the delta budgets: a reference level, not a point on the same axis
                ax.axhline(ys[0], color=colour[m], ls=":", lw=1.0, label=f"full fine-tuning ({_count(xs[0])} params)")
                ax.axhspan(ys[0] - es[0], ys[0] + es[0], color=colour[m], alpha=0.12, lw=0)
                continue
            ax.errorbar(xs, ys, yerr=es, fmt="-o" if m in DESIGNED else "--s", capsize=2, ms=4, lw=0.8,
                        color=colour[m], mfc=colour[m] if m in DESIGNED else "none", label=m)
        ax.set_xscale("log")
        ax.set_xlim(*x_range)
        ax.xaxis.set_major_locator(FixedLocator([t for t in TICKS if x_range[0] <= t <= x_range[1]]))
        ax.xaxis.set_major_formatter(FuncFormatter(_count))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"dev {METRIC[t]}")
        ax.set_title(TASK_NAME.get(t, t))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    return fig


def draw_curves(results_dir: Path) -> Figure:
    """Per task at the largest budget: validation score (mean over seeds) and training loss
    (running mean over a twentieth of the run, mean over seeds) against optimiser step."""
    groups = cells(load_rows(results_dir))
    budgets, tasks = _sorted_keys(groups)
    b = budgets[0]
    colour = _colours(ORDER)
    fig = new_figure(2.6 * len(tasks), 4.6)
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for col, t in enumerate(tasks):
        w = 4
        for m in ORDER:
            rs = groups.get((b, t, m), [])
            if not rs:
                continue
            style = "-" if m in DESIGNED else "--"
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in rs:
                for point in r["val_curve"]:
                    by_step[point["step"]].append(point[METRIC[t]])
                by_step[r["steps"]].append(r["val"][METRIC[t]])
            steps = sorted(by_step)
            axes[0][col].plot(steps, [statistics.fmean(by_step[s]) for s in steps], style, marker=".", ms=3,
                              lw=0.9, color=colour[m], label=m)
            n = min(len(r["train_loss"]) for r in rs)
            loss = [statistics.fmean(r["train_loss"][i] for r in rs) for i in range(n)]
            w = max(4, n // 20)
            smooth = [statistics.fmean(loss[max(0, i - w + 1):i + 1]) for i in range(n)]
            axes[1][col].plot(range(1, n + 1), smooth, style, lw=0.8, color=colour[m])
        axes[0][col].set_title(f"{TASK_NAME.get(t, t)} ({b})")
        axes[0][col].set_ylabel(f"validation {METRIC[t]}")
        axes[1][col].set_ylabel(f"training loss ({w}-step mean)")
        axes[1][col].set_xlabel("optimiser step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    return fig


def _batching(results_dir: Path) -> str:
    """Batch size and max length of the sweep's invocations (read, not assumed)."""
    path = Path(results_dir) / SOURCE.replace(".jsonl", ".invocations.jsonl")
    if not path.is_file():
        return "batch size and max length not recorded"
    configs = [json.loads(line)["config"] for line in path.read_text().splitlines() if line.strip()]
    pairs = sorted({(c["batch_size"], c["max_length"]) for c in configs})
    return "; ".join(f"batch {b}, max length {m}" for b, m in pairs)


def _protocol(results_dir: Path) -> str:
    rows = load_rows(results_dir)
    budget, task = selection_cell(rows)
    sizes = sorted({(r["task"], r["n_train"], r["n_val"], r["n_dev"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    size_text = "; ".join(f"{t}: {a} train / {v} held-out validation / {d} dev rows" for t, a, v, d in sizes)
    return (f"MiniLM (all-MiniLM-L6-v2, float32), one epoch of AdamW, {_batching(results_dir)}, dropout off; "
            f"{size_text}; seeds {seeds}. Learning rates chosen per method on {task} at {budget} by seed-0 "
            f"validation accuracy over a two-point grid (never on dev), then reused everywhere. Designs "
            f"(filled markers, solid lines) against baselines (open markers, dashed). {len(rows)} runs in "
            f"`experiments/results/{SOURCE}`.")


def caption_pareto(results_dir: Path) -> str:
    rows = load_rows(results_dir)
    return (f"Dev score against trainable parameters at two parameter budgets (b74k ≈ LoRA r=8 on q,v; "
            f"b18k ≈ LoRA r=2), mean ± standard deviation over seeds. {_protocol(results_dir)}\n\n"
            f"{table_markdown(rows)}\nVerdict: a design wins/loses against its matched baseline when the "
            f"difference of means exceeds two standard errors, else ties (n/a: fewer than 2 seeds).")


def caption_curves(results_dir: Path) -> str:
    return ("Convergence at the largest budget: held-out validation score (top; mean over seeds) and training "
            "loss (bottom; running mean over a twentieth of the steps, at least 4, mean over seeds) against "
            f"optimiser step. {_protocol(results_dir)}")


FIGURES = [
    FigureSpec(name="design_pareto", title="Control-designed deltas vs standard deltas: score against parameters",
               sources=(SOURCE,), draw=draw_pareto, caption=caption_pareto, recompute=(COMMAND,)),
    FigureSpec(name="design_curves", title="Control-designed deltas vs standard deltas: convergence",
               sources=(SOURCE,), draw=draw_curves, caption=caption_curves, recompute=(COMMAND,)),
]
