"""Lipschitz estimators, Grönwall composition and the certified approximation bound (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch

import controltune as ct
from controltune import bounds
from controltune.bounds import gronwall as gw

SENTENCES = ["a gripping , funny and moving film .", "dull", "the plot is thin but the acting is superb ."]
TARGETS = {"random:bert": ("q", "v", "o", "ffn_in", "ffn_out"), "random:gpt2": ("qkv", "o", "ffn_in", "ffn_out")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny float64 blocks: with two OpenMP threads on a busy machine each op waits on the other
    # thread (100x slower); one thread is also what the experiments use.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _system(name: str, scale: float = 0.05, seed: int = 0):
    """A float64 system with a DeltaWeights control at a seeded random value, and a padded batch."""
    loaded = ct.load_model(name, dtype="float64")
    system = ct.ResidualSystem(loaded, kernel="eager")
    dw = system.add(bounds.DeltaWeights(TARGETS[name]))
    gen = torch.Generator().manual_seed(seed)
    values = {k: scale * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in dw.values().items()}
    dw.assign(values)
    batch = dict(loaded.tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 1, 0])
    return system, dw, values, batch


@pytest.fixture(scope="module", params=["random:bert", "random:gpt2"])
def setup(request):
    system, dw, values, batch = _system(request.param)
    with torch.no_grad():
        traj = system.rollout(batch)
    return request.param, system, dw, values, batch, traj


@pytest.fixture(scope="module")
def constants(setup):
    name, system, dw, values, batch, traj = setup
    return bounds.reference_constants(system, batch, iters=3, sampled_steps=1)


def test_power_iteration_recovers_the_top_singular_value_of_a_known_matrix():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    a = u[:, :5] @ torch.diag(s) @ v.T
    res = bounds.power_iteration(lambda x: a @ x, lambda y: a.T @ y, torch.randn(5, generator=gen, dtype=torch.float64),
                             iters=200, tol=1e-14)
    assert res.converged
    assert res.sigma == pytest.approx(3.0, rel=1e-10)
    assert abs(float(res.vector @ v[:, 0])) == pytest.approx(1.0, rel=1e-8)


def test_local_state_and_control_norms_bound_the_sampled_ones_per_layer(setup):
    name, system, dw, values, batch, traj = setup
    for layer in range(system.n_layers):
        x = traj.states[layer]
        a = bounds.local_state_lipschitz(system, layer, x, traj.ctx, iters=60, tol=1e-10).sigma
        b = bounds.local_control_lipschitz(system, layer, x, traj.ctx, iters=60, tol=1e-10).sigma
        # Radius 1e-6: a sampled ratio is ‖J d‖ + O(radius), never above ‖J‖ beyond that second-order term;
        # the 1e-4 relative slack covers it (power iteration, with 15x the ascent's steps, is ahead of it).
        sa = bounds.sampled_state_lipschitz(system, layer, x, traj.ctx, radius=1e-6, samples=1, steps=3)
        sb = bounds.sampled_control_lipschitz(system, layer, x, traj.ctx, radius=1e-6, samples=1, steps=3)
        assert 0 < sa <= a * (1 + 1e-4), (name, layer, sa, a)
        assert 0 < sb <= b * (1 + 1e-4), (name, layer, sb, b)
        # The ascent really searches: it reaches most of the top singular value.
        assert sa >= 0.5 * a and sb >= 0.5 * b


def test_composed_bound_dominates_local_and_sampled_constants_on_its_domain(setup):
    name, system, dw, values, batch, traj = setup
    for layer in range(system.n_layers):
        x = traj.states[layer]
        dom = bounds.probe_block(system, layer, x, traj.ctx)
        cb = bounds.composed_block_bound(system, layer, dom)
        # Power iterates increase towards ‖J‖, so a few give a valid lower estimate to compare with.
        a = bounds.local_state_lipschitz(system, layer, x, traj.ctx, iters=5).sigma
        b = bounds.local_control_lipschitz(system, layer, x, traj.ctx, iters=5).sigma
        assert cb.a >= a and cb.b_total >= b, (name, layer, cb.a, a, cb.b_total, b)
        # Finite pairs inside the probed domain (x' = x + small step keeps σ and R nearly fixed, so
        # probe both and merge): the composed constant bounds the ratio of the block at two points.
        xp = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(layer), dtype=x.dtype)
        dom2 = dom.merge(bounds.probe_block(system, layer, xp, traj.ctx))
        cb2 = bounds.composed_block_bound(system, layer, dom2)
        m = traj.ctx.attention_mask.unsqueeze(-1).to(x)
        with torch.no_grad():
            fx, fxp = system.step(layer, x, traj.ctx), system.step(layer, xp, traj.ctx)
        if not system.family.post_ln:
            fx, fxp = fx - x, fxp - xp
        assert float(((fx - fxp) * m).norm()) <= cb2.a * float(((x - xp) * m).norm())
        gd = bounds.global_domain(system, layer, traj.ctx)
        assert gd.contains(dom)  # (x' is not a reachable state, so dom2 need not be inside)
        assert bounds.composed_block_bound(system, layer, gd).a >= cb.a


def test_global_terminal_constant_dominates_the_local_one(setup):
    name, system, dw, values, batch, traj = setup
    local = bounds.local_terminal_lipschitz(system, traj.final, traj.ctx, batch)
    sigma = bounds.final_norm_sigma(system, traj.final, traj.ctx)
    assert bounds.terminal_lipschitz(system, traj.ctx, sigma) >= local
    assert bounds.terminal_lipschitz(system, traj.ctx) >= bounds.terminal_lipschitz(system, traj.ctx, sigma)


@pytest.mark.parametrize("structure,size", [("rank", 1), ("sparse", 2000), ("subspace", 50)])
def test_certified_bound_is_never_below_the_exact_gap(setup, constants, structure, size):
    name, system, dw, values, batch, traj = setup
    consts = constants
    projected = bounds.project(values, structure, size)
    row = bounds.compare(system, batch, values, projected, consts)
    with torch.no_grad():
        dw.assign(projected)
        j_proj = float(system.cost(batch))
        dw.assign(values)
        j_ref = float(system.cost(batch))
    assert row["gap"] == pytest.approx(abs(j_ref - j_proj), rel=1e-12, abs=1e-15)
    assert row["gap"] > 0
    assert row["bounds"]["certified"]["cost"] >= row["gap"]
    assert row["bounds"]["global"]["cost"] >= row["bounds"]["certified"]["cost"]
    # The first-order co-state estimate equals the directional derivative of J (autograd).
    direction = {k: projected[k] - values[k] for k in values}
    eps = 1e-6
    with torch.no_grad():
        dw.assign({k: values[k] + eps * direction[k] for k in values})
        jp = float(system.cost(batch))
        dw.assign({k: values[k] - eps * direction[k] for k in values})
        jm = float(system.cost(batch))
        dw.assign(values)
    assert row["costate_estimate"] == pytest.approx((jp - jm) / (2 * eps), rel=1e-5)


def test_certified_bound_also_holds_for_large_displacements():
    system, dw, values, batch = _system("random:bert", scale=0.3, seed=1)
    consts = bounds.reference_constants(system, batch, iters=2, sampled_steps=1)
    row = bounds.compare(system, batch, values, bounds.project(values, "layers", 1), consts)
    assert row["relative_distance"] > 0.5
    assert row["bounds"]["certified"]["cost"] >= row["gap"] > 0


def test_gronwall_composition_matches_a_hand_computed_example():
    # post-LN: A = a; E_3 = A1·A2·d0 + A2·d1 + d2 = 2·3·1 + 3·0.5 + 0.25 = 7.75
    g = gw.gronwall(gw.state_gains([5.0, 2.0, 3.0], post_ln=True), [1.0, 0.5, 0.25], lip_phi=2.0, running=0.1)
    assert g.contributions == [6.0, 1.5, 0.25]
    assert g.state == 7.75
    assert g.cost == pytest.approx(2.0 * 7.75 + 0.1)
    # pre-LN: A = 1 + a, so a = [4, 1, 2] gives the same gains.
    assert gw.gronwall(gw.state_gains([4.0, 1.0, 2.0], post_ln=False), [1.0, 0.5, 0.25]).state == 7.75
    with pytest.raises(ValueError, match="one entry per layer"):
        gw.gronwall([1.0], [1.0, 2.0])


def test_gronwall_is_attained_by_a_scalar_linear_system():
    # x_{l+1} = A_l x_l + b_l u_l with positive coefficients: the bound is an equality.
    a, b, du = [1.5, 0.5, 2.0], [0.3, 1.0, 2.0], [0.1, -0.0, 0.2]
    x, xp = 0.0, 0.0
    for al, bl, d in zip(a, b, du):
        x, xp = al * x + bl * 1.0, al * xp + bl * (1.0 + d)
    bound = gw.gronwall(a, [bl * abs(d) for bl, d in zip(b, du)]).state
    assert bound == pytest.approx(abs(x - xp), rel=1e-14)


def test_projections_have_their_structure():
    gen = torch.Generator().manual_seed(0)
    values = {"0.q": torch.randn(6, 5, generator=gen, dtype=torch.float64),
              "1.q": torch.randn(6, 5, generator=gen, dtype=torch.float64)}
    r2 = bounds.project_rank(values, 2)
    assert all(int(torch.linalg.matrix_rank(v)) == 2 for v in r2.values())
    s = torch.linalg.svdvals(values["0.q"])
    assert float((values["0.q"] - r2["0.q"]).norm()) == pytest.approx(float(s[2:].norm()), rel=1e-10)
    sp = bounds.project_sparse(values, 7)
    assert sum(int((v != 0).sum()) for v in sp.values()) == 7
    kept = torch.cat([v[v != 0].abs() for v in sp.values()])
    dropped = torch.cat([values[k][sp[k] == 0].abs() for k in values])
    assert float(kept.min()) >= float(dropped.max())
    top = max(values, key=lambda k: float(values[k].norm()))
    lay = bounds.project_layers(values, 1)
    assert torch.equal(lay[top], values[top]) and all(float(lay[k].abs().sum()) == 0 for k in values if k != top)
    sub = bounds.project_subspace(values, 4, seed=3)
    twice = bounds.project_subspace(sub, 4, seed=3)
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    pflat = torch.cat([v.reshape(-1) for v in sub.values()])
    assert all(torch.allclose(sub[k], twice[k], atol=1e-12) for k in values)  # idempotent
    assert float((flat - pflat) @ pflat) == pytest.approx(0.0, abs=1e-10)  # orthogonal
    with pytest.raises(ValueError, match="structure"):
        bounds.project(values, "tucker", 2)


def test_bad_inputs_are_rejected_with_clear_errors():
    system, dw, values, batch = _system("random:bert")
    system.set_kernel("sdpa")
    with torch.no_grad():
        traj = system.rollout(batch)
    with pytest.raises(RuntimeError, match="eager"):
        bounds.local_state_lipschitz(system, 0, traj.states[0], traj.ctx)
    with pytest.raises(ValueError, match="iters"):
        bounds.power_iteration(lambda v: v, lambda v: v, torch.ones(2), iters=0)
    llama = ct.ResidualSystem(ct.load_model("random:llama", dtype="float64"))
    with pytest.raises(ct.controllers.UnsupportedMethodError, match="llama"):
        bounds.block_weights(llama, 0)
    assert math.isfinite(bounds.terminal_lipschitz(system, traj.ctx))
