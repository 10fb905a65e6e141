"""The unified optimisation subspace (Yi et al., 2022): projections file, controller, the three stages."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_batch, toy_task

from controltune.controllers import UnsupportedMethodError, build
from controltune.controllers.unified import method_layout
from controltune.fingerprint import fingerprint
from controltune.subspace_projections import Layout, MethodProjection, ProjectionFileError, UnifiedProjections
from controltune.sweep import run_cell
from controltune.system import ResidualSystem
from controltune.unified_subspace import (
    ApproximationConfig,
    SourceRun,
    approximate,
    landscape,
    plane_points,
    simplex_point,
    task_targets,
    transfer_scores,
)
from controltune.verification import verify
from controltune.zoo import load_model

SPECS = {"lora": {"method": "lora", "options": {"rank": 2}},
         "adapter": {"method": "adapter", "options": {"bottleneck": 4}},
         "prefix": {"method": "prefix", "options": {"length": 3}}}


@pytest.fixture(scope="module")
def loaded(one_thread):
    torch.manual_seed(0)
    return load_model("random:bert", dtype="float64")


def untrained(loaded, dim: int = 3) -> UnifiedProjections:
    layouts, refs = {}, {}
    for m, s in SPECS.items():
        system = ResidualSystem(copy.deepcopy(loaded))
        c = build(s["method"], system, **s["options"])
        layouts[m] = method_layout(c)
        refs[m] = layouts[m].flatten({x.name: x.param for x in c.controls()})
    info = {"fingerprint": fingerprint(ResidualSystem(copy.deepcopy(loaded))), "model": "random:bert"}
    proj = UnifiedProjections(dim, SPECS, layouts, refs, info).to(torch.float64)
    for i, m in enumerate(SPECS):  # scales other than 1, so a decode that forgets s_m shows
        proj.maps[m].scale.fill_(0.5 + i)
    return proj


def test_file_round_trip_and_bad_files(loaded, tmp_path):
    proj = untrained(loaded)
    proj.intrinsic = {"lora": torch.randn(2, 3, dtype=torch.float64)}
    path = proj.save(tmp_path / "p.safetensors")
    again = UnifiedProjections.load(path, dtype=torch.float64)
    assert again.methods == proj.methods and again.layouts == proj.layouts and again.info == proj.info
    for (k, a), (_, b) in zip(proj.state_dict().items(), again.state_dict().items()):
        assert torch.allclose(a.float().double(), b), k
    assert torch.allclose(again.intrinsic["lora"], proj.intrinsic["lora"].float().double())
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ProjectionFileError, match="not a projections file"):
        UnifiedProjections.load(tmp_path / "junk.safetensors")
    with pytest.raises(ProjectionFileError, match="subspace approximate"):
        UnifiedProjections.load(tmp_path / "missing.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, kept = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys() if k != "maps.lora.reference"}
    save_file(kept, str(tmp_path / "torn.safetensors"), metadata=meta)
    with pytest.raises(ProjectionFileError, match="incomplete"):
        UnifiedProjections.load(tmp_path / "torn.safetensors")


def test_layout_flattens_in_order_and_names_bad_shapes():
    layout = Layout(("a", "b"), ((2, 2), (3,)))
    vec = layout.flatten({"b": torch.tensor([5.0, 6, 7]), "a": torch.tensor([[1.0, 2], [3, 4]])})
    assert vec.tolist() == [1, 2, 3, 4, 5, 6, 7] and layout.offsets() == {"a": (0, 4), "b": (4, 7)}
    with pytest.raises(ProjectionFileError, match="'b' has shape"):
        layout.flatten({"a": torch.zeros(2, 2), "b": torch.zeros(4)})


@pytest.mark.parametrize("delta", list(SPECS))
def test_controls_are_the_decoded_point_and_verify_passes(loaded, delta):
    """Each tensor of the method is its block of θ⁰ + W z, and the co-state checks hold for z."""
    proj = untrained(loaded)
    system = ResidualSystem(copy.deepcopy(loaded))
    c = build("unified_subspace", system, projections=proj, delta=delta)
    with torch.no_grad():
        c.z.copy_(torch.randn(3, dtype=torch.float64))
    names = [x.name for x in system.controls()]
    assert names == ["head.weight", "head.bias", "unified.z"]
    expected = proj.maps[delta].decode(c.z).detach()
    offsets, tensors = proj.layouts[delta].offsets(), c.tensors()
    assert list(tensors) == list(offsets)
    for name, (start, end) in offsets.items():
        assert torch.equal(tensors[name].detach().reshape(-1), expected[start:end]), name
    frozen = [p for n, p in c.inner.named_parameters() if n.endswith(".original")]
    assert len(frozen) == len(offsets) and not any(p.requires_grad for p in frozen)
    assert torch.equal(c.decoded(), expected)
    batch = make_batch(loaded.tokenizer, n=3)
    report = verify(system, batch)
    assert report.passed, report


def test_z_changes_the_method_exactly_as_the_decoded_tensors_do(loaded):
    """The unified controller at z equals the plain method with its controls set to θ⁰ + W z."""
    proj = untrained(loaded)
    torch.manual_seed(1)
    system = ResidualSystem(copy.deepcopy(loaded))
    c = build("unified_subspace", system, projections=proj, delta="adapter")
    with torch.no_grad():
        c.z.copy_(torch.randn(3, dtype=torch.float64) * 5)
    plain = ResidualSystem(copy.deepcopy(loaded))
    p = build("adapter", plain, **SPECS["adapter"]["options"])
    layout, vec = proj.layouts["adapter"], c.decoded()
    with torch.no_grad():
        for x in p.controls():
            start, end = layout.offsets()[x.name]
            x.param.copy_(vec[start:end].view_as(x.param))
        plain.readout.head.load_state_dict(system.readout.head.state_dict())
    batch = make_batch(loaded.tokenizer, n=3)
    assert torch.equal(system(batch), plain(batch))
    assert not torch.allclose(system(batch), ResidualSystem(copy.deepcopy(loaded))(batch))


def test_bad_uses_are_refused(loaded, tmp_path):
    system = ResidualSystem(copy.deepcopy(loaded))
    with pytest.raises(UnsupportedMethodError, match="projections=FILE"):
        build("unified_subspace", system)
    proj = untrained(loaded)
    with pytest.raises(ValueError, match="delta=NAME"):
        build("unified_subspace", ResidualSystem(copy.deepcopy(loaded)), projections=proj)
    with pytest.raises(ProjectionFileError, match="not 'ia3'"):
        build("unified_subspace", ResidualSystem(copy.deepcopy(loaded)), projections=proj, delta="ia3")
    other = load_model("random:roberta", dtype="float64")
    with pytest.raises(ProjectionFileError, match="refusing"):
        build("unified_subspace", ResidualSystem(other), projections=proj, delta="lora")
    with pytest.raises(UnsupportedMethodError, match="outside the blocks"):
        method_layout(build("prompt", ResidualSystem(copy.deepcopy(loaded)), n_tokens=2))
    with pytest.raises(ValueError, match="z_init"):
        build("unified_subspace", ResidualSystem(copy.deepcopy(loaded)), projections=proj, delta="lora", z_init="x")


def test_simplex_points_and_the_plane():
    gen = torch.Generator().manual_seed(0)
    w = torch.stack([simplex_point(3, gen) for _ in range(2000)])
    assert torch.allclose(w.sum(1), torch.ones(2000, dtype=torch.float64)) and (w > 0).all()
    assert torch.allclose(w.mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    a, b, c = torch.tensor([1.0, 0]), torch.tensor([0.0, 1]), torch.tensor([0.0, 0])
    pts = plane_points({"a": a, "b": b, "c": c}, [0.0, 1.0])
    assert [(x, y, z.tolist()) for x, y, z in pts] == [(0, 0, [0, 0]), (0, 1, [0, 1]), (1, 0, [1, 0]),
                                                       (1, 1, [1, 1])]


def test_aligned_start_reconstructs_the_sources_and_agrees_across_methods():
    gen = torch.Generator().manual_seed(3)
    targets = task_targets(["a", "b", "c"], 4, gen)
    assert torch.equal(torch.stack(list(targets.values())), torch.eye(4, dtype=torch.float64)[:3])
    deltas = torch.randn(4, 50, generator=gen, dtype=torch.float64) * 0.03  # tasks a, b, c and a second seed of c
    t = torch.stack([targets[k] for k in "abcc"])
    proj = MethodProjection(torch.zeros(50, dtype=torch.float64), 4, gen)
    proj.set_scale(deltas)
    proj.align(deltas, t, gen)
    assert torch.allclose(proj.encode(deltas), t, atol=1e-10)  # E(Δθ_i) = t_i (n = d + 0 solutions)
    assert torch.allclose(proj.offset(t[:2]), deltas[:2], atol=1e-12)  # s W t_i = Δθ_i
    assert torch.allclose(proj.offset(t[2]), deltas[2:].mean(0), atol=1e-12)  # seeds of one task: their mean
    free = torch.tensor([0.0, 0, 0, 1], dtype=torch.float64)  # the fourth direction stays random, solution-sized
    assert 0.3 < float(proj.offset(free).detach().norm() / (proj.scale * 50 ** 0.5)) < 3
    many = task_targets([str(i) for i in range(6)], 4, gen)  # more tasks than dimensions: seeded unit vectors
    assert all(abs(float(v.norm()) - 1) < 1e-12 for v in many.values())
    with pytest.raises(ValueError, match="targets"):
        proj.align(deltas, t[:, :3])
    with pytest.raises(ValueError, match="init"):
        ApproximationConfig(init="pca")


def _train(tmp_path, task, method, options, seed=0, steps=6):
    config = {"model": "random:bert", "task": str(task), "method": method, "options": options, "lr": 5e-3,
              "seed": seed, "steps": steps, "batch_size": 8, "eval_batch_size": 32, "max_length": 16,
              "warmup": 0.0, "schedule": "constant", "weight_decay": 0.0, "grad_clip": None, "eval_every": None,
              "dropout": False, "budget": None, "group_by_length": True, "train_size": None, "data_seed": 0,
              "dev_size": None, "pooling": "mean", "dtype": "float64", "device": "cpu"}
    row = run_cell(config, threads=1, runs_dir=str(tmp_path / "runs"))
    assert row["status"] == "done", row
    return tmp_path / "runs" / row["cell"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, one_thread):
    """Three toy tasks; lora, adapter and prefix trained for a few steps on the first two."""
    tmp_path = tmp_path_factory.mktemp("unified")
    tasks = []
    for name in ("a", "b", "c"):
        folder = tmp_path / name
        folder.mkdir()
        toy_task(folder, n_train=32, n_dev=12)
        tasks.append(folder)
    runs = [SourceRun.read(_train(tmp_path, t, s["method"], s["options"])) for t in tasks[:2] for s in SPECS.values()]
    return tasks, runs


def test_the_three_stages_end_to_end(sources, tmp_path):
    """Approximate on two toy source tasks, optimise z on a third, transfer it, draw the landscape."""
    tasks, runs = sources
    loaded = load_model("random:bert", dtype="float64")
    config = ApproximationConfig(dim=3, steps=4, batch_size=4, max_length=16, eval_size=8, progress=False,
                                 log_every=2)
    proj = approximate(loaded, runs, config, model_name="random:bert")
    assert proj.methods == ["lora", "adapter", "prefix"]
    assert {m: tuple(v.shape) for m, v in proj.intrinsic.items()} == {m: (2, 3) for m in SPECS}
    assert [e["step"] for e in proj.info["log"]] == [2, 4]
    rec = proj.info["reconstruction"]
    assert len(rec) == 6 and all({"original", "reconstructed", "span_projection"} <= set(r) for r in rec)
    path = proj.save(tmp_path / "proj.safetensors")
    json.dumps(proj.info)  # the record is plain JSON
    # stage 2: z and a fresh head trained on the unseen task, as a sweep cell (the experiment's path)
    run = _train(tmp_path, tasks[2], "unified_subspace", {"projections": str(path), "delta": "adapter"})
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_trainable"] == 3 + 2 * 64 + 2
    rows = transfer_scores(loaded, path, run, str(tasks[2]), max_length=16)
    assert [r["method"] for r in rows] == ["lora", "adapter", "prefix"]
    own = next(r for r in rows if r["method"] == "adapter")
    assert own["scores"]["loss"] == pytest.approx(metrics["final"]["loss"], rel=1e-9)
    land = landscape(loaded, path, str(tasks[0]), grid=[0.0, 1.0], dev_size=None, max_length=16)
    assert len(land["points"]) == 4 and set(land["points"][0]["scores"]) == set(SPECS)
    assert land["plane_kind"] == "methods" and land["plane"] == list(SPECS) and len(land["plane_distances"]) == 3
    with pytest.raises(ValueError, match="three source tasks"):
        landscape(loaded, path, str(tasks[0]), grid=[0.0], plane="tasks")
    with pytest.raises(ValueError, match="plane"):
        landscape(loaded, path, str(tasks[0]), grid=[0.0], plane="diagonal")
    with pytest.raises(ProjectionFileError, match="not a source task"):
        landscape(loaded, path, str(tasks[2]), grid=[0.0])
    with pytest.raises(ValueError, match="not a finished training run"):
        SourceRun.read(tmp_path)
    with pytest.raises(ValueError, match="at least two methods"):
        approximate(loaded, [r for r in runs if r.method == "lora"], config)
    with pytest.raises(ValueError, match="missing"):
        approximate(loaded, runs[:4], config)
    # the aligned start (no step taken: a vanishing rate) reconstructs every source, all methods agreeing
    still = approximate(loaded, runs, ApproximationConfig(dim=3, steps=1, lr=1e-300, batch_size=4, max_length=16,
                                                          eval_size=8, progress=False), model_name="random:bert")
    assert all(r["relative_reconstruction_error"] < 1e-9 for r in still.info["reconstruction"])
    first = still.intrinsic["lora"]
    assert all(torch.allclose(v, first, atol=1e-9) for v in still.intrinsic.values())


def test_the_command_runs_every_stage(sources, tmp_path, capsys):
    from controltune.cli import main

    tasks, runs = sources
    common = ["--model", "random:bert", "--dtype", "float64", "--max-length", "16", "--no-progress"]
    proj, run = tmp_path / "p.safetensors", tmp_path / "z"
    argv = ["subspace", "approximate", *common, "--dim", "2", "--steps", "2", "--batch-size", "4", "--eval-size", "6",
            "--out", str(proj), "--json", str(tmp_path / "a.json")]
    for r in runs:
        argv += ["--source", str(r.run_dir)]
    assert main(argv) == 0 and proj.is_file()
    assert "reconstructed" in capsys.readouterr().out
    assert main(["subspace", "optimize", *common, "--projections", str(proj), "--delta", "prefix", "--task",
                 str(tasks[2]), "--epochs", "1", "--out", str(run)]) == 0
    assert (run / "deltas.safetensors").is_file()
    assert main(["subspace", "transfer", *common, "--projections", str(proj), "--run", str(run), "--task",
                 str(tasks[2]), "--to", "lora,prefix", "--json", str(tmp_path / "t.json")]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lora", "prefix"]
    assert main(["subspace", "landscape", *common, "--projections", str(proj), "--task", str(tasks[1]),
                 "--grid=0,1,2"]) == 0
    # verify takes the controller's options from --opt
    assert main(["verify", "--model", "random:bert", "--dtype", "float64", "--methods", "unified_subspace,lora",
                 "--opt", f"projections={proj}", "--opt", "delta=prefix", "--json", str(tmp_path / "v.json")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "v.json").read_text())["results"]}
    assert rows["unified_subspace"]["status"] == "passed" and rows["lora"]["status"] == "passed"
    capsys.readouterr()
    assert main(["verify", "--model", "random:bert", "--methods", "lora", "--opt", "delta=prefix"]) == 2
    assert "none of the checked methods (lora) takes 'delta'" in capsys.readouterr().err
    assert main(["subspace", "transfer", *common, "--projections", str(proj)]) == 2
    assert "needs --run, --task" in capsys.readouterr().err
    assert main(["subspace", "landscape", *common, "--projections", str(proj), "--task", str(tasks[1]),
                 "--grid", "x"]) == 2
    assert "LOW,HIGH,N" in capsys.readouterr().err


def test_the_plane_of_tasks_is_through_each_task_s_mean_intrinsic_vector():
    from types import SimpleNamespace

    from controltune.unified_subspace import _plane

    sources = [{"method": m, "task": t} for m in ("a", "b") for t in ("x", "y", "z")]
    intrinsic = {"a": torch.tensor([[1.0, 0], [0, 1], [1, 1]]), "b": torch.tensor([[3.0, 0], [0, 3], [1, 3]])}
    proj = SimpleNamespace(intrinsic=intrinsic, info={"tasks": ["x", "y", "z"]})
    by_method = {m: [s for s in sources if s["method"] == m] for m in ("a", "b")}
    points = _plane(proj, by_method, "y", "tasks")
    assert list(points) == ["y", "x", "z"]  # the scored task first
    assert points["y"].tolist() == [0, 2] and points["x"].tolist() == [2, 0] and points["z"].tolist() == [1, 2]
    assert _plane(proj, by_method, "z", "methods")["b"].tolist() == [1, 3]


def test_span_coordinates_keep_a_weak_but_real_direction():
    """The least-squares coordinates of Δθ in span(W) are exact for a W whose last singular value is 2e-3 of its
    first (a prefix decoder's), where float32's default least-squares cut-off drops that direction."""
    from controltune.unified_subspace import span_coordinates

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(46080, 4, generator=gen, dtype=torch.float64))
    w = (q * torch.tensor([252.0, 159.0, 117.0, 0.55], dtype=torch.float64)).to(torch.float32)
    z_true = torch.tensor([1.0, 0.05, 0.75, 0.03])
    z, condition = span_coordinates(w, w @ z_true)
    assert z.dtype == torch.float32 and condition == pytest.approx(252 / 0.55, rel=1e-3)
    assert torch.allclose(z, z_true, rtol=0, atol=1e-4)


def test_a_frozen_z_leaves_only_the_head_and_through_lora_at_zero_is_a_linear_probe(loaded):
    """The stage-2 control run: z fixed at 0 through LoRA (B = 0 at θ⁰) is the frozen model plus its head."""
    proj = untrained(loaded)
    system = ResidualSystem(copy.deepcopy(loaded))
    c = build("unified_subspace", system, projections=proj, delta="lora", frozen_z=True)
    assert c.controls() == [] and not c.z.requires_grad
    assert [x.name for x in system.controls()] == ["head.weight", "head.bias"]
    probe = ResidualSystem(copy.deepcopy(loaded))
    probe.readout.head.load_state_dict(system.readout.head.state_dict())
    batch = make_batch(loaded.tokenizer, n=3)
    assert torch.equal(system(batch), probe(batch))
