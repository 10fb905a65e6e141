"""The certified bound B(ε) ≥ sup_{‖d‖≤ε} |J(u*+d) − J(u*)| (issue 17) on tiny float64 random models.

Soundness is checked against the measured quantity: dense sampling of 2- and 3-dimensional
sub-balls, random directions in the whole delta space, the attack, and per token and layer
against perturbed rollouts and finite differences.  Tightness: a finite bound below a stated
ceiling (≤ 100× the attack while the Taylor route holds, and never above the readout range).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import controltune as ct
from controltune import bounds
from controltune.bounds import attention_enclosure as att
from controltune.bounds import certified as cf
from controltune.bounds import enclosure as enc
from controltune.bounds.attack import attack, value_and_grad
from controltune.cli import main
from controltune.controllers.base import UnsupportedMethodError

SENTENCES = ["a gripping , funny and moving film .", "dull", "the plot is thin but the acting is superb ."]
TARGETS = {"random:bert": ("q", "v"), "random:gpt2": ("qkv", "o"), "random:roberta": ("v", "ffn_in", "ffn_out")}
# Radii spanning the three regimes of the tiny BERT: Taylor-tight, enclosure, readout range.
RADII = (1e-4, 3e-3, 3e-2, 0.3, 3.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(name: str, seed: int = 0):
    """A float64 system with DeltaWeights at a seeded u*, a head with O(1) logits, and a padded batch."""
    loaded = ct.load_model(name, dtype="float64")
    system = ct.ResidualSystem(loaded, kernel="eager")
    for p in system.parameters():
        p.requires_grad_(False)
    dw = system.add(bounds.DeltaWeights(TARGETS[name]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        system.readout.head.weight.copy_(0.5 * torch.randn(system.readout.head.weight.shape, generator=gen))
    dw.assign({k: 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in dw.values().items()})
    batch = dict(loaded.tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 0])
    return system, dw, batch


@pytest.fixture(scope="module")
def bert():
    system, dw, batch = _setup("random:bert")
    return system, dw, batch, cf.anchor(system, batch)


def _norm(d) -> float:
    return math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))


def _change(system, batch, ref, d, j0) -> float:
    j, _ = value_and_grad(system, batch, ref, d, grad=False)
    return abs(j - j0)


def _combine(basis, coef):
    return {k: sum(c * b[k] for c, b in zip(coef, basis)) for k in basis[0]}


def _orthonormal(ref, k: int, seed: int):
    """k orthonormal directions of the delta space (Frobenius inner product over all maps)."""
    gen = torch.Generator().manual_seed(seed)
    keys = list(ref)
    flat = torch.randn(k, sum(ref[n].numel() for n in keys), generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(flat.T)
    out = []
    for i in range(k):
        d, start = {}, 0
        for n in keys:
            d[n] = q[start:start + ref[n].numel(), i].view_as(ref[n])
            start += ref[n].numel()
        out.append(d)
    return out


def _sphere(k: int, n: int) -> torch.Tensor:
    """n points on the unit sphere of R^k (k = 2: equispaced circle; k = 3: Fibonacci lattice)."""
    if k == 2:
        t = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
        return torch.stack([t.cos(), t.sin()], 1)
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = i * math.pi * (3 - math.sqrt(5))
    r = (1 - z * z).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), z], 1)


def test_trace_reproduces_the_rollout_of_every_supported_family():
    for name in TARGETS:
        system, _, batch = _setup(name)
        with torch.no_grad():
            traj = system.rollout(batch)
        tr = enc.trace(system, batch)
        m = traj.ctx.attention_mask.bool()
        for layer, bt in enumerate(tr.blocks):
            assert float((bt.output - traj.states[layer + 1])[m].abs().max()) < 1e-12, (name, layer)
        ro = cf.readout_trace(system, tr, batch)
        with torch.no_grad():
            assert ro.phi == pytest.approx(float(system.terminal_cost(traj.final, traj.ctx, batch)), abs=1e-12)


def test_softmax_interval_is_sound_and_attained_at_the_corners():
    gen = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(40, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(40, 6, dtype=torch.bool)
    mask[:, 5] = False
    logits = logits.masked_fill(~mask, float("-inf"))
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    for scale in (1e-9, 1e-3, 0.5, 4.0, 60.0):  # both branches (small and large deviations)
        m = scale * torch.rand(40, 6, generator=gen, dtype=torch.float64)
        w, hi = att.softmax_interval(logp, m, mask)
        corners = torch.tensor([[1.0 if (c >> j) & 1 else -1.0 for j in range(6)] for c in range(64)],
                               dtype=torch.float64)
        for delta in [*corners, *(2 * torch.rand(50, 6, generator=gen, dtype=torch.float64) - 1)]:
            q = torch.softmax(logits + delta * m, -1)
            assert bool(((q - p).abs() <= w * (1 + 1e-9) + 1e-15).all()), scale
            assert bool((q <= hi * (1 + 1e-9) + 1e-15).all()), scale
        # The interval is exact: a corner of the logit box attains w.
        worst = torch.stack([(torch.softmax(logits + c * m, -1) - p).abs() for c in corners]).amax(0)
        assert bool((worst[mask] >= w[mask] * (1 - 1e-6) - 1e-15).all()), scale


def test_activation_constants_bound_gelu():
    l1, l2 = enc.activation_constants(torch.nn.functional.gelu)
    assert 1.1289 < l1 < 1.1290 + 1e-5  # max GELU' = 1.12899 at x ≈ 0.7518
    assert 0.79788 < l2 < 0.7981  # max GELU'' = 2φ(0) = 0.797885 (plus the grid margin)


@pytest.mark.parametrize("name, eps, h", [("random:bert", 3e-3, 1e-3), ("random:gpt2", 1e-6, 0.05)])
def test_enclosure_radii_contain_perturbed_states_and_derivatives(name, eps, h):
    system, dw, batch = _setup(name)
    anc = cf.anchor(system, batch)
    ref = dw.values()
    tr, real = anc.trace, anc.trace.real.bool()
    states, state = [], enc.State(enc.Radii.zeros(tr.real), enc.Radii.zeros(tr.real), tr.x0_gamma)
    for bt in tr.blocks:
        state, _ = enc.propagate_block(bt, state, eps, tr.real)
        states.append(state.x)
    assert float(states[-1].rho.max()) < 1.0  # not saturated: the radii rules are exercised, not the caps
    basis = _orthonormal(ref, 4, seed=3)
    for i, coef in enumerate(torch.randn(4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)):
        d = _combine(basis, (coef / coef.norm() * eps * (0.5 + 0.5 * (i % 2))).tolist())

        def rollout(tau: float, d=d):
            dw.assign({k: ref[k] + tau * d[k] for k in ref})
            with torch.no_grad():
                return system.rollout(batch).states

        try:
            xs = rollout(1.0)
            for layer in range(system.n_layers):
                dev = (xs[layer + 1] - tr.blocks[layer].output).norm(dim=-1)
                assert bool((dev[real] <= states[layer].rho[real] * (1 + 1e-9) + 1e-14).all()), layer
            tau = 0.7
            xp, x0, xm = rollout(tau + h), rollout(tau), rollout(tau - h)
            for layer in range(system.n_layers):
                first = ((xp[layer + 1] - xm[layer + 1]) / (2 * h)).norm(dim=-1)
                second = ((xp[layer + 1] - 2 * x0[layer + 1] + xm[layer + 1]) / h**2).norm(dim=-1)
                assert bool((first[real] <= states[layer].a[real] * (1 + 1e-6) + 1e-12).all()), layer
                assert bool((second[real] <= states[layer].b[real] * (1 + 1e-3) + 1e-8).all()), layer
        finally:
            dw.assign(ref)


@pytest.mark.parametrize("k", [2, 3])
def test_every_route_dominates_a_dense_sphere_and_the_attack(bert, k):
    system, dw, batch, anc = bert
    ref = dw.values()
    basis = _orthonormal(ref, k, seed=k)
    points = _sphere(k, 240 if k == 2 else 400)
    for eps in RADII:
        cert = cf.certify(anc, eps)
        seen = max(_change(system, batch, ref, _combine(basis, (r * eps * pt).tolist()), anc.cost)
                   for pt in points for r in (0.5, 1.0))
        a = attack(system, batch, eps, anc.gradient, restarts=1, steps=4).value
        for route, value in cert.routes.items():
            assert math.isfinite(value) or route == "taylor", (eps, route)
            assert value >= seen and value >= a, (eps, route, value, seen, a)
        assert cert.certified == min(cert.routes.values())
        assert cert.certified >= a >= 0.0
    dw.assign(ref)


def test_random_directions_in_the_whole_delta_space_stay_below_every_route(bert):
    system, dw, batch, anc = bert
    ref = dw.values()
    gen = torch.Generator().manual_seed(7)
    for eps in RADII:
        cert = cf.certify(anc, eps)
        for _ in range(15):
            d = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in ref.items()}
            r = eps * float(torch.rand((), generator=gen, dtype=torch.float64)) ** 0.1
            change = _change(system, batch, ref, {n: v * r / _norm(d) for n, v in d.items()}, anc.cost)
            assert all(change <= v for v in cert.routes.values()), (eps, change, cert.routes)
    dw.assign(ref)


def test_certificate_is_finite_tight_for_small_radii_and_capped_by_the_readout_range(bert):
    system, dw, batch, anc = bert
    rng = cf.certify(anc, 1.0).routes["range"]
    assert math.isfinite(rng) and rng < 100
    for eps in (1e-6, 1e-5, 1e-4):
        cert = cf.certify(anc, eps)
        a = attack(system, batch, eps, anc.gradient, restarts=0, steps=3).value
        assert cert.route == "taylor"
        assert a <= cert.certified <= 100 * a  # sound, and within the stated ceiling
        assert cert.certified <= a * (1.01 + 1e4 * eps)  # measured 1.006, 1.06, 1.58
        # The Taylor route tends to the exact first-order term ‖∇J‖ε (from above: it adds the curvature's bound).
        assert 0 <= cert.routes["taylor"] / (anc.grad_norm * eps) - 1 < 1e4 * eps
    for eps in (*RADII, 30.0, 1e3):
        cert = cf.certify(anc, eps)
        assert math.isfinite(cert.certified) and cert.certified <= rng
    assert cf.certify(anc, 0.0).certified < 1e-12


def test_gpt2_pre_ln_fused_qkv_causal_is_sound():
    system, dw, batch = _setup("random:gpt2", seed=1)
    anc = cf.anchor(system, batch)
    ref = dw.values()
    gen = torch.Generator().manual_seed(9)
    for eps in (1e-7, 1e-4, 1e-2, 1.0):
        cert = cf.certify(anc, eps)
        a = attack(system, batch, eps, anc.gradient, restarts=1, steps=3).value
        assert cert.certified >= a >= 0
        for _ in range(6):
            d = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64) for n, v in ref.items()}
            change = _change(system, batch, ref, {n: v * eps / _norm(d) for n, v in d.items()}, anc.cost)
            assert all(change <= v for v in cert.routes.values()), (eps, change, cert.routes)
    assert cf.certify(anc, 1e-7).certified <= 100 * attack(system, batch, 1e-7, anc.gradient, restarts=0,
                                                            steps=1).value
    dw.assign(ref)


def test_weight_decay_enters_the_certificate():
    """With decay λ the cost is J_task + (λ/2)‖u‖²: its gradient and curvature both grow, and the certificate
    with them.  At small radii (the Taylor regime) a certificate that left the decay out would fall below the
    attack on the decayed cost (measured at 1e-6: 1.9502e-5 against 1.9600e-5); at larger ones it would not."""
    system, dw, batch = _setup("random:roberta")
    ref = dw.values()
    dw.weight_decay = 0.0
    without = cf.anchor(system, batch)
    dw.weight_decay = 0.5
    anc = cf.anchor(system, batch)
    assert anc.grad_norm > without.grad_norm
    for eps in (1e-6, 1e-5, 1e-3, 0.1, 2.0):
        cert = cf.certify(anc, eps)
        a = attack(system, batch, eps, anc.gradient, restarts=1, steps=3).value
        assert cert.certified >= a
        assert cert.certified > cf.certify(without, eps).certified
    a = attack(system, batch, 1e-6, anc.gradient, restarts=1, steps=3).value
    assert cf.certify(without, 1e-6).certified < a  # the test above would see a certificate without the decay
    dw.assign(ref)


def test_unsupported_family_is_refused_with_a_clear_error():
    loaded = ct.load_model("random:llama", dtype="float64")
    system = ct.ResidualSystem(loaded, kernel="eager")
    system.add(bounds.DeltaWeights(("q",)))
    batch = dict(loaded.tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with pytest.raises(UnsupportedMethodError, match="anatomy"):
        enc.trace(system, batch)


# --- the command ----------------------------------------------------------------------------

ROWS = [{"text": f"sentence number {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(16)]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("task")
    for split, rows in (("train", ROWS), ("dev", ROWS[:6])):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert main(["train", "--model", "random:bert", "--method", "lora", "--task", str(folder), "--steps", "2",
                 "--batch-size", "4", "--max-length", "16", "--lr", "1e-2", "--no-progress", "--out", str(out),
                 "--opt", "rank=2", "--opt", "targets=q,v"]) == 0
    return out


def test_bound_certified_writes_rows_with_certificate_attack_and_gap(lora_run, tmp_path, capsys):
    out = tmp_path / "cert.json"
    code = main(["bound", "--reference", str(lora_run), "--structure", "rank", "--sizes", "0,1", "--dtype",
                 "float64", "--eval-size", "3", "--max-length", "16", "--no-progress", "--certified",
                 "--epsilons", "1e-4,0.1", "--grid", "1e-9,1", "--attack-steps", "2", "--attack-restarts", "1",
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "certified" in text
    data = json.loads(out.read_text())
    assert data["config"]["certified"] and "versions" in data
    assert [r["size"] for r in data["rows"]] == [0, 1] and len(data["curve"]) == 2
    for r in data["rows"]:
        assert {"structure", "size", "epsilon", "gap", "attack", "certified", "route", "seconds"} <= set(r)
        assert r["structure"] == "rank" and r["route"] in cf.ROUTES
        # The attack starts from Πu* − u*, so it is at least the gap; the certificate bounds both.
        assert r["certified"] >= r["attack"] >= r["gap"] * (1 - 1e-9) >= 0
        assert math.isfinite(r["certified"])
    for r in data["curve"]:
        assert r["certified"] >= r["attack"] >= 0
    assert [g["epsilon"] for g in data["grid"]] == [1e-9, 1.0] and data["grid"][0]["route"] == "taylor"


def test_bound_epsilons_need_certified(lora_run, capsys):
    assert main(["bound", "--reference", str(lora_run), "--structure", "rank", "--sizes", "1", "--epsilons",
                 "0.1"]) == 2
    assert "--certified only" in capsys.readouterr().err
