"""The residual-stream system reproduces the real models exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILY_MODELS, make_batch

import controltune as ct
from controltune.families import UnsupportedArchitectureError, family_of
from controltune.zoo import UnknownModelError

TOL = {"float32": 1e-5, "float64": 1e-12}


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_rollout_equals_hf_hidden_states(name, dtype, kernel):
    loaded = ct.load_model(name, dtype=dtype)
    system = ct.ResidualSystem(loaded, kernel=kernel)
    batch = make_batch(loaded.tokenizer, 3)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    errs = system.hf_agreement(batch)
    assert len(errs) == system.n_layers + 1
    assert max(errs) <= TOL[dtype], errs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_minilm_rollout_equals_hf(dtype):
    loaded = ct.load_model("minilm", dtype=dtype)
    system = ct.ResidualSystem(loaded)
    assert (system.n_layers, system.d_model) == (6, 384)
    assert abs(loaded.n_params - 22.7e6) < 0.1e6
    errs = system.hf_agreement(make_batch(loaded.tokenizer, 3))
    assert max(errs) <= TOL[dtype]


def test_states_are_the_blocks_composed():
    loaded = ct.load_model("random:llama", dtype="float64")
    system = ct.ResidualSystem(loaded)
    batch = make_batch(loaded.tokenizer)
    traj = system.rollout(batch)
    x = traj.states[1]
    assert torch.equal(system.step(1, x, traj.ctx), traj.states[2])
    assert traj.ctx.rotary is not None and traj.ctx.mask.dtype == torch.bool


@pytest.mark.parametrize("name", ["random:gpt2", "random:llama"])
def test_causal_lm_cost_matches_hf_loss(name):
    loaded = ct.load_model(name, dtype="float64")
    system = ct.ResidualSystem(loaded, readout="causal_lm")
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ours = system.cost(batch)
    theirs = loaded.model(input_ids=ids, labels=ids).loss
    # HF upcasts logits to float32 inside its loss, so it is only float32-exact.
    assert ours.dtype == torch.float64
    assert abs(ours.item() - theirs.item()) <= 1e-6 * abs(theirs.item())


def test_classification_mean_pooling_and_head():
    loaded = ct.load_model("random:bert", dtype="float64")
    system = ct.ResidualSystem(loaded, num_labels=3, pooling="mean")
    batch = make_batch(loaded.tokenizer)
    batch["labels"] = torch.tensor([0, 2, 1])
    hs = loaded.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).last_hidden_state
    m = batch["attention_mask"].double().unsqueeze(-1)
    pooled = (hs * m).sum(1) / m.sum(1)
    logits = system.readout.head(pooled)
    assert torch.allclose(system(batch), logits, atol=1e-12)
    assert torch.allclose(system.cost(batch), F.cross_entropy(logits, batch["labels"]), atol=1e-12)


def test_local_checkpoint_folder_and_in_memory_model(tmp_path):
    loaded = ct.load_model("random:gpt2")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    again = ct.load_model(str(tmp_path))
    assert again.family.name == "gpt2"
    for a, b in zip(loaded.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    mem = ct.load_model(loaded.model)
    assert mem.family.name == "gpt2" and mem.name == "<in-memory>"


def test_unknown_model_names_what_is_accepted():
    with pytest.raises(UnknownModelError, match="random:llama") as err:
        ct.load_model("random:t5")
    assert "checkpoint folder" in str(err.value)


def test_unsupported_family_lists_supported():
    from transformers import T5Config

    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        family_of(T5Config())


def test_cli_models_and_rollout(tmp_path, capsys):
    from controltune.cli import main

    assert main(["models", "--model", "random:bert", "--json", str(tmp_path / "m.json")]) == 0
    assert "random:bert" in capsys.readouterr().out
    assert main(["rollout", "--model", "random:gpt2", "--dtype", "float64", "--json", str(tmp_path / "r.json")]) == 0
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["passed"] and len(result["states"]) == 4 and result["versions"]["torch"]


def test_llama_norm_swap_is_bitwise_in_float32_and_exact_in_float64():
    stock = ct.load_model("random:llama", dtype="float32")
    batch = make_batch(stock.tokenizer)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    before = stock.model(**kwargs, output_hidden_states=True).hidden_states
    system = ct.ResidualSystem(stock)
    assert not any(type(m).__name__ == "LlamaRMSNorm" for m in system.model.modules())
    traj = system.rollout(batch)
    m = batch["attention_mask"].bool()
    for layer in range(system.n_layers):
        assert torch.equal(traj.states[layer][m], before[layer][m])
    # float64: the swapped norm keeps float64 resolution (HF's would round to float32).
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    norm = ct.ResidualSystem(ct.load_model("random:llama", dtype="float64")).readout.norm
    exact = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert torch.allclose(norm(x), exact, atol=1e-15, rtol=0)


def test_functional_call_over_controls_needs_untied_swap():
    """A delta is reachable by two paths (the model's wrapped module and its controller): a
    ``functional_call`` with ``tie_weights=False`` substitutes it and leaves the system intact, the
    default corrupts the system (pytorch/pytorch#164759) — if torch fixes that, this test says so."""
    from torch.func import functional_call

    loaded = ct.load_model("random:bert", dtype="float64")
    system = ct.ResidualSystem(loaded, num_labels=2)
    ct.build("lora", system, rank=2)
    system.eval()
    batch = make_batch(loaded.tokenizer)
    paths: dict[int, list[str]] = {}
    for name, p in system.named_parameters(remove_duplicate=False):
        paths.setdefault(id(p), []).append(name)
    name = next(n for n, *rest in paths.values() if rest and ".B" in n)
    module_path, attr = name.rsplit(".", 1)

    def slot() -> torch.Tensor:  # what the model reads (get_parameter refuses a plain tensor)
        return system.get_submodule(module_path)._parameters[attr]

    original = slot()
    with torch.no_grad():
        original.normal_()  # B = 0 at initialisation would make every substitution of A invisible
    before = system.cost(batch)
    moved = original.detach() + 1.0
    for path in paths[id(original)]:
        changed = functional_call(system, {path: moved}, (batch,), tie_weights=False)
        assert not torch.equal(changed, system(batch)), "the substitution reached the forward"
        assert slot() is original
        assert torch.equal(system.cost(batch), before)
    functional_call(system, {name: moved}, (batch,))
    assert slot() is not original, "torch restores shared slots now: drop the caveat in ARCHITECTURE.md"
