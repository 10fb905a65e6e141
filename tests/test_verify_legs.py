"""The three legs of ``controltune.verification``: autograd, forward-mode AD and directional finite differences."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_batch

import controltune as ct
from controltune.controllers import build
from controltune.pmp import solve_costate
from controltune.verification import (
    FD_RAW_CEILING,
    Verification,
    control_groups,
    refined_difference,
    richardson,
    token_direction,
    verify,
)
from controltune.verification.differences import fd_errors

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
WD = 0.1

METHODS = {  # one controller of each kind of control, and the special cases of the legs
    "lora": {"rank": 2},                                  # layer controls
    "prompt": {"n_tokens": 2},                            # an initial control
    "prefix": {"length": 2, "reparam": True, "hidden": 8},  # shared controls
    "adapter": {"bottleneck": 4},                         # ReLU kinks
    "masking": {"targets": ["q"], "layers": [1]},          # a straight-through estimator
    "diff_pruning": {"layers": [0]},                      # saturated hard-concrete gates
    "bitfit": {},                                         # key biases: exactly zero derivatives
    "closed_loop_prefix": {"n_prefix": 2, "rank": 2},     # state feedback the controller captures per rollout
}


def _system(name: str, method: str, dtype: str = "float64", seed: int = 0):
    loaded = ct.load_model(name, dtype=dtype)
    system = ct.ResidualSystem(loaded)
    options = dict(METHODS[method])
    if method not in ("masking", "bitfit"):
        options["weight_decay"] = WD
    build(method, system, **options)
    system.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in system.controls():
            c.param.add_(0.05 * torch.randn(c.param.shape, generator=gen, dtype=torch.float64).to(c.param))
    return system, make_batch(loaded.tokenizer, 2)


@pytest.mark.parametrize("name,methods", [
    ("random:bert", ["lora", "prompt", "prefix", "adapter", "masking", "diff_pruning", "bitfit"]),
    ("random:gpt2", ["lora", "prompt", "adapter"]),
    ("random:llama", ["lora", "prefix", "masking"]),
])
def test_every_leg_passes(name, methods):
    for method in methods:
        system, batch = _system(name, method)
        report = verify(system, batch, n_state_directions=1)
        assert report.passed, (method, report.failures())
        legs = report.legs
        assert set(legs) == {"autograd", "forward", "fd"}, method
        assert legs["forward"]["max_error"] <= 1e-10 and legs["fd"]["max_error"] <= 1e-6, method
        assert legs["fd"]["max_raw_error"] <= 1e-5, method  # even without the allowance δ the quotients agree
        assert set(report.control_forward) == {c.name for c in system.controls()}, method
        assert report.forward_joint is not None and len(report.costate_forward) == system.n_layers + 1
        assert "all" in report.fd_directions and len(report.costate_fd) == system.n_layers + 1
        assert system.kernel == "sdpa", "the eager kernel of the forward leg is switched back"


def _planted(solution, factor: float = 1.01, controls: bool = True, costates: bool = False):
    """The solution with every ∇_u H (or every co-state) scaled by ``factor``: a 1 % relative error."""
    grads = {n: g * factor for n, g in solution.control_grads.items()} if controls else solution.control_grads
    states = [p * factor for p in solution.costates] if costates else solution.costates
    return dataclasses.replace(solution, control_grads=grads, costates=states)


def test_a_one_percent_error_in_the_control_gradients_fails_forward_and_fd():
    system, batch = _system("random:bert", "lora")
    planted = _planted(solve_costate(system, batch))
    report = verify(system, batch, solution=planted, n_state_directions=1)
    assert not report.passed
    assert all(e > 1e-3 for e in report.control_forward.values()), report.control_forward
    assert report.forward_joint > 1e-3
    assert all(e > 1e-3 for e in report.fd_directions.values()), report.fd_directions
    failures = report.failures()
    assert any("vs forward mode" in f for f in failures) and any("vs finite differences" in f for f in failures)
    # The co-states were not touched: every leg still agrees on them.
    assert report.max_rel_err_costate <= 1e-10 and max(report.costate_forward) <= 1e-10
    assert max(report.costate_fd) <= 1e-6


def test_a_planted_error_of_1e_5_fails_the_fd_leg_at_its_tolerance():
    """An error of 1e-5 in every ∇_u H lies below the raw ceiling (1e-2, which alone fails any method) and
    10x above the FD tolerance (1e-6): the FD leg itself must see it."""
    system, batch = _system("random:bert", "lora")
    report = verify(system, batch, solution=_planted(solve_costate(system, batch), factor=1 + 1e-5),
                    n_state_directions=1)
    assert not report.passed
    fd = report.legs["fd"]
    assert 1e-6 < fd["max_error"] and fd["max_raw_error"] < FD_RAW_CEILING
    assert any("vs finite differences" in f for f in report.failures())


def test_a_one_percent_error_in_the_costates_fails_forward_and_fd():
    system, batch = _system("random:gpt2", "lora")
    planted = _planted(solve_costate(system, batch), controls=False, costates=True)
    report = verify(system, batch, solution=planted, n_state_directions=1)
    assert all(e > 1e-3 for e in report.costate_forward), report.costate_forward
    assert all(e > 1e-3 for e in report.costate_fd), report.costate_fd
    assert report.max_rel_err_control_grad <= 1e-10 and report.max_rel_err_forward > 1e-3


def test_one_wrong_control_is_named_by_the_forward_leg_and_its_fd_group():
    system, batch = _system("random:llama", "lora")
    solution = solve_costate(system, batch)
    wrong = next(c for c in system.controls() if c.name.startswith("lora.1") and c.name.endswith(".A"))
    grads = dict(solution.control_grads)
    grads[wrong.name] = grads[wrong.name] * 1.01
    report = verify(system, batch, solution=dataclasses.replace(solution, control_grads=grads),
                    n_state_directions=1)
    bad_forward = {n for n, e in report.control_forward.items() if e > report.tol_forward}
    assert bad_forward == {wrong.name}
    bad_fd = {n for n, e in report.fd_directions.items() if e > report.tol_fd}
    assert bad_fd <= {"all", "layer 1"} and "layer 1" in bad_fd


def test_the_json_has_each_leg_with_its_tolerance_and_error():
    system, batch = _system("random:bert", "prompt")
    report = verify(system, batch, n_state_directions=1)
    payload = json.loads(json.dumps(report.to_dict()))
    legs = payload["legs"]
    for leg in ("autograd", "forward", "fd"):
        assert {"tolerance", "max_error", "n_checks", "seconds"} <= set(legs[leg]), leg
        assert legs[leg]["max_error"] <= legs[leg]["tolerance"] and legs[leg]["seconds"] >= 0
    assert legs["autograd"]["tolerance"] == 1e-10 and legs["forward"]["tolerance"] == 1e-10
    assert legs["fd"]["tolerance"] == 1e-6 and legs["fd"]["raw_ceiling"] == FD_RAW_CEILING
    assert legs["fd"]["max_raw_error"] == payload["fd_raw_max"] and legs["fd"]["mode"] == "directional"
    for key in ("control_forward", "costate_forward", "forward_joint", "fd_directions", "fd_directions_raw",
                "costate_fd_raw", "tol_forward", "zero_scale"):
        assert key in payload, key


def test_the_cli_row_carries_the_legs(tmp_path, capsys):
    from controltune.cli import main

    out = tmp_path / "verify.json"
    code = main(["verify", "--model", "random:gpt2", "--methods", "lora,bitfit", "--dtype", "float64",
                 "--state-directions", "1", "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    table = capsys.readouterr().out
    assert "forward" in table and "secs" in table
    for row in json.loads(out.read_text())["results"]:
        assert row["passed"] and set(row["legs"]) == {"autograd", "forward", "fd"}
        assert row["max_rel_err_forward"] <= row["tol_forward"] == 1e-10
        assert row["seconds"]["total"] >= row["seconds"]["forward"] > 0


def test_legacy_mode_checks_one_direction_per_control():
    system, batch = _system("random:bert", "lora")
    report = verify(system, batch, n_state_directions=1, fd_mode="legacy", forward=False)
    assert report.fd_mode == "legacy" and not report.control_forward
    assert set(report.fd_directions) == {c.name for c in system.controls()}
    assert set(report.legs) == {"autograd", "fd"}
    with pytest.raises(ValueError, match="fd_mode"):
        verify(system, batch, fd_mode="ladder")


@pytest.mark.parametrize("method", ["lora", "closed_loop_prefix"])  # the latter holds state the copy must own
def test_float32_systems_run_forward_and_fd_on_the_float64_copy(method):
    system, batch = _system("random:roberta", method, dtype="float32")
    report = verify(system, batch, n_state_directions=1)
    assert report.dtype == "float32" and report.tol_autograd == 1e-4
    assert report.tol_forward == 1e-10 and report.tol_fd == 1e-6
    assert report.passed, report.failures()


def test_groups_cover_every_control_once_besides_the_joint_direction():
    system, _ = _system("random:bert", "prefix")
    build("lora", system, rank=2)
    build("prompt", system, n_tokens=2)
    groups = control_groups(system, system.controls())
    assert groups[0].label == "all" and len(groups[0].controls) == len(system.controls())
    names = [c.name for g in groups[1:] for c in g.controls]
    assert sorted(names) == sorted(c.name for c in system.controls())
    labels = {g.label for g in groups}
    assert {"init", "term", "layer 0"} <= labels and any(label.startswith("shared ") for label in labels)
    assert all(g.local for g in groups if g.label.startswith("layer") or g.label == "init")


def test_state_directions_are_scaled_token_by_token():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    x[0, 3] *= 1000.0  # a "massive activation"
    x[1, 4] = 0.0
    v = token_direction(x, torch.Generator().manual_seed(0))
    expected = x.norm(dim=-1)
    expected[1, 4] = 1.0
    assert torch.allclose(v.norm(dim=-1), expected, rtol=1e-12)


def test_richardson_is_exact_for_quartics_and_refines_across_a_kink():
    def quartic(ts):
        return [1.0 + 2.0 * t + 3.0 * t ** 2 + 5.0 * t ** 3 + 7.0 * t ** 4 for t in ts]

    d = richardson(quartic([1e-2, -1e-2, 5e-3, -5e-3, 0.0]), 1e-2)
    assert d.value == pytest.approx(2.0, rel=1e-12)
    assert not d.smooth(1e-6, 1e-4)  # D(h) − D(h/2) = 5·(3/4)h² is the third derivative, not noise
    assert richardson(quartic([1e-5, -1e-5, 5e-6, -5e-6, 0.0]), 1e-5).smooth(1e-6, 1e-4)

    def kinked(ts):  # slope 1, plus a ReLU kink at t = 3e-6 inside the first step
        return [1.0 + t + max(t - 3e-6, 0.0) for t in ts]

    d = refined_difference(kinked, 1e-5, 1e-6, 1e-4)
    assert d.refined == 1 and d.step == pytest.approx(1e-6)
    assert d.value == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("where", [0.0, 1e-12, -1e-12, 1e-5 / 3])
def test_a_kink_at_the_point_or_a_third_of_the_step_is_seen(where):
    """Both central quotients take half of a jump at the point, so D(h) = D(h/2): the second-difference
    test must see it (and a kink at h/3, where the second test is blind, the first)."""
    def kinked(ts):
        return [1.0 + t + 2.0 * max(t - where, 0.0) for t in ts]

    points = [1e-5, -1e-5, 5e-6, -5e-6, 0.0]
    assert not richardson(kinked(points), 1e-5).smooth(1e-6, 1e-4)
    d = refined_difference(kinked, 1e-5, 1e-6, 1e-4)
    if where == 1e-5 / 3:
        assert d.smooth(1e-6, 1e-4) and d.value == pytest.approx(1.0, rel=1e-9)
        return
    assert not d.smooth(1e-6, 1e-4) and d.refined == 3  # no step moves a kink at the point out
    assert d.kink == pytest.approx(2.0, rel=1e-3)
    assert sorted([d.left, d.right]) == pytest.approx([1.0, 3.0], rel=1e-3)  # the far side is off by 6|c|/h
    truth = 3.0 if where < 0 else 1.0  # the slope of the side that holds 0 (at 0 itself: ReLU'(0) = 0)
    assert fd_errors(truth, d, 1e-4, kinked=True)[1] < 1e-6
    assert fd_errors(2.0, d, 1e-4, kinked=True)[1] > 0.3  # the average of the two slopes is wrong
    assert fd_errors(2.0, d, 1e-4)[1] < 1e-3  # ... and is near what the central difference gives


def test_an_offset_of_j0_is_not_a_kink():
    """Rounding that is systematic at the unperturbed point offsets J(0) alone: the fourth difference stays
    constant as the step shrinks (a kink's shrinks with it), so the central differences, which do not read J(0),
    decide."""
    def offset(ts):
        return [1.0 + 2.0 * t + 3.0 * t * t + (1e-10 if t == 0 else 0.0) for t in ts]

    d = refined_difference(offset, 1e-5, 1e-6, 1e-4)
    assert d.kink_offset and d.step == 1e-5 and d.refined == 0
    assert d.value == pytest.approx(2.0, rel=1e-9)

    def kink_at_point(ts):  # the kink test's answer must not be set aside for a real kink
        return [1.0 + t + 2.0 * max(t, 0.0) for t in ts]

    d = refined_difference(kink_at_point, 1e-5, 1e-6, 1e-4)
    assert not d.kink_offset and not d.smooth(1e-6, 1e-4) and d.refined == 3


def test_the_raw_ceiling_fails_whatever_the_allowance():
    report = Verification(dtype="float64", n_layers=1, n_controls=1, costate_autograd=[0.0, 0.0],
                          control_autograd={"u": 0.0}, fd_directions={"all": 0.0},
                          fd_directions_raw={"all": 2 * FD_RAW_CEILING})
    assert not report.passed
    assert report.failures() == [f"grad_u H[all] vs finite differences (raw): {2 * FD_RAW_CEILING:.2e} > "
                                 f"{FD_RAW_CEILING:g}"]


def test_verify_jobs_give_the_rows_of_one_process(tmp_path, one_thread):
    """``--jobs 2`` checks methods in two worker processes; every method reseeds, so its row is the same.

    Both runs use one torch thread per process (the workers get cores/jobs): with more threads the
    reductions of full fine-tuning's weight tangents round differently in the last bits."""
    from controltune.cli import main

    common = ["verify", "--model", "random:bert", "--methods", "lora,full,prompt,masking,adapter", "--dtype", "float64"]
    assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
    assert main([*common, "--jobs", "2", "--json", str(tmp_path / "two.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("one", "two"))
    keys = ("method", "status", "costate_autograd", "control_autograd", "costate_forward", "control_forward",
            "costate_fd", "fd_directions_raw")
    assert [{k: r[k] for k in keys} for r in one] == [{k: r[k] for k in keys} for r in two]
    assert main([*common, "--jobs", "0"]) == 2


def test_verify_jobs_never_run_two_dense_methods_at_once(monkeypatch):
    """Methods as large as the model (full, diff pruning, masking, subspace) go first and one at a time."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from controltune.commands import verify as verify_cmd
    from controltune.controllers import REGISTRY

    methods = ["lora", "full", "prompt", "masking", "adapter", "diff_pruning", "bitfit"]
    lock, now, peak, order = threading.Lock(), {"dense": 0, "all": 0}, {"dense": 0, "all": 0}, []

    def fake_row(method, batch):
        dense = REGISTRY[method].dense
        with lock:
            order.append(method)
            now["dense"] += dense
            now["all"] += 1
            peak["dense"], peak["all"] = max(peak["dense"], now["dense"]), max(peak["all"], now["all"])
        time.sleep(0.05)
        with lock:
            now["dense"] -= dense
            now["all"] -= 1
        return {"method": method}

    monkeypatch.setattr(verify_cmd, "_worker_row", fake_row)
    with ThreadPoolExecutor(3) as pool:
        got = dict(verify_cmd._scheduled(pool, 3, methods, {}))
    assert sorted(got) == list(range(len(methods))) and all(got[i]["method"] == m for i, m in enumerate(methods))
    assert peak["dense"] == 1 and peak["all"] == 3
    assert order[0] == "full"  # a dense method starts first (they are the long ones)
