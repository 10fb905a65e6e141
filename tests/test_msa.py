"""MSA / E-MSA training (Li, Chen, Tai & E, 2018) on the toy network and on a Transformer system."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_batch

import controltune as ct
from controltune.controllers import build
from controltune.msa import MSA, MSAConfig, ToyResidualNet, toy_batch
from controltune.verification import verify

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine


def test_the_toy_follows_the_solver_protocol_and_verifies():
    net = ToyResidualNet(n_layers=6, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for c in net.controls():
            c.param.add_(0.3 * torch.randn(c.param.shape, generator=gen, dtype=torch.float64))
    report = verify(net, toy_batch(32, seed=1), n_state_directions=3)
    assert report.passed, report.failures()


def test_zero_initialised_toy_is_the_identity_map():
    net = ToyResidualNet()
    batch = toy_batch(8, seed=0)
    x0, _ = net.embed(batch)
    assert net.n_layers == 20 and x0.shape == (8, 5)
    x = x0
    for layer in range(net.n_layers):
        x = net.step(layer, x)
    assert torch.equal(x, x0)
    assert torch.equal(net(batch), torch.zeros(8, 1, dtype=torch.float64))


@pytest.mark.parametrize("rho,costate_penalty", [(0.0, False), (0.5, False), (0.5, True)])
def test_msa_reduces_the_toy_loss(rho, costate_penalty):
    torch.manual_seed(0)
    net = ToyResidualNet(n_layers=10)
    test = toy_batch(128)
    before = float(net.cost(test).detach())
    trainer = MSA(net, MSAConfig(rho=rho, inner_steps=3, lr=0.05, costate_penalty=costate_penalty))
    for it in range(40):
        trainer.step(toy_batch(64, seed=it))
    after = float(net.cost(test).detach())
    assert after < 0.25 * before, (before, after)


def test_one_inner_sgd_step_without_penalty_is_gradient_descent_on_J():
    net = ToyResidualNet(n_layers=5, weight_decay=0.05)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for c in net.controls():
            c.param.add_(0.2 * torch.randn(c.param.shape, generator=gen, dtype=torch.float64))
    batch = toy_batch(16, seed=2)
    before = [c.param.detach().clone() for c in net.controls()]
    grads = torch.autograd.grad(net.cost(batch), [c.param for c in net.controls()])
    MSA(net, MSAConfig(rho=0.0, inner_steps=1, lr=0.1, optimizer="sgd")).step(batch)
    for c, u0, g in zip(net.controls(), before, grads):
        torch.testing.assert_close(c.param.detach(), u0 - 0.1 * g, rtol=1e-12, atol=1e-14)


def test_emsa_trains_lora_on_a_transformer_and_restores_the_kernel():
    loaded = ct.load_model("random:bert", dtype="float64")
    system = ct.ResidualSystem(loaded)
    build("lora", system, rank=2)
    batch = make_batch(loaded.tokenizer, 4)
    before = float(system.cost(batch).detach())
    trainer = MSA(system, MSAConfig(rho=0.1, inner_steps=2, lr=1e-2, costate_penalty=True))
    for _ in range(4):
        trainer.step(batch)
    assert system.kernel == "sdpa"
    assert float(system.cost(batch).detach()) < before


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        MSAConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="rho"):
        MSAConfig(rho=-1.0)
    with pytest.raises(ValueError, match="no controls"):
        MSA(_NoControls())


class _NoControls(ToyResidualNet):
    def controls(self):
        return []


def test_msa_command_writes_a_dev_curve(tmp_path):
    from controltune.cli import main

    # A task folder of its own, so the test does not depend on ../shared/data being present.
    task = tmp_path / "task"
    task.mkdir()
    rows = [{"text": f"{word} film number {i}", "label": int(word == "good")}
            for i in range(12) for word in ("good", "bad")]
    for split in ("train", "dev"):
        (task / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "msa.json"
    code = main(["msa", "--model", "random:bert", "--task", str(task), "--method", "lora", "--opt", "rank=2",
                 "--iterations", "2",
                 "--eval-every", "1", "--batch-size", "4", "--max-length", "16", "--train-size", "16",
                 "--dev-size", "8", "--rho", "0.1", "--json", str(out)])
    assert code == 0
    curve = json.loads(out.read_text())["curve"]
    assert [row["iteration"] for row in curve] == [1, 2]
    assert all(0.0 <= row["dev_accuracy"] <= 1.0 and row["train_cost"] > 0 for row in curve)
