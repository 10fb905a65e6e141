"""The README's claims section says what the committed results say.

Each verdict a study's summary decides (``experiments/results/*.json``) must appear in the README row of its claim,
so a result that changes (a study completing, a rule refined) fails here until the README follows.  Verdict words:
a claim held reads "held"/"holds", one not held "did not hold", an open one "inconclusive" or "no verdict yet".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"


def _claims_table() -> dict[str, str]:
    """``{claim cell: verdict cell}`` of the README's claims table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Claims of the founding papers", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and not set(cells[0]) <= {"-", " "} and cells[0] != "claim (paper)":
            rows[cells[0]] = cells[1]
    return rows


def _row(start: str) -> str:
    found = [here for claim, here in _claims_table().items() if claim.startswith(start)]
    assert len(found) == 1, f"the README's claims table has {len(found)} rows starting {start!r}"
    return found[0]


def _bold(text: str) -> list[str]:
    return re.findall(r"\*\*(.+?)\*\*", text)


def _load(name: str) -> dict:
    path = RESULTS / name
    if not path.is_file():
        pytest.skip(f"{name} is not committed")
    return json.loads(path.read_text())


TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA"}
"""The GLUE tasks as the README names them."""

WORDS = {True: "held", False: "did not hold", None: "inconclusive"}


def _says(verdict: bool | None, text: str) -> bool:
    """Whether ``text`` (a bold phrase) states ``verdict``: "did not hold" is not "held"."""
    text = text.lower()
    if verdict is False:
        return text.startswith("did not hold")
    if verdict is True:
        return text.startswith(("held", "holds"))
    return text.startswith(("inconclusive", "no verdict yet"))


def test_transfer_row_states_the_transfer_verdict():
    payload = _load("transfer.json")
    row = _row("transfer within a kind")
    if not payload["complete"]:
        assert "no verdict yet" in row
        return
    assert _says(payload["claim_holds"], _bold(row)[0]), (payload["claim_holds"], _bold(row))
    verdicts = [p["verdict"] for p in payload["pairs"] if p["verdict"] is not None]
    n = len(verdicts)
    assert f"in {verdicts.count('no transfer within kind')} of {n} pairs the same-kind source keeps no gain" in row
    assert f"in the other {verdicts.count('tie')}" in row or verdicts.count("tie") == 0
    better = verdicts.count("same kind better")
    assert (f"it beats them in {better}" if better else "it beats them in none") in row


def test_generalisation_gap_row_states_each_decided_claim():
    gap = _load("generalization_gap.json")
    claims = gap["claims"]
    row = _row("the generalisation gap")
    bold = _bold(row)
    assert _says(claims["single_smaller_than_full"], bold[0])
    counts = gap["against_full_counts"]
    n = sum(counts.values())
    assert (f"smaller in {counts.get('smaller', 0)} of {n} (task, method) pairs" in row
            and f"a tie in {counts.get('tie', 0)}" in row
            and f"larger in {counts.get('larger', 0) or 'none'}" in row), (counts, row[:400])
    assert _says(claims["prompt_smallest"], bold[1])
    if claims["combinations_widen"] is None:
        assert "Combinations: no verdict yet" in row or "Combinations: **inconclusive**" in row
    else:
        assert any(_says(claims["combinations_widen"], b) for b in bold[2:])
        wide = gap["widening_counts"]
        assert (f"in {wide['wider']} of {sum(wide.values())} (task, combination) pairs" in row
                and f"narrower in {wide['narrower']}" in row), (wide, row[-600:])
        if gap["decided_early"]["combinations_widen"]:
            word = WORDS[claims["combinations_widen"]]
            assert f"Combinations: **{word}** (decided before the grid is complete" in row


def test_convergence_row_states_the_verdict_over_its_tasks():
    """Held when every task that is a test is as claimed, not held when one is not as claimed (one task's
    contradiction breaks an ordering claimed in general), inconclusive otherwise."""
    verdicts = [o["verdict"] for o in _load("convergence.json")["orders"] if o["verdict"] != "not a test"]
    overall = (False if "not as claimed" in verdicts else True if verdicts and set(verdicts) == {"as claimed"}
               else None)
    row = _row("convergence")
    assert _says(overall, _bold(row)[0]), (verdicts, _bold(row))
    held = [t for t, v in _conv_tasks() if v == "as claimed"]
    if held:
        assert f"as claimed on {', '.join(held)}" in row


def _conv_tasks() -> list[tuple[str, str]]:
    return [(TASK_NAMES[o["task"]], o["verdict"]) for o in _load("convergence.json")["orders"]]


def test_sequential_row_states_both_claims():
    claims = _load("sequential.json")["claims"]
    bold = _bold(_row("sequential combination"))
    assert _says(claims["keeps_improving"], next(b for b in bold if "orders" in b))
    assert _says(claims["no_best_order"], next(b for b in bold if "task" in b))


def test_unipelt_row_states_each_decided_k():
    payload = _load("unipelt_low_resource.json")
    row = _row("UniPELT beats each of its parts")
    undecided = set()
    for k, v in payload["per_k"].items():
        if payload["progress"]["complete"] or (v.get("decided_early") and v["holds"] is not None):
            assert f"**{WORDS[v['holds']]} at K = {k}**" in row, k
        else:
            undecided.add(k)
    if undecided:  # "K = 100 and 500 open until ..."
        match = re.search(r"K = ([\d ,and]+?) open", row)
        assert match and set(re.findall(r"\d+", match.group(1))) == undecided, (undecided, row[:200])


def test_efficiency_row_states_the_memory_claim():
    claims = _load("efficiency.json")["claims"]
    held = all(c["up_to_three_quarters_at_small"] and c["at_least_one_third_at_large"] for c in claims)
    row = _row("delta tuning saves up to 3/4")
    assert row.startswith("held") if held else row.startswith(("did not hold", "**did not hold"))
    for c in claims:  # the savings quoted, in whole percent (the large-batch one rounded down: "at least")
        small, large = round(100 * c["largest_saving_small_batch"]), int(100 * c["smallest_saving_large_batch"])
        assert f"{small} %" in row and f"{large} %" in row, (c["model"], small, large, row)


def test_composability_and_scale_rows_state_what_their_summaries_decide():
    """A complete grid decides every claim and the row states each; before that the row says "no verdict yet"
    unless some claim is decided early, which the row then states as such."""
    row = _row("composability")
    for name in ("composability.json", "scale.json"):
        path = RESULTS / name
        payload = json.loads(path.read_text()) if path.is_file() else None
        if payload is not None and payload["progress"]["complete"]:
            for claim, held in payload["claims"].items():
                if isinstance(held, dict):  # a per-task breakdown of a claim, not a claim
                    continue
                assert f"{claim}: **{WORDS[held]}**" in row, f"{name}'s complete grid decides {claim}: {WORDS[held]}"
            continue
        early = {k: payload["claims"][k] for k, v in (payload or {}).get("decided_early", {}).items() if v}
        if not early:
            assert row.startswith("no verdict yet"), f"{name} has no complete grid, the row says: {row[:80]}"
        for claim, held in early.items():
            assert f"{claim}: **{WORDS[held]}** (decided before the grid is complete" in row, (name, claim)


def test_parameters_row_states_the_glue_tables_pair_counts_and_verdict():
    from paper_figs.figures.glue_table import parameters_and_score

    counts = parameters_and_score(_load("glue_table.json"))
    row = _row("more trainable parameters do not mean better")
    assert _says(counts["holds"], _bold(row)[0])
    judged = counts["larger"] + counts["smaller"] + counts["tie"]
    assert (f"of {judged} pairs" in row and f"higher by two standard errors in {counts['larger']}" in row
            and f"the one with fewer in {counts['smaller']}" in row and f"neither in {counts['tie']}" in row), row[:300]


def _design_section() -> str:
    """The README's design-table section, from its heading to the next one of its level or above."""
    text = (ROOT / "README.md").read_text()
    return text.split("### The design table: do the control-designed deltas win?", 1)[1].split("\n## ", 1)[0]


def test_readme_design_table_is_the_one_the_summary_prints():
    from experiments.design_report import markdown_table

    payload = _load("design_table.json")
    assert markdown_table(payload) in _design_section()


def test_readme_lists_where_each_design_wins_ties_and_loses_as_the_summary_prints():
    from experiments.design_report import verdict_lines

    assert "\n".join(verdict_lines(_load("design_table.json"))) in _design_section()


def test_design_table_section_states_the_wins_over_lora_of_each_complete_task():
    payload = _load("design_table.json")
    row = " ".join(_design_section().split())
    for task, name in TASK_NAMES.items():
        mine = [r for r in payload["rows"] if r["task"] == task and r["baseline"] == "lora"]
        if not mine or any(r["n_seeds"] < 3 or r["baseline_n_seeds"] < 3 for r in mine):
            continue  # a task still running: no statement to check
        wins = sorted({r["design"] for r in mine if r["verdict"] == "win"})
        assert f"{name} complete" in row, name
        if not wins:
            assert "no design wins" in row.split(f"{name} complete", 1)[1], name
        else:
            assert all(w in row for w in wins), (name, wins)


def test_design_table_section_counts_the_designs_above_lora_at_the_first_and_last_evaluation():
    from paper_figs.figures.design_table import head_start

    found = head_start(_load("design_table.json"))
    section = " ".join(_design_section().split())
    said = section.split("**A head start, and where it goes.**", 1)[1].split("- **", 1)[0]
    tasks = [t for t in TASK_NAMES if t in found]
    firsts = " and ".join(f"{found[t]['first_above']} of {found[t]['n']} {TASK_NAMES[t]} cells" for t in tasks)
    lasts = " and ".join(f"{found[t]['last_above']} of {found[t]['n']}" for t in tasks)
    assert f"in {firsts}, and at the last in {lasts}" in said


def test_design_table_section_states_what_choosing_on_validation_rows_cost_each_complete_task():
    payload = _load("design_table.json")
    section = " ".join(_design_section().split())
    for task, found in payload.get("selection_regret", {}).items():
        if task not in payload["complete_tasks"]:
            continue
        unit = {"mcc": "MCC", "accuracy": "accuracy", "f1": "F1"}[
            next(c["metric"] for c in payload["cells"] if c["task"] == task and c["metric"])]
        said = (f"{TASK_NAMES[task]}: the validation rows chose the rate best on dev in {found['same_rate']} of "
                f"{found['pairs']} pairs, at a mean cost of {found['mean_regret']:.3f} {unit}")
        assert said in section, said


def test_design_table_section_states_what_moving_the_rates_did_on_dev():
    payload = _load("design_table.json")
    row = " ".join(_design_section().split())
    for task, found in payload.get("refinement", {}).items():
        part = row.split(f"On {TASK_NAMES[task]} ", 1)[1]
        assert part.startswith(f"{found['pairs']} of "), (task, part[:80])
        assert f"lower on dev in {found['lower']} and higher in {found['higher']}" in part, task
        metric = next(c["metric"] for c in payload["cells"] if c["task"] == task and c["metric"])
        unit = {"mcc": "MCC", "accuracy": "accuracy", "f1": "F1"}.get(metric, metric)
        assert f"by {found['mean_change']:.3f} {unit} on average".replace("-", "−") in part, task
        lora = sum(v["baseline"] == "lora" for v in found["verdicts_changed"])
        assert (f"{len(found['verdicts_changed'])} of the {found['verdicts']} verdicts differ between the two "
                f"({lora} of the {len(found['verdicts_changed'])} against LoRA") in part, task
        if not found["wins_over_lora_at_earlier_rates"]:
            assert "at the earlier rates no design wins against LoRA" in part, task


def test_apet_row_states_the_positions_and_reach_verdicts():
    from paper_figs.figures.apet import _reach_verdict, spread_claim

    payload = _load("apet.json")
    row = _row("positions of tuned parameters matter less")
    spread = spread_claim(payload)
    positions = False if "does not hold here" in spread else True if "holds here" in spread else None
    assert _says(positions, row.split("Positions: ", 1)[1].split("**")[1])
    for part in _reach_verdict(payload).split(": ", 1)[1].split("; "):
        task, verdict = part.split(": ", 1)
        said = "not a test" if verdict.startswith("not a test") else (
            "did not hold" if verdict.endswith("does not hold") else "held" if verdict.endswith("holds") else "open")
        name = TASK_NAMES[task]
        assert f"**{said} on {name}**" in row or (said == "open" and f"open on {name}" in row), part


def test_unified_subspace_row_states_the_recovered_share_per_dimension():
    from paper_figs.figures.unified_subspace import NEAR, recovered

    shares, _ = recovered(_load("unified_subspace.json"))
    row = _row("optimisation in a unified subspace")
    means = {dim: sum(v) / len(v) for dim, v in shares.items()}
    held = all(m >= NEAR for m in means.values()) if means else None
    assert _says(held, row.split("optimisation: ", 1)[1].split("**")[1])
    for dim, mean in means.items():  # "recovers −0.24 (d = 4)", the minus sign typeset
        assert f"{mean:.2f} (d = {dim})".replace("-", "−") in row, (dim, mean)


def test_performance_order_row_states_the_mean_ranks_and_scores():
    from paper_figs.figures.glue_table import performance_order

    order = performance_order(_load("glue_table.json"))
    row = _row("FT > LoRA > adapter > prefix > prompt on average")
    if order is None:
        assert row.startswith("no verdict yet")
        return
    assert row.startswith("holds on average" if order["holds"] else "does not hold on average")
    names = {"full": "FT", "lora": "LoRA", "adapter": "adapter", "prefix": "prefix", "bitfit": "BitFit",
             "prompt": "prompt"}
    scores = row.split("mean score ", 1)[1].split(";", 1)[0]
    ranks = row.split("mean rank ", 1)[1].split(" (", 1)[0]
    for method, name in names.items():
        assert f"{name} {order['mean_score'][method]:.3f}" in scores, (method, scores)
        said = re.search(rf"\b{name} ([\d.]+)", ranks)
        assert said and float(said.group(1)) == order["mean_rank"][method], (method, ranks)
    tasks = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "cola": "CoLA"}
    for task in order["tasks_in_claimed_order"]:
        assert f"{tasks[task]}" in row.split("(the paper's order)", 1)[0].rsplit(";", 1)[-1], task


def test_sequential_row_states_its_counts():
    payload = _load("sequential.json")
    row = _row("sequential combination")
    steps = [s["verdict"] for s in payload["steps"]]
    assert f"**held in {len(payload['improving_orders'])} of {len(payload['orders'])} orders**" in row
    assert (f"of the {len(steps)} (order, added stage) steps, {steps.count('helps')} helped" in row
            and f"{steps.count('hurts')} hurt" in row and f"{steps.count('no effect')} made no difference" in row)


def test_readme_counts_the_design_table_cells_still_rising_as_the_curves_caption_does():
    from paper_figs.figures.design_table import _peaks_last

    payload = _load("design_table.json")
    text = (ROOT / "README.md").read_text()
    said = re.search(r"still rising at their last evaluation: ([^)]*)\)", text)
    assert said, "the README's figure list should count the design table's cells still rising"
    for task, name in TASK_NAMES.items():
        mine = [c for c in payload["cells"] if c["task"] == task and c.get("val_curve")]
        if mine and all(c["n_seeds"] >= 3 for c in payload["cells"] if c["task"] == task):
            assert f"{sum(_peaks_last(c['val_curve']) for c in mine)} of {len(mine)} on {name}" in said.group(1), name


def test_design_table_section_states_the_margin_a_win_needed_on_each_complete_task():
    payload = _load("design_table.json")
    section = " ".join(_design_section().split())
    said = section.split("**What a tie means.**", 1)[1].split("- **", 1)[0]
    for task in payload["complete_tasks"]:
        r = payload["resolution"][task]
        c = r["closest"]
        assert (f"on {TASK_NAMES[task]}: a median of {r['margin_median']:.3f} ({r['margin_min']:.3f}–"
                f"{r['margin_max']:.3f} over {r['n']} comparisons)") in said, task
        assert f"at {c['budget']}, {c['difference']:+.3f} against a margin of {c['margin']:.3f}" in said, task
    sst2 = payload["resolution"].get("sst2")
    if "sst2" in payload["complete_tasks"]:
        assert f"On SST-2 no design's mean is more than {sst2['closest']['difference']:.3f} above LoRA's" in said


def test_design_table_section_states_where_the_costate_line_searches_stopped():
    payload = _load("design_table.json")
    said = " ".join(_design_section().split()).split("**The co-state initialisation designs through a random head.**",
                                                     1)[1].split("- **", 1)[0]
    found = payload["costate_search"]
    tasks = [t for t in TASK_NAMES if t in payload["complete_tasks"]]
    for t in tasks:  # the sentence states one count per task for both budgets
        assert found[f"{t}/b74k"] == {**found[f"{t}/b18k"], "mean_change": found[f"{t}/b74k"]["mean_change"]}, t
    smallest = " and ".join(f"{found[t + '/b74k']['at_smallest']} of {found[t + '/b74k']['searches']}"
                            + ("" if i else " searches") + f" on {TASK_NAMES[t]}" for i, t in enumerate(tasks))
    lowered = " and ".join(f"{found[t + '/b74k']['lowered']} of {found[t + '/b74k']['searches']} on {TASK_NAMES[t]}"
                           for t in tasks)
    assert f"grid's smallest step in {smallest} at each budget" in said
    assert f"lowered the held-out J in {lowered}" in said
    if "cola" in payload["complete_tasks"]:
        spread = {b: max((c for c in payload["cells"] if c["task"] == "cola" and c["budget"] == b),
                         key=lambda c: c["std"] or 0.0) for b in ("b74k", "b18k")}
        assert all(c["method"] == "costate_lora" for c in spread.values())
        assert (f"spread the most of any cell at both budgets (std {spread['b74k']['std']:.3f} at b74k, "
                f"{spread['b18k']['std']:.3f} at b18k)") in said



def test_design_section_states_the_close_calls_answer_on_new_seeds_once_complete():
    payload = _load("design_seeds.json")
    said = " ".join(_design_section().split()).split("**New seeds for the close calls.**", 1)[1].split("- **", 1)[0]
    if not payload["complete"]:
        assert "no rows yet" in said or "provisional" in said
        return
    wins = payload["confirmed_wins"]
    assert f"on the new seeds {len(wins)} of the {len(payload['rows'])} close calls win" in said
    for row in payload["rows"]:
        new = row["new"]
        stated = f"{new['difference']:+.3f} against a margin of {2 * new['se']:.3f}".replace("-", "−")
        assert stated in said, row["design"]


def test_design_section_states_the_placement_ablations_counts_and_its_one_loss():
    payload = _load("design_ablation.json")
    if not payload["complete"]:
        pytest.skip("the placement study is still running")
    said = " ".join(_design_section().split()).split("**Placement or start?**", 1)[1].split("- **", 1)[0]
    placement, start = payload["counts"]["placement"], payload["counts"]["start"]
    n = sum(placement.values())
    assert (f"ties in all {n}" if placement["tie"] == n else f"ties in {placement['tie']}") in said
    assert f"ties in {start['tie']} and loses in {start['loss']}" in said
    for r in payload["rows"]:
        if r["verdict"] in ("win", "loss"):
            assert f"{r['difference']:+.3f} against a margin of {2 * r['se']:.3f}".replace("-", "−") in said, r


def test_readme_states_the_recommender_trained_in_plain_peft_as_its_summary_has_it():
    payload = _load("recommend_peft.json")
    text = " ".join((ROOT / "README.md").read_text().split())
    said = text.split("**Trained in plain peft on a real task.**", 1)[1].split("###", 1)[0]
    for pair in payload["pairs"]:
        if not pair["complete"]:
            continue
        rec, lora = pair["cells"]["recommended"], pair["cells"]["lora"]
        for key in ("best", "end"):
            v = pair["verdict"][key]
            assert (f"{rec[key]['mean']:.3f} ± {rec[key]['std']:.3f} against" in said
                    and f"{lora[key]['mean']:.3f} ± {lora[key]['std']:.3f}" in said), (pair["budget"], key)
            margin = f"{2 * v['se']:.3f}"
            assert (f"{v['verdict']} ({v['difference']:+.3f} against a margin of {margin})" in said
                    or f"{v['verdict']} ({v['difference']:+.3f} against {margin})" in said), (pair["budget"], key)
