"""Control-theoretic design: Riccati/LQR, Gramian estimates, co-state LoRA, closed-loop prefix, placement."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.func import functional_call

import controltune as ct
from controltune.controllers import build
from controltune.design import dlqr, greedy_allocate, lqr_rollout, module_gramian_scores, reduce
from controltune.design.gramian import gn_sqrt, parameter_names
from controltune.design.placement import allocation_cost

pytestmark = pytest.mark.usefixtures("one_thread")


def _system(name: str = "random:bert", kernel: str = "sdpa", num_labels: int = 2) -> ct.ResidualSystem:
    return ct.ResidualSystem(ct.load_model(name, dtype="float64"), kernel=kernel, num_labels=num_labels)


def _batch(n_seq: int, n_tok: int, seed: int = 0, vocab: int = 1000, n_labels: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1000 + vocab, (n_seq, n_tok), generator=gen)
    mask = torch.ones(n_seq, n_tok, dtype=torch.long)
    if n_tok > 2:
        mask[0, -1] = 0  # one padded position exercises the masks
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n_seq) % n_labels}


# --- Riccati / LQR -------------------------------------------------------------------------------
def _random_lqr(batch: tuple[int, ...] = (), k: int = 3, m: int = 2, n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def spd(dim, eps):
        a = rnd(*batch, dim, dim)
        return a @ a.transpose(-1, -2) + eps * torch.eye(dim, dtype=torch.float64)

    A = [rnd(*batch, k, k) * 1.1 for _ in range(n)]  # unstable on purpose: finite horizon only
    B = [rnd(*batch, k, m) for _ in range(n)]
    Q = [spd(k, 0.0) for _ in range(n)]
    return A, B, Q, spd(k, 0.5), rnd(*batch, k), spd(m, 0.3)


def _dense_lqr(A, B, Q, Q_L, q_L, R, start: int):
    """The LQR from step ``start`` as one least-squares problem in all its controls.

    ``J = ½Σ‖R^{1/2}u_i‖² + ½Σ‖Q_i^{1/2}z_i‖² + ½‖Q_L^{1/2}z_L + Q_L^{-1/2}q_L‖² + const`` with
    ``z_i = X_i z_0 + Y_i u``; returns ``(K, k)`` such that the optimal first control is ``−K z_0 + k``.
    """
    k_dim, m = B[0].shape
    n = len(A) - start
    sq = lambda M: torch.linalg.cholesky(M + 1e-300 * torch.eye(M.shape[0], dtype=M.dtype)).T  # noqa: E731
    X, Y = torch.eye(k_dim, dtype=torch.float64), torch.zeros(k_dim, n * m, dtype=torch.float64)
    rows_u, rows_z, rhs = [], [], []
    for i in range(n):
        block = torch.zeros(m, n * m, dtype=torch.float64)
        block[:, i * m:(i + 1) * m] = sq(R)
        rows_u.append(block)
        rows_z.append(torch.zeros(m, k_dim, dtype=torch.float64))
        rhs.append(torch.zeros(m, dtype=torch.float64))
        if i > 0:  # the cost of z_start is independent of u
            c = torch.linalg.eigh(Q[start + i])
            half = (c.eigenvectors * c.eigenvalues.clamp_min(0).sqrt()) @ c.eigenvectors.T
            rows_u.append(half @ Y)
            rows_z.append(half @ X)
            rhs.append(torch.zeros(k_dim, dtype=torch.float64))
        a, b = A[start + i], B[start + i]
        Y = a @ Y
        Y[:, i * m:(i + 1) * m] += b
        X = a @ X
    half = sq(Q_L)
    rows_u.append(half @ Y)
    rows_z.append(half @ X)
    rhs.append(torch.linalg.solve(half.T, q_L))
    M, N, c = torch.cat(rows_u), torch.cat(rows_z), torch.cat(rhs)
    # min ‖M u + N z_0 + c‖²  ⇒  u = −M⁺ N z_0 − M⁺ c
    K_all = torch.linalg.lstsq(M, N, driver="gelsd").solution
    k_all = -torch.linalg.lstsq(M, c[:, None], driver="gelsd").solution[:, 0]
    return K_all[:m], k_all[:m]


def test_riccati_gains_equal_dense_least_squares_lqr():
    A, B, Q, Q_L, q_L, R = _random_lqr()
    sol = dlqr(A, B, Q, R, Q_L, q_L)
    for start in range(len(A)):
        K, k = _dense_lqr(A, B, Q, Q_L, q_L, R, start)
        assert torch.allclose(sol.K[start], K, rtol=0, atol=1e-10), start
        assert torch.allclose(sol.k[start], k, rtol=0, atol=1e-10), start
    # The closed-loop rollout from any z_0 is the optimum of the whole problem.
    z0 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    _, us = lqr_rollout(sol, A, B, z0)
    K, k = _dense_lqr(A, B, Q, Q_L, q_L, R, 0)
    assert torch.allclose(us[0], -K @ z0 + k, rtol=0, atol=1e-10)


def test_riccati_batched_equals_per_element():
    A, B, Q, Q_L, q_L, R = _random_lqr(batch=(3,), seed=1)
    sol = dlqr(A, B, Q, R, Q_L, q_L)
    for i in range(3):
        one = dlqr([a[i] for a in A], [b[i] for b in B], [x[i] for x in Q], R[i], Q_L[i], q_L[i])
        for layer in range(len(A)):
            assert torch.allclose(sol.K[layer][i], one.K[layer], rtol=0, atol=1e-12)
            assert torch.allclose(sol.k[layer][i], one.k[layer], rtol=0, atol=1e-12)


def test_riccati_rejects_bad_shapes_and_cost():
    A, B, Q, Q_L, q_L, R = _random_lqr()
    with pytest.raises(ValueError, match="one .A_l, B_l. pair"):
        dlqr(A, B[:-1], None, R, Q_L)
    with pytest.raises(ValueError, match="positive definite"):
        dlqr(A, B, None, 0.0, Q_L)


def test_zero_terminal_curvature_feedforward_is_one_hamiltonian_step():
    """Q_L = 0: k_l = R⁻¹ B_lᵀ p_{l+1} = (1/λ)(−∂J/∂u_l) on the real (tiny) model, to 1e-10.

    One-token sequences and full bases (V_l = I) make the pooled reduced model exact.
    """
    system = _system(kernel="eager")
    batch = _batch(3, 1, seed=2)
    d, m, lam, n = system.d_model, 4, 0.7, system.n_layers
    gen = torch.Generator().manual_seed(5)
    Us = [torch.linalg.qr(torch.randn(d, m, generator=gen, dtype=torch.float64)).Q for _ in range(n)]
    eye = torch.eye(d, dtype=torch.float64)
    model = reduce(system, batch, [eye] * (n + 1), Us)
    sol = dlqr(model.A, [b.expand(3, -1, -1) for b in model.B], None, lam, torch.zeros_like(model.Q), model.q)
    assert all(float(K.abs().max()) == 0.0 for K in sol.K)

    u = torch.zeros(n, 3, m, dtype=torch.float64, requires_grad=True)
    x, ctx = system.embed(batch)
    for layer in range(n):
        x = system.step(layer, x, ctx) + (u[layer] @ Us[layer].T)[:, None, :]
    J = system.terminal_cost(x, ctx, batch) + 0.5 * lam * u.pow(2).sum()
    (grad,) = torch.autograd.grad(J, u)
    for layer in range(n):
        assert torch.allclose(sol.k[layer], -grad[layer] / lam, rtol=0, atol=1e-10), layer
    assert float(grad.abs().max()) > 1e-4  # the identity is not 0 = 0


# --- Gramian scores ---------------------------------------------------------------------------------
def test_hutchinson_gramian_matches_dense_gramian():
    # Four sequences and four classes: a Gramian of rank 12, so Hutchinson's variance is moderate.
    system = _system(kernel="eager", num_labels=4)
    batch = _batch(4, 4, seed=3, n_labels=4)
    W = system.blocks[1].attention.self.query.weight
    (name,) = parameter_names(system, [W])
    jac = torch.autograd.functional.jacobian(
        lambda w: functional_call(system, {name: w}, (batch,), strict=False), W.detach())    # S×C×d_out×d_in
    s, c = jac.shape[:2]
    C = jac.reshape(s, c, -1)
    with torch.no_grad():
        hs = gn_sqrt(system(batch))
    HC = hs @ C                                                      # S×C×n
    exact = float(HC.pow(2).sum()) / s                               # tr(CᵀHC)/S
    X = torch.einsum("sci,scj->ij", HC, HC)                          # Σ_s C_sᵀ H_s C_s
    n_probes = 100
    tol = 4 * (2 * float(X.pow(2).sum()) / n_probes) ** 0.5 / s      # 4 standard deviations
    assert tol < 0.3 * exact  # the check is sharp enough to mean something
    for method in ("jvp", "vjp"):
        est = module_gramian_scores(system, batch, {"q1": W}, n_probes=n_probes, method=method, seed=11)["q1"]
        assert abs(est - exact) < tol, (method, est, exact, tol)


def test_control_set_scores_of_a_placement_match_the_dense_quantities():
    """Co-state energy ‖∂J/∂u‖² and the Hutchinson Gramian tr(CᵀHC)/S of 40 arbitrary positions, exactly."""
    from controltune.design.gramian import control_set_scores

    system = _system(num_labels=3)
    batch = _batch(4, 4, seed=5, n_labels=3)
    ctrl = build("arbitrary", system, budget=40, seed=2)
    params = [c.param for c in ctrl.controls()]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # away from 0, where the head's gradient alone would matter
    J = torch.nn.functional.cross_entropy(system(batch), batch["labels"])
    energy = sum(float(g.pow(2).sum()) for g in torch.autograd.grad(J, params))

    logits = system(batch)
    # C = ∂logits/∂u row by row (functional_call would untie the delta parameters the controller shares with
    # the wrapped modules)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(logits[i, j], params, retain_graph=True)])
            for i in range(logits.shape[0]) for j in range(logits.shape[1])]
    C = torch.stack(rows).view(*logits.shape, -1)                     # S×C×n
    with torch.no_grad():
        hs = gn_sqrt(system(batch))
    HC = hs @ C
    s = C.shape[0]
    exact = float(HC.pow(2).sum()) / s
    X = torch.einsum("sci,scj->ij", HC, HC)
    n_probes = 200
    tol = 4 * (2 * float(X.pow(2).sum()) / n_probes) ** 0.5 / s
    assert tol < 0.3 * exact
    scores = control_set_scores(system, batch, n_probes=n_probes, seed=3)
    assert scores["n"] == 40
    assert scores["costate_energy"] == pytest.approx(energy, rel=1e-12) and energy > 0
    assert abs(scores["gramian"] - exact) < tol, (scores["gramian"], exact, tol)


# --- co-state LoRA ------------------------------------------------------------------------------------
def test_costate_lora_init_is_top_r_svd_of_hamiltonian_gradient():
    batch = _batch(4, 5, seed=4)
    step, rank = 0.3, 3
    system = _system()
    ctrl = build("costate_lora", system, rank=rank, targets=["q", "v"], step=step, design_batch=batch)

    ref = _system()
    weights = [ref.blocks[layer].get_submodule(p).weight for layer in range(ref.n_layers)
               for p in ("attention.self.query", "attention.self.value")]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(ref.cost(batch), weights)
    for (layer, path), g in zip(itertools.product(range(ref.n_layers), ("q", "v")), grads):
        U, S, Vh = torch.linalg.svd(-g)
        expected = step * (U[:, :rank] * S[:rank]) @ Vh[:rank]
        got = ctrl.deltas[f"{layer}_{path}"].delta_weight()
        assert torch.allclose(got, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
        assert float(expected.abs().max()) > 0


def _twice(batch: dict) -> dict:
    """The batch followed by itself: the held-out half of the step search is the design half again."""
    return {k: torch.cat([v, v]) for k, v in batch.items()}


def test_costate_lora_auto_step_lowers_the_held_out_cost_to_the_grid_minimum():
    # the held-out half repeats the design half, so the gradient's direction lowers it for small enough steps
    system = _system()
    batch = _twice(_batch(3, 5, seed=6))
    ctrl = build("costate_lora", system, rank=2, design_batch=batch)
    r = ctrl.report
    assert r["step"] > 0 and r["J_search"] < r["J0_search"]
    assert r["J_search"] == min(j for j, _ in r["grid"]) and r["step"] == min(r["grid"])[1]
    held_out = {k: v[3:] for k, v in batch.items()}
    with torch.no_grad():
        assert float(system.cost(held_out)) == pytest.approx(r["J_search"], rel=1e-12)  # the built system's


def test_costate_lora_takes_the_smallest_step_when_no_step_lowers_the_held_out_cost():
    """Random tokens with alternating labels: the design half's gradient does not generalise to the other half,
    and every step of the grid raises its cost.  The factors still need a non-zero product to train, so the
    smallest step is taken and its (higher) held-out cost reported."""
    system = _system()
    ctrl = build("costate_lora", system, rank=2, design_batch=_batch(6, 5, seed=6))
    r = ctrl.report
    assert all(j > r["J0_search"] for j, _ in r["grid"])
    assert r["step"] == r["grid"][-1][1] == min(eta for _, eta in r["grid"]) > 0
    assert r["J_search"] == r["grid"][-1][0]


# --- closed-loop prefix ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["random:bert", "random:gpt2"])
def test_closed_loop_prefix_feeds_back_the_state_and_trains(name):
    system = _system(name)
    ctrl = build("closed_loop_prefix", system, n_prefix=3, rank=2)
    batch = _batch(2, 5, seed=7)
    J = system.cost(batch)
    J.backward()
    grads = {c.name: c.param.grad for c in ctrl.controls()}
    assert all(float(grads[n].abs().max()) > 0 for n in grads if ".V" not in n)  # P0 and U (U = 0 at init)
    with torch.no_grad():
        for p in ctrl.prefixes.values():
            p.U_key.normal_(0, 0.1)
            p.U_value.normal_(0, 0.1)
    system.zero_grad()
    system.cost(batch).backward()
    assert all(float(c.param.grad.abs().max()) > 0 for c in ctrl.controls())

    with torch.no_grad():
        system.rollout(batch)
        key, value = ctrl._prefix_for(1, 2)
        assert key.shape == (2, *ctrl.prefixes["1"].P0_key.shape)
        assert float((key[0] - key[1]).abs().max()) > 1e-6  # each sequence gets its own prefix
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][0, 1] += 1
        system.rollout(changed)
        key2, _ = ctrl._prefix_for(1, 2)
        assert float((key2[0] - key[0]).abs().max()) > 1e-6  # ... a function of its state
        assert torch.equal(key2[1], key[1])


def test_open_loop_prefix_is_input_independent():
    system = _system()
    ctrl = build("closed_loop_prefix", system, n_prefix=2, rank=0)
    with torch.no_grad():
        system.rollout(_batch(2, 4))
        key, value = ctrl._prefix_for(0, 2)
    assert torch.equal(key[0], key[1]) and torch.equal(value[0], value[1])


# --- Riccati controller ------------------------------------------------------------------------------
def test_riccati_feedback_designs_a_trainable_low_rank_feedback():
    system = _system()
    batch = _batch(6, 5, seed=8)
    with torch.no_grad():
        j0 = float(system.cost(batch))
    ctrl = build("riccati_feedback", system, rank=2, state_dim=6, design_batch=batch)
    assert ctrl.report["predicted_dJ"] < 0
    J = system.cost(batch)
    # the designed feedback lowers the cost, by about what the linear-quadratic model of the blocks predicts
    # (a second-order model of a nonlinear system: measured -0.228 against -0.214)
    assert float(J.detach()) < j0
    assert float(J.detach()) - j0 == pytest.approx(ctrl.report["predicted_dJ"], rel=0.25)
    J.backward()
    assert all(float(c.param.grad.abs().max()) > 0 for c in ctrl.controls())
    assert ctrl.n_trainable() == system.n_layers * (2 * system.d_model * 2 + 2)
    for d in ctrl.deltas.values():
        assert torch.allclose(d.U.T @ d.U, torch.eye(2, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match="rank <= state_dim"):
        build("riccati_feedback", _system(), rank=4, state_dim=2, design_batch=batch)
    # Two sequences cannot span eight control directions: a clear refusal, not a shape error inside dlqr.
    with pytest.raises(ValueError, match="n_design >= 8"):
        build("riccati_feedback", _system(), rank=8, state_dim=16, design_batch=_batch(2, 5, seed=8))


# --- placement -----------------------------------------------------------------------------------------
def test_greedy_allocation_respects_budget_exactly():
    rnd = random.Random(0)
    for trial in range(200):
        names = [f"m{i}" for i in range(rnd.randint(1, 5))]
        gains = {n: sorted((rnd.random() for _ in range(rnd.randint(0, 4))), reverse=True) for n in names}
        costs = {n: rnd.randint(1, 9) for n in names}
        budget = rnd.randint(0, 30)
        units = greedy_allocate(gains, costs, budget)
        used = allocation_cost(units, costs)
        assert used <= budget
        left = [costs[n] for n in names if units[n] < len(gains[n])]
        assert not left or min(left) > budget - used, trial  # nothing else fits
        if len(set(costs.values())) == 1:  # equal costs: greedy is optimal for concave gains
            best = max(sum(sum(gains[n][:u]) for n, u in zip(names, us))
                       for us in itertools.product(*(range(len(gains[n]) + 1) for n in names))
                       if sum(us) * costs[names[0]] <= budget)
            assert abs(sum(sum(gains[n][:units[n]]) for n in names) - best) < 1e-12
    with pytest.raises(ValueError, match="non-increasing"):
        greedy_allocate({"a": [1.0, 2.0]}, {"a": 1}, 5)


def test_gramian_lora_stays_within_lora_budget():
    system = _system()
    ctrl = build("gramian_lora", system, rank=2, design_batch=_batch(4, 5, seed=9))
    lora = build("lora", _system(), rank=2, targets=["q", "v"])
    assert ctrl.n_trainable() == ctrl.report["used"] <= ctrl.report["budget"] == lora.n_trainable()
    assert ctrl.report["budget"] - ctrl.report["used"] < 2 * 2 * system.d_model  # not even a q-sized unit left
    assert len(ctrl.report["chosen"]) >= 1


def test_closed_loop_prefix_survives_a_deep_copy():
    """A float64 twin of a float32 system must use its own copy of the feedback, not the original's: with the
    feedback switched on and the original's captured states left stale (another batch ran last), the twin's
    output equals that of a system built afresh from the same parameters and cast to float64, to rounding
    (a twin calling the original's float32 prefix, or reading its stale states, misses by about 1e-7 or more)."""
    import copy

    import controltune as ct
    from controltune.controllers import build
    from controltune.controllers.designed.closed_loop_prefix import ClosedLoopPrefix

    def built() -> ct.ResidualSystem:
        loaded = ct.load_model("random:bert", dtype="float32")
        system = ct.ResidualSystem(loaded)
        build("closed_loop_prefix", system, rank=2)
        return system

    system = built()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in system.named_parameters():
            if ".U_" in name or ".P0_" in name:  # the feedback is zero at initialisation: switch it on
                param.copy_(0.5 * torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype))
    tokenizer = ct.load_model("random:bert", dtype="float32").tokenizer
    batch = dict(tokenizer(["a fine film .", "dull"], padding=True, return_tensors="pt"))
    other = dict(tokenizer(["something else entirely , and longer", "no"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        system(other)  # the original's captured states are now those of another batch
    twin = copy.deepcopy(system).to(torch.float64)
    fresh = built()
    fresh.load_state_dict(system.state_dict())
    fresh = fresh.to(torch.float64)
    with torch.no_grad():
        out64, expected = twin(batch), fresh(batch)
        twin_ctrl = next(m for m in twin.modules() if isinstance(m, ClosedLoopPrefix))
        key, value = twin_ctrl._prefix_for(0, 2)
    assert out64.dtype == key.dtype == value.dtype == torch.float64
    assert torch.allclose(out64, expected, rtol=0, atol=1e-12), float((out64 - expected).abs().max())
    with torch.no_grad():
        assert float((out64 - system(batch).double()).abs().max()) > 1e-9  # the float32 original: rounding


@pytest.mark.parametrize("name", ["random:gpt2", "random:llama"])
def test_riccati_feedback_wraps_whole_blocks_of_decoders(name):
    """The feedback wraps the whole block; the decoder's block call must still find its attention."""
    from controltune.verification import verify

    system = _system(name)
    build("riccati_feedback", system, rank=2, state_dim=4, design_batch=_batch(6, 5, seed=3))
    system.eval()
    report = verify(system, _batch(2, 5, seed=4), fd=False)
    assert report.passed, report.failures()
