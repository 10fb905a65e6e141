"""The costate-profile, stationarity and design-score experiments at tiny size, and their figures.

Everything runs on ``random:bert`` (3 blocks, d = 64) with a handful of real sentences, so the
file stays well under a minute on one thread.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, make_batch
from matplotlib.figure import Figure

import controltune as ct
from controltune.controllers import build
from controltune.data import Example
from controltune.figures import load_scripts
from controltune.results import stamp, write_json
from experiments import costate_profile, design_scores, stationarity

# The figure scripts of paper_figs/figures/, imported the way `controltune figures` imports them.
_SCRIPTS = load_scripts(Path(__file__).resolve().parents[1] / "paper_figs" / "figures")
costate_norms = _SCRIPTS["costate_norms"]
design_fig = _SCRIPTS["design_scores"]
stationarity_fig = _SCRIPTS["stationarity"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded64():
    return ct.load_model("random:bert", dtype="float64", seed=0)


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(text, None, i % 2) for i, text in enumerate(SENTENCES * 3)]


def _finite_nonneg(values) -> bool:
    return all(math.isfinite(v) and v >= 0 for v in values)


# --- co-state profile ----------------------------------------------------------------------------------
def _per_sequence_autograd_norm(system, batch: dict, layer: int) -> float:
    """(1/S) Σ_s ‖∂Φ_s/∂x_{l,s}‖_F with each sequence run *alone* through plain autograd."""
    norms = []
    for s in range(batch["input_ids"].shape[0]):
        one = {k: v[s:s + 1] for k, v in batch.items()}
        with torch.no_grad():
            x, ctx = system.embed(one)
            for block in range(layer):
                x = system.step(block, x, ctx)
        leaf = x.detach().requires_grad_(True)
        h = leaf
        for block in range(layer, system.n_layers):
            h = system.step(block, h, ctx)
        (g,) = torch.autograd.grad(system.terminal_cost(h, ctx, one), leaf)
        norms.append(float(g.norm()))
    return sum(norms) / len(norms)


def test_costate_norm_is_per_sequence_gradient_norm(loaded64):
    """‖p_L‖ and ‖p_0‖ of the profile equal the mean per-sequence ‖∂Φ_s/∂x_l‖ from plain autograd."""
    system = costate_profile.make_system(loaded64, "lora", seed=0, options={"rank": 2, "targets": ("q", "v")})
    batch = make_batch(loaded64.tokenizer, n=3)
    row = costate_profile.measure(system, batch)
    n = system.n_layers
    assert len(row["mean_seq"]) == len(row["batch_fro"]) == len(row["rms_seq"]) == n + 1
    for layer in (0, 1, n):
        expected = _per_sequence_autograd_norm(system, batch, layer)
        assert row["mean_seq"][layer] == pytest.approx(expected, rel=1e-9)
    # Frobenius over the batch ≤ sum of per-sequence norms (triangle/Cauchy–Schwarz), and > 0.
    assert all(0 < f <= m * (1 + 1e-12) for f, m in zip(row["batch_fro"], row["mean_seq"]))


def test_profile_method_rows(loaded64, examples):
    cfg = costate_profile.config(costate_profile.parser().parse_args(
        ["--model", "random:bert", "--steps", "2", "--batch-size", "3", "--max-length", "16"]))
    batch = make_batch(loaded64.tokenizer, n=3)
    rows = {m: costate_profile.profile_method(loaded64, m, examples, batch, cfg, progress=False)
            for m in ("lora", "full", "prompt")}
    for before, after in rows.values():
        assert (before["phase"], after["phase"]) == ("before", "after")
        for r in (before, after):
            assert len(r["mean_seq"]) == r["n_layers"] + 1 == 4
            assert _finite_nonneg(r["mean_seq"] + r["rms_seq"] + [r["loss"]])
            assert 0.0 <= r["accuracy"] <= 1.0
        assert after["step"] == 2 and after["mean_seq"] != before["mean_seq"]  # training moved the controls
    # LoRA (B = 0) and full FT are the identity at init: same trajectory, same head seed, same co-states.
    assert rows["lora"][0]["mean_seq"] == pytest.approx(rows["full"][0]["mean_seq"], rel=1e-12)
    # Prompt tuning prepends tokens: a different trajectory from the start.
    assert rows["prompt"][0]["mean_seq"] != pytest.approx(rows["lora"][0]["mean_seq"], rel=1e-6)


# --- stationarity -------------------------------------------------------------------------------------
def test_stationarity_point_matches_autograd(loaded64):
    """The per-block ‖∇_{u_l} H_l‖ of a curve row equals ‖∂J/∂u_l‖ over that block's controls (autograd)."""
    system = ct.ResidualSystem(copy.deepcopy(loaded64), seed=0)
    build("lora", system, rank=2, targets=("q", "v"), seed=0)
    with torch.no_grad():  # move B off zero so every LoRA factor has a gradient
        for c in system.controls():
            if c.kind == "layer":
                c.param.add_(0.05 * torch.randn(c.param.shape, generator=torch.Generator().manual_seed(1),
                                                dtype=c.param.dtype))
    batch = make_batch(loaded64.tokenizer, n=3)
    row = stationarity.point(system, batch, 0, None, None, None, 16)
    system.zero_grad()
    system.cost(batch).backward()
    for layer in range(system.n_layers):
        sq = sum(float(c.param.grad.pow(2).sum()) for c in system.controls() if c.kind == "layer"
                 and tuple(c.layers) == (layer,))
        assert row["layer"][layer] == pytest.approx(math.sqrt(sq), rel=1e-9)
    head = [c for c in system.controls() if c.kind == "term"]
    assert row["term"] == pytest.approx(math.sqrt(sum(float(c.param.grad.pow(2).sum()) for c in head)), rel=1e-9)


def _binary_task():
    """A single-sentence binary task scored by accuracy (the GLUE copies may not be on this machine)."""
    from controltune.data import TaskSpec

    return TaskSpec(name="binary", folder=None, num_labels=2, label_names=["negative", "positive"], is_pair=False)


def test_run_method_rows_and_probe(loaded64, examples):
    cfg = stationarity.config(stationarity.parser().parse_args(
        ["--model", "random:bert", "--steps", "2", "--every", "1", "--n-directions", "3", "--batch-size", "3",
         "--max-length", "16"]))
    batch = make_batch(loaded64.tokenizer, n=3)
    dev = examples[:4]
    spec = _binary_task()
    rows = [{"method": "lora", **r} for r in stationarity.run_method(
        loaded64, "lora", {"rank": 2, "targets": ["q", "v"]}, examples, batch, dev, spec, cfg, progress=False)]
    assert [r["kind"] for r in rows] == ["probe", "curve", "curve", "curve", "probe"]
    out = stationarity.collect(rows)["lora"]
    assert [r["step"] for r in out["curve"]] == [0, 1, 2]
    for r in out["curve"]:
        assert len(r["layer"]) == 3 and _finite_nonneg(r["layer"] + [r["term"], r["total"], r["dev_loss"]])
    for phase in ("before", "after"):
        p = out["probe"][phase]
        assert len(p["layers"]) == 3 and 0.0 <= p["fraction_local_max"] <= 1.0
        for layer in p["layers"]:
            assert set(map(float, layer["per_radius"])) == set(stationarity.RADII)
            assert all(0.0 <= f <= 1.0 for f in layer["per_radius"].values())


def test_probe_at_tiny_radius_sees_the_gradient(loaded64):
    """With ∇_u H_l ≠ 0, H_l is first-order in ε: at ε = 1e-7‖u‖ one of ±εv always raises H_l."""
    system = ct.ResidualSystem(copy.deepcopy(loaded64), seed=0)
    build("lora", system, rank=2, targets=("q", "v"), seed=0)
    batch = make_batch(loaded64.tokenizer, n=3)
    row = stationarity.probe(system, batch, "before", n_directions=4, seed=0, radii=(1e-7,))
    assert [layer["fraction_local_max"] for layer in row["layers"]] == [0.0, 0.0, 0.0]


# --- design scores ------------------------------------------------------------------------------------
def test_design_scores_rows_and_allocation(loaded64):
    system = ct.ResidualSystem(copy.deepcopy(loaded64), seed=0)
    system.eval()
    batch = make_batch(loaded64.tokenizer, n=4)
    res = design_scores.design_scores(system, batch, rank=2, n_probes=2, seed=0)
    roles = list(system.family.linear_roles)
    assert res["roles"] == roles and len(res["sites"]) == 3 * len(roles) and len(res["layer_energy"]) == 3
    for r in res["sites"]:
        assert _finite_nonneg([r["gramian"], r["gramian_se"], r["costate"]])
        assert r["cost"] == 2 * (r["d_in"] + r["d_out"]) and r["rank_gramian"] in (0, 2)
    budget = res["budget"]
    assert budget == sum(r["cost"] for r in res["sites"] if r["role"] in ("q", "v"))
    for score in ("gramian", "costate"):
        used = res[f"used_{score}"]
        assert used == sum(r["cost"] for r in res["sites"] if r[f"rank_{score}"]) <= budget
        # Greedy: a site still left out fits no longer in what is left (else it would have been taken).
        assert all(r["cost"] > budget - used for r in res["sites"] if not r[f"rank_{score}"])
    # The head gradient flows into block L-1's output, so its co-state energy is positive.
    assert res["layer_energy"][-1] > 0


# --- figures ------------------------------------------------------------------------------------------
def _check_figure(fig, caption: str, command: str) -> None:
    assert isinstance(fig, Figure) and len(fig.axes) >= 2
    assert command in caption and "nan" not in caption.lower()


def test_figures_draw_from_tiny_results(tmp_path, loaded64, examples):
    batch = make_batch(loaded64.tokenizer, n=3)
    # co-state profile
    args = ["--model", "random:bert", "--steps", "1", "--batch-size", "3", "--max-length", "16"]
    cfg = costate_profile.config(costate_profile.parser().parse_args(args))
    rows = [r for m in ("lora", "bitfit", "prefix")
            for r in costate_profile.profile_method(loaded64, m, examples, batch, cfg, progress=False)]
    write_json(tmp_path / costate_norms.SOURCE, {**stamp(cfg), "rows": rows})
    assert costate_norms.init_groups({"rows": rows}) == [["lora", "bitfit"], ["prefix"]]
    _check_figure(costate_norms.draw(tmp_path), costate_norms.caption(tmp_path),
                  "python experiments/costate_profile.py --model random:bert --steps 1")
    # stationarity and max condition
    args = ["--model", "random:bert", "--steps", "1", "--every", "1", "--n-directions", "2", "--max-length", "16"]
    cfg = stationarity.config(stationarity.parser().parse_args(args))
    out = [{"method": "lora", **r} for r in stationarity.run_method(
        loaded64, "lora", {"rank": 2, "targets": ["q", "v"]}, examples, batch, examples[:3], _binary_task(),
        cfg, progress=False)]
    write_json(tmp_path / stationarity_fig.SOURCE, {**stamp(cfg), "methods": stationarity.collect(out)})
    _check_figure(stationarity_fig.draw_stationarity(tmp_path), stationarity_fig.caption_stationarity(tmp_path),
                  "python experiments/stationarity.py --model random:bert")
    fig = stationarity_fig.draw_max_condition(tmp_path)
    assert isinstance(fig, Figure) and "0.001" in stationarity_fig.caption_max_condition(tmp_path)
    # design scores
    system = ct.ResidualSystem(copy.deepcopy(loaded64), seed=0)
    res = design_scores.design_scores(system, batch, rank=2, n_probes=2)
    write_json(tmp_path / design_fig.SOURCE, {**stamp({"model": "random:bert", "dtype": "float64", "n_batch": 3,
                                                       "max_length": 16, "rank": 2, "n_probes": 2, "seed": 0}),
                                              **res})
    grid = design_fig.score_grid(res, "gramian")
    assert max(v for line in grid for v in line) == 1.0 and len(grid) == 3
    _check_figure(design_fig.draw(tmp_path), design_fig.caption(tmp_path),
                  "python experiments/design_scores.py --model random:bert")
