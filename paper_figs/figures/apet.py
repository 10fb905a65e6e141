"""Figures ``apet_positions`` and ``apet_scale`` (issue 16; Su et al., EMNLP 2023).

Source: ``apet.json`` (``experiments/apet.py``): per (model, task, budget) the dev scores of three random position
draws of the ``arbitrary`` controller (3 seeds each), the majority-class level, full fine-tuning's score, and the
rank correlation of the draws' control-theoretic scores with their dev scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import edge_rate_note, load_json, sci, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SOURCE = "apet.json"
COLOURS = {"minilm": "tab:blue", "smollm2": "tab:red"}
LABELS = {"minilm": "MiniLM (22.7M)", "smollm2": "SmolLM2 (134.5M)"}


def _tasks(payload: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(c["task"] for c in payload["cells"]))


def draw_positions(results_dir: Path) -> Figure:
    """Per task: every draw's seed-mean dev score against the budget, per model (the spread is the position
    effect)."""
    payload = load_json(results_dir, SOURCE)
    tasks = _tasks(payload)
    fig = new_figure(max(3.4 * len(tasks), 5.0), 2.9)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for k, model in enumerate(dict.fromkeys(c["model"] for c in payload["cells"])):
            cells = [c for c in payload["cells"] if (c["model"], c["task"]) == (model, task)]
            shift = 1.08 if k else 1 / 1.08
            for c in cells:
                xs = [c["budget"] * shift] * len(c["draw_means"])
                ax.scatter(xs, list(c["draw_means"].values()), s=10, color=COLOURS.get(model, "k"),
                           label=LABELS.get(model, model) if c is cells[0] else None)
        level = payload["majority"][task]["level"]
        ax.axhline(level, color="k", linestyle=":", linewidth=0.8, label="majority class")
        ax.set(xscale="log", xlabel="tuned scalars (budget)", ylabel=payload["majority"][task]["metric"],
               title=task)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6.5, frameon=False)
    fig.suptitle("Arbitrary-position tuning: one point per position draw (mean of 3 seeds)", fontsize=9)
    return fig


def draw_scale(results_dir: Path) -> Figure:
    """Per task: mean dev score against the budget per model, with full fine-tuning and majority lines."""
    payload = load_json(results_dir, SOURCE)
    tasks = _tasks(payload)
    fig = new_figure(max(3.4 * len(tasks), 5.0), 2.9)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for model in dict.fromkeys(c["model"] for c in payload["cells"]):
            cells = sorted((c for c in payload["cells"] if (c["model"], c["task"]) == (model, task)
                            and c["mean"] is not None), key=lambda c: c["budget"])
            colour = COLOURS.get(model, "k")
            ax.errorbar([c["budget"] for c in cells], [c["mean"] for c in cells],
                        yerr=[c["std"] or 0 for c in cells], color=colour, marker="o", capsize=2,
                        label=LABELS.get(model, model))
            full = next((f for f in payload["full"] if (f["model"], f["task"]) == (model, task)), None)
            if full and full["mean"] is not None:
                ax.axhline(full["mean"], color=colour, linestyle="--", linewidth=0.9)
            lp = next((f for f in payload.get("linear_probe", []) if (f["model"], f["task"]) == (model, task)), None)
            if lp and lp["mean"] is not None:
                ax.axhline(lp["mean"], color=colour, linestyle="-.", linewidth=0.9)
        ax.axhline(payload["majority"][task]["level"], color="k", linestyle=":", linewidth=0.8)
        ax.set(xscale="log", xlabel="tuned scalars (budget)", ylabel=payload["majority"][task]["metric"],
               title=f"{task} (dashed: full FT, dash-dot: head only)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6.5, frameon=False)
    fig.suptitle("Score against the number of tuned parameters, per model size", fontsize=9)
    return fig


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def spread_claim(payload: dict[str, Any]) -> str:
    """Positions matter less in the larger model: its spread across draws is smaller at more budgets.

    A (task, budget) where neither model's cell beats the linear probe (the head alone) is left out and named: there
    the B scalars add nothing measurable to the head, so their draws differ by noise, not by their positions (at a
    small rate SmolLM2's CoLA draws score exactly the probe: a spread of 0 that says nothing of positions)."""
    models = list(dict.fromkeys(c["model"] for c in payload["cells"]))
    if len(models) < 2:
        return "inconclusive: one model"
    small, large = models[0], models[-1]
    pairs, idle = [], []
    for c in payload["cells"]:
        if c["model"] != small or c["position_spread"] is None:
            continue
        other = next((o for o in payload["cells"] if (o["model"], o["task"], o["budget"]) ==
                      (large, c["task"], c["budget"]) and o["position_spread"] is not None), None)
        if not other:
            continue
        if not (c.get("beats_probe") or other.get("beats_probe")):
            idle.append(f"{c['task']} B={c['budget']}")
            continue
        pairs.append((c["task"], c["budget"], c["position_spread"], other["position_spread"]))
    left_out = f"; left out, neither model above the linear probe: {', '.join(idle)}" if idle else ""
    if not pairs:
        return f"inconclusive: no (task, budget) where either model's draws beat the linear probe{left_out}"
    smaller = sum(1 for *_, a, b in pairs if b < a)
    verdict = "holds" if smaller > len(pairs) / 2 else "does not hold"
    detail = ", ".join(f"{t} B={b}: {a:.3f} vs {o:.3f}" for t, b, a, o in pairs)
    return (f"the spread across position draws (std of the draws' seed means) is smaller for {large} than for "
            f"{small} in {smaller} of {len(pairs)} (task, budget) pairs ({detail}) — the claim {verdict} here, by "
            f"count (each spread is the std of {len(payload['config']['draws'])} draw means: no significance test)"
            f"{left_out}")


def _head_line(payload: dict[str, Any]) -> str:
    heads = payload.get("head_scalars") or {}
    if not heads:
        return ""
    return ("Every cell also trains the classification head (" + ", ".join(f"{m}: {n:,} scalars"
                                                                         for m, n in heads.items())
            + "), not counted in B, so the smallest budget's score is mostly the head's. ")


def _predictors_text(pred: dict[str, Any]) -> str:
    return "; ".join(f"{k}: ρ = {_fmt(v['rho'])}, 95 % interval "
                     f"{[round(x, 2) for x in v['ci95']] if v['ci95'] else '–'} over {v['n_groups']} groups"
                     for k, v in pred.items() if v)


def caption_positions(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    cfg = payload["config"]
    preds = _predictors_text(payload.get("predictors") or {})
    acting = payload.get("predictors_beyond_probe")
    if acting is not None:
        preds += ("; over the cells whose budget beats the linear probe only (elsewhere draws of one seed train "
                  f"alike): {_predictors_text(acting) or 'no such cell'}")
    return (
        f"The arbitrary controller tunes exactly B scalars at seeded random positions of every block parameter "
        f"(models {', '.join(cfg['models'])}; tasks {', '.join(cfg['tasks'])}; B in {cfg['budgets']}; position "
        f"draws {cfg['draws']}; seeds {cfg['seeds']}; {cfg['train']['steps']} AdamW steps of batch "
        f"{cfg['train']['batch_size']} on {cfg['train']['train_size']} training rows, max length "
        f"{cfg['train']['max_length']}, {cfg['train']['dev_size']} dev rows; the rate chosen "
        f"{cfg.get('select', 'per (model, task) at B=' + str(cfg.get('select_at')))} on validation rows). "
        f"{_head_line(payload)}Each point is one draw's mean dev score over seeds. Claim (Su "
        f"et al. 2023, positions matter less as models grow): {spread_claim(payload)}. Do control-theoretic scores "
        f"of a draw (at Δ = 0, 64 training rows) predict which draws train better? Pooled within-(model, task, "
        f"budget) Spearman correlation of the score with the dev score: {preds or 'not computed yet'}. Cut to fit: "
        "100 steps, 2,000 training rows, two tasks."
        + edge_rate_note(payload.get("rates_at_edge", []), lambda c: f"{c['model']} {c['task']} B={c['budget']}")
        + f" Command: `python experiments/apet.py` ({versions_line(payload)})."
    )


def caption_scale(results_dir: Path) -> str:
    payload = load_json(results_dir, SOURCE)
    smallest = payload["smallest_budget_beating_majority"]
    fulls = "; ".join(f"{f['model']}/{f['task']} full FT {_fmt(f['mean'])} ± {_fmt(f['std'])}" for f in payload["full"])
    reach = []
    for f in payload["full"]:
        cells = [c for c in payload["cells"] if (c["model"], c["task"]) == (f["model"], f["task"])
                 and c["mean"] is not None and f["mean"] is not None]
        best = max(cells, key=lambda c: c["mean"]) if cells else None
        level = payload["majority"][f["task"]]["level"]
        above = f["mean"] > level if f.get("beats_majority") is None else f["beats_majority"]
        if best and above:  # a share of full FT's gain over chance; at chance a share means nothing
            reach.append(f"{f['model']}/{f['task']}: best budget {sci(best['budget'], 0)} recovers "
                         f"{(best['mean'] - level) / (f['mean'] - level):.2f} of full FT's gain over the majority "
                         "class")
        elif best:
            reach.append(f"{f['model']}/{f['task']}: full FT {_fmt(f['mean'])} is not above the majority class "
                         f"({_fmt(level)}), best budget {sci(best['budget'], 0)} {_fmt(best['mean'])}")
    probes = "; ".join(f"{f['model']}/{f['task']} {_fmt(f['mean'])} ± {_fmt(f['std'])} (n={f['n_seeds']})"
                       for f in payload.get("linear_probe", []))
    return (
        "Mean dev score (± std over 3 draws × 3 seeds) against the number of tuned scalars, per model; dashed: full "
        "fine-tuning of that model (3 seeds, rate chosen on validation rows), dotted: the majority class, dash-dot: "
        f"the linear probe (B = 0: the head alone, rate chosen on validation rows; {probes or 'not run yet'}). "
        f"{_head_line(payload)}{fulls}. Claims (Su et al. 2023): fewer tuned parameters reach full fine-tuning in the "
        f"larger model — {_reach_verdict(payload)} ({'; '.join(r for r in reach if r) or 'no cells yet'}); "
        "across tasks a similar number of "
        "parameters is needed to beat random guessing — the smallest budget whose mean beats the level by two "
        "standard errors (of the difference where the level is itself a mean over seeds: the probe, full FT), per "
        f"model across tasks: above the majority class {_per_model(smallest)}; above the "
        f"linear probe (what the B scalars add to the head) "
        f"{_per_model(payload.get('smallest_budget_beating_probe') or {})}. "
        f"Command: `python experiments/apet.py` ({versions_line(payload)})."
    )


def _reach_verdict(payload: dict[str, Any]) -> str:
    """Per task, the smallest budget not below full fine-tuning by two standard errors, per model; the claim holds
    where the larger model's is smaller, fails where it is larger, and is open where either model has none.  A task
    where full fine-tuning does not beat the majority class in a model is not a test: any budget 'reaches' chance."""
    reach = payload.get("smallest_budget_reaching_full") or {}
    models = list(dict.fromkeys(k.split("/")[0] for k in reach))
    if len(models) < 2:
        return "inconclusive: one model"
    small, large = models[0], models[-1]
    at_chance = {(f["model"], f["task"]): f["mean"] for f in payload.get("full", [])
                 if f.get("beats_majority") is False}
    verdicts = []
    for task in dict.fromkeys(k.split("/")[1] for k in reach):
        a, b = reach.get(f"{small}/{task}"), reach.get(f"{large}/{task}")
        weak = [m for m in (small, large) if (m, task) in at_chance]
        if weak:
            verdicts.append(f"{task}: not a test (full FT does not beat the majority class in "
                            + ", ".join(f"{m}: {_fmt(at_chance[(m, task)])}" for m in weak) + ")")
        elif a is None or b is None:
            top = sci(max(payload["config"]["budgets"]), 0)
            if not _task_complete(payload, task):
                verdicts.append(f"{task}: open (no budget reaches full FT in {small if a is None else large} yet)")
            elif a is None and b is None:
                verdicts.append(f"{task}: inconclusive (neither model reaches full FT at any budget up to {top})")
            elif b is None:
                verdicts.append(f"{task}: {small} needs {sci(a, 0)}, {large} reaches it at no budget up to {top}"
                                " — does not hold")
            else:
                verdicts.append(f"{task}: {small} reaches it at no budget up to {top}, {large} needs {sci(b, 0)}"
                                " — holds")
        else:
            word = "holds" if b < a else "does not hold" if b > a else "tie"
            verdicts.append(f"{task}: {small} needs {sci(a, 0)}, {large} {sci(b, 0)} — {word}")
    return "smallest budget within two standard errors of full FT: " + "; ".join(verdicts)


def _task_complete(payload: dict[str, Any], task: str) -> bool:
    """Whether every (model, budget) cell of ``task`` has all its draws × seeds: a budget missing from a partial
    table may still reach full fine-tuning, so "none" is a verdict only on a complete one."""
    config = payload["config"]
    want = len(config["draws"]) * len(config["seeds"])
    runs = {(c["model"], c["budget"]): c["n_runs"] for c in payload.get("cells", []) if c["task"] == task}
    return all(runs.get((m, b), 0) >= want for m in config["models"] for b in config["budgets"])


def _per_model(smallest: dict[str, int | None]) -> str:
    """``{"model/task": budget}`` as ``model: {task: budget, ...}`` (None: no budget beats the level)."""
    if not smallest:
        return "not computed yet"
    per: dict[str, list[str]] = {}
    for key, budget in smallest.items():
        model, task = key.split("/")
        per.setdefault(model, []).append(f"{task} {sci(budget, 0) if budget else 'none'}")
    return "; ".join(f"{m}: {', '.join(v)}" for m, v in per.items())


RECOMPUTE = (("python", "experiments/apet.py"),)
FIGURES = [
    FigureSpec(name="apet_positions", title="Arbitrary-position tuning: the spread across position draws per budget "
                                            "and model", sources=(SOURCE,), draw=draw_positions,
               caption=caption_positions, recompute=RECOMPUTE),
    FigureSpec(name="apet_scale", title="Arbitrary-position tuning: score against the number of tuned parameters per "
                                        "model size", sources=(SOURCE,), draw=draw_scale, caption=caption_scale,
               recompute=RECOMPUTE),
]

__all__ = ["FIGURES", "spread_claim"]
