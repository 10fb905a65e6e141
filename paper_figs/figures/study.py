"""Figures of the Delta Tuning paper's analyses and UniPELT's low-resource study (issue 15): ``composability``,
``generalization_gap``, ``sequential``, ``transfer``, ``scale`` and ``unipelt_low_resource``.

Sources: ``composability.json``, ``glue_table.json``, ``sequential.json``, ``transfer.json``, ``scale.json`` and
``unipelt_low_resource.json`` (the experiments of the same names).  Every caption states what ran, the paper's
claim and whether it holds here, with the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import flagged_runs_note, load_json, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TASKS = ("sst2", "mrpc", "rte", "cola")
SINGLE = ("lora", "adapter", "prefix", "prompt", "bitfit")
METRIC = {"sst2": "accuracy", "mrpc": "F1", "rte": "accuracy", "cola": "MCC"}
"""Each GLUE task's dev metric (the one every study reports)."""


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _verdict(held: bool | None) -> str:
    return "inconclusive" if held is None else ("holds here" if held else "does not hold here")


def _gated(payload: dict[str, Any], held: bool | None, decided_early: bool = False) -> str:
    """:func:`_verdict`, once the study's grid has every seed (its ``progress``) or the summary decided it early
    (``decided_early``: no comparison still to run can change it, :func:`verdicts.early_verdict`); before, what is
    missing."""
    prog = payload.get("progress")
    if decided_early and prog and not prog["complete"]:
        return f"{_verdict(held)} (decided before the grid is complete: no comparison still to run can change it)"
    if prog and not prog["complete"]:
        return f"no verdict yet ({prog['with_all_seeds']} of {prog['planned']} cells have all 3 seeds)"
    return _verdict(held)


# --- composability --------------------------------------------------------------------------------
SHORT = {"prompt": "P", "bitfit": "B", "adapter": "A"}
"""Tick labels of the subsets: P prompt, B BitFit, A adapter."""


def draw_composability(results_dir: Path) -> Figure:
    """Per task with cells: dev score of each subset of {prompt, BitFit, adapter} (mean ± std over seeds, the
    number of seeds above each point), the majority class dotted."""
    payload = load_json(results_dir, "composability.json")
    subsets = list(dict.fromkeys(c["subset"] for c in payload["cells"]))
    levels = payload["config"].get("majority") or {}
    tasks = [t for t in TASKS if any(c["task"] == t and c["mean"] is not None for c in payload["cells"])]
    fig = new_figure(2.6 * max(len(tasks), 1) + 0.4, 2.8)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        cells = {c["subset"]: c for c in payload["cells"] if c["task"] == task and c["mean"] is not None}
        xs = [s for s in subsets if s in cells]
        for x, sub in enumerate(xs):  # points, not bars from 0, which hid differences of a few hundredths
            c = cells[sub]
            ax.errorbar([x], [c["mean"]], yerr=[c["std"] or 0], fmt="o", markersize=4, capsize=2,
                        color="tab:orange" if "adapter" in sub else "tab:gray")
            ax.annotate(f"n={c['n_seeds']}", (x, c["mean"] + (c["std"] or 0)), xytext=(0, 1),
                        textcoords="offset points", ha="center", va="bottom", fontsize=5)
        if levels.get(task) is not None:
            ax.axhline(levels[task], color="black", linestyle=":", linewidth=0.8)
        ax.set_xticks(range(len(xs)), ["+".join(SHORT[p] for p in s.split("+")) for s in xs], fontsize=6.5)
        ax.set(title=task, ylabel=f"dev {METRIC.get(task, 'score')}")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Simultaneous combinations of prompt tuning (P), BitFit (B) and the adapter (A); orange: with the "
                 "adapter, dotted: majority class", fontsize=8)
    return fig


def part_effects(payload: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per part: how many (task, subset without it) pairs adding it helped, hurt or left alone, and how many were
    not a test (with and without it at the majority class)."""
    out: dict[str, dict[str, int]] = {}
    for e in payload["effects"]:
        out.setdefault(e["part"], {"helps": 0, "hurts": 0, "no effect": 0, "not a test": 0,
                                   "too few seeds": 0})[e["verdict"]] += 1
    return out


def caption_composability(results_dir: Path) -> str:
    payload = load_json(results_dir, "composability.json")
    eff = part_effects(payload)

    def tests(e: dict[str, int]) -> int:
        return e["helps"] + e["hurts"] + e["no effect"] + e["too few seeds"]

    def share(part: str, what: str) -> str:
        e = eff.get(part)
        if not e or not tests(e):
            return f"{part}: no comparison yet" + (f" ({e['not a test']} not a test)" if e else "")
        untested = f"; {e['not a test']} more not a test, both at the majority class" if e["not a test"] else ""
        few = f", too few seeds {e['too few seeds']}" if e["too few seeds"] else ""
        return (f"{part} {what} in {e[what]} of {tests(e)} (helps {e['helps']}, no effect {e['no effect']}, "
                f"hurts {e['hurts']}{few}{untested})")

    def held(part: str) -> bool | None:
        return (payload.get("claims") or {}).get(part)

    def verdict(part: str) -> str:
        return _gated(payload, held(part), bool((payload.get("decided_early") or {}).get(part)))

    return (
        "MiniLM on the GLUE table's harness (per-task epochs, validation rows held out of train, rates chosen on them; "
        "seeds 0, 1, 2): the 7 non-empty subsets of {prompt (20 tokens), BitFit, adapter (bottleneck 64)} trained "
        "simultaneously, each part at the rate the GLUE selection chose for it alone on the task times one factor "
        "chosen on validation rows (0.5, 1 or 2); single methods are GLUE table cells. Adding a part to a subset is "
        "judged by the two-standard-error rule. Claims (Ding et al. 2023): adapters almost always help — "
        f"{share('adapter', 'helps')}, "
        f"{verdict('adapter')} (criterion: helps in ≥ 75 % of the tests); prompt tuning usually "
        f"hurts — {share('prompt', 'hurts')}, {verdict('prompt')} (in more than half); BitFit "
        f"usually helps — {share('bitfit', 'helps')}, {verdict('bitfit')} (in more than half; "
        "ties and comparisons short of 3 scored seeds are absence of evidence: a claim holds when its count alone "
        "reaches the share, and does not when even every tie counted for it would not)."
        + flagged_runs_note(payload["cells"], lambda c: f"{c['task']} {c['subset']}")
        + " What was cut to fit: a combination's parts are not tuned jointly (one common factor on their own rates, "
        "three values, instead of a grid per part); one model (MiniLM, 22.7M) and the GLUE table's harness (SST-2 a "
        "seeded 20k-row subsample); three seeds. "
        f"Command: `python experiments/composability.py` ({versions_line(payload)})."
    )


# --- generalisation gap ----------------------------------------------------------------------------
def draw_gap(results_dir: Path) -> Figure:
    """Per task: the train − dev gap of full fine-tuning, each single method (± std over seeds) and, once the
    composability study has run, each combination (the metrics differ across tasks, so no mean over them)."""
    payload = load_json(results_dir, "generalization_gap.json")
    single, combos = payload["single"], payload["combinations"]
    tasks = list(single)
    fig = new_figure(max(3.2 * len(tasks), 5.0), 2.9)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        cells = {**{m: single[task][m] for m in ("full", *SINGLE) if m in single[task]}, **combos.get(task, {})}
        names = list(cells)
        ax.bar(range(len(names)), [cells[n]["mean"] for n in names], yerr=[cells[n]["std"] or 0.0 for n in names],
               capsize=2, color=["tab:gray" if n == "full" else "tab:blue" if "+" not in n else "tab:purple"
                                 for n in names])
        ax.set_xticks(range(len(names)), ["+".join(SHORT[p] for p in n.split("+")) if "+" in n else n
                                          for n in names], fontsize=6, rotation=60)
        ax.set(title=task, ylabel="train − dev (task metric)" if ax is axes[0] else None)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Generalisation gap per task (grey: full FT, blue: single methods, purple: combinations of prompt P, "
                 "BitFit B, adapter A)", fontsize=9)
    return fig


def caption_gap(results_dir: Path) -> str:
    payload = load_json(results_dir, "generalization_gap.json")
    single, claims = payload["single"], payload["claims"]
    pairs, count = payload["against_full"], payload["against_full_counts"]
    not_smaller = ", ".join(f"{p['task']}/{p['method']} {p['verdict']}" for p in pairs if p["verdict"] != "smaller")
    listing = "; ".join(f"{t}: " + ", ".join(f"{m} {_fmt(g[m]['mean'])}" for m in ("full", *SINGLE) if m in g)
                        for t, g in single.items())
    fewer = [f"{t}/{m} {g['n_seeds']}" for t, gs in single.items() for m, g in gs.items() if g["n_seeds"] < 3]
    short = f"; scored seeds below 3: {', '.join(fewer)}" if fewer else ""
    widening, w_counts = payload["widening"], payload["widening_counts"]
    progress = payload.get("composability_progress")
    early = bool((payload.get("decided_early") or {}).get("combinations_widen"))
    widen_verdict = _gated({"progress": progress}, claims["combinations_widen"], early)
    if widening:
        combos_text = ("combinations widen it (a combination's gap above the largest of its parts' on the same task "
                       f"by two standard errors) — wider in {w_counts['wider']} of {len(widening)} (task, "
                       f"combination) pairs, tie {w_counts['tie']}, narrower {w_counts['narrower']}, too few seeds "
                       f"{w_counts['too few seeds']}: {widen_verdict} "
                       "(criterion: wider in more than half)")
    elif progress is not None:
        combos_text = "combinations widen it — no combination has a scored gap yet"
    else:
        combos_text = "combinations widen it — not run yet (`python experiments/composability.py`)"
    return (
        "Generalisation gap: the task metric on 1,000 seeded training rows the reported deltas were trained on minus "
        "the dev score, averaged over the seeds that have it (runs from before training-row scores existed have "
        f"none{short}). Gaps per task (each task's own metric): {listing or '–'}. Claims (Ding et al. 2023), each "
        "by two standard errors over seeds, with ties and pairs short of 3 scored seeds counted as absence of "
        "evidence: every single delta method's gap is smaller than full fine-tuning's — judged per task against "
        f"full fine-tuning on the same task: smaller in {count['smaller']} of {len(pairs)} (task, method) pairs"
        + (f" (not smaller: {not_smaller})" if not_smaller else "")
        + f", {_verdict(claims['single_smaller_than_full'])} (holds when every pair is smaller, does not hold when "
        "one is larger); prompt tuning's is the smallest — per task, no single method's gap below prompt's by two "
        "standard errors: "
        + (", ".join(f"{t} {_verdict(v)}" for t, v in payload["prompt_smallest"].items()) or "–")
        + f" ({_verdict(claims['prompt_smallest'])}: held on every task, or not on one); {combos_text}. Commands: "
        "`python experiments/generalization_gap.py` (from the rows of `python experiments/glue_table.py` and "
        f"`python experiments/composability.py`; {versions_line(payload)})."
    )


# --- sequential ---------------------------------------------------------------------------------------
def draw_sequential(results_dir: Path) -> Figure:
    """Dev score after each stage (mean ± std over seeds), one line per order; the majority class dashed."""
    payload = load_json(results_dir, "sequential.json")
    fig = new_figure(5.5, 3.0)
    ax = fig.subplots()
    for k, o in enumerate(payload["orders"]):
        pts = [s for s in o["stages"] if s["mean"] is not None]
        if pts:
            ax.errorbar([s["stage"] + 0.04 * (k - 2.5) for s in pts], [s["mean"] for s in pts],
                        yerr=[s["std"] or 0.0 for s in pts], marker="o", capsize=2, label=o["order"])
    if payload["config"].get("majority") is not None:
        ax.axhline(payload["config"]["majority"], color="grey", ls="--", lw=0.8, label="majority class")
    ax.set(xticks=[0, 1, 2], xticklabels=["stage 1", "stage 2", "stage 3"], ylabel="dev accuracy (SST-2)",
           title="Sequential combination: the score after each stage")
    ax.legend(fontsize=6, frameon=False)
    ax.grid(True, alpha=0.3)
    return fig


def _cell(c: dict[str, Any] | None) -> str:
    return "–" if c is None or c.get("mean") is None else f"{_fmt(c['mean'])} ± {_fmt(c['std'])}"


def caption_sequential(results_dir: Path) -> str:
    payload = load_json(results_dir, "sequential.json")
    steps, claims, cfg = payload["steps"], payload.get("claims", {}), payload["config"]
    count = {v: sum(1 for s in steps if s["verdict"] == v) for v in ("helps", "hurts", "no effect")}
    orders = "; ".join(f"{o['order']} {_cell(o)}" for o in payload["orders"])
    improving = payload.get("improving_orders", [])
    single, vs = payload.get("best_single"), payload.get("best_vs_single")
    best = next((o for o in payload["orders"] if o["order"] == payload["best_order"]), None)
    per_seed = ", ".join(f"seed {s}: {o}" for s, o in payload.get("best_per_seed", {}).items())
    collapsed = payload.get("collapsed", [])
    return (
        f"MiniLM on SST-2 ({cfg['harness']['train_size']} seeded training rows, {cfg['harness']['val_size']} held "
        "out as validation rows): prompt tuning, BitFit and the adapter trained one after another in each of the 6 "
        "orders, one epoch per stage, each stage frozen before the next is added, each at the rate the GLUE "
        f"selection chose for its method alone on SST-2 ({cfg['stage_rates']}); seeds 0, 1, 2. Final dev accuracy "
        f"(mean ± std): {orders}. Claims (Ding et al. 2023): sequential combination can keep improving — "
        f"{_verdict(claims.get('keeps_improving'))}: {len(improving)} of {len(payload['orders'])} orders keep "
        f"improving ({', '.join(improving) or 'none'}; criterion: the final score above the first stage's by two "
        f"standard errors, no added stage hurting); over all (order, added stage) steps, adding the stage helped in "
        f"{count['helps']}, hurt in {count['hurts']} and made no difference beyond two standard errors in "
        f"{count['no effect']} of {len(steps)}."
        + (f" No order beats the best part alone: the best final, {payload['best_order']} {_cell(best)}, against "
           f"the {vs['part']} alone {_cell(single)} (first stage): {vs['verdict']} "
           f"(difference {_fmt(vs['difference'])}, se {_fmt(vs['se'])})." if vs and vs["verdict"] != "above" else "")
        + f" No order is best everywhere — {_verdict(claims.get('no_best_order'))} on this one task: the best order "
        f"({payload['best_order'] or '–'}) beats {len(payload.get('beaten_by_best', []))} of the other "
        f"{len(payload['orders']) - 1} by two standard errors; best order per seed: {per_seed or '–'}; across tasks "
        "not tested (the study runs SST-2 only)."
        + (" A stage left a run at the majority class (dev accuracy within two binomial standard errors of "
           f"{_fmt(cfg.get('majority'))}): "
           + "; ".join(f"{c['order']} seed {c['seed']} after {c['part']} ({_fmt(c['score'])})" for c in collapsed)
           + " — its seed is in the mean and std above." if collapsed else "")
        + " What was cut to fit: no rate is chosen per stage (a stage trains at its method's rate chosen alone from "
        f"the pretrained model), 5,000 rows. Command: `python experiments/sequential.py` ({versions_line(payload)})."
    )


# --- transfer -----------------------------------------------------------------------------------------
def draw_transfer(results_dir: Path) -> Figure:
    """Per method: the source × target matrix of gain shares over the majority class (blank: target not learnt)."""
    payload = load_json(results_dir, "transfer.json")
    methods = list(dict.fromkeys(m["method"] for m in payload["matrix"]))
    fig = new_figure(2.0 * len(methods), 2.5)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    image = None
    for ax, method in zip(axes, methods):
        grid = [[float("nan")] * len(TASKS) for _ in TASKS]
        for m in payload["matrix"]:
            if m["method"] == method and m.get("gain_share") is not None:
                grid[TASKS.index(m["source"])][TASKS.index(m["target"])] = m["gain_share"]
        image = ax.imshow(grid, vmin=-0.2, vmax=1.0, cmap="viridis")
        for m in payload["matrix"]:
            if m["method"] == method and m["source"] != m["target"] and m.get("beats_majority"):
                ax.text(TASKS.index(m["target"]), TASKS.index(m["source"]), "*", ha="center", va="center",
                        color="white", fontsize=8)
        ax.set_xticks(range(len(TASKS)), TASKS, fontsize=6)
        ax.set_yticks(range(len(TASKS)), TASKS, fontsize=6)
        ax.set(title=method, xlabel="target")
    axes[0].set_ylabel("source")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of in-task gain")
    fig.suptitle("Zero-shot transfer: share of the target's in-task gain over the majority class kept "
                 "(*: above the majority class by 2 se)", fontsize=8)
    return fig


def caption_transfer(results_dir: Path) -> str:
    payload = load_json(results_dir, "transfer.json")
    k = payload["kinds"]
    levels = payload["config"].get("majority", {})
    not_learnt = ", ".join(f"{e['method']}/{e['target']}" for e in payload.get("targets_not_learnt", [])) or "none"
    rebuilt = payload.get("sources_rebuilt", 0)
    odd = payload.get("sources_not_reproduced", [])
    pairs = [p for p in payload.get("pairs", []) if p["verdict"] is not None]
    count = {v: sum(p["verdict"] == v for p in pairs) for v in ("same kind better", "tie", "cross kind better",
                                                                  "no transfer within kind", "too few seeds")}
    running = "" if payload.get("complete") else (
        f" Still running: {payload.get('sources_scored', 0)} of {payload.get('sources', 0)} source runs scored, "
        "so no verdict yet.")
    return (
        "Every GLUE table run (MiniLM, each method at its chosen rate, seeds 0, 1, 2) scored with its own head on the "
        "other tasks' dev sets, no training; labels mapped by each task's affirming class (SST-2 positive = 1, CoLA "
        "acceptable = 1, MRPC equivalent = 1, RTE entailment = 0; a source whose affirming class sits at another "
        "index has its head rows swapped). Each entry is the share of the target's in-task gain over the majority "
        "class that the transferred delta keeps, (score − majority) / (in-task − majority); majority levels "
        + ", ".join(f"{t} {_fmt(v)}" for t, v in levels.items())
        + f". Blank where the method does not beat the majority class in-task on the target (no test: {not_learnt}). "
        "Within a kind (single-sentence SST-2/CoLA, pairs MRPC/RTE): median share "
        f"{_fmt(k['same kind'].get('median'))} over {k['same kind']['n']} entries, "
        f"{k['same kind']['beats_majority']} of {k['same kind']['judged']} above the majority class; across kinds: "
        f"{_fmt(k['cross kind'].get('median'))} over {k['cross kind']['n']}, "
        f"{k['cross kind']['beats_majority']} of {k['cross kind']['judged']} above it. "
        "Claim (Ding et al. 2023): deltas transfer to tasks of the same kind, poorly across kinds — "
        f"{_verdict(payload['claim_holds'])}: on each target a method learns, the same-kind source's transferred "
        "gain over the majority class (a score below it counted as no gain) beats the cross-kind sources' (per "
        "seed, their mean) by two standard errors in "
        f"{count['same kind better']} of {len(pairs)} (method, target) pairs, ties in {count['tie']}, loses in "
        f"{count['cross kind better']}, and keeps no gain over the majority class by two standard errors in "
        f"{count['no transfer within kind']}" + (f", {count['too few seeds']} with too few seeds"
                                                 if count["too few seeds"] else "")
        + " (criterion: wins in more than half, the pairs where it loses or keeps no gain counting against and "
        "ties as absence of evidence; compared on one target, not through the shares, whose denominator is small "
        f"where a target is barely learnt).{running} {rebuilt} source runs were trained again from their rows on "
        "this machine"
        + (f", {len(odd)} of them not reproducing their recorded scores exactly ({', '.join(odd)})" if odd else
           (", each reproducing its recorded scores exactly" if rebuilt else ""))
        + f". Command: `python experiments/transfer.py` ({versions_line(payload)})."
    )


# --- scale ----------------------------------------------------------------------------------------------
def draw_scale(results_dir: Path) -> Figure:
    """Per task: each method's dev score on both models (mean ± std over seeds, the number of seeds beside each
    point), the majority class dotted."""
    payload = load_json(results_dir, "scale.json")
    levels = payload["config"].get("majority") or {}
    tasks = list(dict.fromkeys(c["task"] for c in payload["cells"]))
    models = list(dict.fromkeys(c["model"] for c in payload["cells"]))
    methods = list(dict.fromkeys(c["method"] for c in payload["cells"]))
    fig = new_figure(max(3.6 * len(tasks), 4.0) + 0.9, 2.9)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    step = 0.5 / max(len(models) - 1, 1)  # the models' points side by side around each method's tick
    for ax, task in zip(axes, tasks):
        for j, model in enumerate(models):
            cells = {c["method"]: c for c in payload["cells"] if (c["task"], c["model"]) == (task, model)
                     and c["mean"] is not None}
            xs = [i for i, m in enumerate(methods) if m in cells]
            offset = (j - (len(models) - 1) / 2) * step
            ax.errorbar([x + offset for x in xs], [cells[methods[x]]["mean"] for x in xs],
                        yerr=[cells[methods[x]]["std"] or 0 for x in xs], fmt="o", markersize=3.5, capsize=2,
                        color=f"C{j}", label=model)
            for x in xs:
                ax.annotate(str(cells[methods[x]]["n_seeds"]), (x + offset, cells[methods[x]]["mean"]),
                            xytext=(3, 0), textcoords="offset points", fontsize=4.5, va="center", color=f"C{j}")
        if levels.get(task) is not None:
            ax.axhline(levels[task], color="black", linestyle=":", linewidth=0.8, label="majority class")
        ax.set_xticks(range(len(methods)), methods, fontsize=6, rotation=30, ha="right", rotation_mode="anchor")
        ax.set(title=task, ylabel=f"dev {METRIC.get(task, 'score')}")
        ax.grid(True, axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=6.5, frameon=False)
    fig.suptitle("The power of scale: MiniLM (22.7M) against SmolLM2 (134.5M); small numbers: seeds per point",
                 fontsize=9)
    return fig


def caption_scale(results_dir: Path) -> str:
    payload = load_json(results_dir, "scale.json")
    claims = payload.get("claims") or {}
    h = payload["config"]["harness"]
    early = payload.get("decided_early") or {}

    def said(claim: str) -> str:
        return _gated(payload, claims.get(claim), bool(early.get(claim)))

    levels = payload["config"].get("majority") or {}

    def tally(items: list[dict], *kinds: str) -> str:
        return ", ".join(f"{k} {sum(1 for i in items if i['verdict'] == k)}" for k in kinds
                         if any(i["verdict"] == k for i in items)) or "none yet"

    per_task = "; ".join(f"{t}: " + ", ".join(f"{g['method']} {g['gain']:+.3f}" for g in payload["gains"]
                                              if g["task"] == t) for t in dict.fromkeys(g["task"] for g in
                                                                                        payload["gains"]))
    most = ", ".join(f"{t} {_verdict(v)}" for t, v in (claims.get("prompt_most_per_task") or {}).items())
    return (
        f"One harness for both models ({h['train_size']} seeded training rows, {h['val_size']} held out as validation "
        f"rows, {h['epochs']} epoch of batch {h['batch_size']}, max length {h['max_length']}; rates chosen on the "
        "validation rows; seeds 0, 1, 2); majority class "
        + ", ".join(f"{t} {_fmt(v)}" for t, v in levels.items())
        + f". Gain of SmolLM2 over MiniLM per task (each task's own metric): {per_task or '–'}. Claims (Ding et al. "
        "2023), each by the two-standard-error rule with ties and cells short of 3 scored seeds counted as absence "
        "of evidence: every method improves with model size — (task, method) pairs: "
        + tally(payload["gains"], "improves", "tie", "worsens", "not a test", "too few seeds")
        + f" — {said('every_method_improves')}; prompt tuning improves most — per task, "
        "prompt's gain against each other method's (the difference of two gains against two standard errors): "
        + tally(payload.get("prompt_vs_others", []), "prompt larger", "tie", "other larger")
        + f" ({most or 'no task tested'}) — {said('prompt_improves_most')} (criterion: on every task prompt's gain "
        "is an improvement and larger than every other method's); selective-module "
        "tuning beats last-layer tuning at the same budget — (model, task) pairs: "
        + tally(payload["selective_vs_last_layer"], "selective better", "tie", "last-layer better", "not a test",
                "too few seeds")
        + f" — {said('selective_beats_last_layer')} (criterion: in more than half); "
        "last-layer and selective tuning do well — judged as not falling below full fine-tuning by two standard "
        "errors on any (model, task): "
        + tally(payload.get("against_full", []), "above full FT", "tie with full FT", "below full FT", "not a test",
                "too few seeds")
        + f" — {said('they_do_well')}."
        + flagged_runs_note(payload["cells"], lambda c: f"{c['model']} {c['task']} {c['method']}")
        + " What was cut to fit (SmolLM2 on two CPU cores): two models only, a training subsample of "
        f"{h['train_size']} rows for one epoch, sequences cut at {h['max_length']} tokens, a seeded part of SST-2's "
        "dev set, two rates per method (continued at the edge of the grid). "
        f"Command: `python experiments/scale.py` ({versions_line(payload)})."
    )


# --- UniPELT -----------------------------------------------------------------------------------------
def draw_unipelt(results_dir: Path) -> Figure:
    """Per task with cells: dev score against K for UniPELT and its parts, the majority class dotted."""
    payload = load_json(results_dir, "unipelt_low_resource.json")
    levels = {c["task"]: c["majority"] for c in payload.get("comparisons", [])}
    tasks = [t for t in TASKS if any(c["task"] == t and c["mean"] is not None for c in payload["cells"])]
    fig = new_figure(2.5 * max(len(tasks), 1) + 0.5, 2.7)
    axes = fig.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    methods = ("unipelt", "lora", "prefix", "pfeiffer")
    for ax, task in zip(axes, tasks):
        for j, method in enumerate(methods):
            cells = sorted((c for c in payload["cells"] if (c["task"], c["method"]) == (task, method)
                            and c["mean"] is not None), key=lambda c: c["k"])
            dodge = 1.06 ** (j - (len(methods) - 1) / 2)  # side by side at each K (log axis), error bars apart
            if cells:
                ax.errorbar([c["k"] * dodge for c in cells], [c["mean"] for c in cells],
                            yerr=[c["std"] or 0 for c in cells], marker="o", markersize=4, capsize=2, label=method,
                            linewidth=2.0 if method == "unipelt" else 1.0)
        if levels.get(task) is not None:
            ax.axhline(levels[task], color="black", linestyle=":", linewidth=0.8, label="majority class")
        ax.set(title=task, xscale="log", xlabel="K training examples", ylabel=f"dev {METRIC.get(task, 'score')}")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=6, frameon=False)
    fig.suptitle("UniPELT against its parts in low-resource settings", fontsize=9)
    return fig


def caption_unipelt(results_dir: Path) -> str:
    payload = load_json(results_dir, "unipelt_low_resource.json")
    c = payload["counts"]
    per_k = payload.get("per_k") or {}
    lines = "; ".join(f"K = {k}: wins {v['win']}, ties {v['tie']}, losses {v['loss']}"
                      + (f", {v['not a test']} not a test" if v.get("not a test") else "")
                      + (f", {v['too few seeds']} with too few seeds" if v.get("too few seeds") else "")
                      + f" — {_gated(payload, v['holds'], bool(v.get('decided_early')))}" for k, v in per_k.items())
    overall = None if not per_k else (False if any(v["holds"] is False for v in per_k.values())
                                      else True if all(v["holds"] for v in per_k.values()) else None)
    overall_early = any(v.get("decided_early") for v in per_k.values())  # the claim needs every K
    return (
        "MiniLM, K seeded training rows (the same for every method and seed; 20 % of them held out as validation "
        "rows), rates chosen on the validation rows, seeds 0, 1, 2; parts in UniPELT's own configurations (LoRA r=8 "
        "on q,v, prefix 10 through Li & Liang's MLP, the FFN adapter with bottleneck 64). Claim (Mao et al. 2022): "
        "UniPELT beats each of its parts at K = 100, 500, 1000 — judged at each K over its (task, part) comparisons "
        "by the two-standard-error rule (held at a K when UniPELT wins every test there, not held when it loses "
        "one; ties, and cells short of 3 scored seeds, leave it open; comparisons with both at the majority class "
        f"are not a test): {lines or 'no comparison yet'}. Over all K: "
        f"{_gated(payload, overall, overall_early)} (wins {c['win']}, ties {c['tie']}, losses {c['loss']})."
        + flagged_runs_note(payload["cells"], lambda c: f"{c['task']} K={c['k']} {c['method']}")
        + " What was cut to fit: MiniLM (22.7M) in place of BERT-base, one seeded draw of the K rows (the seeds vary "
        "the training, not the rows), 100–250 steps per run (20, 10 and 5 epochs at K = 100, 500, 1000), two rates "
        "per method (continued at the edge of the grid)."
        + f" Command: `python experiments/unipelt_low_resource.py` ({versions_line(payload)})."
    )


FIGURES = [
    FigureSpec(name="composability", title="Simultaneous combinations of prompt tuning, BitFit and adapters",
               sources=("composability.json",), draw=draw_composability, caption=caption_composability,
               recompute=(("python", "experiments/composability.py"),)),
    FigureSpec(name="generalization_gap", title="Generalisation gap of single delta methods, full fine-tuning and "
                                                "combinations", sources=("generalization_gap.json",),
               draw=draw_gap, caption=caption_gap, recompute=(("python", "experiments/generalization_gap.py"),)),
    FigureSpec(name="sequential", title="Sequential combination of prompt tuning, BitFit and the adapter, all 6 orders",
               sources=("sequential.json",), draw=draw_sequential, caption=caption_sequential,
               recompute=(("python", "experiments/sequential.py"),)),
    FigureSpec(name="transfer", title="Zero-shot transfer of deltas across GLUE tasks", sources=("transfer.json",),
               draw=draw_transfer, caption=caption_transfer, recompute=(("python", "experiments/transfer.py"),)),
    FigureSpec(name="scale", title="The power of scale: delta methods on MiniLM and SmolLM2",
               sources=("scale.json",), draw=draw_scale, caption=caption_scale,
               recompute=(("python", "experiments/scale.py"),)),
    FigureSpec(name="unipelt_low_resource", title="UniPELT against its parts with 100, 500 and 1,000 training examples",
               sources=("unipelt_low_resource.json",), draw=draw_unipelt, caption=caption_unipelt,
               recompute=(("python", "experiments/unipelt_low_resource.py"),)),
]

__all__ = ["FIGURES", "part_effects"]
