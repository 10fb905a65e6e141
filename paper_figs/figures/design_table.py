"""Figure ``design_table`` (issue 18): control-designed deltas and the recommender against LoRA and the other standard
deltas at equal budgets, on the GLUE table's harness.

Source: ``design_table.json`` (``experiments/design_table.py``): per (task, budget, method) the dev score over seeds,
and per (design, baseline, task, budget) the two-standard-error verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import chance_text, flagged_runs_note, load_json, regret_note, versions_line

if TYPE_CHECKING:
    from collections.abc import Iterable

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SOURCE = "design_table.json"
TASKS = ("sst2", "mrpc", "rte", "cola")
GOAL_WINS = 2
"""The issue's goal: at least two wins over LoRA at equal parameters."""


def _methods(payload: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(c["method"] for c in payload["cells"]))


def _not_run(ax: Axes, title: str) -> None:
    """An empty panel whose table cells (seeds 0, 1, 2 at the chosen rates) have not run yet; its rate selection may
    have (seed 0 on the grid, not shown: those scores choose the rates)."""
    ax.text(0.5, 0.5, "no table cell yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set(title=title, xticks=[], yticks=[])


def _designs(payload: dict[str, Any]) -> set[str]:
    return {r["design"] for r in payload["rows"]} | set(payload["config"].get("designs", []))


def draw(results_dir: Path) -> Figure:
    """Rows: budgets; columns: tasks; bars: every method's mean dev score ± std (designs hatched), LoRA dashed."""
    payload = load_json(results_dir, SOURCE)
    budgets = list(dict.fromkeys(c["budget"] for c in payload["cells"]))
    methods = _methods(payload)
    designs = _designs(payload)
    fig = new_figure(10.5, 2.6 * max(len(budgets), 1))
    axes = fig.subplots(max(len(budgets), 1), len(TASKS), squeeze=False)
    for i, budget in enumerate(budgets):
        for j, task in enumerate(TASKS):
            ax = axes[i][j]
            cells = {c["method"]: c for c in payload["cells"] if (c["budget"], c["task"]) == (budget, task)
                     and c["mean"] is not None}
            xs = [m for m in methods if m in cells]
            if not xs:
                _not_run(ax, f"{task}, {budget}")
                continue
            means, stds = [cells[m]["mean"] for m in xs], [cells[m]["std"] or 0 for m in xs]
            chance = payload.get("majority", {}).get(task)
            bottom = _bottom(means, stds, chance)
            ax.bar(range(len(xs)), [m - bottom for m in means], bottom=bottom, yerr=stds,
                   color=["tab:orange" if m in designs else "tab:gray" for m in xs])
            if "lora" in cells:
                ax.axhline(cells["lora"]["mean"], color="tab:blue", linestyle="--", linewidth=0.8)
            if chance is not None:
                ax.axhline(chance, color="0.3", linestyle=":", linewidth=0.8)
            ax.set_xticks(range(len(xs)), xs, fontsize=5, rotation=60, ha="right")
            ax.set(title=f"{task}, {budget}")
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Designed deltas (orange) against standard ones (grey) at equal budgets; dashed: LoRA; "
                 "dotted: the majority class (bars start there)", fontsize=9)
    return fig


def _bottom(means: list[float], stds: list[float], chance: float | None) -> float:
    """Where a panel's bars start: the task's majority-class score (the chance level every method is judged from),
    or lower, by a margin, when a bar or its error bar reaches below it; 0 without a known level.  Bars from 0 would
    hide SST-2's differences of 0.01 on a scale of 0.85."""
    if chance is None:
        return 0.0
    low = min(m - s for m, s in zip(means, stds, strict=True))
    return chance if low >= chance else low - 0.05 * (max(means) - low or 1.0)


def verdicts(payload: dict[str, Any], baseline: str = "lora") -> dict[str, dict[str, list[str]]]:
    """Per design: the (task/budget) cells it wins, ties and loses against ``baseline``, and those with too few
    seeds (a seed diverged) to judge."""
    out: dict[str, dict[str, list[str]]] = {}
    for r in payload["rows"]:
        if r["baseline"] != baseline or r["verdict"] is None:
            continue
        out.setdefault(r["design"], {"win": [], "tie": [], "loss": [], "too few seeds": []})[r["verdict"]].append(
            f"{r['task']}/{r['budget']} ({r['difference']:+.3f})")
    return out


def caption(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    v = verdicts(payload)
    wins = sum(len(x["win"]) for x in v.values())
    chance = {d: sum(1 for r in payload["rows"] if r["design"] == d and r["baseline"] == "lora"
                     and r["verdict"] == "tie" and r.get("at_chance")) for d in v}
    lines = "; ".join(f"{d}: wins {', '.join(x['win']) or 'none'}, ties {len(x['tie'])}"
                      + (f" ({chance[d]} of them with both at the majority class)" if chance[d] else "")
                      + f", losses {', '.join(x['loss']) or 'none'}"
                      + (f", too few seeds {', '.join(x['too few seeds'])}" if x["too few seeds"] else "")
                      for d, x in v.items())
    others = [r for r in payload["rows"] if r["baseline"] != "lora" and r["verdict"] is not None]
    other_counts = {k: sum(1 for r in others if r["verdict"] == k) for k in ("win", "tie", "loss")}
    goal = ("met" if wins >= GOAL_WINS else "not met") if v else "not measurable yet (fewer than two seeds per cell)"
    return (
        "MiniLM on the GLUE table's harness (per-task epochs, validation rows held out of train, each pair's rate "
        "chosen "
        "on them, seeds 0, 1, 2) at two budgets: b74k (LoRA r=8 on q,v) and b18k (r=2); every method's options give "
        "about the same trainable count (see `python experiments/design_table.py --plan`). Verdicts by the "
        f"two-standard-error rule against LoRA at the same budget — {lines or 'no cell has two seeds yet'}. Against "
        f"the other baselines (adapter, prefix, PiSSA, OLoRA, LoRA-GA, EVA): {other_counts['win']} wins, "
        f"{other_counts['tie']} ties, {other_counts['loss']} losses. Goal (at least {GOAL_WINS} wins over LoRA at "
        f"equal parameters): {wins} win{'' if wins == 1 else 's'}, {goal}."
        + chance_text(payload.get("chance"))
        + _checkpoint_note(payload.get("checkpoint_rule", {}))
        + _bracket_note(payload.get("cells", []))
        + _resolution_note(payload.get("resolution", {}))
        + _costate_search_note(payload.get("costate_search", {}))
        + _refinement_note(payload.get("refinement", {}))
        + regret_note(payload.get("selection_regret", {}))
        + flagged_runs_note(payload.get("cells", []), lambda c: f"{c['task']}/{c['budget']} {c['method']}")
        + " Command: `python experiments/design_table.py` "
        f"({versions_line(payload)})."
    )


def _costate_search_note(found: dict[str, dict[str, Any]]) -> str:
    """Where the co-state initialisation's line searches stopped (its co-state runs through each seed's random
    head, so each seed searches anew): at the grid's smallest step, and whether the held-out J fell."""
    return (" The co-state initialisation's line searches (one per seed: its co-state runs through the seed's "
            "randomly initialised head), per task/budget: stopped at the grid's smallest step in, lowered the "
            "held-out J in, of the searches: "
            + "; ".join(f"{k} {v['at_smallest']}, {v['lowered']} of {v['searches']} (mean change "
                        f"{v['mean_change']:+.3f})" for k, v in found.items()) + "." if found else "")


def _checkpoint_note(found: dict[str, dict[str, Any]]) -> str:
    """The verdicts against LoRA that change when each seed reports its last step instead of its best
    validation score."""
    if not found:
        return ""
    n = sum(e["comparisons"] for e in found.values())
    changed = [f"{t}/{c['budget']} {c['design']} {c['verdict']} → {c['verdict_at_end']} "
               f"({c['difference_at_end']:+.3f} against {c['margin_at_end']:.3f})"
               for t, e in sorted(found.items()) for c in e["changed"]]
    return (f" Scored at each seed's last step instead of its best validation score, {len(changed)} of these {n} "
            f"verdicts change{': ' + '; '.join(changed) if changed else ''}.")


def _resolution_note(found: dict[str, dict[str, Any]]) -> str:
    """What a tie against LoRA means per task: the margin a win needed (two standard errors of the difference)
    and the design closest to a win (the largest difference in its favour)."""
    def one(task: str, r: dict[str, Any]) -> str:
        c = r["closest"]
        return (f"{task} median {r['margin_median']:.3f} ({r['margin_min']:.3f}–{r['margin_max']:.3f} over "
                f"{r['n']} comparisons), closest {c['budget']} {c['design']} {c['difference']:+.3f} against "
                f"{c['margin']:.3f} ({c['verdict']})")
    return (" The margin a win over LoRA needed (two standard errors of the difference) and the largest difference "
            "in a design's favour: " + "; ".join(one(t, r) for t, r in found.items()) + "." if found else "")


def _bracket_note(cells: list[dict[str, Any]]) -> str:
    """Per task, how well the chosen rates are known: the widest ratio between a chosen rate and its nearest tried
    rates (``rate_bracket``); a verdict between two methods can be the grid's when it is wide."""
    widest = {}
    for c in cells:
        if c.get("rate_bracket") is not None:
            widest[c["task"]] = max(widest.get(c["task"], 0.0), c["rate_bracket"])
    return (" Rate resolution, the widest ratio between a chosen rate and a neighbouring rate tried: "
            + ", ".join(f"{t} {r:.2g}" for t, r in sorted(widest.items())) + "." if widest else "")


def _refinement_note(found: dict[str, dict[str, Any]]) -> str:
    """Per task, what moving a pair's rate to a midpoint did on dev (``refinement`` of the summary): a finer grid
    is worth its cells only if the validation rows rank neighbouring rates better than their noise."""
    if not found:
        return ""
    parts = [f"{t}: {e['pairs']} moved, {e['lower']} lower on dev, {e['higher']} higher, mean change "
             f"{e['mean_change']:+.3f}, wins over LoRA at the earlier rates: "
             f"{', '.join(e['wins_over_lora_at_earlier_rates']) or 'none'}, verdicts that differ between the two: "
             f"{len(e['verdicts_changed'])} of {e['verdicts']} "
             f"({sum(v['baseline'] == 'lora' for v in e['verdicts_changed'])} against LoRA)"
             for t, e in sorted(found.items())]
    return (" Rates moved after their seeds 1 and 2 had run (the earlier cells kept; chosen minus earlier mean): "
            + "; ".join(parts) + ".")


def _style(method: str, designs: set[str]) -> dict[str, Any]:
    """Designs in colour with markers, LoRA blue, the other baselines grey."""
    if method == "lora":
        return {"color": "tab:blue", "marker": "s", "linewidth": 1.6, "zorder": 3}
    if method in designs:
        i = sorted(designs).index(method)
        return {"color": f"C{(i + 1) % 10}", "marker": "o^v<>D"[i % 6], "linewidth": 1.2, "zorder": 2}
    return {"color": "0.6", "marker": ".", "linewidth": 0.8, "zorder": 1}


def _legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend right of ``fig`` with every method any of ``axes`` plots, each once."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside right", fontsize=6)


def draw_pareto(results_dir: Path) -> Figure:
    """Columns: tasks; per method its two budgets joined: dev score (mean ± std over seeds) against trainable
    parameters (the head aside)."""
    payload = load_json(results_dir, SOURCE)
    designs = _designs(payload)
    fig = new_figure(10.5, 3.0)
    axes = fig.subplots(1, len(TASKS), squeeze=False)[0]
    for ax, task in zip(axes, TASKS):
        cells = [c for c in payload["cells"] if c["task"] == task and c["mean"] is not None and c["trainable"]]
        if not cells:
            _not_run(ax, task)
            continue
        for method in dict.fromkeys(c["method"] for c in cells):
            mine = sorted((c for c in cells if c["method"] == method), key=lambda c: c["trainable"])
            ax.errorbar([c["trainable"] for c in mine], [c["mean"] for c in mine],
                        yerr=[c["std"] or 0.0 for c in mine], capsize=2, markersize=4,
                        label=method, **_style(method, designs))
        ax.set(xscale="log", title=task, xlabel="trainable parameters", ylabel=cells[0]["metric"])
        ax.grid(True, alpha=0.3)
    _legend(fig, axes)
    return fig


def draw_curves(results_dir: Path) -> Figure:
    """Rows: budgets; columns: tasks; per method the validation score at each evaluation, mean over the seeds at
    the chosen rate (``val_curve`` of each cell)."""
    payload = load_json(results_dir, SOURCE)
    designs = _designs(payload)
    budgets = list(dict.fromkeys(c["budget"] for c in payload["cells"]))
    fig = new_figure(10.5, 2.8 * max(len(budgets), 1))
    axes = fig.subplots(max(len(budgets), 1), len(TASKS), squeeze=False)
    for i, budget in enumerate(budgets):
        for j, task in enumerate(TASKS):
            ax = axes[i][j]
            cells = [c for c in payload["cells"] if (c["task"], c["budget"]) == (task, budget) and c.get("val_curve")]
            if not cells:
                _not_run(ax, f"{task}, {budget}")
                continue
            for c in cells:
                style = {**_style(c["method"], designs), "markersize": 3}
                ax.plot([p["step"] for p in c["val_curve"]], [p["mean"] for p in c["val_curve"]], label=c["method"],
                        **style)
            ax.set(title=f"{task}, {budget}", xlabel="step", ylabel=f"validation {cells[0]['metric']}")
            ax.grid(True, alpha=0.3)
    _legend(fig, axes.flat)
    return fig


def _peaks_last(curve: list[dict[str, float]]) -> bool:
    """Whether a mean validation curve reaches its maximum at its last evaluation."""
    return len(curve) > 1 and curve[-1]["mean"] >= max(p["mean"] for p in curve)


def head_start(payload: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per task, how many designs' mean validation curves sit above LoRA's at the same budget at the first and at
    the last evaluation step both reached: ``{task: {first_above, last_above, n}}`` over the cells with curves (a
    designed start's head start, if it has one, shows at the first; the rates are each cell's own)."""
    cells = {(c["task"], c["budget"], c["method"]): c for c in payload["cells"] if c.get("val_curve")}
    designs = _designs(payload)
    out: dict[str, dict[str, int]] = {}
    for (task, budget, method), c in sorted(cells.items()):
        lora = cells.get((task, budget, "lora"))
        if method not in designs or lora is None:
            continue
        mine, base = ({p["step"]: p["mean"] for p in x["val_curve"]} for x in (c, lora))
        steps = sorted(set(mine) & set(base))
        if not steps:
            continue
        entry = out.setdefault(task, {"first_above": 0, "last_above": 0, "n": 0})
        entry["first_above"] += mine[steps[0]] > base[steps[0]]
        entry["last_above"] += mine[steps[-1]] > base[steps[-1]]
        entry["n"] += 1
    return out


def caption_pareto(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    done = payload["complete_tasks"]
    return (
        "Dev score (mean ± standard deviation over seeds 0, 1, 2 at each pair's chosen rate) against trainable "
        "parameters, the classification head aside, of every method at the design table's two budgets (b18k: LoRA "
        "r=2 on q,v; b74k: r=8), each method's two budgets joined; designs in colour, LoRA blue, the other "
        "baselines (adapter, prefix, PiSSA, OLoRA, LoRA-GA, EVA) grey. MiniLM on the GLUE table's harness. Tasks "
        f"complete (3 seeds in every cell, a diverged seed counted): {', '.join(done) or 'none yet'}; a task still "
        "running shows the cells "
        "finished so far. The verdicts (two standard errors) are in the `design_table` figure's caption. Command: "
        f"`python experiments/design_table.py` ({versions_line(payload)})."
    )


def caption_curves(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    done = payload["complete_tasks"]
    short = sorted({f"{c['task']}/{c['budget']} {c['method']}" for c in payload["cells"] if c.get("val_curve")
                    and c["val_curve"][0]["n"] < c["n_seeds"]})
    rising = {t: (sum(_peaks_last(c["val_curve"]) for c in mine), len(mine)) for t in TASKS
              if (mine := [c for c in payload["cells"] if c["task"] == t and c.get("val_curve")])}
    starts = head_start(payload)
    return (
        "Validation score (the rows held out of train that choose the rates; dev is never plotted here) at each "
        "evaluation step, mean over the seeds at each pair's chosen rate, at the design table's two budgets. "
        "MiniLM on the GLUE table's harness (per-task epochs and evaluation cadence). Tasks complete (3 seeds in "
        f"every cell, a diverged seed counted): {', '.join(done) or 'none yet'}. Cells whose mean curve is highest "
        "at its last evaluation (still "
        "rising when the harness's epochs end: those runs had not levelled off): "
        + (", ".join(f"{t} {k} of {n}" for t, (k, n) in rising.items()) or "none yet") + "."
        + " Designs whose mean validation score is above LoRA's at the same budget at the first evaluation (a "
        "designed start's head start, if it has one, shows there) and at the last: "
        + ("; ".join(f"{t} {h['first_above']} and {h['last_above']} of {h['n']}" for t, h in starts.items())
           or "none yet") + "."
        + (f" Cells averaged over fewer seeds than they have (a seed's row without its curve): {'; '.join(short)}."
           if short else "")
        + f" Command: `python experiments/design_table.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(name="design_table", title="Control-designed deltas and the recommender against standard deltas at "
                                          "equal budgets (GLUE harness, 3 seeds)", sources=(SOURCE,), draw=draw,
               caption=caption, recompute=(("python", "experiments/design_table.py"),)),
    FigureSpec(name="design_table_pareto", title="Designed and standard deltas at the design table's two budgets: "
                                                 "dev score against trainable parameters", sources=(SOURCE,),
               draw=draw_pareto, caption=caption_pareto, recompute=(("python", "experiments/design_table.py"),)),
    FigureSpec(name="design_table_curves", title="Designed and standard deltas at the design table's two budgets: "
                                                 "validation curves", sources=(SOURCE,),
               draw=draw_curves, caption=caption_curves, recompute=(("python", "experiments/design_table.py"),)),
]

__all__ = ["FIGURES", "verdicts"]
