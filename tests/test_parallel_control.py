"""State-based parallel control (``parallel_control``, Zhang et al., ICML 2025) on tiny random models."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import make_batch

import controltune as ct
from controltune.controllers import build
from controltune.controllers.base import construct
from controltune.verification import verify
from controltune.zoo import LoadedModel

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["random:bert", "random:gpt2", "random:llama"]
# Where each HF block keeps the state entering its FFN sub-block (module, argument index): written
# with HF's own attribute names, independently of the controller's role table.
FFN_STATE = {"random:bert": ("output", 1), "random:gpt2": ("ln_2", 0), "random:llama": ("post_attention_layernorm", 0)}


@functools.cache
def _pristine(name: str, dtype: str) -> LoadedModel:
    return ct.load_model(name, dtype=dtype, seed=0)


def _system(name: str = "random:bert", dtype: str = "float64") -> tuple[ct.ResidualSystem, dict]:
    base = _pristine(name, dtype)
    loaded = LoadedModel(base.name, copy.deepcopy(base.model), base.tokenizer, base.family)
    system = ct.ResidualSystem(loaded, seed=0)
    system.eval()
    return system, make_batch(loaded.tokenizer, 3)


def _perturb(controller, scale: float = 0.1, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in controller.controls():
            c.param.add_(scale * torch.randn(c.param.shape, generator=gen, dtype=torch.float64).to(c.param))


def _captured(system, layer: int, name: str, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_{l+1}, m_l)``: block ``layer``'s output on ``x`` and the FFN-entry state seen by HF's module."""
    module_name, arg = FFN_STATE[name]
    seen = {}
    handle = system.blocks[layer].get_submodule(module_name).register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("m", args[arg]))
    try:
        with torch.no_grad():
            out = system.step(layer, x, ctx)
    finally:
        handle.remove()
    return out, seen["m"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("sublayers", [("ffn",), ("attn", "ffn")])
def test_zero_delta_at_init(name, sublayers):
    system, batch = _system(name)
    with torch.no_grad():
        before = system.rollout(batch).states
        logits = system(batch)
    ctrl = build("parallel_control", system, rank=4, sublayers=sublayers)
    assert all(float(c.param.detach().abs().max()) == 0 for c in ctrl.controls() if c.name.endswith(".B"))
    assert all(float(c.param.detach().abs().max()) > 0 for c in ctrl.controls() if c.name.endswith(".A"))
    with torch.no_grad():
        after = system.rollout(batch).states
        assert torch.equal(system(batch), logits)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    copy.deepcopy(system)  # no graph or state is kept between passes


@pytest.mark.parametrize("name", FAMILIES)
def test_block_is_frozen_block_plus_low_rank_feedback_of_the_ffn_entry_state(name):
    """``x_{l+1} = ffn_l(m_l) + α (m_l Aᵀ) Bᵀ`` with ``m_l`` the state HF's block feeds its FFN sub-block."""
    frozen, batch = _system(name)
    system, _ = _system(name)
    ctrl = build("parallel_control", system, rank=3, alpha=0.7)
    _perturb(ctrl)
    with torch.no_grad():
        traj = frozen.rollout(batch)
    layer = 1
    x = traj.states[layer] + 0.1 * torch.randn(traj.states[layer].shape, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(2))
    expected_next, m = _captured(frozen, layer, name, x, traj.ctx)
    got_next, m_seen = _captured(system, layer, name, x, traj.ctx)
    g = ctrl.deltas[f"{layer}_ffn"].control
    assert torch.equal(m_seen, m)
    delta = 0.7 * (m @ g.A.T) @ g.B.T
    assert float((got_next - expected_next - delta).abs().max()) <= 1e-12
    assert float(delta.abs().max()) > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_side_control_reads_the_block_input_and_moves_the_ffn_entry_state(name):
    """``m_l = attn_l(x_l) + α (x_l A'ᵀ) B'ᵀ`` (the paper's double control)."""
    frozen, batch = _system(name)
    system, _ = _system(name)
    ctrl = build("parallel_control", system, rank=2, sublayers="attn")
    _perturb(ctrl)
    with torch.no_grad():
        traj = frozen.rollout(batch)
    layer = 2
    x = traj.states[layer]
    _, m = _captured(frozen, layer, name, x, traj.ctx)
    _, m_ctrl = _captured(system, layer, name, x, traj.ctx)
    g = ctrl.deltas[f"{layer}_attn"].control
    assert float((m_ctrl - m - (x @ g.A.T) @ g.B.T).abs().max()) <= 1e-12


@pytest.mark.parametrize(("options", "n_layers", "n_sub"), [
    ({"rank": 4}, 3, 1), ({"rank": 2, "sublayers": ["attn", "ffn"]}, 3, 2), ({"rank": 5, "layers": [0, -1]}, 2, 1)])
def test_shapes_and_trainable_count(options, n_layers, n_sub):
    system, _ = _system("random:bert")
    ctrl = build("parallel_control", system, **options)
    d, r = system.d_model, options["rank"]
    controls = ctrl.controls()
    assert ctrl.n_trainable() == n_layers * n_sub * 2 * d * r
    assert len(controls) == 2 * n_layers * n_sub and {c.kind for c in controls} == {"layer"}
    for c in controls:
        layer = int(c.name.split(".")[1])
        assert c.layers == (layer,)
        assert tuple(c.param.shape) == ((r, d) if c.name.endswith(".A") else (d, r))
        assert c.param.dtype == torch.float64
    if "layers" in options:
        assert sorted({c.layers[0] for c in controls}) == [0, system.n_layers - 1]
    # the controller's controls are the system's, besides the head
    assert {c.name for c in controls} <= {c.name for c in system.controls()}


def test_init_options_and_seed():
    system, _ = _system("random:bert")
    d = system.d_model
    kaiming = build("parallel_control", system, rank=8, seed=3)
    a = kaiming.controls()[0].param
    assert float(a.abs().max()) <= 1 / d ** 0.5
    system2, _ = _system("random:bert")
    again = build("parallel_control", system2, rank=8, seed=3)
    assert all(torch.equal(p.param, q.param) for p, q in zip(kaiming.controls(), again.controls()))
    system3, _ = _system("random:bert")
    normal = build("parallel_control", system3, rank=8, init_std=0.02, seed=3)
    stds = [float(c.param.std()) for c in normal.controls() if c.name.endswith(".A")]
    assert all(0.015 < s < 0.025 for s in stds), stds


def test_minilm_default_budget_equals_lora_r8_on_q_v():
    loaded = ct.load_model("minilm")
    pc = build("parallel_control", ct.ResidualSystem(copy.deepcopy(loaded)))
    lora = build("lora", ct.ResidualSystem(loaded), rank=8, targets=["q", "v"])
    assert pc.n_trainable() == lora.n_trainable() == 6 * 2 * 384 * 16


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 0}, "parallel_control: rank must be an integer >= 1, got 0"),
    ({"rank": 2.5}, "parallel_control: rank must be an integer >= 1, got 2.5"),
    ({"alpha": 0}, "parallel_control: alpha must be a positive number, got 0"),
    ({"init_std": -0.1}, "parallel_control: init_std must be a positive number"),
    ({"sublayers": []}, "parallel_control: sublayers must be distinct names among ('attn', 'ffn')"),
    ({"sublayers": "mlp"}, "parallel_control: sublayers must be distinct names among ('attn', 'ffn')"),
    ({"sublayers": ["ffn", "ffn"]}, "parallel_control: sublayers must be distinct names"),
    ({"bottleneck": 4}, "parallel_control has no option 'bottleneck'"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError) as info:
        construct("parallel_control", options)
    assert message in str(info.value)


def test_bad_layers_are_refused():
    system, _ = _system("random:bert")
    with pytest.raises(ValueError, match="layers \\[7\\] out of range"):
        build("parallel_control", system, layers=[7])


@pytest.mark.parametrize("name", ["random:bert", "random:llama"])
def test_verify_passes_all_three_legs(name):
    system, _ = _system(name)
    ctrl = build("parallel_control", system, rank=2, sublayers=["attn", "ffn"], weight_decay=0.1)
    _perturb(ctrl, 0.05)
    batch = make_batch(_pristine(name, "float64").tokenizer, 2)
    report = verify(system, batch, n_state_directions=1)
    assert report.passed, report.failures()
    assert set(report.legs) == {"autograd", "forward", "fd"}
    assert report.legs["forward"]["max_error"] <= 1e-10 and report.legs["fd"]["max_error"] <= 1e-6
    assert set(report.control_forward) == {c.name for c in system.controls()}


def test_running_cost_is_weight_decay_of_its_layer():
    system, _ = _system("random:bert")
    ctrl = build("parallel_control", system, rank=2, weight_decay=0.3)
    _perturb(ctrl)
    expected = sum(0.5 * 0.3 * c.param.pow(2).sum() for c in ctrl.controls() if c.layers == (1,))
    assert torch.allclose(ctrl.running_cost(1), expected, rtol=1e-12, atol=0)


def test_a_few_steps_reduce_the_loss():
    system, batch = _system("random:bert", "float32")
    ctrl = build("parallel_control", system, rank=4)
    params = [c.param for c in ctrl.controls()]  # only the controller (the head stays as it is)
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = system.cost(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_coexists_with_a_parallel_adapter_on_the_same_block():
    system, batch = _system("random:bert")
    with torch.no_grad():
        logits = system(batch)
    build("parallel_adapter", system, bottleneck=4)
    ctrl = build("parallel_control", system, rank=2)
    with torch.no_grad():
        assert torch.equal(system(batch), logits)
    _perturb(ctrl)
    with torch.no_grad():
        assert float((system(batch) - logits).abs().max()) > 1e-6
