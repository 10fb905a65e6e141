"""Specification, diff-pruning, masking, subspace and full fine-tuning controllers on the tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import scipy.linalg
import torch

import controltune as ct
from controltune.controllers import REGISTRY, UnsupportedMethodError, build
from controltune.controllers.diff_pruning import hard_concrete, hard_concrete_mode, prob_nonzero
from controltune.controllers.masking import straight_through_mask
from controltune.controllers.param_delta import block_parameters
from controltune.fastfood import FastfoodProjection, fwht, hadamard
from controltune.system import ResidualSystem
from controltune.zoo import LoadedModel

torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead on a shared machine

FAMILIES = ("bert", "roberta", "gpt2", "llama")
# (method, options) pairs; bitfit on LLaMA is refused (tested separately).
METHODS = [
    ("bitfit", {}), ("layernorm", {}), ("last_layer", {"n_layers": 2}), ("selective", {"budget": 0.2}),
    ("arbitrary", {"budget": 300, "group_size": 7}), ("diff_pruning", {}), ("masking", {}),
    ("subspace", {"which": "dense", "dim": 8}), ("subspace", {"which": "fastfood", "dim": 8}), ("full", {}),
]
CASES = [(f, m, o) for f in FAMILIES for m, o in METHODS if not (f == "llama" and m == "bitfit")]
IDS = [f"{f}-{m}-{o.get('which', '')}".rstrip("-") for f, m, o in CASES]


_LOADED: dict[str, LoadedModel] = {}


def make_system(family: str) -> ResidualSystem:
    """A fresh float64 system on a private copy of the (seeded, cached) random model."""
    if family not in _LOADED:
        _LOADED[family] = ct.load_model(f"random:{family}", dtype="float64")
    base = _LOADED[family]
    return ResidualSystem(LoadedModel(base.name, copy.deepcopy(base.model), base.tokenizer, base.family))


def make_batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (2, 6), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}


def perturb(controller, scale: float = 1e-2, seed: int = 1) -> None:
    """Move every control off its initial value (so gradients through products are non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in controller.controls():
            c.param.add_(scale * torch.randn(c.param.shape, generator=gen, dtype=c.param.dtype))


@pytest.mark.parametrize(("family", "method", "options"), CASES, ids=IDS)
def test_identity_at_init_and_gradients_reach_every_control(family, method, options):
    system, batch = make_system(family), make_batch()
    with torch.no_grad():
        bare = system(batch)
    controller = build(method, system, **options)
    with torch.no_grad():
        assert (system(batch) - bare).abs().max().item() <= 1e-12
    assert controller.n_trainable() > 0 and controller.method == method and controller.form
    if method in ("diff_pruning", "masking"):
        # At init w = 0 (diff pruning) blocks the task gradient to log α; a masking score near the
        # threshold is still kept.  Move off the identity so every product has a live factor.
        perturb(controller, 1e-3)
    controls = controller.controls()
    grads = torch.autograd.grad(system.cost(batch), [c.param for c in controls], allow_unused=True)
    dead = [c.name for c, g in zip(controls, grads) if g is None or not g.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("family", FAMILIES)
def test_control_kinds(family):
    decoder = family in ("gpt2", "llama")
    kinds = {c.kind for c in build("layernorm", make_system(family)).controls()}
    assert kinds == ({"layer", "term"} if decoder else {"layer"})
    full = build("full", make_system(family))
    kinds = {c.kind for c in full.controls()}
    assert kinds == ({"layer", "init", "term"} if decoder else {"layer", "init"})
    system = make_system(family)
    z = build("subspace", system, dim=4).controls()
    assert len(z) == 1 and z[0].kind == "shared" and z[0].layers == tuple(range(system.n_layers))


def test_bitfit_refuses_llama():
    with pytest.raises(UnsupportedMethodError, match="llama.*layernorm"):
        build("bitfit", make_system("llama"))


def test_full_covers_exactly_the_used_parameters():
    system = make_system("bert")
    full = build("full", system)
    names = {c.name for c in full.controls()}
    assert not any("pooler" in n for n in names)  # never used by the rollout
    head = {id(p) for p in system.readout.head.parameters()}
    assert {id(p) for p in system.model.parameters() if p.requires_grad} == \
        {id(c.param) for c in full.controls()} - head
    gpt2 = make_system("gpt2")
    full = build("full", gpt2)
    params = [c.param for c in full.controls()]
    assert len({id(p) for p in params}) == len(params)  # the tied word table is one control
    assert n_params(gpt2) == sum(p.numel() for p in params)


def n_params(system) -> int:
    return sum(p.numel() for p in system.model.parameters())


def test_full_delta_and_weight_decay():
    system, batch = make_system("gpt2"), make_batch()
    full = build("full", system, weight_decay=0.3)
    assert all(d.abs().max() == 0 for d in full.delta().values())
    perturb(full)
    deltas = full.delta()
    for where, kind in ((1, "layer"), ("init", "init"), ("term", "term")):
        chosen = [c for c in full.controls() if c.kind == kind and (kind != "layer" or c.layers == (where,))]
        expect = sum(0.15 * deltas[c.name].pow(2).sum() for c in chosen)
        assert torch.allclose(full.running_cost(where), expect, rtol=1e-12, atol=0)
    assert system.cost(batch).requires_grad


# --- budgets and seeds ------------------------------------------------------------------------


def selection(controller) -> dict[str, list[int] | int]:
    """Which positions a selection controller tunes, by control name."""
    out = {}
    for c in controller.controls():
        key = c.name.split(".", 1)[1]
        delta = next(d for d in controller.deltas.values() if any(p is c.param for p in d.u.values()))
        name = key.rsplit(".", 1)[1]
        pos = delta.positions(name)
        out[key] = pos.tolist() if pos is not None else c.param.numel()
    return out


@pytest.mark.parametrize("family", ("bert", "gpt2", "llama"))
@pytest.mark.parametrize("budget", (0.15, 5000))
def test_selective_budget_is_respected_and_filled(family, budget):
    system = make_system(family)
    total = sum(s.numel() for s in block_parameters(system))
    cap = round(budget * total) if isinstance(budget, float) else budget
    sel = build("selective", system, budget=budget, seed=3)
    slack = cap - sel.n_trainable()
    assert 0 <= slack
    chosen = {s.path for s in sel.sites}
    module_sizes: dict[str, int] = {}
    for s in block_parameters(make_system(family)):
        module_sizes[s.path] = module_sizes.get(s.path, 0) + s.numel()
    left_out = [n for path, n in module_sizes.items() if path not in chosen]
    assert all(n > slack for n in left_out), "first fit: no module left out fits in what remains"


@pytest.mark.parametrize("family", ("roberta", "gpt2", "llama"))
@pytest.mark.parametrize(("budget", "group_size"), ((777, 1), (1000, 7), (0.05, 64)))
def test_arbitrary_budget_is_exact_and_delta_lives_on_the_positions(family, budget, group_size):
    system, batch = make_system(family), make_batch()
    total = sum(s.numel() for s in block_parameters(system))
    count = round(budget * total) if isinstance(budget, float) else budget
    arb = build("arbitrary", system, budget=budget, group_size=group_size, seed=5)
    assert arb.n_trainable() == count
    for positions in selection(arb).values():
        assert len(set(positions)) == len(positions)
    perturb(arb)
    changed = 0
    for delta in arb.deltas.values():
        owner = _owner(system, delta)
        for name, eff in delta.effective(owner).items():
            changed += int((eff != getattr(owner, name)).sum())
    assert changed == count
    assert system.cost(batch).isfinite()


@pytest.mark.parametrize("method", ("selective", "arbitrary"))
def test_same_seed_same_selection_other_seed_different(method):
    pick = {"selective": {"budget": 0.2}, "arbitrary": {"budget": 500, "group_size": 4}}[method]
    first = selection(build(method, make_system("bert"), seed=11, **pick))
    again = selection(build(method, make_system("bert"), seed=11, **pick))
    other = selection(build(method, make_system("bert"), seed=12, **pick))
    assert first == again and first != other


def test_budget_and_layer_errors():
    with pytest.raises(ValueError, match="fraction"):
        build("selective", make_system("bert"), budget=1.5)
    with pytest.raises(ValueError, match="between 1 and"):
        build("arbitrary", make_system("bert"), budget=10 ** 9)
    with pytest.raises(UnsupportedMethodError, match="smallest module"):
        build("selective", make_system("bert"), budget=10)
    with pytest.raises(UnsupportedMethodError, match="n_layers=4"):
        build("last_layer", make_system("bert"), n_layers=4)
    with pytest.raises(UnsupportedMethodError, match="out of range"):
        build("diff_pruning", make_system("bert"), layers=[7])
    with pytest.raises(ValueError, match="projection"):
        REGISTRY["subspace"](which="gaussian")


@pytest.mark.parametrize("family", ("bert", "gpt2"))
def test_composes_with_controllers_already_wrapping_the_modules(family):
    system, batch = make_system(family), make_batch()
    with torch.no_grad():
        bare = system(batch)
    stack = [build("lora", system, targets=("v", "o")), build("bitfit", system), build("masking", system),
             build("diff_pruning", system, layers=[0]), build("subspace", system, dim=4, which="fastfood"),
             build("layernorm", system), build("arbitrary", system, budget=100)]
    assert max(s.inner.count("base_layer") for s in block_parameters(system)) >= 5  # wrappers five deep
    with torch.no_grad():
        assert (system(batch) - bare).abs().max().item() <= 1e-12
    # bitfit's bias delta sits on the same module as LoRA, masking, diff pruning and the subspace.
    for c in stack:
        perturb(c, 1e-3)
    params = [c.param for ctrl in stack for c in ctrl.controls()]
    grads = torch.autograd.grad(system.cost(batch), params, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("masking_first", (True, False))
def test_stacked_weight_deltas_compose_exactly(masking_first):
    """Masking and BitFit on the same map, in either order, are ``W ⊙ m`` and ``b + Δb`` together."""
    system, batch = make_system("bert"), make_batch()
    order = ("masking", "bitfit") if masking_first else ("bitfit", "masking")
    ctrl = {m: build(m, system, **({"targets": ("ffn_in",), "layers": [1]} if m == "masking" else {}))
            for m in order}
    scores = ctrl["masking"].controls()[0].param
    with torch.no_grad():
        scores.copy_(0.01 * torch.randn(scores.shape, generator=torch.Generator().manual_seed(0), dtype=scores.dtype))
    perturb(ctrl["bitfit"])
    reference = make_system("bert")
    params = dict(reference.base.named_parameters())
    with torch.no_grad():
        params["encoder.layer.1.intermediate.dense.weight"].mul_((scores > ctrl["masking"].threshold).to(scores))
        for c in ctrl["bitfit"].controls():
            site = next(s for s in block_parameters(reference) if f"bitfit.{s.label}" == c.name)
            params[f"{site.path}.{site.name}"].add_(c.param)
        assert torch.allclose(system(batch), reference(batch), rtol=0, atol=1e-12)


# --- diff pruning -----------------------------------------------------------------------------


def test_expected_l0_matches_monte_carlo():
    log_alpha = torch.linspace(-4.0, 4.0, 9, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    u = torch.rand(n, 9, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    z = hard_concrete(log_alpha.expand(n, 9), u)
    assert z.min() >= 0 and z.max() <= 1
    freq = (z > 0).to(torch.float64).mean(0)
    # Binomial standard error <= 0.5/√n = 0.0025; 0.0125 is five of them.
    assert (freq - prob_nonzero(log_alpha)).abs().max() < 0.0125
    assert prob_nonzero(log_alpha)[0] < 0.1 and prob_nonzero(log_alpha)[-1] > 0.99  # the test is not vacuous
    assert torch.equal(hard_concrete_mode(torch.tensor([5.0, -5.0])), torch.tensor([1.0, 0.0]))


def test_diff_pruning_running_cost_is_the_expected_l0():
    system = make_system("gpt2")
    dp = build("diff_pruning", system, l0_penalty=0.01, init_log_alpha=0.5, weight_decay=0.2)
    perturb(dp)
    for layer in range(system.n_layers):
        sites = [s for s in dp._sites if s.layer == layer]
        la = torch.cat([dp._delta(s).log_alpha[s.name].reshape(-1) for s in sites])
        w = torch.cat([dp._delta(s).w[s.name].reshape(-1) for s in sites])
        expect = 0.01 * prob_nonzero(la).sum() + 0.1 * w.pow(2).sum()
        assert torch.allclose(system.running_cost(layer), expect, rtol=1e-12, atol=0)


def test_diff_pruning_gates_are_sampled_in_training_and_deterministic_in_eval():
    dp = build("diff_pruning", make_system("llama"), init_log_alpha=0.0)
    perturb(dp)
    site = dp._sites[0]
    delta = dp._delta(site)
    delta.train()
    torch.manual_seed(0)
    first, second = delta.gate(site.name), delta.gate(site.name)
    assert not torch.equal(first, second) and first.min() >= 0 and first.max() <= 1
    delta.eval()
    assert torch.equal(delta.gate(site.name), hard_concrete_mode(delta.log_alpha[site.name]))


@pytest.mark.parametrize("family", ("bert", "llama"))
def test_diff_pruning_projection_keeps_exactly_the_top_k(family):
    system, batch = make_system(family), make_batch()
    dp = build("diff_pruning", system)
    perturb(dp, 1.0)  # log α ~ 5 ± 1: some deterministic gates fall below 1
    system.eval()
    before = dp.diff_vector()
    k = 1234
    assert dp.project(k) == k
    after = dp.diff_vector()
    top = torch.topk(before.abs(), k).indices
    assert int((after != 0).sum()) == k
    assert torch.equal(after[top], before[top])
    masks = torch.cat([getattr(dp._delta(s), f"mask_{s.name}").reshape(-1) for s in dp._sites])
    assert int(masks.sum()) == k
    assert not any(c.name.endswith("log_alpha") for c in dp.controls())
    # The forward pass is the bare model's with θ₀ + Δθ (projected) written in.
    reference = make_system(family)
    params, start = dict(reference.base.named_parameters()), 0
    with torch.no_grad():
        for s in dp._sites:
            params[f"{s.path}.{s.name}"].add_(after[start:start + s.numel()].view(s.param.shape))
            start += s.numel()
        assert torch.allclose(system(batch), reference(batch), rtol=0, atol=1e-12)
    system.train()  # frozen masks: the gates are deterministic in training mode too
    assert torch.equal(torch.cat([dp._delta(s).diff(s.name).reshape(-1) for s in dp._sites]), after)
    with pytest.raises(RuntimeError, match="already"):
        dp.project(k)


# --- masking ----------------------------------------------------------------------------------


def test_straight_through_mask_is_exactly_binary():
    s = torch.tensor([0.1, -0.2, 0.004, 0.006], dtype=torch.float64, requires_grad=True)
    m = straight_through_mask(s, 0.005)
    assert torch.equal(m, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    (m * torch.arange(4.0, dtype=torch.float64)).sum().backward()
    assert torch.equal(s.grad, torch.arange(4.0, dtype=torch.float64))


@pytest.mark.parametrize("family", ("bert", "gpt2"))
def test_masking_gradient_is_effective_weight_gradient_times_weight(family):
    batch = make_batch()
    system = make_system(family)
    masking = build("masking", system, targets=("ffn_in",), layers=[1])
    site = masking._sites[0]
    scores = masking.controls()[0].param
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial mask: about a third of the weights dropped
        scores.copy_(0.01 * torch.randn(scores.shape, generator=gen, dtype=scores.dtype))
    mask = (scores > masking.threshold).to(scores.dtype)
    assert 0 < mask.mean() < 1
    g_scores = torch.autograd.grad(system.cost(batch), scores)[0]
    # Reference: the bare model with W ⊙ m written in, differentiated w.r.t. that effective weight.
    reference = make_system(family)
    weight = dict(reference.base.named_parameters())[site.path.replace(".base_layer", "") + "." + site.name]
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(mask)
    weight.requires_grad_(True)
    g_eff = torch.autograd.grad(reference.cost(batch), weight)[0]
    assert torch.allclose(g_scores, g_eff * original, rtol=1e-10, atol=1e-14)
    assert g_scores.abs().max() > 0
    with torch.no_grad():
        assert torch.equal(system(batch), reference(batch))
    assert masking.density() == pytest.approx(float(mask.mean()))


# --- subspace ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_radix", (2, 8, 128))
@pytest.mark.parametrize("n", (1, 2, 8, 16, 64, 512))
def test_walsh_hadamard_is_sylvester_and_orthogonal_up_to_scale(n, max_radix):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    h = torch.from_numpy(scipy.linalg.hadamard(n)).to(torch.float64)
    assert torch.equal(hadamard(n), h)
    assert torch.allclose(fwht(x, max_radix), x @ h.T, rtol=0, atol=1e-12)
    assert torch.allclose(fwht(fwht(x, max_radix), max_radix), n * x, rtol=0, atol=1e-11)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(fwht(eye, max_radix) @ fwht(eye, max_radix).T, n * eye, rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(6))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_walsh_hadamard_derivatives():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    for max_radix in (2, 8):  # recursion of two and five levels
        def transform(v, r=max_radix):
            return fwht(v, r)
        assert torch.autograd.gradcheck(transform, (x,), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(transform, (x,))


def test_walsh_hadamard_batches_under_vmap():
    """The verifier carries perturbed states through blocks with ``vmap``; a transform vmap cannot
    batch sends it to a per-state loop (SmolLM2's Fastfood subspace check took 4x longer)."""
    from torch.func import jvp, vmap

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    z, t = torch.randn(64, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen, dtype=torch.float64)
    h = torch.from_numpy(scipy.linalg.hadamard(64)).to(torch.float64)
    assert torch.allclose(vmap(lambda v: fwht(v, 8))(x), x @ h, rtol=0, atol=1e-12)
    # An unbatched transform (the projection of z) inside a batched function, and its JVP.
    assert torch.allclose(vmap(lambda v: v * fwht(z, 8))(x), x * (z @ h), rtol=0, atol=1e-12)
    tangents = vmap(lambda v: jvp(lambda u: v * fwht(u, 8), (z,), (t,))[1])(x)
    assert torch.allclose(tangents, x * (t @ h), rtol=0, atol=1e-12)


def test_fastfood_equals_explicit_hgphb():
    like = torch.zeros((), dtype=torch.float64)
    proj = FastfoodProjection(n_out=37, dim=5, gen=torch.Generator().manual_seed(0), like=like)
    n = proj.block
    assert n == 8 and proj.n_blocks == 5
    h = torch.from_numpy(scipy.linalg.hadamard(n)).to(torch.float64)
    blocks = []
    for i in range(proj.n_blocks):
        perm = torch.zeros(n, n, dtype=torch.float64)
        perm[torch.arange(n), proj.perm[i]] = 1.0  # (Π v)_k = v_{perm[k]}
        v = h @ torch.diag(proj.gauss[i]) @ perm @ h @ torch.diag(proj.sign[i])
        blocks.append(proj.scale[i] * v)
        # Each block has exactly unit-norm columns.
        assert torch.allclose(blocks[-1].norm(dim=0), torch.ones(n, dtype=torch.float64), atol=1e-12)
    explicit = torch.cat(blocks)[:37, :5]
    z = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(proj(z), explicit @ z, rtol=0, atol=1e-10)
    assert torch.allclose(proj.dense(), explicit, rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ("dense", "fastfood"))
def test_subspace_projection_has_unit_columns_and_seeded(which):
    sub = build("subspace", make_system("bert"), dim=6, which=which, seed=4)
    p = sub.projection_matrix()
    assert p.shape == (sum(s.numel() for s in block_parameters(make_system("bert"))), 6)
    norms = p.norm(dim=0)
    if which == "dense":
        assert torch.allclose(norms, torch.ones(6, dtype=p.dtype), atol=1e-12)
    else:  # the last Fastfood block of each module is truncated: norms slightly below 1
        assert bool((norms <= 1 + 1e-12).all()) and bool((norms > 0.9).all())
    same = build("subspace", make_system("bert"), dim=6, which=which, seed=4).projection_matrix()
    other = build("subspace", make_system("bert"), dim=6, which=which, seed=5).projection_matrix()
    assert torch.equal(p, same) and not torch.allclose(p, other)
    assert list(sub.state_dict()) == ["z"]  # the projection is rebuilt from the seed, never saved


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ("dense", "fastfood"))
def test_subspace_per_block_vjps_sum_to_the_gradient(family, which):
    system, batch = make_system(family), make_batch()
    sub = build("subspace", system, dim=8, which=which)
    with torch.no_grad():
        sub.z.copy_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    traj = system.rollout(batch)
    cost = system.terminal_cost(traj.final, traj.ctx, batch)
    adjoints = torch.autograd.grad(cost, traj.states[1:], retain_graph=True)
    total = torch.autograd.grad(cost, sub.z)[0]
    parts = [torch.autograd.grad(system.step(layer, traj.states[layer].detach(), traj.ctx), sub.z,
                                 grad_outputs=adjoints[layer])[0] for layer in range(system.n_layers)]
    assert all(p.abs().max() > 0 for p in parts)
    assert torch.allclose(torch.stack(parts).sum(0), total, rtol=0, atol=1e-10)
    # The effective parameters really are θ₀ + P z (θ in block_parameters order).
    sites = block_parameters(make_system(family))
    theta0 = torch.cat([s.param.reshape(-1) for s in sites])
    moved = torch.cat([eff.reshape(-1) for d in sub.deltas.values()
                       for eff in d.effective(_owner(system, d)).values()])
    assert math.isclose((moved - theta0 - sub.projection_matrix() @ sub.z).abs().max().item(), 0.0, abs_tol=1e-12)


def _owner(system, delta):
    return next(m for m in system.modules() if getattr(m, "delta", None) is delta).base_layer


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_linear_probe_leaves_the_trajectory_and_trains_only_the_head(family):
    system = make_system(family)
    batch = make_batch()
    before = system(batch).detach()
    probe = build("linear_probe", system)
    assert probe.controls() == [] and probe.n_trainable() == 0
    head = {id(p) for p in system.readout.head.parameters()}
    assert {id(c.param) for c in system.controls()} == head  # the optimiser sees the head alone
    torch.testing.assert_close(system(batch), before, rtol=0, atol=0)  # no Δ anywhere in the rollout
    blocks = {n: p.detach().clone() for n, p in system.model.named_parameters()}
    opt = torch.optim.SGD([c.param for c in system.controls()], lr=0.5)
    system.cost(batch).backward()
    opt.step()
    assert not torch.allclose(system(batch), before)  # the head moved the logits
    assert all(torch.equal(p, blocks[n]) for n, p in system.model.named_parameters())
