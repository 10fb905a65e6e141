"""Simultaneous and sequential combinations of controllers (tiny random BERT, float64)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from controltune import ResidualSystem, load_model
from controltune.controllers import REGISTRY, build
from controltune.controllers.composition import Sequential, Simultaneous
from controltune.families.base import dense_weight
from controltune.zoo import offline_tokenizer


def _system(seed: int = 0) -> ResidualSystem:
    return ResidualSystem(load_model("random:bert", dtype="float64", seed=seed), seed=0)


def _batch() -> dict:
    tok = offline_tokenizer()
    enc = tok(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt")
    return {**{k: v for k, v in enc.items()}, "labels": torch.tensor([0, 1])}


@torch.no_grad()
def _perturb(controls, seed: int = 0) -> None:
    """Move every control away from its (often zero) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    for c in controls:
        c.param.copy_(0.1 * torch.randn(c.param.shape, generator=gen, dtype=torch.float64))


def test_two_deltas_on_one_linear_map_add_up():
    system = _system()
    combo = build("combination", system, parts=[("lora", {"rank": 2, "targets": "q"}),
                                                ("lora", {"rank": 3, "targets": "q", "seed": 1})])
    _perturb(combo.controls())
    first, second = combo.parts
    q = system.blocks[1].attention.self.query
    x = torch.randn(2, 5, system.d_model, dtype=torch.float64)
    expected = x @ dense_weight(q).T + q.base_layer.base_layer.bias
    for part in (first, second):
        d = part.deltas["1_q"]
        expected = expected + part.alpha / part.rank * x @ (d.B @ d.A).T
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-12)
    names = [c.name for c in combo.controls()]
    assert len(set(names)) == len(names) and any(n.startswith("part1.lora.") for n in names)
    assert combo.n_trainable() == first.n_trainable() + second.n_trainable()


def test_lora_and_bitfit_on_one_map_add_their_deltas():
    system = _system()
    combo = build("combination", system, parts=[("lora", {"rank": 2, "targets": "q"}), ("bitfit", {})])
    _perturb(combo.controls())
    lora = combo.parts[0]
    controls = {c.name: c.param for c in combo.controls()}
    q = system.blocks[1].attention.self.query
    linear = q.base_layer.base_layer
    x = torch.randn(2, 5, system.d_model, dtype=torch.float64)
    d = lora.deltas["1_q"]
    # W x + b  +  Δb (BitFit)  +  s B A x (LoRA)
    expected = x @ linear.weight.T + linear.bias + controls["bitfit.1.q.bias"] + lora.alpha / lora.rank * x @ (
        d.B @ d.A).T
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-12)
    assert combo.n_trainable() == lora.n_trainable() + combo.parts[1].n_trainable()


def test_combination_equals_parts_attached_one_by_one():
    combo_sys, sep_sys = _system(), _system()
    combo = build("combination", combo_sys, parts=[("lora", {"rank": 4, "targets": ["q", "v"]}),
                                                   ("adapter", {"bottleneck": 8})])
    lora, adapter = build("lora", sep_sys, rank=4, targets=["q", "v"]), build("adapter", sep_sys, bottleneck=8)
    _perturb(combo.controls())
    _perturb(lora.controls() + adapter.controls())
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(combo_sys(batch), sep_sys(batch), rtol=0, atol=1e-12)
        # each part changes the output: the combination is not one of them alone
        only_lora = _system()
        lo = build("lora", only_lora, rank=4, targets=["q", "v"])
        _perturb(lo.controls())
        assert (combo_sys(batch) - only_lora(batch)).abs().max() > 1e-4
    info = combo.describe()
    assert [p["method"] for p in info["parts"]] == ["lora", "adapter"]
    assert REGISTRY["lora"].form in combo.form and REGISTRY["adapter"].form in combo.form
    assert info["group"] == "combination" and set(info["modules"]) == {"q", "v", "o", "ffn_out"}


def test_running_cost_is_the_sum_of_the_parts():
    system = _system()
    combo = build("combination", system, parts=[("lora", {"rank": 2, "weight_decay": 0.3}),
                                                ("adapter", {"bottleneck": 4, "weight_decay": 0.7})])
    _perturb(combo.controls())
    lora, adapter = combo.parts
    for where in (0, 2, "init", "term"):
        torch.testing.assert_close(combo.running_cost(where), lora.running_cost(where) + adapter.running_cost(where))
    assert combo.running_cost(1) > 0


def test_sequential_freezes_the_trained_stage():
    system = _system()
    seq = build("sequential", system, stages=[("lora", {"rank": 2}), ("adapter", {"bottleneck": 4})])
    assert seq.stage == 0 and all(c.name.startswith("stage0.lora.") for c in seq.controls())
    lora_controls = seq.controls()
    _perturb(lora_controls)
    batch = _batch()
    with torch.no_grad():
        before = system(batch)
    seq.advance()
    assert all(c.name.startswith("stage1.adapter.") for c in seq.controls())
    assert [c.name for c in seq.frozen_controls()] == [c.name for c in lora_controls]
    assert not any(c.param.requires_grad for c in seq.frozen_controls())
    with torch.no_grad():  # the adapter starts at zero: the frozen LoRA deltas alone act
        torch.testing.assert_close(system(batch), before, rtol=0, atol=1e-12)
    frozen = [c.param.detach().clone() for c in seq.frozen_controls()]
    params = [c.param for c in system.controls()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        system.cost(batch).backward()
        opt.step()
    for c, old in zip(seq.frozen_controls(), frozen):
        assert c.param.grad is None and torch.equal(c.param, old)
    assert any(c.param.detach().abs().sum() > 0 for c in seq.controls() if c.name.endswith("W_up"))
    with pytest.raises(RuntimeError, match="last"):
        seq.advance()


def test_bad_combinations_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least two"):
        Simultaneous([("lora", {})])
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        Simultaneous([("lora", {}), ("nope", {})])
    with pytest.raises(TypeError, match="combination part"):
        Sequential([("lora", {}), 3])


def test_stage_wise_training_keeps_stage_one_fixed(tmp_path):
    from controltune.data import Example, TaskSpec
    from controltune.train import TrainConfig, train_stages

    examples = [Example("good fine nice", None, 1), Example("bad awful sad", None, 0)] * 4
    spec = TaskSpec("toy", None, 2, ["0", "1"], False)
    system = _system()
    seq = build("sequential", system, stages=[("bitfit", {}), ("lora", {"rank": 2})])
    configs = [TrainConfig(lr=1e-2, steps=2, batch_size=4, progress=False, out=str(tmp_path / f"s{i}"))
               for i in range(2)]
    bitfit = {c.name: c.param for c in seq.controls()}
    results = train_stages(system, seq, examples, examples, spec, configs)
    assert seq.stage == 1 and len(results) == 2
    assert results[1]["n_trainable"] == sum(c.param.numel() for c in system.controls())
    end_of_stage_one = load_file(tmp_path / "s0" / "deltas.safetensors")
    assert any(not torch.equal(end_of_stage_one[n], torch.zeros_like(p)) for n, p in bitfit.items())
    for name, param in bitfit.items():  # stage 2 trained, stage 1 did not move
        assert torch.equal(param, end_of_stage_one[name])
    final = load_file(tmp_path / "s1" / "deltas.safetensors")  # holds both stages' deltas
    assert set(bitfit) <= set(final) and any(n.startswith("stage1.lora") for n in final)
