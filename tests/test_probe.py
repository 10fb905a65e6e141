"""The linear probe (LP of LP-FT): a convex fit of the classification head before the layer controls move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import toy_task

from controltune.probe import L2_GRID, fit_head, fit_linear_probe, head_inputs
from controltune.system import ResidualSystem
from controltune.zoo import load_model


def _blobs(n: int = 200, d: int = 6, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes on badly scaled coordinates (a residual stream's outlier dimensions)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centres = torch.randn(c, d, generator=gen)
    scale = torch.logspace(-2, 2, d, dtype=torch.float64)
    z = (centres[y] + 1.5 * torch.randn(n, d, generator=gen)).double() * scale + 50.0
    return z, y


def test_the_probe_is_stationary_for_the_stated_objective():
    z, y = _blobs()
    lam = 1e-2
    fit = fit_linear_probe(z, y, 3, l2=lam)
    assert fit.converged and fit.iterations > 0
    # the objective in the coordinates of z: W_s = W D (D = diag σ), so the penalty is (λ/2)‖W D‖²
    sigma = z.std(0, unbiased=False)
    w = fit.weight.clone().requires_grad_(True)
    b = fit.bias.clone().requires_grad_(True)
    objective = F.cross_entropy(z @ w.T + b, y) + 0.5 * lam * ((w * sigma) ** 2).sum()
    objective.backward()
    assert objective.item() == pytest.approx(fit.objective, rel=1e-12)
    # stationary in the standardised coordinates the solver works in: W = W_s D^{-1}, b = b_s − W μ, so
    # ∂/∂W_s = (∂/∂W − (∂/∂b) μᵀ) D^{-1} and ∂/∂b_s = ∂/∂b
    mu = z.mean(0)
    grad_ws = (w.grad - torch.outer(b.grad, mu)) / sigma
    assert max(grad_ws.abs().max(), b.grad.abs().max()) <= 1e-6
    # and a minimum: any small step raises the objective (convex, so this holds everywhere)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        dw = 1e-3 * torch.randn(w.shape, generator=gen, dtype=torch.float64) / sigma
        moved_w = fit.weight + dw
        moved = F.cross_entropy(z @ moved_w.T + fit.bias, y) + 0.5 * lam * ((moved_w * sigma) ** 2).sum()
        assert moved.item() > fit.objective
    assert fit.train_accuracy > 0.5


def test_a_larger_penalty_shrinks_the_head_and_bad_input_is_refused():
    z, y = _blobs()
    small, large = fit_linear_probe(z, y, 3, l2=1e-4), fit_linear_probe(z, y, 3, l2=1.0)
    sigma = z.std(0, unbiased=False)
    assert (large.weight * sigma).norm() < (small.weight * sigma).norm()
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_linear_probe(torch.full((4, 2), float("nan")), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"labels outside 0\.\.1"):
        fit_linear_probe(z, y, 2)
    with pytest.raises(ValueError, match=">= 0"):
        fit_linear_probe(z, y, 3, l2=-1.0)
    with pytest.raises(ValueError, match="S×d"):
        fit_linear_probe(z[0], y, 3)


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_thread):
    spec, train_ex, dev_ex = toy_task(tmp_path_factory.mktemp("toy"), n_train=64, n_dev=24)
    return spec, train_ex, dev_ex, load_model("random:bert", seed=0)


def test_fit_head_sets_the_readouts_head_to_the_probe_of_the_head_inputs(toy):
    spec, train_ex, dev_ex, loaded = toy
    system = ResidualSystem(loaded, num_labels=spec.num_labels, pooling="mean", seed=3)
    modes = {name: m.training for name, m in system.named_modules()}
    assert modes[""] and not modes["model"]  # a fresh system holds an HF model in eval mode (no dropout)
    z, y = head_inputs(system, train_ex, loaded.tokenizer, max_length=32)
    # every module keeps its own mode: the design that follows must not run with the model's dropout on
    assert {name: m.training for name, m in system.named_modules()} == modes
    assert z.shape == (len(train_ex), system.d_model) and z.dtype == torch.float64
    # the states are those the system's own forward pools: the head's logits agree with system(batch)
    report = fit_head(system, train_ex, loaded.tokenizer, held_out=dev_ex, max_length=32)
    assert report["l2"] in L2_GRID and len(report["l2_scores"]) == len(L2_GRID) and report["converged"]
    assert report["l2_at_edge"] == (report["l2"] in (L2_GRID[0], L2_GRID[-1]))
    assert report["held_out_loss"] == min(s["held_out_loss"] for s in report["l2_scores"])
    expected = fit_linear_probe(z, y, spec.num_labels, report["l2"])
    assert torch.allclose(system.readout.head.weight.double(), expected.weight, atol=1e-5)
    from controltune.batching import encode

    batch = encode(train_ex[:8], loaded.tokenizer, 32).batch(list(range(8)))
    with torch.no_grad():
        logits = system.eval()(batch).double()
    assert torch.allclose(logits, z[:8] @ system.readout.head.weight.double().T + system.readout.head.bias.double(),
                          atol=1e-4)
    # the fit depends on the rows, not on the seed of the random head it replaces
    other = ResidualSystem(loaded, num_labels=spec.num_labels, pooling="mean", seed=7)
    fit_head(other, train_ex, loaded.tokenizer, held_out=dev_ex, max_length=32)
    assert torch.allclose(other.readout.head.weight, system.readout.head.weight)


def test_stored_features_are_those_of_the_same_forward_only(toy, tmp_path, monkeypatch):
    from controltune import probe

    spec, train_ex, _, loaded = toy
    system = ResidualSystem(loaded, num_labels=spec.num_labels, pooling="mean", seed=0)
    z, y = head_inputs(system, train_ex, loaded.tokenizer, max_length=32, cache_dir=tmp_path)
    (stored,) = tmp_path.glob("*.pt")
    key = probe.features_key(system, train_ex, loaded.tokenizer, 32, 128)
    assert stored.name == f"{key}.pt"

    def no_forward(*_args, **_kwargs):
        raise AssertionError("computed the features again")

    with monkeypatch.context() as m:
        m.setattr(probe, "_forward_features", no_forward)
        # another seed's random head: z does not pass through the head, so the stored file serves it bit for bit
        other = ResidualSystem(loaded, num_labels=spec.num_labels, pooling="mean", seed=9)
        assert probe.features_key(other, train_ex, loaded.tokenizer, 32, 128) == key
        z2, y2 = head_inputs(other, train_ex, loaded.tokenizer, max_length=32, cache_dir=tmp_path)
    assert torch.equal(z2, z) and torch.equal(y2, y)
    assert torch.equal(head_inputs(system, train_ex, loaded.tokenizer, max_length=32)[0], z)
    # anything the features depend on gives another key
    keys = {key, probe.features_key(system, train_ex[:-1], loaded.tokenizer, 32, 128),
            probe.features_key(system, train_ex, loaded.tokenizer, 16, 128),
            probe.features_key(system, train_ex, loaded.tokenizer, 32, 8),
            probe.features_key(ResidualSystem(loaded, num_labels=spec.num_labels, pooling="cls", seed=0), train_ex,
                               loaded.tokenizer, 32, 128)}
    weight = next(p for n, p in system.model.named_parameters() if n.endswith("LayerNorm.weight"))
    with torch.no_grad():
        weight.add_(1e-3)
        keys.add(probe.features_key(system, train_ex, loaded.tokenizer, 32, 128))
        weight.sub_(1e-3)
    assert len(keys) == 6 and probe.features_key(system, train_ex, loaded.tokenizer, 32, 128) == key
    # a damaged file is computed again and replaced
    stored.write_bytes(b"not a tensor file")
    z3, _ = head_inputs(system, train_ex, loaded.tokenizer, max_length=32, cache_dir=tmp_path)
    assert torch.equal(z3, z) and torch.equal(torch.load(stored, weights_only=True)["z"], z)


def test_fit_head_refuses_what_it_cannot_fit(toy):
    spec, train_ex, _, loaded = toy
    system = ResidualSystem(loaded, num_labels=spec.num_labels, seed=0)
    with pytest.raises(ValueError, match="needs held-out rows"):
        fit_head(system, train_ex, loaded.tokenizer, l2=[1e-3, 1e-2])
    with pytest.raises(ValueError, match="at least one training row"):
        fit_head(system, [], loaded.tokenizer)
    lm = ResidualSystem(load_model("random:gpt2", seed=0), readout="causal_lm")
    with pytest.raises(ValueError, match="this system's readout is CausalLMReadout"):
        fit_head(lm, train_ex, loaded.tokenizer)
    report = fit_head(system, train_ex, loaded.tokenizer, max_length=32)  # no held-out rows: the default λ
    assert report["l2"] == 1e-3 and report["held_out"] == 0 and report["held_out_loss"] is None


def test_a_sweep_cell_with_head_init_probe_designs_through_the_fitted_head(toy, tmp_path, monkeypatch):
    from controltune import sweep, sweep_spec
    from controltune.evaluation import validation_split
    from controltune.results import read_jsonl

    monkeypatch.setenv("CONTROLTUNE_CACHE", str(tmp_path / "cache"))
    spec, train_ex, _, loaded = toy
    grid = {"model": "random:bert", "method": "costate_lora", "task": str(spec.folder), "lr": 1e-2,
            "options": {"rank": 2, "n_design": 8}}
    train = {"steps": 2, "batch_size": 8, "max_length": 32, "val_size": 16, "eval_every": 1}
    plain = sweep_spec.expand(sweep_spec.parse_spec({"grid": grid, "train": train}))[0]
    assert "head_init" not in plain  # cells that do not set it keep their configuration and identity
    config = sweep_spec.expand(sweep_spec.parse_spec({"grid": grid, "train": {**train, "head_init": "probe"}}))[0]
    assert config["head_init"] == "probe" and sweep_spec.cell_id(config) != sweep_spec.cell_id(plain)
    cell = sweep.build_cell(config)
    fit_rows, held = validation_split(train_ex, 16, 0)
    assert cell.head_fit["rows"] == len(fit_rows) == 48 and cell.head_fit["held_out"] == 16
    # the head the design ran through is the probe of the run's training rows, whatever the seed's random head
    reference = ResidualSystem(loaded, num_labels=spec.num_labels, seed=11)
    fit_head(reference, fit_rows, loaded.tokenizer, held_out=held, max_length=32)
    assert torch.allclose(cell.system.readout.head.weight, reference.readout.head.weight, atol=1e-6)
    # the cell kept its features (fitting rows and validation rows) for the task's other cells, which read them
    # (a random model is seeded by the cell's seed, so here only the same seed shares them)
    assert len(list((tmp_path / "cache" / "probe").glob("*.pt"))) == 2
    again = sweep.build_cell({**config, "lr": 2e-2, "options": {"rank": 1, "n_design": 8}})
    assert torch.equal(again.system.readout.head.weight, cell.system.readout.head.weight)
    assert len(list((tmp_path / "cache" / "probe").glob("*.pt"))) == 2
    out = tmp_path / "rows.jsonl"
    sweep.run_cells([config, {**config, "head_init": "linear"}], out, name="probe", executor="local",
                    echo=lambda _: None)
    rows = {r["config"]["head_init"]: r for r in read_jsonl(out)}
    assert rows["probe"]["status"] == "done", rows["probe"].get("reason")
    assert rows["probe"]["head_fit"]["l2"] == cell.head_fit["l2"] and rows["probe"]["head_fit"]["converged"]
    assert rows["linear"]["status"] == "failed"
    assert "head initialisation 'linear' is not one of random, probe" in rows["linear"]["reason"]


def test_controltune_train_head_init_probe(toy, capsys):
    from controltune.cli import main

    spec, *_ = toy
    assert main(["train", "--model", "random:bert", "--method", "lora", "--task", str(spec.folder), "--steps", "2",
                 "--batch-size", "8", "--max-length", "32", "--val-size", "16", "--head-init", "probe",
                 "--no-progress", "--train-score-size", "0"]) == 0
    out = capsys.readouterr().out
    assert "head: linear probe on 48 training rows, L2 " in out and "held-out accuracy" in out


@pytest.mark.parametrize(("family", "layer"), [("bert", "classifier"), ("roberta", "classifier.out_proj"),
                                               ("llama", "score")])
def test_the_probe_fits_the_last_linear_map_of_an_hf_sequence_head(toy, family, layer):
    from controltune.probe import head_layer

    spec, train_ex, dev_ex, _ = toy
    loaded = load_model(f"random:{family}", dtype="float64", head="sequence_classification", num_labels=2)
    system = ResidualSystem(loaded, readout="sequence_classifier", num_labels=2)
    fitted = head_layer(system.readout)
    assert fitted is loaded.model.get_submodule(layer)
    report = fit_head(system, train_ex, loaded.tokenizer, held_out=dev_ex, max_length=32)
    assert report["converged"]
    # the features are the map's inputs in the HF head's own forward: its logits are W z + b on them
    z, y = head_inputs(system, train_ex[:6], loaded.tokenizer, max_length=32)
    from controltune.batching import encode

    batch = encode(train_ex[:6], loaded.tokenizer, 32).batch(list(range(6)))
    with torch.no_grad():
        logits = system.eval()(batch)
    expected = z @ fitted.weight.T + (fitted.bias if fitted.bias is not None else 0.0)
    assert torch.allclose(logits, expected, atol=1e-10)
    assert (fitted.bias is None) == (family == "llama")  # a decoder's score has no bias: fitted with b = 0


def test_a_probe_without_bias_is_stationary_in_w():
    z, y = _blobs()
    fit = fit_linear_probe(z, y, 3, l2=1e-2, bias=False)
    assert fit.bias is None and fit.converged
    rms = z.pow(2).mean(0).sqrt()
    w = fit.weight.clone().requires_grad_(True)
    objective = F.cross_entropy(z @ w.T, y) + 0.5 * 1e-2 * ((w * rms) ** 2).sum()
    objective.backward()
    assert objective.item() == pytest.approx(fit.objective, rel=1e-12)
    assert (w.grad / rms).abs().max() <= 1e-6  # ∂/∂W_s = ∂/∂W · D^{-1}, D = diag(rms): scaled, not centred


@pytest.mark.usefixtures("one_thread")
def test_recommend_head_init_probe_exports_the_fitted_classifier(toy, tmp_path, capsys):
    import json

    pytest.importorskip("peft")
    from peft import PeftModel

    from controltune.cli import main
    from controltune.data import load_split
    from controltune.probe import init_head

    spec, *_ = toy
    out = tmp_path / "rec"
    assert main(["recommend", "--model", "random:bert", "--task", str(spec.folder), "--budget", "2500",
                 "--max-rank", "2", "--n-design", "16", "--head-init", "probe", "--probe-rows", "40",
                 "--out", str(out)]) == 0
    assert "classifier: linear probe on 36 training rows" in capsys.readouterr().out
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["head_fit"]["converged"] and rec["head_fit"]["held_out"] == 4
    # the folder carries the probe: the classifier peft loads is the one fitted on the same rows
    loaded = load_model("random:bert", head="sequence_classification", num_labels=2)
    system = ResidualSystem(loaded, readout="sequence_classifier", num_labels=2)
    init_head(system, "probe", load_split(spec, "train", n=40, seed=0), loaded.tokenizer, val_size=0.1, val_seed=0,
              max_length=64)
    model = PeftModel.from_pretrained(load_model("random:bert", head="sequence_classification").model, str(out))
    saved = dict(model.named_parameters())
    key = next(k for k in saved if k.endswith("classifier.modules_to_save.default.weight"))
    assert torch.allclose(saved[key], loaded.model.classifier.weight, atol=1e-6)
    assert not torch.allclose(saved[key], load_model("random:bert", head="sequence_classification").model
                              .classifier.weight)
    assert main(["recommend", "--model", "random:bert", "--task", str(spec.folder), "--head-init", "probe",
                 "--probe-rows", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "--probe-rows must be at least 10" in capsys.readouterr().err
