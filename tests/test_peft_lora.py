"""``peft_lora``: peft's own LoRA layers and initialisations as a controller, and loading a peft folder."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, needs_peft, toy_task

from controltune import ResidualSystem, load_model
from controltune.controllers import UnsupportedMethodError, build
from controltune.peft_export import to_peft
from controltune.verification import verify

pytestmark = [pytest.mark.usefixtures("one_thread"), needs_peft]


def _system(dtype: str = "float64", family: str = "bert") -> ResidualSystem:
    loaded = load_model(f"random:{family}", dtype=dtype, head="sequence_classification")
    return ResidualSystem(loaded, readout="sequence_classifier")


@pytest.mark.parametrize(("init", "dtype"), [("default", "float64"), ("pissa", "float32"), ("olora", "float32"),
                                             ("lora_ga", "float64")])
def test_peft_initialisations_keep_the_cost_and_pass_verify(init, dtype):
    system = _system(dtype)
    batch = make_batch(system.tokenizer, 4)
    with torch.no_grad():
        before = float(system.cost(batch))
    ctrl = build("peft_lora", system, rank=2, init=init, design_batch=batch)
    with torch.no_grad():
        after = float(system.cost(batch))
    # default: B = 0; PiSSA, OLoRA, LoRA-GA: W' = W − (α/r) B A, the model's function unchanged up to rounding
    assert after == pytest.approx(before, rel=1e-5 if dtype == "float32" else 1e-10)
    names = [c.name for c in ctrl.controls()]
    assert len(names) == 2 * 2 * system.n_layers and names[0] == "peft_lora.0.q.A"
    moved = [float(c.param.detach().abs().max()) for c in ctrl.controls() if c.name.endswith(".B")]
    assert (max(moved) == 0) == (init == "default")
    assert {c.name for c in system.controls()} >= {"head.classifier.weight"}  # peft froze the model; not the head
    report = verify(system.eval(), make_batch(system.tokenizer, 2), n_state_directions=1)
    assert report.passed, report.failures()


def test_pissa_in_float64_is_refused_with_peft_reason():
    with pytest.raises(UnsupportedMethodError, match="init='pissa' on a float64 model"):
        build("peft_lora", _system("float64"), rank=2, init="pissa")
    with pytest.raises(ValueError, match="init 'evaa' is not one of"):
        build("peft_lora", _system(), init="evaa")
    with pytest.raises(ValueError, match="go together"):
        build("peft_lora", _system(), init="adapter")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_recommended_peft_folder_loads_back_as_the_same_model(tmp_path, family):
    toy_task(tmp_path, 48, 8)
    source = _system(family=family)
    build("recommended_lora", source, task=str(tmp_path), n_design=16, budget=2500, max_rank=3)
    folder = to_peft(source, tmp_path / "adapter")
    target = _system(family=family)
    ctrl = build("peft_lora", target, init="adapter", adapter=str(folder))
    batch = make_batch(source.tokenizer, 3)
    with torch.no_grad():
        assert torch.equal(source(batch), target(batch))
    assert {c.name.rsplit(".", 1)[0] for c in ctrl.controls()} == {
        f"peft_lora.{s.layer}.{s.role}" for s in source.controllers[0].sites}


def test_eva_starts_from_the_principal_directions_of_the_inputs_with_redistributed_ranks():
    system = _system("float64")
    batch = make_batch(system.tokenizer, 8)
    with torch.no_grad():
        before = float(system.cost(batch))
    ctrl = build("peft_lora", system, rank=2, init="eva", design_batch=batch)
    with torch.no_grad():
        assert float(system.cost(batch)) == before  # B = 0: the model is unchanged
    a = [c.param.detach() for c in ctrl.controls() if c.name.endswith(".A")]
    assert sum(x.shape[0] for x in a) == 2 * 2 * system.n_layers  # the rank budget, redistributed
    for x in a:
        assert torch.allclose(x @ x.T, torch.eye(x.shape[0], dtype=x.dtype), atol=1e-6)  # orthonormal rows
    # the first map's A spans the top principal directions of its inputs (the embeddings' output)
    site, layer = next(iter(ctrl.layers_found.values()))
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        system(batch)
    handle.remove()
    tokens = seen[0][batch["attention_mask"].bool()]
    top = torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False).Vh[: a[0].shape[0]]  # PCA: centred
    overlap = torch.linalg.svdvals(a[0] @ top.T)
    assert overlap.min() > 0.9, overlap
    report = verify(system.eval(), make_batch(system.tokenizer, 2), n_state_directions=1)
    assert report.passed, report.failures()
