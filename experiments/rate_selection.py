"""Learning rates chosen on validation rows, for the table experiments (GLUE table, design table).

A *pair* is what gets one rate: (task, method) in the GLUE table, (task, method, options) in the
design table (a method at two budgets is two pairs); ``key(row) -> pair`` says which.  The
selection sweep runs seed 0 on each pair's grid of rates; :func:`choose_lrs` takes the rate with
the highest validation score (rows held out of train; dev is never read), :func:`next_edge_rate`
continues a grid whose best rate sits at its edge, :func:`refine_rates` narrows a coarse bracket around
an interior best (where a study asks for it), and :func:`extended_spec` rebuilds the
selection spec with those extra rates from the rows alone (a resumed driver rebuilds the same
cells).  :func:`copy_rows` carries finished rows whose configuration is a cell of another sweep
into that sweep's JSONL (the seed-0 table cell *is* the selection cell at the chosen rate; a
design table's baseline cell *is* the GLUE table's cell when the settings are equal).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.results import append_jsonl, read_jsonl
from controltune.sweep import FINISHED
from controltune.sweep_spec import SweepSpec, canonical_config, expand, parse_spec

if TYPE_CHECKING:
    import argparse

Pair = tuple
KeyFn = Callable[[dict[str, Any]], Pair]
WhereFn = Callable[[Pair], dict[str, Any]]

MAX_EDGE_RATES = 2
"""Rates a pair may get beyond its grid when its best rate sits at the grid's edge."""


POOLING = {"minilm": "mean", "smollm2": "last"}
"""The readout of each model in the studies that train both: MiniLM's sentence-embedding mean pooling, and for the
causal SmolLM2 the last real token (what HF's sequence classifiers pool).  Measured side by side (LoRA r=8 on q,v,
SST-2, 2,000 rows, one epoch, rate 2e-3, seed 0, 500 dev rows; ``pooling_probe_smollm2_{last,mean}.json``): dev
accuracy 0.858 with the last token against 0.826 with the mean (validation 0.845 against 0.800)."""


def task_method(row: dict[str, Any]) -> tuple[str, str]:
    """The GLUE table's pair: (task, method)."""
    return str(row["config"]["task"]), str(row["config"]["method"])


def task_method_where(pair: Pair) -> dict[str, Any]:
    return {"task": pair[0], "method": pair[1]}


def choose_lrs(select_rows: list[dict[str, Any]], key: KeyFn = task_method) -> dict[Pair, dict[str, Any]]:
    """For each pair: the rate with the highest validation score among the finished cells.

    Returns ``{pair: {lr, val_score, candidates: [{lr, status, val_score}]}}``; a pair whose cells
    all diverged (or have no validation score) gets ``lr`` None.  Ties go to the smaller rate.
    Only ``val_score`` (validation rows held out of train) is read: dev plays no part.
    """
    by_pair: dict[Pair, list[dict[str, Any]]] = defaultdict(list)
    for row in select_rows:
        if row.get("status") in FINISHED:
            by_pair[key(row)].append(row)
    chosen = {}
    for pair, rows in by_pair.items():
        candidates = sorted(({"lr": float(r["config"]["lr"]), "status": r["status"], "val_score": r.get("val_score")}
                             for r in rows), key=lambda c: c["lr"])
        scored = [c for c in candidates if c["status"] == "done" and c["val_score"] is not None]
        best = max(scored, key=lambda c: c["val_score"]) if scored else None  # max keeps the first (smaller lr)
        chosen[pair] = {"lr": best["lr"] if best else None, "val_score": best["val_score"] if best else None,
                        "candidates": candidates}
    return chosen


def selection_regret(select_rows: list[dict[str, Any]], key: KeyFn = task_method) -> dict[Pair, dict[str, Any]]:
    """What choosing on validation rows cost on dev, pair by pair, on the selection's own seed-0 runs.

    For each pair with two or more scored rates: the chosen rate (:func:`choose_lrs`) and the rate whose run
    scored best on dev, and ``regret = dev(best on dev) − dev(chosen) ≥ 0`` (``score_at_best_val`` of each
    rate's run).  The dev maximum is itself one noisy draw per rate, so the regret overstates what a perfect
    choice would gain; it measures how far validation and dev disagree on the rates tried.
    ``{pair: {lr, best_dev_lr, regret, n_rates}}``."""
    chosen = choose_lrs(select_rows, key)
    dev: dict[Pair, dict[float, float]] = defaultdict(dict)
    for row in select_rows:
        if row.get("status") == "done" and row.get("val_score") is not None \
                and row.get("score_at_best_val") is not None:
            dev[key(row)][float(row["config"]["lr"])] = float(row["score_at_best_val"])
    out = {}
    for pair, scores in dev.items():
        lr = chosen[pair]["lr"]
        if len(scores) < 2 or lr not in scores:
            continue
        best = max(sorted(scores), key=lambda r: scores[r])
        out[pair] = {"lr": lr, "best_dev_lr": best, "regret": scores[best] - scores[lr], "n_rates": len(scores)}
    return out


def regret_by_task(select_rows: list[dict[str, Any]], key: KeyFn = task_method) -> dict[str, dict[str, Any]]:
    """:func:`selection_regret` per task (a pair's first entry): ``{pairs, same_rate, mean_regret, largest: {pair,
    lr, best_dev_lr, regret, n_rates}}``, ``same_rate`` counting the pairs whose chosen rate was also best on dev."""
    out: dict[str, dict[str, Any]] = {}
    for pair, r in sorted(selection_regret(select_rows, key).items()):
        entry = out.setdefault(str(pair[0]), {"pairs": 0, "same_rate": 0, "regrets": [], "largest": None})
        entry["pairs"] += 1
        entry["same_rate"] += r["lr"] == r["best_dev_lr"]
        entry["regrets"].append(r["regret"])
        if entry["largest"] is None or r["regret"] > entry["largest"]["regret"]:
            entry["largest"] = {"pair": list(pair), **r}
    return {t: {"pairs": e["pairs"], "same_rate": e["same_rate"], "mean_regret": statistics.fmean(e["regrets"]),
                "largest": e["largest"]} for t, e in out.items()}


def pair_rates(rows: list[dict[str, Any]], key: KeyFn = task_method) -> dict[Pair, list[float]]:
    """``pair -> sorted rates`` of the rows."""
    rates: dict[Pair, set[float]] = defaultdict(set)
    for row in rows:
        rates[key(row)].add(float(row["config"]["lr"]))
    return {pair: sorted(r) for pair, r in rates.items()}


def next_edge_rate(candidates: list[dict[str, Any]], grid: list[float], max_edge_rates: int = MAX_EDGE_RATES
                   ) -> float | None:
    """The next rate to try for a pair whose best validation score is at the edge of the rates tried, else None.

    ``candidates``: ``[{lr, status, val_score}]`` of every finished cell of the pair (sorted by lr), ``grid``: the
    pair's rates in the spec.  When every grid rate has finished and the best rate is the highest (lowest) tried,
    the grid continues geometrically one step up (down): ``r_top · r_top / r_next`` (``r_low · r_low / r_next``).
    Nothing once ``max_edge_rates`` rates beyond the grid were tried, or when the edge rate itself diverged (the
    way up is closed); when every rate tried diverged, one step down.  An optimum at the edge of a grid is a rate
    the grid did not reach; without this, a method that wants a larger rate than the grid offers would show a gap
    to full fine-tuning that is the grid's.
    """
    lrs = [c["lr"] for c in candidates]
    if len(lrs) < 2 or not set(grid) <= set(lrs) or len(set(lrs) - set(grid)) >= max_edge_rates:
        return None
    scored = [c for c in candidates if c["status"] == "done" and c["val_score"] is not None]
    if not scored:  # every rate diverged: the way down is the only one left
        return float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}") if all(c["status"] == "diverged" for c in candidates) \
            else None
    best = max(scored, key=lambda c: c["val_score"])["lr"]
    if best == lrs[-1]:
        return float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.3g}")
    if best == lrs[0] and candidates[0]["status"] == "done":
        return float(f"{lrs[0] * lrs[0] / lrs[1]:.3g}")
    return None


REFINE_RATIO = 2.5
"""A best interior rate whose tried neighbour is farther than this ratio gets the geometric midpoint between them
(:func:`refine_rates`): a factor-4 grid ends known to a factor of 2, a factor-10 one to 1.78 after two rounds."""


def refine_rates(candidates: list[dict[str, Any]], grid: list[float], min_ratio: float = REFINE_RATIO
                 ) -> list[float]:
    """The rates that narrow the bracket around a pair's best interior rate, ``[]`` when none is due.

    ``candidates``: ``[{lr, status, val_score}]`` of every finished cell of the pair (sorted by lr), ``grid``: the
    pair's rates in the spec.  Once every grid rate has finished and the best validation score is at ``r*`` with
    tried neighbours ``r_lo < r* < r_hi`` (a diverged neighbour counts: the optimum may sit just below divergence),
    each side whose ratio exceeds ``min_ratio`` gets its geometric midpoint, ``(r_lo·r*)^{1/2}`` and
    ``(r*·r_hi)^{1/2}`` (3 significant digits).  Both sides: the three scores bracket a maximum but do not say on
    which side of ``r*`` it lies.  A best rate at the edge of the rates tried is :func:`next_edge_rate`'s to
    continue, not this one's; the midpoints are interior, so they never put the best at an edge.
    """
    lrs = [c["lr"] for c in candidates]
    scored = [c for c in candidates if c["status"] == "done" and c["val_score"] is not None]
    if len(lrs) < 3 or not set(grid) <= set(lrs) or not scored:
        return []
    best = max(scored, key=lambda c: c["val_score"])["lr"]
    sides = _neighbours(lrs, best) or ()
    return [float(f"{(best * r) ** 0.5:.3g}") for r in sides if max(best, r) / min(best, r) > min_ratio]


def _neighbours(lrs: list[float], best: float | None) -> tuple[float, float] | None:
    """The rates tried just below and just above ``best`` (``lrs`` sorted); None when it is at their edge."""
    if best is None or best not in lrs or lrs.index(best) in (0, len(lrs) - 1):
        return None
    i = lrs.index(best)
    return lrs[i - 1], lrs[i + 1]


def rate_bracket(info: dict[str, Any]) -> float | None:
    """How well a pair's chosen rate is known: the larger ratio between it and its two tried neighbours,
    ``max(r*/r_lo, r_hi/r*)`` (``info``: :func:`choose_lrs`'s); None when it is at the edge of the rates tried
    (:func:`rate_at_edge`) or no rate scored."""
    sides = _neighbours([c["lr"] for c in info["candidates"]], info["lr"])
    return None if sides is None else max(info["lr"] / sides[0], sides[1] / info["lr"])


def rate_at_edge(info: dict[str, Any]) -> bool:
    """Whether a pair's chosen rate (``info``: :func:`choose_lrs`'s) is the highest or the lowest of the rates it
    finished (two or more).  Once its selection is complete, with the grid continued ``MAX_EDGE_RATES`` steps past
    its edge, such a pair's optimum is not bracketed by the rates tried: its score may be the grid's rather than
    the method's, and a caption names it (``flagged_runs_note``)."""
    lrs = [c["lr"] for c in info["candidates"]]
    return info["lr"] is not None and len(lrs) >= 2 and info["lr"] in (lrs[0], lrs[-1])


def extended_spec(spec: Path | dict[str, Any], select_rows: list[dict[str, Any]], key: KeyFn = task_method,
                  where: WhereFn = task_method_where, folder: Path | None = None,
                  max_edge_rates: int = MAX_EDGE_RATES,
                  refine: bool | Callable[[Pair], bool] = False) -> SweepSpec:
    """The selection spec (a YAML path, or its data with ``out`` relative to ``folder``) plus, per pair, the rates
    beyond its grid tried so far and the next edge rate (at most ``max_edge_rates`` beyond the grid); with
    ``refine`` (every pair, or the pairs a predicate accepts), once a pair's best rate is interior, the midpoints
    of :func:`refine_rates` around it.

    Derived from the rows alone, so a resumed driver rebuilds the same cells: one override
    ``{where: where(pair), set: {lr: [grid..., extra...]}}`` per extended pair.
    """
    import copy

    import yaml

    if isinstance(spec, Path):
        data, source, folder = yaml.safe_load(spec.read_text()), str(spec), spec.parent
    else:
        data, source = copy.deepcopy(spec), str(spec.get("name", "spec"))
    grid = pair_rates([{"config": c} for c in expand(parse_spec(data, source, folder))], key)
    tried = pair_rates([r for r in select_rows if r.get("status") in FINISHED], key)
    chosen = choose_lrs(select_rows, key)
    extra = []
    for pair, rates in sorted(grid.items(), key=lambda item: canonical_config({"p": list(item[0])})):
        have = sorted(set(rates) | set(tried.get(pair, [])))
        step = next_edge_rate(chosen[pair]["candidates"], rates, max_edge_rates) if pair in chosen else None
        if step is not None:
            have = sorted({*have, step})
        elif pair in chosen and (refine(pair) if callable(refine) else refine):
            have = sorted({*have, *refine_rates(chosen[pair]["candidates"], rates)})
        if have != rates:
            extra.append({"where": where(pair), "set": {"lr": have}})
    data["overrides"] = list(data.get("overrides") or []) + extra
    return parse_spec(data, source, folder)


def copy_rows(rows: list[dict[str, Any]], spec: SweepSpec, out: Path, source: str) -> int:
    """Append to ``out`` the finished rows whose configuration equals a cell of ``spec`` and that ``out`` lacks
    (marked ``copied_from: source``); returns how many were copied."""
    have = {canonical_config(r["config"]) for r in read_jsonl(out) if "config" in r}
    wanted = {canonical_config(c) for c in expand(spec)}
    copied = 0
    for row in rows:
        key = canonical_config(row["config"])
        if row.get("status") in FINISHED and key in wanted and key not in have:
            append_jsonl(out, {**row, "copied_from": source})
            have.add(key)
            copied += 1
    return copied


# --- the driver the table experiments share ------------------------------------------------------
def add_sweep_arguments(parser: argparse.ArgumentParser, runs: str) -> None:
    """The sweep's own options (``controltune sweep``'s) on an experiment driver; ``runs``: default run folders."""
    from pathlib import Path as _Path

    parser.add_argument("--cpus-per-cell", type=int, default=1, help="CPUs (and torch threads) per cell")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the embedded Ray (default: every core)")
    parser.add_argument("--executor", default="auto", choices=["auto", "ray", "local"])
    parser.add_argument("--address", default=None, help="an existing Ray cluster")
    parser.add_argument("--runs", type=_Path, default=_Path(runs), help="run folders of the cells (resumable)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep finished cells' resume states (checkpoint.pt; deleted by default)")


def sweep_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"cpus_per_cell": args.cpus_per_cell, "cpus": args.cpus, "executor": args.executor,
            "address": args.address, "runs_dir": args.runs, "keep_checkpoints": args.keep_checkpoints}


def select_then_tabulate(selection: Callable[[list[dict[str, Any]]], SweepSpec], select_out: Path,
                         table: Callable[[list[dict[str, Any]]], SweepSpec], table_out: Path,
                         glue_results: Path, echo: Callable[[str], None], sweep: dict[str, Any],
                         max_edge_rates: int = MAX_EDGE_RATES, refine_rounds: int = 0) -> None:
    """Run the selection sweep (with its edge rates, at most ``max_edge_rates`` rounds: the one ``selection``
    builds its spec with, and ``refine_rounds`` more for the midpoints of a spec built with ``refine``), then the
    table sweep.

    ``selection(rows)`` / ``table(selection rows)`` build the specs; finished GLUE table rows that are cells of
    either (same settings) are copied into their JSONL first (``glue_results``: the folder of
    ``glue_select.jsonl`` and ``glue_table.jsonl``), as are the selection's seed-0 rows into the table's.
    """
    from controltune.sweep import finished_configs, run_sweep

    glue_select = read_jsonl(glue_results / "glue_select.jsonl")
    glue_table = read_jsonl(glue_results / "glue_table.jsonl")
    rounds = max_edge_rates + 1 + refine_rounds
    for _ in range(rounds):
        spec = selection(read_jsonl(select_out))
        copy_rows(glue_select, spec, select_out, "glue_select.jsonl")
        if all(canonical_config(c) in finished_configs(read_jsonl(select_out)) for c in expand(spec)):
            break
        run_sweep(spec, select_out, echo=echo, **sweep)
    rows = read_jsonl(select_out)
    left = [c for c in expand(selection(rows)) if canonical_config(c) not in finished_configs(rows)]
    if left:  # a failed cell, or edge rates beyond the rounds: a table now would tabulate a half-chosen rate
        raise SystemExit(f"the selection has {len(left)} unfinished cell(s) after {rounds} rounds "
                         f"(e.g. {left[0]['task']} {left[0]['method']} lr {left[0]['lr']}); run again to continue")
    spec = table(rows)
    copy_rows(rows + glue_table, spec, table_out, f"{select_out.name} / glue_table.jsonl")
    run_sweep(spec, table_out, echo=echo, **sweep)


# --- the chosen cells and the driver's progress ----------------------------------------------------
def chosen_rows(select_rows: list[dict[str, Any]], table_rows: list[dict[str, Any]], key: KeyFn = task_method
                ) -> dict[Pair, tuple[float | None, dict[int, dict[str, Any]]]]:
    """Per pair: its chosen rate and the finished (``done``) rows at that rate, by seed (selection and table rows;
    the seed-0 table row is the selection row)."""
    out = {}
    for pair, info in choose_lrs(select_rows, key).items():
        rows = {r["config"]["seed"]: r for r in table_rows + select_rows if r.get("status") == "done"
                and key(r) == pair and float(r["config"]["lr"]) == info["lr"]}
        out[pair] = (info["lr"], rows)
    return out


def diverged_at_chosen(select_rows: list[dict[str, Any]], table_rows: list[dict[str, Any]],
                       key: KeyFn = task_method) -> dict[Pair, list[int]]:
    """Per pair: the seeds whose run at the chosen rate diverged (finished without a score, so never run again):
    a cell's grid is complete with them, and its caption names them."""
    out: dict[Pair, list[int]] = {}
    for pair, info in choose_lrs(select_rows, key).items():
        seeds = sorted({int(r["config"]["seed"]) for r in table_rows + select_rows if r.get("status") == "diverged"
                        and key(r) == pair and float(r["config"]["lr"]) == info["lr"]})
        if seeds:
            out[pair] = seeds
    return out


def require_rates(chosen: dict[Pair, dict[str, Any]], pairs: list[Pair]) -> None:
    """Stop (SystemExit naming them) when a pair of ``pairs`` has no chosen rate (where a rate is an input, e.g.
    a part's own rate in a combination)."""
    missing = [p for p in pairs if chosen.get(p, {}).get("lr") is None]
    if missing:
        raise SystemExit(f"no rate chosen for {missing} (selection unfinished, or every rate diverged)")


def diverged_everywhere(chosen: dict[Pair, dict[str, Any]]) -> set[Pair]:
    """The pairs whose every finished selection cell diverged (:func:`choose_lrs` gives them no rate)."""
    return {p for p, info in chosen.items()
            if info["lr"] is None and info["candidates"] and all(c["status"] == "diverged" for c in info["candidates"])}


def table_pairs(chosen: dict[Pair, dict[str, Any]], pairs: list[Pair]) -> list[Pair]:
    """The pairs of ``pairs`` that diverged at every rate tried, which a table leaves out (its spec's ``exclude``)
    and a summary counts as finished (``diverged_every_rate``) and names; a clear stop when a pair has no rate
    otherwise (its selection has not finished).  Called after :func:`select_then_tabulate` has run the selection to
    its end, edge rates included, so every rate there is to try was tried."""
    missing = [p for p in pairs if chosen.get(p, {}).get("lr") is None]
    everywhere = diverged_everywhere({p: chosen[p] for p in missing if p in chosen})
    unfinished = [p for p in missing if p not in everywhere]
    if unfinished:
        raise SystemExit(f"no rate chosen for {unfinished}: their selection has not finished")
    return [p for p in pairs if p in everywhere]


def at_chosen_rates(data: dict[str, Any], chosen: dict[Pair, dict[str, Any]], pairs: list[Pair],
                    where: WhereFn = task_method_where) -> dict[str, Any]:
    """A table spec's ``data`` with each pair of ``pairs`` at its chosen rate (one override each) and the pairs that
    diverged at every rate tried excluded (:func:`table_pairs`, which stops on a pair without a rate otherwise)."""
    skipped = table_pairs(chosen, pairs)
    data["overrides"] = list(data.get("overrides") or []) + [
        {"where": where(p), "set": {"lr": chosen[p]["lr"]}} for p in pairs if p not in skipped]
    data["exclude"] = [where(p) for p in skipped]
    return data


def progress_echo(refresh: Callable[[], Any]) -> Callable[[str], None]:
    """A sweep's ``echo``: print each line, and after every finished cell (its line starts with ``[``) rewrite the
    study's summary with ``refresh()``, so a partial result is always on disk."""
    def echo(line: str) -> None:
        print(line, flush=True)
        if line.startswith("["):
            refresh()

    return echo


REPRODUCED = ("score_at_best_val", "val_score", "score")
"""A rebuilt run stands in for its row only if these are identical (``experiments/rebuild_runs.py``)."""


def reproduces(row: dict[str, Any], rebuilt: dict[str, Any]) -> bool:
    """Whether a rebuilt run scored exactly what the row it was trained again from recorded."""
    return all(row.get(k) == rebuilt.get(k) for k in REPRODUCED)


def with_rebuilt(rows: list[dict[str, Any]], rebuilt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with what they lack (``curves``, ``train_loss_end``, ``train_scores``, ``predicts_one_class``, and
    the ``top_class_share`` of ``dev_at_best_val`` and ``scores``: rows written before they carried them) taken from
    their rebuilt run, when that run reproduced the row's scores exactly; other rows unchanged."""
    twins = {r["cell"]: r for r in rebuilt if r.get("status") == "done"}
    out = []
    for row in rows:
        twin = twins.get(row.get("cell"))
        if twin is not None and reproduces(row, twin):
            row = {**row, **{k: twin[k] for k in ("curves", "train_loss_end", "train_scores", "predicts_one_class")
                           if row.get(k) is None and twin.get(k) not in (None, {}, [])}}
            for k in ("dev_at_best_val", "scores"):
                mine, theirs = row.get(k), twin.get(k) or {}
                if isinstance(mine, dict) and "top_class_share" not in mine and "top_class_share" in theirs:
                    row[k] = {**mine, "top_class_share": theirs["top_class_share"]}
        out.append(row)
    return out


def rescored_lacks(row: dict[str, Any]) -> bool:
    """Whether a finished row's reported dev scores lack ``top_class_share`` (rows written before evaluations
    reported it): what ``experiments/rescore_runs.py`` measures again from the run folder."""
    reported = row.get("dev_at_best_val") or row.get("scores")
    return row.get("status") == "done" and isinstance(reported, dict) and "top_class_share" not in reported


def with_rescored(rows: list[dict[str, Any]], rescored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` lacking ``top_class_share`` (:func:`rescored_lacks`) completed from their rescore
    (``results/rescored.jsonl``): the reported dev scores' ``top_class_share`` and ``predicts_one_class``, only
    when the rescore reproduced the row's recorded score exactly; other rows unchanged."""
    twins = {r["cell"]: r for r in rescored if r.get("reproduces")}
    out = []
    for row in rows:
        twin = twins.get(row.get("cell"))
        if twin is not None and rescored_lacks(row):
            share = twin["scores"]["top_class_share"]
            key = "dev_at_best_val" if row.get("dev_at_best_val") else "scores"
            row = {**row, key: {**row[key], "top_class_share": share}, "predicts_one_class": share == 1.0}
        out.append(row)
    return out


def completed_rows(path: Path) -> list[dict[str, Any]]:
    """A study's rows (``path``, a JSONL under ``experiments/results``) completed from what was measured for them
    later: the rebuilds of GLUE cells copied into it (``glue_rebuilt.jsonl``, :func:`with_rebuilt`) and rescores of
    its old rows (``rescored.jsonl``, :func:`with_rescored`), each taken only where it reproduced the row exactly."""
    folder = path.parent
    return with_rescored(with_rebuilt(read_jsonl(path), read_jsonl(folder / "glue_rebuilt.jsonl")),
                         read_jsonl(folder / "rescored.jsonl"))


def rebuild_cells(rows: list[dict[str, Any]], out: Path, settings: dict[str, Any], root: Path,
                  echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train the cells of finished ``rows`` again from their recorded configurations into the run folders the
    rows name (relative to ``root``), appending the new rows to ``out``; returns them.  For a run folder lost
    with the machine that trained it (``runs/`` is never committed); whether each rebuild reproduced its row is
    for the caller to compare (:data:`REPRODUCED`)."""
    from controltune.sweep import run_cells

    by_folder: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_folder[str(Path(row["run_dir"]).parent)].append(row["config"])
    settings = {k: v for k, v in settings.items() if k != "runs_dir"}  # each cell goes back to its own folder
    before = len(read_jsonl(out))
    for folder, cells in sorted(by_folder.items()):
        run_cells(cells, out, name=f"rebuild {folder}", runs_dir=root / folder, skip_finished=False, echo=echo,
                  **settings)
    return read_jsonl(out)[before:]
