"""Choosing learning rates on validation rows for the study tables (``experiments/rate_selection.py``): the chosen
rate, the edge rates that continue a grid, the midpoints that narrow a bracket, the shared select-then-tabulate
driver (with a fake sweep), the GLUE and design tables built on them, and rows completed from rebuilt and rescored
runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controltune.results import append_jsonl, read_jsonl
from controltune.sweep_spec import canonical_config, expand, parse_spec


def test_the_glue_driver_chooses_rates_on_validation_scores_only():
    from experiments.glue_table import choose_lrs, table_rows

    def row(lr, status="done", val=None, dev=None, seed=0):
        return {"config": {"task": "rte", "method": "lora", "lr": lr, "seed": seed}, "status": status,
                "val_score": val, "score_at_best_val": dev, "score": dev, "metric": "accuracy",
                "best_val": {"step": 10}, "dev_at_best_val": {"step": 10, "accuracy": dev, "loss": 0.6},
                "n_trainable": 5, "trainable_fraction": 0.1, "total_steps": 20, "train_time_s": 1.0}

    rows = [row(1e-3, val=0.60, dev=0.70), row(3e-3, val=0.65, dev=0.55), row(1e-2, "diverged"),
            row(3e-2, val=0.65, dev=0.99)]
    chosen = choose_lrs(rows)[("rte", "lora")]
    assert chosen["lr"] == 3e-3 and chosen["val_score"] == 0.65  # the best dev (0.99, 0.70) plays no part
    assert [c["lr"] for c in chosen["candidates"]] == [1e-3, 3e-3, 1e-2, 3e-2]
    assert choose_lrs([row(1e-2, "diverged")])[("rte", "lora")]["lr"] is None
    provisional = table_rows(rows, [])
    assert provisional[0]["stage"] == "selection" and provisional[0]["n_seeds"] == 1
    assert provisional[0]["mean"] == 0.55 and provisional[0]["std"] is None
    table = table_rows(rows, [row(3e-3, val=0.6, dev=d, seed=s) for s, d in enumerate((0.55, 0.60, 0.65))])
    assert table[0]["stage"] == "table" and table[0]["n_seeds"] == 3 and table[0]["mean"] == pytest.approx(0.60)
    assert table[0]["std"] == pytest.approx(0.05) and table[0]["lr"] == 3e-3 and table[0]["trainable"] == 5


def test_the_glue_driver_continues_a_grid_whose_best_rate_is_at_its_edge(tmp_path):
    from experiments.glue_table import selection_spec
    from experiments.rate_selection import MAX_EDGE_RATES, next_edge_rate

    def cand(lr, val, status="done"):
        return {"lr": lr, "status": status, "val_score": val}

    grid = [5e-4, 2e-3]
    assert next_edge_rate([cand(5e-4, 0.5)], grid) is None  # the grid is not finished yet
    assert next_edge_rate([cand(5e-4, 0.5), cand(2e-3, 0.6)], grid) == 8e-3  # top: one geometric step up
    assert next_edge_rate([cand(5e-4, 0.6), cand(2e-3, 0.5)], grid) == 1.25e-4  # bottom: one step down
    assert next_edge_rate([cand(5e-4, 0.5), cand(2e-3, 0.6), cand(8e-3, 0.55)], grid) is None  # interior
    assert next_edge_rate([cand(5e-4, 0.5), cand(2e-3, 0.6), cand(8e-3, None, "diverged")], grid) is None
    beyond = [cand(5e-4, 0.5), cand(2e-3, 0.6), cand(8e-3, 0.7), cand(3.2e-2, 0.8)]
    assert len(beyond) - len(grid) == MAX_EDGE_RATES and next_edge_rate(beyond, grid) is None
    assert next_edge_rate(beyond, grid, max_edge_rates=3) == 0.128  # a study that allows a third step
    # every rate diverged: one step down (no chosen rate would otherwise stop the study at its table), twice at most
    assert next_edge_rate([cand(5e-4, None, "diverged"), cand(2e-3, None, "diverged")], grid) == 1.25e-4
    down = [cand(3.12e-5, None, "diverged"), cand(1.25e-4, None, "diverged"), cand(5e-4, None, "diverged"),
            cand(2e-3, None, "diverged")]
    assert next_edge_rate(down, grid) is None

    spec = tmp_path / "select.yaml"
    spec.write_text("name: s\nout: rows.jsonl\ngrid: {model: minilm, task: [rte, cola], method: [lora], seed: 0}\n"
                    "per_method: {lora: {lr: [5.0e-4, 2.0e-3]}}\n")

    def row(task, lr, val):
        return {"config": {"task": task, "method": "lora", "lr": lr, "seed": 0}, "status": "done", "val_score": val}

    rows = [row("rte", 5e-4, 0.6), row("rte", 2e-3, 0.5), row("cola", 5e-4, 0.1), row("cola", 2e-3, 0.2)]
    cells = {(c["task"], c["lr"]) for c in expand(selection_spec(spec, rows))}
    assert cells == {("rte", 5e-4), ("rte", 2e-3), ("rte", 1.25e-4), ("cola", 5e-4), ("cola", 2e-3), ("cola", 8e-3)}
    rows += [row("cola", 8e-3, 0.3)]  # still the top: one more step, then no more
    assert ("cola", 3.2e-2) in {(c["task"], c["lr"]) for c in expand(selection_spec(spec, rows))}
    rows += [row("cola", 3.2e-2, 0.4)]
    assert len([c for c in expand(selection_spec(spec, rows)) if c["task"] == "cola"]) == 2 + MAX_EDGE_RATES


def test_a_chosen_rate_at_the_edge_of_the_rates_tried_is_flagged():
    from experiments.rate_selection import choose_lrs, rate_at_edge

    def row(lr, val, status="done"):
        return {"config": {"task": "cola", "method": "lora", "lr": lr, "seed": 0}, "status": status, "val_score": val}

    def flagged(rows):
        return rate_at_edge(choose_lrs(rows)[("cola", "lora")])

    assert flagged([row(5e-4, 0.1), row(2e-3, 0.2)])  # the top
    assert flagged([row(5e-4, 0.3), row(2e-3, 0.2), row(1.25e-4, 0.1)]) is False  # bracketed
    assert flagged([row(5e-4, 0.1), row(2e-3, 0.2), row(8e-3, None, "diverged")]) is False  # the way up diverged
    assert flagged([row(3.12e-5, 0.4), row(1.25e-4, 0.3), row(5e-4, 0.2)])  # the bottom
    assert flagged([row(5e-4, 0.1)]) is False  # one rate: nothing to bracket
    assert flagged([row(5e-4, None, "diverged"), row(2e-3, None, "diverged")]) is False  # no rate chosen


def test_the_design_table_shares_the_glue_harness_and_judges_by_two_standard_errors():
    from controltune.sweep_spec import canonical_config, load_spec
    from experiments.design_table import BUDGETS, label_of, selection_spec, verdict
    from experiments.glue_table import SELECT_SPEC

    glue_lora = {canonical_config(c) for c in expand(load_spec(SELECT_SPEC)) if c["method"] == "lora"}
    design = {canonical_config(c) for c in expand(selection_spec(("sst2", "mrpc", "rte", "cola"), ("b74k",)))}
    assert glue_lora and glue_lora <= design  # the GLUE table's LoRA cells are design cells: copied, not rerun
    assert label_of({"method": "peft_lora", "options": BUDGETS["b18k"]["pissa"][1]}) == ("b18k", "pissa")

    def cell(mean, std, n=3):
        return {"mean": mean, "std": std, "n_seeds": n}

    assert verdict(cell(0.60, 0.01), cell(0.55, 0.01))[0] == "win"
    assert verdict(cell(0.55, 0.01), cell(0.60, 0.01))[0] == "loss"
    assert verdict(cell(0.56, 0.05), cell(0.55, 0.05))[0] == "tie"
    assert verdict(cell(0.60, None, 1), cell(0.55, 0.01))[0] is None



def test_the_design_table_continues_a_grid_three_steps_past_its_edge():
    from experiments.design_table import BUDGETS, EDGE_RATES, selection_spec

    _, options, grid = BUDGETS["b74k"]["prefix"]

    def row(lr, val):
        return {"config": {"model": "minilm", "task": "sst2", "method": "prefix", "options": options, "lr": lr,
                           "seed": 0}, "status": "done", "val_score": val}

    def prefix_rates(rows):
        return sorted(c["lr"] for c in expand(selection_spec(("sst2",), ("b74k",), rows))
                      if c["method"] == "prefix")

    rows = [row(lr, 0.80 + i / 100) for i, lr in enumerate(grid)]
    for _ in range(EDGE_RATES):  # still rising at each step: one more, up to EDGE_RATES beyond the grid
        rates = prefix_rates(rows)
        rows.append(row(rates[-1], 0.80 + len(rows) / 100))
    assert EDGE_RATES == 3 and len(prefix_rates(rows)) == len(grid) + 3 == len(rows)
    assert prefix_rates(rows)[-1] == pytest.approx(grid[-1] * (grid[1] / grid[0]) ** 3, rel=0.01)
def test_the_design_table_keeps_the_cells_of_a_rate_the_midpoints_moved_and_what_the_move_did():
    from experiments.design_table import other_rates, refinement

    def row(lr, seed, score):
        return {"config": {"lr": lr, "seed": seed}, "score_at_best_val": score}

    rows = [row(2e-3, s, 0.25 + 0.01 * s) for s in range(3)] + [row(4e-3, s, 0.20 + 0.01 * s) for s in range(3)]
    rows.append(row(1e-3, 0, 0.3))  # a selection cell only: one seed, not a cell of the table
    earlier = other_rates(rows, 4e-3)
    assert [(o["lr"], o["n_seeds"]) for o in earlier] == [(2e-3, 3)] and earlier[0]["mean"] == pytest.approx(0.26)

    def cell(method, mean, std, other=()):
        return {"task": "cola", "budget": "b18k", "method": method, "lr": 4e-3, "mean": mean, "std": std,
                "n_seeds": 3, "other_rates": [{"lr": 2e-3, "mean": m, "std": s, "n_seeds": 3} for m, s in other]}

    # LoRA's move cost it 0.1 on dev; the design's gained 0.05: at the earlier rates the design would lose, at the
    # chosen ones it wins
    cells = [cell("lora", 0.20, 0.01, [(0.30, 0.01)]), cell("riccati_feedback", 0.25, 0.01, [(0.20, 0.01)]),
             cell("adapter", 0.22, 0.01)]
    found = refinement(cells)["cola"]
    assert (found["pairs"], found["lower"], found["higher"]) == (2, 1, 1)
    assert found["mean_change"] == pytest.approx(-0.025)
    assert found["wins_over_lora_at_earlier_rates"] == []
    assert found["verdicts"] == 2  # riccati_feedback against LoRA and the adapter
    assert found["verdicts_changed"] == [{"budget": "b18k", "design": "riccati_feedback", "baseline": "lora",
                                          "earlier": "loss", "chosen": "win"},
                                         {"budget": "b18k", "design": "riccati_feedback", "baseline": "adapter",
                                          "earlier": "loss", "chosen": "win"}]
    cells[0]["other_rates"][0]["mean"] = 0.10  # LoRA was worse before: the design wins at the earlier rates too
    assert refinement(cells)["cola"]["wins_over_lora_at_earlier_rates"] == ["b18k:riccati_feedback"]


def test_a_gap_to_full_fine_tuning_gets_its_measured_reasons(tmp_path):
    from experiments.glue_table import gap_reasons

    def cell(best_step, losses):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"curves": {"train_loss": losses}}))
        return {"best_val": {"step": best_step}, "total_steps": 10, "run_dir": str(run)}

    row = {"lr": 1e-2, "lr_grid": [3e-3, 1e-2]}
    found = gap_reasons(row, [cell(10, [0.7] * 10), cell(10, [0.6] * 10)], [cell(5, [0.2] * 10)])
    assert found["rate_at_grid_edge"] and found["best_val_at_last_step"] == "2/2"
    assert found["train_loss_end"] == pytest.approx(0.65) and found["full_train_loss_end"] == pytest.approx(0.2)
    assert len(found["reasons"]) == 3 and "fits the training data less" in found["reasons"][2]
    fits = gap_reasons({"lr": 3e-3, "lr_grid": [1e-3, 3e-3, 1e-2]}, [cell(4, [0.21] * 10)], [cell(5, [0.2] * 10)])
    assert fits["reasons"] == [fits["reasons"][0]] and "generalisation gap" in fits["reasons"][0]


def test_select_then_tabulate_runs_the_edges_then_the_table_and_reuses_glue_rows(tmp_path, monkeypatch):
    """The shared driver of the design and composability tables, with the sweep replaced by a fake that
    finishes every cell at once (validation score rising with the rate, so the grid's top is continued)."""
    import controltune.sweep as sweep_module
    from controltune.results import append_jsonl
    from experiments.rate_selection import MAX_EDGE_RATES, choose_lrs, extended_spec, select_then_tabulate

    ran = []

    def fake_sweep(spec, out, echo=None, **_):
        have = {canonical_config(r["config"]) for r in read_jsonl(out)}
        for cell in expand(spec):
            if canonical_config(cell) not in have:
                ran.append((spec.name, cell["lr"], cell["seed"]))
                append_jsonl(out, {"config": cell, "status": "done", "val_score": cell["lr"]})

    monkeypatch.setattr(sweep_module, "run_sweep", fake_sweep)
    data = {"name": "sel", "out": "sel.jsonl", "grid": {"model": "minilm", "task": "rte", "method": "lora",
                                                        "seed": 0}, "per_method": {"lora": {"lr": [1e-3, 2e-3]}}}
    glue = tmp_path / "glue"
    glue.mkdir()
    (glue / "glue_table.jsonl").write_text("")
    first = expand(parse_spec(data, "sel", tmp_path))[0]  # the GLUE table already has the 1e-3 cell: copied
    append_jsonl(glue / "glue_select.jsonl", {"config": first, "status": "done", "val_score": 1e-3})

    def table(rows):
        lr = choose_lrs(rows)[("rte", "lora")]["lr"]
        grid = {**data["grid"], "seed": [0, 1, 2]}
        return parse_spec({**data, "name": "tab", "out": "tab.jsonl", "grid": grid,
                           "per_method": {"lora": {"lr": [lr]}}}, "tab", tmp_path)

    select_then_tabulate(lambda rows: extended_spec(data, rows, folder=tmp_path), tmp_path / "sel.jsonl", table,
                         tmp_path / "tab.jsonl", glue, print, {})
    selection = [lr for name, lr, _ in ran if name == "sel"]
    assert 1e-3 not in selection and selection == [2e-3, 4e-3, 8e-3][:1 + MAX_EDGE_RATES]  # edges, one round each
    assert [(lr, seed) for name, lr, seed in ran if name == "tab"] == [(8e-3, 1), (8e-3, 2)]  # seed 0 copied
    assert [r.get("copied_from") for r in read_jsonl(tmp_path / "tab.jsonl")][0] == "sel.jsonl / glue_table.jsonl"


def test_the_glue_table_runs_through_the_shared_driver_and_leaves_out_a_pair_that_diverged_everywhere(
        tmp_path, monkeypatch):
    """``glue_table.py`` (no sweep loop of its own): its selection continues the grid's top edge, the table runs
    seeds 1 and 2 at the chosen rate with seed 0 copied, and a pair whose every rate diverged is not tabulated."""
    import yaml

    import controltune.sweep as sweep_module
    import experiments.glue_table as glue_table
    from controltune.results import append_jsonl

    ran = []

    def fake_sweep(spec, out, echo=None, **_):
        have = {canonical_config(r["config"]) for r in read_jsonl(out)}
        for cell in expand(spec):
            if canonical_config(cell) not in have:
                ran.append((spec.name, cell["method"], cell["lr"], cell["seed"]))
                diverged = cell["method"] == "bitfit"
                append_jsonl(out, {"config": cell, "status": "diverged" if diverged else "done",
                                   "val_score": None if diverged else cell["lr"]})
                echo(f"[{len(ran)}] done")

    summaries = []
    monkeypatch.setattr(sweep_module, "run_sweep", fake_sweep)
    monkeypatch.setattr(glue_table, "write_summary", lambda select, table: summaries.append(len(expand(select))))
    grid = {"model": "minilm", "task": "rte", "method": ["lora", "bitfit"]}
    (tmp_path / "sel.yaml").write_text(yaml.safe_dump({
        "name": "sel", "out": "sel.jsonl", "grid": {**grid, "seed": 0},
        "per_method": {"lora": {"lr": [1e-3, 2e-3]}, "bitfit": {"lr": [1e-3]}}}))
    (tmp_path / "tab.yaml").write_text(yaml.safe_dump({"name": "tab", "out": "tab.jsonl",
                                                       "grid": {**grid, "seed": [0, 1, 2]}}))
    glue_table.main(["--select", str(tmp_path / "sel.yaml"), "--table", str(tmp_path / "tab.yaml"),
                     "--runs", str(tmp_path / "runs")])
    assert [(m, lr) for name, m, lr, _ in ran if name == "sel"] == [
        ("lora", 1e-3), ("lora", 2e-3), ("bitfit", 1e-3), ("lora", 4e-3), ("lora", 8e-3)]
    assert [(m, lr, seed) for name, m, lr, seed in ran if name == "tab"] == [("lora", 8e-3, 1), ("lora", 8e-3, 2)]
    assert [r.get("copied_from") for r in read_jsonl(tmp_path / "tab.jsonl")][0] == "sel.jsonl / glue_table.jsonl"
    assert summaries[0] == 3 and summaries[-1] == 5  # rewritten after each cell, with the edge rates the rows led to


def test_a_coarse_bracket_around_an_interior_best_rate_is_narrowed_on_both_sides():
    """The design table's grids step by 4: a best rate between two tried ones is known to a factor of 4 until the
    midpoints on both sides are tried; then to a factor of 2, and nothing more is asked."""
    from experiments.rate_selection import choose_lrs, rate_bracket, refine_rates

    def cand(lr, val, status="done"):
        return {"lr": lr, "status": status, "val_score": val}

    grid = [5e-4, 2e-3]
    interior = [cand(5e-4, 0.19), cand(2e-3, 0.27), cand(8e-3, None, "diverged")]  # CoLA's LoRA: 8e-3 collapsed
    assert refine_rates(interior, grid) == [1e-3, 4e-3]  # a diverged neighbour still bounds the bracket
    assert refine_rates(interior[:2], grid) == []  # best at the edge: the edge step's job, not this one's
    assert refine_rates(interior[1:], grid) == []  # the grid is not finished
    narrowed = sorted([*interior, cand(1e-3, 0.24), cand(4e-3, 0.29)], key=lambda c: c["lr"])
    assert refine_rates(narrowed, grid) == []  # 4e-3 best between 2e-3 and 8e-3: a factor of 2 each side

    def bracket(cands):  # through choose_lrs, as a summary computes it
        rows = [{"config": {"task": "cola", "method": "lora", "lr": c["lr"]}, "status": c["status"],
                 "val_score": c["val_score"]} for c in cands]
        return rate_bracket(choose_lrs(rows)[("cola", "lora")])

    assert bracket(interior) == pytest.approx(4.0) and bracket(narrowed) == pytest.approx(2.0)
    assert bracket(interior[:2]) is None  # at the edge: no bracket at all
    tenfold = [cand(3e-3, 0.5), cand(3e-2, 0.6), cand(3e-1, 0.55)]
    assert refine_rates(tenfold, [3e-3, 3e-2, 3e-1]) == [9.49e-3, 9.49e-2]
    assert refine_rates([cand(5e-4, None, "diverged"), cand(2e-3, None, "diverged"), cand(8e-3, None, "diverged")],
                        grid) == []  # nothing scored: nothing to bracket


def test_select_then_tabulate_narrows_the_bracket_when_the_study_asks(tmp_path, monkeypatch):
    """With ``refine``, the midpoints around an interior best run as one more selection round and the table takes
    the best of them; without it (every other study) the selection is what it was."""
    import math

    import controltune.sweep as sweep_module
    from controltune.results import append_jsonl
    from experiments.rate_selection import choose_lrs, extended_spec, select_then_tabulate

    ran = []

    def fake_sweep(spec, out, echo=None, **_):  # validation falls with the log-distance from 3e-3
        have = {canonical_config(r["config"]) for r in read_jsonl(out)}
        ran.extend((spec.name, c["lr"]) for c in expand(spec) if canonical_config(c) not in have)
        for cell in (c for c in expand(spec) if canonical_config(c) not in have):
            append_jsonl(out, {"config": cell, "status": "done", "val_score": -abs(math.log(cell["lr"] / 3e-3))})

    monkeypatch.setattr(sweep_module, "run_sweep", fake_sweep)
    data = {"name": "sel", "out": "sel.jsonl", "grid": {"task": "rte", "method": "lora", "seed": 0},
            "per_method": {"lora": {"lr": [5e-4, 2e-3]}}}
    for name in ("glue_table.jsonl", "glue_select.jsonl"):
        (tmp_path / name).write_text("")

    def table(rows):
        lr = choose_lrs(rows)[("rte", "lora")]["lr"]
        return parse_spec({**data, "name": "tab", "out": "tab.jsonl", "grid": {**data["grid"], "seed": [0, 1, 2]},
                           "per_method": {"lora": {"lr": [lr]}}}, "tab", tmp_path)

    for refine, folder in ((False, tmp_path / "plain"), (lambda pair: pair[0] == "rte", tmp_path / "refined")):
        folder.mkdir()
        ran.clear()
        select_then_tabulate(lambda rows, f=folder, r=refine: extended_spec(data, rows, folder=f, refine=r),
                             folder / "sel.jsonl", table, folder / "tab.jsonl", tmp_path, print, {},
                             refine_rounds=2 if refine else 0)
        selection = sorted(lr for name, lr in ran if name == "sel")
        tabulated = {lr for name, lr in ran if name == "tab"}
        if refine:  # the grid, its edge step 8e-3 (2e-3 was the top), then 1e-3 and 4e-3 around 2e-3
            assert selection == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3] and tabulated == {4e-3}
        else:
            assert selection == [5e-4, 2e-3, 8e-3] and tabulated == {2e-3}


def test_select_then_tabulate_leaves_out_a_pair_that_diverged_at_every_rate_and_stops_on_a_failed_cell(
        tmp_path, monkeypatch):
    """Prompt tuning diverges at every rate: the selection steps down twice, the table runs LoRA's seeds only;
    a failed selection cell (never finished) stops the driver before any table is built."""
    import controltune.sweep as sweep_module
    from controltune.results import append_jsonl
    from experiments.rate_selection import MAX_EDGE_RATES, choose_lrs, extended_spec, select_then_tabulate, table_pairs

    ran, fail = [], set()

    def fake_sweep(spec, out, echo=None, **_):
        have = {canonical_config(r["config"]) for r in read_jsonl(out) if r["status"] != "failed"}
        for cell in expand(spec):
            if canonical_config(cell) not in have:
                ran.append((spec.name, cell["method"], cell["lr"], cell["seed"]))
                status = "failed" if cell["lr"] in fail else "diverged" if cell["method"] == "prompt" else "done"
                append_jsonl(out, {"config": cell, "status": status,
                                   "val_score": -abs(cell["lr"] - 1.5e-3) if status == "done" else None})

    monkeypatch.setattr(sweep_module, "run_sweep", fake_sweep)
    data = {"name": "sel", "out": "sel.jsonl", "grid": {"model": "minilm", "task": "rte", "method": ["lora", "prompt"],
                                                        "seed": 0},
            "per_method": {"lora": {"lr": [1e-3, 2e-3]}, "prompt": {"lr": [1e-2, 5e-2]}}}
    glue = tmp_path / "glue"
    glue.mkdir()
    for name in ("glue_select.jsonl", "glue_table.jsonl"):
        (glue / name).write_text("")

    def table(rows):
        chosen = choose_lrs(rows)
        skipped = table_pairs(chosen, [("rte", "lora"), ("rte", "prompt")])
        spec = {**data, "name": "tab", "out": "tab.jsonl", "grid": {**data["grid"], "seed": [0, 1, 2]},
                "overrides": [{"where": {"method": m}, "set": {"lr": chosen[("rte", m)]["lr"]}}
                              for m in ("lora", "prompt") if ("rte", m) not in skipped],
                "exclude": [{"task": t, "method": m} for t, m in skipped]}
        return parse_spec(spec, "tab", tmp_path)

    select_then_tabulate(lambda rows: extended_spec(data, rows, folder=tmp_path), tmp_path / "sel.jsonl", table,
                         tmp_path / "tab.jsonl", glue, print, {})
    prompt = [lr for name, m, lr, _ in ran if name == "sel" and m == "prompt"]
    assert len(prompt) == 2 + MAX_EDGE_RATES and prompt[2:] == [2e-3, 4e-4][:MAX_EDGE_RATES]  # down, twice
    assert [(m, seed) for name, m, _, seed in ran if name == "tab"] == [("lora", 1), ("lora", 2)]

    (tmp_path / "sel.jsonl").unlink()
    (tmp_path / "tab.jsonl").unlink()
    ran.clear()
    fail.add(2e-3)  # LoRA's grid rate and prompt's first step down
    with pytest.raises(SystemExit, match=r"2 unfinished cell\(s\).*rte lora lr 0.002"):
        select_then_tabulate(lambda rows: extended_spec(data, rows, folder=tmp_path), tmp_path / "sel.jsonl", table,
                             tmp_path / "tab.jsonl", glue, print, {})
    assert not [r for r in ran if r[0] == "tab"]


def test_a_row_takes_curves_only_from_a_rebuild_that_reproduced_it():
    from experiments.rate_selection import with_rebuilt

    dev = {"step": 5, "accuracy": 0.8}
    rows = [{"cell": "a", "score_at_best_val": 0.8, "val_score": 0.9, "score": 0.8, "dev_at_best_val": dev},
            {"cell": "b", "score_at_best_val": 0.7, "val_score": 0.9, "score": 0.7, "dev_at_best_val": dev}]
    rebuilt = [{"cell": "a", "status": "done", "score_at_best_val": 0.8, "val_score": 0.9, "score": 0.8,
                "curves": {"val": [1]}, "train_loss_end": 0.3, "train_scores": {"accuracy": 0.95},
                "dev_at_best_val": {**dev, "top_class_share": 0.97}},
               {"cell": "b", "status": "done", "score_at_best_val": 0.71, "val_score": 0.9, "score": 0.7,
                "curves": {"val": [2]}, "train_loss_end": 0.4,  # not the same run: nothing of it is the row's
                "dev_at_best_val": {**dev, "top_class_share": 0.97}}]
    a, b = with_rebuilt(rows, rebuilt)
    assert a["curves"] == {"val": [1]} and a["train_loss_end"] == 0.3 and a["train_scores"] == {"accuracy": 0.95}
    assert a["dev_at_best_val"] == {**dev, "top_class_share": 0.97} and "top_class_share" not in dev
    assert "curves" not in b and "train_loss_end" not in b and b["dev_at_best_val"] == dev



def test_a_study_reads_its_rows_completed_from_exact_rebuilds_and_rescores(tmp_path):
    from experiments.rate_selection import completed_rows

    dev = {"step": 5, "mcc": 0.2}
    old = {"status": "done", "score_at_best_val": 0.2, "val_score": 0.3, "score": 0.2, "dev_at_best_val": dev}
    rows = [{**old, "cell": "glue"}, {**old, "cell": "own"}, {**old, "cell": "other"}]
    def write_jsonl(path: Path, items: list[dict]) -> None:
        for item in items:
            append_jsonl(path, item)

    write_jsonl(tmp_path / "study.jsonl", rows)
    write_jsonl(tmp_path / "glue_rebuilt.jsonl", [{**old, "cell": "glue", "train_scores": {"mcc": 0.5},
                                                    "dev_at_best_val": {**dev, "top_class_share": 1.0}}])
    write_jsonl(tmp_path / "rescored.jsonl", [{"cell": "own", "reproduces": True, "scores": {"top_class_share": 0.9}},
                                              {"cell": "other", "reproduces": False,
                                               "scores": {"top_class_share": 0.99}}])
    glue, own, other = completed_rows(tmp_path / "study.jsonl")
    assert glue["train_scores"] == {"mcc": 0.5} and glue["dev_at_best_val"]["top_class_share"] == 1.0
    assert own["dev_at_best_val"]["top_class_share"] == 0.9 and own["predicts_one_class"] is False
    assert other == rows[2]  # its rescore did not reproduce the row: nothing taken from it


def test_selection_regret_is_what_the_validation_choice_cost_on_dev():
    from experiments.rate_selection import selection_regret

    def row(task, lr, val, dev, status="done"):
        return {"config": {"task": task, "method": "lora", "lr": lr, "seed": 0}, "status": status,
                "val_score": val, "score_at_best_val": dev}

    rows = [row("cola", 1e-3, 0.30, 0.20), row("cola", 4e-3, 0.35, 0.15), row("cola", 2e-3, 0.20, 0.25),
            row("cola", 8e-3, None, None, "diverged"),
            row("sst2", 1e-3, 0.90, 0.88), row("sst2", 4e-3, 0.80, 0.85),  # validation and dev agree
            row("rte", 1e-3, 0.60, 0.55)]  # one rate: nothing to choose between
    found = selection_regret(rows)
    assert found[("cola", "lora")] == {"lr": 4e-3, "best_dev_lr": 2e-3, "regret": pytest.approx(0.10), "n_rates": 3}
    assert found[("sst2", "lora")]["regret"] == 0.0 and found[("sst2", "lora")]["best_dev_lr"] == 1e-3
    assert ("rte", "lora") not in found
    from experiments.rate_selection import regret_by_task

    summary = regret_by_task(rows)
    assert summary["cola"] == {"pairs": 1, "same_rate": 0, "mean_regret": pytest.approx(0.10),
                               "largest": {"pair": ["cola", "lora"], "lr": 4e-3, "best_dev_lr": 2e-3,
                                           "regret": pytest.approx(0.10), "n_rates": 3}}
    assert summary["sst2"]["same_rate"] == 1 and "rte" not in summary
