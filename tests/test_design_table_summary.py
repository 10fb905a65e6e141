"""The design table's summary, verdicts and figures (issue 18), from synthetic rows in the sweeps' format."""

from __future__ import annotations

import json

import pytest
from study_rows import rendered_caption, sweep_row

from controltune.results import append_jsonl
from experiments import design_report, design_table


def test_design_table(tmp_path, monkeypatch):
    monkeypatch.setattr(design_table, "SELECT_OUT", tmp_path / "s.jsonl")
    monkeypatch.setattr(design_table, "TABLE_OUT", tmp_path / "t.jsonl")
    monkeypatch.setattr(design_table, "SUMMARY", tmp_path / "design_table.json")
    better = {"parallel_control": 0.05, "recommended_lora": 0.05, "costate_lora": -0.05}
    for task in ("rte", "cola"):
        for label, (method, options, _) in design_table.BUDGETS["b74k"].items():
            for seed in (0, 1, 2):
                row = sweep_row({"task": task, "method": method, "options": options, "lr": 1e-3, "seed": seed},
                                0.7 + better.get(label, 0.0) + 0.001 * seed)
                last = 0.8 if label == "lora" else 0.6  # LoRA still rising at its last evaluation, the rest not
                row["curves"] = {"val": [{"step": 10, "accuracy": 0.5}, {"step": 20, "accuracy": 0.7},
                                         {"step": 30, "accuracy": last}][:3 if seed or task == "cola" else 2]}
                if method == "recommended_lora":
                    row["designs"] = {method: {"used": 73000 + seed, "ranks": {"0_v": 2},
                                               "scores": {"0_v": 1.0}, "trust_region": {"eta": 0.5, "trials": [{}]}}}
                if seed == 0:
                    append_jsonl(design_table.SELECT_OUT, row)
                append_jsonl(design_table.TABLE_OUT, row)
            if (task, label) == ("cola", "lora"):  # 1e-3 between two worse rates, a factor of 4 from the upper one
                for seed in (0, 1, 2):  # the cell of a rate chosen before the midpoints moved it: kept, not shown
                    append_jsonl(design_table.TABLE_OUT, sweep_row({"task": task, "method": method, "options": options,
                                                                    "lr": 4e-3, "seed": seed}, 0.6))
                for lr in (5e-4, 4e-3):
                    append_jsonl(design_table.SELECT_OUT, sweep_row({"task": task, "method": method, "options": options,
                                                                     "lr": lr, "seed": 0}, 0.5))
    # RTE's level above every score: a tie there has both at chance
    monkeypatch.setattr(design_table, "glue_majority", lambda _: {"rte": 0.9, "cola": 0.0})
    out = design_table.summary(("rte", "cola"), ("b74k",))
    assert out["wins"] == 4  # two designs x two tasks beat LoRA
    assert out["chance"]["comparisons"] == 6 and out["chance"]["wins"] == 2  # RTE's, both at chance, are no test
    assert out["checkpoint_rule"] == {"cola": {"comparisons": 6, "changed": []}}  # last step = best; RTE no test
    assert "Scored at each seed's last step instead of its best validation score, 0 of these 6 verdicts change." in (
        rendered_caption("design_table", tmp_path, tmp_path / "g"))
    # every cell's seeds at 0.000, 0.001, 0.002 above its level: std 0.001, a win needs 2·(2·0.001²/3)^½
    margin = 2 * (2 * 0.001 ** 2 / 3) ** 0.5
    res = out["resolution"]["cola"]
    assert res["n"] == 6 and res["margin_median"] == pytest.approx(margin)
    assert res["margin_max"] == pytest.approx(margin)
    assert res["closest"]["difference"] == pytest.approx(0.05) and res["closest"]["verdict"] == "win"
    assert all(r["at_chance"] == (r["task"] == "rte") for r in out["rows"])
    rec = next(c for c in out["cells"] if c["method"] == "recommended_lora" and c["task"] == "cola")
    assert rec["designs"] == [{"used": 73000 + s, "ranks": {"0_v": 2}, "trust_region": {"eta": 0.5}} for s in (0, 1, 2)]
    caption = rendered_caption("design_table", tmp_path, tmp_path / "f")
    assert "parallel_control: wins cola/b74k (+0.050), rte/b74k (+0.050)" in caption
    assert "costate_lora: wins none, ties 0, losses cola/b74k (-0.050), rte/b74k (-0.050)" in caption
    assert "4 wins, met" in caption
    assert "would call 0.3 wins in these 6 comparisons by chance" in caption and "2 were called" in caption
    assert (f"cola median {margin:.3f} ({margin:.3f}–{margin:.3f} over 6 comparisons), closest b74k "
            "parallel_control +0.050 against 0.002 (win)") in caption
    assert "the widest ratio between a chosen rate and a neighbouring rate tried: cola 4." in caption  # rte: none
    assert "gramian_lora: wins none, ties 2 (1 of them with both at the majority class), losses none" in caption
    # at LoRA's earlier rate (0.6) every design beats it; at the chosen one (0.701) two do
    earlier = ", ".join(f"b74k:{d}" for d in sorted(design_table.DESIGNS))
    assert ("Rates moved after their seeds 1 and 2 had run (the earlier cells kept; chosen minus earlier mean): "
            f"cola: 1 moved, 0 lower on dev, 1 higher, mean change +0.101, wins over LoRA at the earlier rates: "
            f"{earlier}, verdicts that differ between the two: 4 of 42 (4 against LoRA).") in caption
    lora = next(c for c in out["cells"] if (c["task"], c["method"]) == ("rte", "lora"))
    assert lora["val_curve"] == [{"step": 10, "mean": pytest.approx(0.5), "n": 3},  # the steps every seed reached
                                 {"step": 20, "mean": pytest.approx(0.7), "n": 3}]
    curves = rendered_caption("design_table_curves", tmp_path, tmp_path / "f")
    # RTE: the seed-0 rows stop at step 20, so every mean curve ends rising there; CoLA: LoRA alone rises at the end
    assert "not levelled off): rte 13 of 13, cola 1 of 13." in curves
    assert "Tasks complete (3 seeds in every cell, a diverged seed counted): rte, cola." in curves
    pareto = rendered_caption("design_table_pareto", tmp_path, tmp_path / "f")
    assert "Tasks complete (3 seeds in every cell, a diverged seed counted): rte, cola;" in pareto
    assert out["complete_tasks"] == ["rte", "cola"] and all(c["final"] for c in out["cells"])
    # a pair with no cell yet leaves its task running, in the captions as in the README's table
    short = {**out, "cells": [c for c in out["cells"] if (c["task"], c["method"]) != ("rte", "eva")]}
    assert not design_table.task_complete(short, "rte") and design_table.task_complete(short, "cola")
    assert out["refinement"]["cola"]["changes"] == [{"budget": "b74k", "method": "lora", "earlier_lr": 4e-3,
                                                     "lr": 1e-3, "change": pytest.approx(0.101)}]


def test_design_table_bars_start_at_the_majority_class_unless_a_bar_reaches_below_it():
    from paper_figs.figures.design_table import _bottom

    assert _bottom([0.85, 0.86], [0.01, 0.0], 0.51) == 0.51
    assert _bottom([0.2, 0.1], [0.01, 0.15], 0.0) == pytest.approx(-0.05 - 0.05 * 0.25)  # MCC below 0: shown
    assert _bottom([0.85], [0.01], None) == 0.0


def test_a_design_cell_short_of_three_scored_seeds_is_not_judged():
    lora = {"mean": 0.28, "std": 0.01, "n_seeds": 3}
    assert design_table.verdict({"mean": 0.40, "std": 0.01, "n_seeds": 3}, lora)[0] == "win"
    assert design_table.verdict({"mean": 0.40, "std": 0.01, "n_seeds": 2}, lora)[0] == "too few seeds"
    assert design_table.verdict({"mean": 0.40, "std": None, "n_seeds": 1}, lora)[0] is None


def test_the_readme_table_shows_final_cells_and_their_verdicts_against_lora_only():
    def cell(task, budget, method, mean, n=3, **extra):
        return {"task": task, "budget": budget, "method": method, "mean": mean, "std": 0.01 if mean else None,
                "n_seeds": n, "diverged_seeds": [], "diverged_every_rate": False, "rate_at_edge": False, **extra}

    labels = [label for b in ("b74k", "b18k") for label in design_table.BUDGETS[b]]
    assert len(labels) == 26
    cells = [cell("cola", b, label, 0.25) for b in ("b74k", "b18k") for label in design_table.BUDGETS[b]]
    mine = {(c["budget"], c["method"]): c for c in cells}
    mine["b74k", "parallel_control"].update(mean=0.30)
    mine["b74k", "prefix"].update(rate_at_edge=True)
    mine["b74k", "eva"].update(n_seeds=2, diverged_seeds=[1])
    mine["b18k", "riccati_feedback"].update(mean=None, n_seeds=0, diverged_every_rate=True)
    cells.append(cell("sst2", "b74k", "lora", 0.86, n=1))  # SST-2: a seed so far, nothing else
    rows = [{"task": "cola", "budget": "b74k", "design": "parallel_control", "baseline": b, "verdict": v}
            for b, v in (("lora", "win"), ("adapter", "tie"))]
    payload = {"config": {"tasks": ["sst2", "cola"], "budgets": ["b74k", "b18k"]}, "cells": cells, "rows": rows,
               "majority": {"sst2": 0.509, "cola": 0.0}}
    lines = design_report.markdown_table(payload).splitlines()
    assert lines[0] == "| budget | method | SST-2 (accuracy; incomplete) | CoLA (MCC) |" and len(lines) == 3 + 26
    assert lines[2] == "| | majority class | 0.509 | 0.000 |"
    assert "| b74k | `lora` |  | 0.250 ± 0.010 |" in lines  # SST-2's one seed is not a cell yet
    assert "| b74k | `parallel_control` |  | 0.300 ± 0.010, **win** |" in lines  # against LoRA, not the adapter
    assert "| b74k | `prefix` |  | 0.250 ± 0.010† |" in lines
    assert "| b74k | `eva` |  | 0.250 ± 0.010 (2 of 3 seeds) |" in lines
    assert "| b18k | `riccati_feedback` |  | diverged at every rate |" in lines


def test_each_designs_line_says_where_it_wins_ties_and_loses_against_lora_on_complete_tasks_only():
    def cell(task, budget, method, n=3):
        return {"task": task, "budget": budget, "method": method, "mean": 0.3, "std": 0.01, "n_seeds": n,
                "diverged_seeds": [], "diverged_every_rate": False, "rate_at_edge": False}

    cells = [cell(t, b, label) for t in ("cola", "mrpc") for b in ("b74k", "b18k") for label in design_table.BUDGETS[b]]
    cells.append(cell("sst2", "b74k", "lora", n=1))  # SST-2 is not complete: its verdicts are not listed

    def row(task, budget, design, verdict, at_chance=False, baseline="lora"):
        return {"task": task, "budget": budget, "design": design, "baseline": baseline, "verdict": verdict,
                "at_chance": at_chance}

    rows = [row(t, b, d, "tie") for t in ("cola", "mrpc") for b in ("b74k", "b18k") for d in design_table.DESIGNS]
    rows[0] = row("cola", "b74k", "costate_lora", "win")
    rows[1] = row("cola", "b74k", "gramian_lora", "loss")
    rows[6] = row("cola", "b18k", "costate_lora", "tie", at_chance=True)
    rows[7] = row("cola", "b18k", "gramian_lora", "design diverged at every rate")
    rows += [row("sst2", "b74k", "costate_lora", "win"), row("cola", "b74k", "gramian_lora", "win", baseline="eva")]
    payload = {"config": {"tasks": ["sst2", "mrpc", "cola"], "budgets": ["b74k", "b18k"]}, "cells": cells,
               "rows": rows}
    lines = design_report.verdict_lines(payload)
    assert lines[0] == "Against LoRA at the same budget, on the complete tasks (MRPC, CoLA):"
    assert len(lines) == 1 + len(design_table.DESIGNS)
    assert lines[1] == ("- `costate_lora`: wins on CoLA b74k; ties on MRPC b74k, MRPC b18k; loses nowhere; "
                        "is no test (both at the majority class) on CoLA b18k")
    assert lines[2] == ("- `gramian_lora`: wins nowhere; ties on MRPC b74k, MRPC b18k; loses on CoLA b74k; "
                        "design diverged at every rate on CoLA b18k")
    assert lines[3] == ("- `recommended_lora`: wins nowhere; ties on MRPC b74k, MRPC b18k, CoLA b74k, CoLA b18k; "
                        "loses nowhere")


def test_the_curves_caption_counts_the_designs_above_lora_at_the_first_and_last_evaluation():
    from paper_figs.figures.design_table import head_start

    def cell(method, means, budget="b74k", steps=(10, 20, 30)):
        return {"task": "cola", "budget": budget, "method": method, "n_seeds": 3,
                "val_curve": [{"step": s, "mean": m, "n": 3} for s, m in zip(steps, means)]}

    payload = {"cells": [cell("lora", [0.1, 0.2, 0.3]),
                         cell("costate_lora", [0.2, 0.25, 0.29]),  # a head start, lost by the end
                         cell("riccati_feedback", [0.1, 0.2, 0.4], steps=(10, 20, 40)),  # last common step 20: tie
                         cell("gramian_lora", [0.0, 0.1, 0.5]),
                         cell("adapter", [0.9, 0.9, 0.9]),  # a baseline: not counted
                         cell("parallel_control", [0.9, 0.9, 0.9], budget="b18k")],  # no LoRA at b18k
               "rows": [{"design": d} for d in ("costate_lora", "riccati_feedback", "gramian_lora",
                                                "parallel_control")], "config": {}}
    assert head_start(payload) == {"cola": {"first_above": 1, "last_above": 1, "n": 3}}


def test_markdown_flag_prints_the_table_of_the_summary_file(tmp_path, monkeypatch, capsys):
    payload = {"config": {"tasks": ["cola"], "budgets": ["b74k"]}, "rows": [], "majority": {"cola": 0.0},
               "cells": [{"task": "cola", "budget": "b74k", "method": "lora", "mean": 0.3, "std": 0.01, "n_seeds": 3,
                          "diverged_seeds": [], "diverged_every_rate": False, "rate_at_edge": False}]}
    (tmp_path / "design_table.json").write_text(json.dumps(payload))
    monkeypatch.setattr(design_table, "SUMMARY", tmp_path / "design_table.json")
    assert design_table.main(["--markdown"]) == {}
    printed = capsys.readouterr().out
    assert printed.strip() == design_report.markdown_table(payload)
    assert "| b74k | `lora` | 0.300 ± 0.010 |" in printed and "CoLA (MCC; incomplete)" in printed  # 12 cells missing


def test_the_costate_line_searches_are_counted_once_each_per_task_and_budget():
    def row(seed, step, j0, j, lr=1e-3):
        _, options, _ = design_table.BUDGETS["b18k"]["costate_lora"]
        grid = [[j + 0.1 * k, step * 2.0 ** k] for k in range(3)][::-1]  # the smallest step last, as searched
        return sweep_row({"task": "cola", "method": "costate_lora", "options": options, "lr": lr, "seed": seed},
                         0.2, designs={"costate_lora": {"step": step, "J0_search": j0, "J_search": j, "grid": grid}})

    smallest = row(0, 0.1, 0.65, 0.66)  # the grid's smallest step, above the pretrained start's J
    again = row(0, 0.1 + 1e-9, 0.65, 0.66, lr=1.25e-4)  # seed 0's search at another rate, its step a float apart
    rows = [smallest, {**smallest, "config": {**smallest["config"], "lr": 4e-3}},  # same search at another rate
            again, row(1, 0.2, 0.67, 0.66), row(2, 6.0, 0.70, 0.65)]
    rows[3]["designs"]["costate_lora"]["grid"].append([0.7, 0.05])  # seed 1 searched below its step
    rows[4]["designs"]["costate_lora"]["grid"].append([0.7, 0.5])
    assert design_table.costate_search(rows) == {"cola/b18k": {"searches": 3, "at_smallest": 1, "lowered": 2,
                                                               "mean_change": pytest.approx((0.01 - 0.01 - 0.05) / 3)}}



def test_null_win_rate_is_the_two_se_rules_rate_between_equal_methods():
    """Seeds of two equal methods drawn many times: the share the rule calls a win matches P(T_4 > 2)."""
    import numpy as np

    from experiments.verdicts import null_win_rate, two_se

    rng = np.random.default_rng(0)
    draws = 40_000
    a, b = rng.normal(0.8, 0.01, (draws, 3)), rng.normal(0.8, 0.01, (draws, 3))
    cell = lambda x: {"mean": float(x.mean()), "std": float(x.std(ddof=1)), "n_seeds": 3}  # noqa: E731
    wins = sum(two_se(cell(x), cell(y))[0] == 1 for x, y in zip(a, b))
    rate = null_win_rate(3, 3)
    assert rate == pytest.approx(0.0581, abs=1e-4)
    assert abs(wins / draws - rate) < 4 * (rate * (1 - rate) / draws) ** 0.5  # within 4 binomial s.e.


def test_chance_wins_sums_the_rate_over_the_tested_comparisons():
    from experiments.verdicts import chance_wins, null_win_rate

    rows = [{"baseline": "lora", "verdict": v, "n_seeds": 3, "baseline_n_seeds": 3}
            for v in ("win", "tie", "loss", "too few seeds", None)]
    rows.append({"baseline": "adapter", "verdict": "win", "n_seeds": 3, "baseline_n_seeds": 3})
    out = chance_wins(rows, "lora")
    assert out == {"comparisons": 3, "wins": 1, "expected_wins": pytest.approx(3 * null_win_rate(3, 3))}


def test_checkpoint_rule_names_the_verdicts_that_change_at_the_last_step():
    from experiments.verdicts import checkpoint_rule

    def row(design: str, verdict: str, at_end: str | None, baseline: str = "lora") -> dict:
        return {"task": "mrpc", "budget": "b18k", "design": design, "baseline": baseline, "verdict": verdict,
                "verdict_at_end": at_end, "difference_at_end": 0.006, "se_at_end": 0.0035}

    rows = [row("recommended_lora", "win", "tie"), row("costate_lora", "tie", "tie"),
            row("gramian_lora", "too few seeds", None), row("recommended_lora", "win", "tie", baseline="eva")]
    out = checkpoint_rule(rows, "lora")
    assert out == {"mrpc": {"comparisons": 2, "changed": [
        {"budget": "b18k", "design": "recommended_lora", "verdict": "win", "verdict_at_end": "tie",
         "difference_at_end": 0.006, "margin_at_end": 0.007}]}}
