"""The Pontryagin co-state solver, its verification and the PMP diagnostics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILY_MODELS, make_batch

import controltune as ct
from controltune.controllers import build
from controltune.controllers.base import Control, UnsupportedMethodError
from controltune.controllers.subspace import Subspace
from controltune.diagnostics import maximum_condition_probe, stationarity
from controltune.msa import ToyResidualNet, toy_batch
from controltune.pmp import CoStateError, solve_costate
from controltune.verification import autograd_reference, relative_error, verify

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
WD = 0.1  # nonzero weight decay everywhere, so the running-cost terms are exercised


def _perturb(system, scale: float = 0.05, seed: int = 0) -> None:
    """Move every control off its initialisation (B = 0, z = 0 would make gradients special)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in system.controls():
            c.param.add_(scale * torch.randn(c.param.shape, generator=gen, dtype=torch.float64).to(c.param))


def _system(name: str, dtype: str = "float64", subspace_cls=Subspace):
    """LoRA (layer) + intrinsic subspace (shared) + prompt (init) + the head (term), all with weight decay."""
    loaded = ct.load_model(name, dtype=dtype)
    system = ct.ResidualSystem(loaded)
    build("lora", system, rank=2, weight_decay=WD)
    system.add(subspace_cls(dim=4, weight_decay=WD))
    build("prompt", system, n_tokens=2, weight_decay=WD)
    _perturb(system)
    return system, make_batch(loaded.tokenizer, 2)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_costates_and_hamiltonian_gradients_equal_autograd(name):
    system, batch = _system(name)
    sol = solve_costate(system, batch)
    assert {c.kind for c in sol.controls} == {"layer", "shared", "init", "term"}
    neg_dx, neg_du = autograd_reference(system, batch)
    assert len(sol.costates) == len(neg_dx) == system.n_layers + 1
    for layer, (p, ref) in enumerate(zip(sol.costates, neg_dx)):
        assert ref.norm() > 0
        assert relative_error(p, ref) <= 1e-10, f"p_{layer}"
    for c in sol.controls:
        assert neg_du[c.name].norm() > 0, c.name
        assert relative_error(sol.control_grads[c.name], neg_du[c.name]) <= 1e-10, c.name
    # The shared control's gradient is the sum of its per-layer parts.
    z = next(c for c in sol.controls if c.kind == "shared")
    parts = sum(sol.layer_grads[layer][z.name] for layer in z.layers)
    assert relative_error(parts, sol.control_grads[z.name]) <= 1e-12
    with torch.no_grad():
        assert abs(sol.cost - float(system.cost(batch))) <= 1e-12


def test_hamiltonian_values_follow_the_index_convention():
    system, batch = _system("random:bert")
    sol = solve_costate(system, batch)
    for layer in range(system.n_layers):
        f = system.step(layer, sol.states[layer], sol.ctx).detach()
        expected = float((sol.costates[layer + 1] * f).sum() - system.running_cost(layer).detach())
        assert sol.hamiltonian[layer].item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", ["random:gpt2", "random:llama"])
def test_recompute_mode_equals_graph_mode(name):
    system, batch = _system(name)
    graph, recompute = solve_costate(system, batch, "graph"), solve_costate(system, batch, "recompute")
    for a, b in zip(graph.costates, recompute.costates):
        assert relative_error(b, a) <= 1e-12
    for n, g in graph.control_grads.items():
        assert relative_error(recompute.control_grads[n], g) <= 1e-12
    assert torch.allclose(graph.hamiltonian, recompute.hamiltonian, rtol=1e-12, atol=0)


def test_verification_passes_with_finite_differences():
    system, batch = _system("random:bert")
    report = verify(system, batch, n_state_directions=2)
    assert report.passed, report.failures()
    assert len(report.costate_fd) == system.n_layers + 1
    assert set(report.control_fd) == {c.name for c in system.controls()}
    assert report.max_rel_err_fd <= 1e-6
    assert 0 < report.fd_raw_max <= 1e-5  # even without the rounding allowance the quotients agree


def test_float32_verification_uses_the_float32_tolerance():
    system, batch = _system("random:roberta", dtype="float32")
    report = verify(system, batch, n_state_directions=1)
    assert report.dtype == "float32" and report.tol_autograd == 1e-4 and report.tol_fd == 1e-6
    assert report.passed, report.failures()
    assert report.max_rel_err_costate <= 1e-4 and report.max_rel_err_fd <= 1e-6


class _ForgetfulSubspace(Subspace):
    """A planted bug: the shared control forgets that it also acts in the last block."""

    def controls(self) -> list[Control]:
        return [Control(c.name, c.param, c.kind, c.layers[:-1]) for c in super().controls()]


def test_a_dropped_shared_contribution_fails_verification():
    system, batch = _system("random:bert", subspace_cls=_ForgetfulSubspace)
    report = verify(system, batch, fd=True, n_state_directions=1)
    assert not report.passed
    bad = [f for f in report.failures() if "subspace.z" in f]
    assert any("autograd" in f for f in bad) and any("finite differences" in f for f in bad), report.failures()
    assert report.control_autograd["subspace.z"] > 1e-3
    # Everything the bug does not touch still agrees.
    assert report.max_rel_err_costate <= 1e-10
    assert all(e <= 1e-10 for n, e in report.control_autograd.items() if n != "subspace.z")


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nan_costate_names_the_first_layer():
    system, batch = _system("random:gpt2")
    step = system.step
    system.step = lambda layer, x, ctx: _NaNBackward.apply(step(layer, x, ctx)) if layer == 1 else step(layer, x, ctx)
    with pytest.raises(CoStateError, match=r"p_1 \(layer 1\).*backward pass overflowed"):
        solve_costate(system, batch)
    system.step = step
    lora_b = next(c for c in system.controls() if c.name.startswith("lora.2") and c.name.endswith(".B"))
    with torch.no_grad():
        lora_b.param.fill_(float("inf"))
    with pytest.raises(CoStateError, match=r"co-state p_3 \(layer 3\).*forward pass already diverged"):
        solve_costate(system, batch)


def test_bad_mode_is_rejected():
    net = ToyResidualNet(n_layers=2)
    with pytest.raises(ValueError, match="graph"):
        solve_costate(net, toy_batch(4, seed=0), mode="adjoint")


def test_stationarity_reports_layer_norms():
    system, batch = _system("random:llama")
    sol = solve_costate(system, batch)
    report = stationarity(sol)
    assert len(report["layer"]) == system.n_layers
    for layer, norm in enumerate(report["layer"]):
        expected = torch.sqrt(sum(g.pow(2).sum() for g in sol.layer_grads[layer].values()))
        assert norm == pytest.approx(float(expected), rel=1e-12) and norm > 0
    assert report["init"] == pytest.approx(float(sol.control_grads["prompt.P"].norm()), rel=1e-12)


def test_maximum_condition_probe_on_the_toy():
    # Zero controls and a zero head: p = 0, so H_l = −R_l(u) is maximised exactly at u* = 0.
    net = ToyResidualNet(n_layers=4, weight_decay=0.5)
    batch = toy_batch(16, seed=0)
    at_max = maximum_condition_probe(net, batch, n_directions=4, radii=(1e-2, 1e-1), relative=False)
    assert at_max["fraction_local_max"] == 1.0
    # Away from stationarity the first-order term ε⟨∇H, v⟩ raises H on one side of every probe.
    _perturb(net, scale=0.5)
    moved = maximum_condition_probe(net, batch, n_directions=4, radii=(1e-4,), relative=True)
    assert moved["fraction_local_max"] == 0.0
    assert all(len(line["dH"]) == 9 for layer in moved["layers"] for line in layer["lines"])


class _Refuses(Subspace):
    method = "refuses_everything"

    def attach(self, system) -> None:
        raise UnsupportedMethodError(f"{self.method} does not fit {system.family.name}")


def test_verify_command_reports_passes_and_skips(tmp_path, monkeypatch, capsys):
    from controltune import controllers
    from controltune.cli import main

    monkeypatch.setitem(controllers.REGISTRY, _Refuses.method, _Refuses)
    out = tmp_path / "verify.json"
    code = main(["verify", "--model", "random:gpt2", "--methods", "lora,prompt,refuses_everything",
                 "--dtype", "float64", "--state-directions", "1", "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["model"] == "random:gpt2" and report["dtype"] == "float64" and "versions" in report
    rows = {r["method"]: r for r in report["results"]}
    assert rows["refuses_everything"]["status"] == "skipped" and "does not fit" in rows["refuses_everything"]["reason"]
    for method in ("lora", "prompt"):
        row = rows[method]
        assert row["passed"] and row["family"] == "gpt2" and row["n_layers"] == 3 and row["n_controls"] > 0
        assert row["max_rel_err_costate"] <= 1e-10 and row["max_rel_err_fd"] <= 1e-6


def test_skipping_the_initial_costate_changes_nothing_else():
    loaded = ct.load_model("random:bert", dtype="float64")
    system = ct.ResidualSystem(loaded)
    build("lora", system, rank=2, weight_decay=WD)
    _perturb(system)
    batch = make_batch(loaded.tokenizer, 2)
    full, lean = solve_costate(system, batch), solve_costate(system, batch, initial_costate=False)
    assert lean.costates[0] is None and full.costates[0] is not None
    for a, b in zip(full.costates[1:], lean.costates[1:]):
        assert torch.equal(a, b)
    for n, g in full.control_grads.items():
        assert torch.equal(lean.control_grads[n], g)
    # An initial control needs p_0, so it is computed anyway.
    build("prompt", system, n_tokens=2)
    assert solve_costate(system, batch, initial_costate=False).costates[0] is not None


def test_straight_through_masking_is_checked_on_its_linearisation():
    """Hard masks make J flat in the scores; the straight-through linearisation makes FD meaningful."""
    import controltune as ct
    from controltune.controllers import build
    from controltune.verification import finite_differences, float64_twin

    loaded = ct.load_model("random:bert", dtype="float64")
    system = ct.ResidualSystem(loaded)
    masking = build("masking", system, targets=["q"], layers=[1])
    batch = dict(loaded.tokenizer(["a fine film .", "dull"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1])
    twin = float64_twin(system)
    solution = solve_costate(twin, batch)
    _, flat, _ = finite_differences(twin, batch, solution, n_state_directions=1)
    name = masking.controls()[0].name
    assert flat[name] > 0.5, "without the linearisation the quotient of the hard mask is ~0"
    twin_masking = next(m for m in twin.modules() if type(m).__name__ == "Masking")
    with twin_masking.straight_through_linearisation():
        _, lin, _ = finite_differences(twin, batch, solution, n_state_directions=1)
    assert lin[name] <= 1e-6
    assert twin_masking.deltas[next(iter(twin_masking.deltas))].anchor is None
