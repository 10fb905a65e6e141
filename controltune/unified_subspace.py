"""The three stages of a unified optimisation subspace for delta tuning (Yi et al., 2022).

1. **Subspace approximation** (:func:`approximate`): from solutions θ_{m,t} of several methods m
   trained independently on source tasks t (run folders of ``controltune train`` or a sweep),
   learn per method a down-projection E_m and an up-projection θ_m(z) = θ_m⁰ + s_m W_m z into one
   shared R^d (:mod:`controltune.subspace_projections`).  Each step takes a source task t and a
   batch of its training rows, one solution of t per method, their intrinsic vectors
   ``I_m = E_m(θ_{m,t} − θ_m⁰)`` and a random point of their simplex
   ``I = Σ_m w_m I_m`` (``w ~ Dirichlet(1, …, 1)``; for three methods the paper's
   ``α I_A + β I_P + (1−α−β) I_L``), and minimises

       L = Σ_m [ CE(θ_m(I); batch, head_{m,t}) + λ_rec ‖s_m W_m I_m − Δθ_{m,t}‖² / ‖Δθ_{m,t}‖² ],

   the task loss of every method driven by the interpolated point plus the (relative) error of
   reconstructing each solution from its own intrinsic vector (``W_m`` in units of the method's scale
   ``s_m``, :class:`~controltune.subspace_projections.MethodProjection`).  The heads stay the solutions'.
   By default (``init="aligned"``) the maps start where this loss's reconstruction term is zero and the
   methods agree: every method's solution of source task t encodes to the same vector e_t and each W_m
   decodes e_t to that method's solution, so training starts from the span of the sources; ``init="random"``
   is the paper's start from small random weights.
2. **Subspace optimisation**: train the ``unified_subspace`` controller (only z, and a fresh
   head) on an unseen task, e.g. ``controltune train --method unified_subspace
   --opt projections=P.safetensors --opt delta=adapter``.
3. **Solution transfer** (:func:`transfer_scores`): the z found with one method, decoded by the
   other methods' up-projections, scored on the task's dev rows without further training.

:func:`landscape` scores every method on a plane of intrinsic vectors, the paper's (the three methods'
vectors of one source task) or one through three source tasks' vectors (the paper's landscape plot: do the
methods' good regions overlap?).
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .batching import encode
from .controllers.spec import controller_spec
from .controllers.unified import UnifiedSubspace, method_layout
from .data import Example, load_split, resolve_task
from .evaluation import evaluate
from .fingerprint import fingerprint
from .resources import using_threads
from .run_folder import reported_deltas
from .subspace_projections import Layout, ProjectionFileError, UnifiedProjections
from .system import ResidualSystem

if TYPE_CHECKING:
    from .data import TaskSpec
    from .zoo import LoadedModel

RECON_WEIGHT = 1.0
"""Default λ_rec (the paper's single-task script used 0.1 with an unsquared distance)."""
INITS = ("aligned", "random")
"""How stage 1 starts: ``aligned`` at an exact reconstruction with the methods' intrinsic vectors of a task made
equal (:meth:`~controltune.subspace_projections.MethodProjection.align`, targets :func:`task_targets`);
``random`` from the paper's N(0, 0.02) weights (in the pilot, 150 steps left relative reconstruction
errors of 0.44–0.83)."""


# --- source solutions ------------------------------------------------------------------------
@dataclass
class SourceRun:
    """A trained solution: a run folder with ``metrics.json`` and ``deltas.safetensors``; the solution is the
    deltas the run reports (:func:`~controltune.run_folder.reported_deltas`: best on validation when it had
    validation rows)."""

    run_dir: Path
    model: str
    method: str
    options: dict[str, Any]
    task: str
    seed: int
    pooling: str

    @classmethod
    def read(cls, run_dir: str | Path) -> SourceRun:
        """The run's configuration from its ``metrics.json`` (a clear error for a folder that is not a run)."""
        run_dir = Path(run_dir)
        metrics, deltas = run_dir / "metrics.json", run_dir / "deltas.safetensors"
        if not metrics.is_file() or not deltas.is_file():
            raise ValueError(f"{run_dir} is not a finished training run: it needs metrics.json and "
                             "deltas.safetensors (the --out folder of `controltune train` or a sweep's run folder)")
        config = json.loads(metrics.read_text())["config"]
        extra = config.get("extra", {})
        if "+" in extra.get("method", "+"):
            raise ValueError(f"{run_dir}: method {extra.get('method')!r}; a unified subspace ties single methods")
        return cls(run_dir, extra["model"], extra["method"], dict(extra.get("options") or {}), extra["task"],
                   int(config["seed"]), extra.get("pooling", "mean"))


@dataclass
class Solution:
    """One source solution as a vector: ``delta`` = θ − θ⁰ (D,) in its method's layout, and its head."""

    run: SourceRun
    delta: torch.Tensor
    head: dict[str, torch.Tensor]


def reference_system(loaded: LoadedModel, method: str, options: dict[str, Any], num_labels: int, pooling: str
                     ) -> tuple[ResidualSystem, Any]:
    """A fresh system (seed 0) with ``method`` attached: its controls are the reference point θ⁰."""
    name, opts = controller_spec(method, dict(options), 0)
    if name != method:
        raise ValueError(f"{method}: a unified subspace ties single registered methods")
    from .controllers.base import build

    system = ResidualSystem(copy.deepcopy(loaded), num_labels=num_labels, pooling=pooling, seed=0)
    return system, build(name, system, **opts)


def _key(options: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in options.items() if k != "seed"}, sort_keys=True)


def load_solutions(loaded: LoadedModel, runs: Sequence[SourceRun], num_labels: int
                   ) -> tuple[dict[str, Layout], dict[str, torch.Tensor], dict[str, dict], list[Solution]]:
    """Layouts, reference points θ⁰ and build specs per method, and every run as a :class:`Solution`.

    Runs of one method must share their options (but for the seed) and every run its pooling; each
    run's deltas are loaded with the checkpoint's checks (same base model, same shapes).
    """
    by_method: dict[str, list[SourceRun]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    poolings = {r.pooling for r in runs}
    if len(poolings) > 1:
        raise ValueError(f"the source runs use different poolings {sorted(poolings)}; use runs of one pooling")
    layouts, refs, specs, solutions = {}, {}, {}, []
    for method, group in by_method.items():
        keys = {_key(r.options) for r in group}
        if len(keys) > 1:
            raise ValueError(f"the {method} runs have different options {sorted(keys)}: one subspace needs one "
                             "configuration per method")
        options = {k: v for k, v in group[0].options.items() if k != "seed"}
        system, controller = reference_system(loaded, method, options, num_labels, group[0].pooling)
        layout = method_layout(controller)
        tensors = {c.name: c.param for c in controller.controls()}
        reference = layout.flatten(tensors).clone()
        layouts[method], refs[method] = layout, reference
        specs[method] = {"method": method, "options": options}
        saved = {c.name: c.param.detach().clone() for c in system.controls()}
        for run in group:
            checkpoint.load(system, reported_deltas(run.run_dir))
            delta = layout.flatten({c.name: c.param for c in controller.controls()}) - reference
            head = {c.name: c.param.detach().clone() for c in system.readout.controls()}
            solutions.append(Solution(run, delta.clone(), head))
            with torch.no_grad():
                for c in system.controls():
                    c.param.copy_(saved[c.name])
    return layouts, refs, specs, solutions


# --- stage 1 ---------------------------------------------------------------------------------
def simplex_point(k: int, generator: torch.Generator) -> torch.Tensor:
    """``w ~ Dirichlet(1, …, 1)`` (k,): normalised Exp(1) draws, uniform on the probability simplex."""
    e = -torch.log(torch.rand(k, generator=generator, dtype=torch.float64).clamp_min(1e-300))
    return e / e.sum()


@dataclass
class ApproximationConfig:
    """Settings of :func:`approximate` (recorded in the projections file)."""

    dim: int = 4
    steps: int = 600
    lr: float = 1e-2
    recon_weight: float = RECON_WEIGHT
    batch_size: int = 16
    max_length: int = 128
    train_size: int | None = 2000
    eval_size: int = 400
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    log_every: int = 50
    init: str = "aligned"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is not one of {', '.join(INITS)}")


def task_targets(tasks: Sequence[str], dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The intrinsic vector every method's solution of a source task starts at (``init="aligned"``):
    the task's unit vector e_t when the tasks fit in d dimensions, else seeded random unit vectors."""
    if len(tasks) <= dim:
        return {t: torch.eye(dim, dtype=torch.float64)[i] for i, t in enumerate(tasks)}
    draws = torch.randn(len(tasks), dim, generator=generator, dtype=torch.float64)
    return {t: v / v.norm() for t, v in zip(tasks, draws)}


def driven_systems(loaded: LoadedModel, projections: UnifiedProjections, num_labels: int, pooling: str
                   ) -> dict[str, tuple[ResidualSystem, UnifiedSubspace]]:
    """Per method a system whose controls are decoded from a driven point (the projections are shared)."""
    out = {}
    for method in projections.methods:
        system = ResidualSystem(copy.deepcopy(loaded), num_labels=num_labels, pooling=pooling, seed=0)
        controller = system.add(UnifiedSubspace(projections, delta=method))
        for param in projections.maps[method].trained_parameters():
            param.requires_grad_(True)
        system.readout.requires_grad_(False)
        system.eval()
        out[method] = (system, controller)
    return out


def _set_head(system: ResidualSystem, head: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in system.readout.head.named_parameters():
            p.copy_(head[f"head.{name}"])


def _task_rows(task: str, n: int | None, seed: int) -> tuple[Any, list[Example], list[Example]]:
    spec = resolve_task(task)
    return spec, load_split(spec, "train", n=n, seed=seed), load_split(spec, "dev")


def approximate(loaded: LoadedModel, runs: Sequence[SourceRun], config: ApproximationConfig,
                model_name: str | None = None) -> UnifiedProjections:
    """Stage 1: train the projections of every method in ``runs`` on their source tasks (see the module doc).

    Returns the projections with ``intrinsic`` (the source solutions' intrinsic vectors) and ``info``
    (model, fingerprint, sources, settings, loss log, and per method and task the dev scores of the
    first solution and of its reconstruction ``θ⁰ + W E(Δθ)``).
    """
    if len({r.method for r in runs}) < 2:
        raise ValueError("a unified subspace needs solutions of at least two methods")
    tasks = sorted({r.task for r in runs})
    missing = [(m, t) for m in {r.method for r in runs} for t in tasks
               if not any(r.method == m and r.task == t for r in runs)]
    if missing:
        raise ValueError(f"every method needs a solution on every source task; missing (method, task): {missing}")
    start = time.perf_counter()
    with using_threads(config.threads):
        data = {t: _task_rows(t, config.train_size, config.seed) for t in tasks}
        labels = {data[t][0].num_labels for t in tasks}
        if len(labels) > 1:
            raise ValueError(f"the source tasks have different label counts {sorted(labels)}")
        num_labels = labels.pop()
        layouts, refs, specs, solutions = load_solutions(loaded, runs, num_labels)
        base = ResidualSystem(copy.deepcopy(loaded), num_labels=num_labels, seed=0)
        info = {"model": model_name or getattr(loaded, "name", None), "fingerprint": fingerprint(base),
                "tasks": tasks, "approximation": {k: v for k, v in vars(config).items() if k != "progress"},
                "sources": [{"method": s.run.method, "task": s.run.task, "seed": s.run.seed,
                             "run_dir": str(s.run.run_dir)} for s in solutions]}
        del base
        like = next(loaded.model.parameters())
        refs = {m: r.to(like) for m, r in refs.items()}
        projections = UnifiedProjections(config.dim, specs, layouts, refs, info, seed=config.seed).to(like)
        for m in projections.methods:
            projections.maps[m].set_scale(torch.stack([s.delta for s in solutions if s.run.method == m]))
        if config.init == "aligned":
            init_gen = torch.Generator().manual_seed(config.seed + 1)
            targets = task_targets(tasks, config.dim, init_gen)
            for m in projections.methods:
                own = [s for s in solutions if s.run.method == m]
                projections.maps[m].align(torch.stack([s.delta for s in own]).to(like),
                                          torch.stack([targets[s.run.task] for s in own]), init_gen)
        systems = driven_systems(loaded, projections, num_labels, runs[0].pooling)
        encoded = {t: encode(data[t][1], loaded.tokenizer, config.max_length) for t in tasks}
        pool = defaultdict(list)
        for s in solutions:
            pool[(s.run.method, s.run.task)].append(s)
        methods = projections.methods
        optimizer = torch.optim.Adam([p for m in methods for p in projections.maps[m].trained_parameters()],
                                     lr=config.lr)
        gen = torch.Generator().manual_seed(config.seed)
        log: list[dict[str, Any]] = []
        running: dict[str, float] = defaultdict(float)
        bar = tqdm(range(config.steps), desc="subspace approximation", disable=not config.progress)
        for step in bar:
            task = tasks[step % len(tasks)]
            rows = torch.randint(len(encoded[task]), (config.batch_size,), generator=gen).tolist()
            batch = encoded[task].batch(rows)
            chosen = {m: pool[(m, task)][int(torch.randint(len(pool[(m, task)]), (1,), generator=gen))]
                      for m in methods}
            intrinsic = {m: projections.maps[m].encode(chosen[m].delta) for m in methods}
            weights = simplex_point(len(methods), gen).to(like)
            point = sum(w * intrinsic[m] for w, m in zip(weights, methods))
            loss = torch.zeros((), dtype=like.dtype)
            for m in methods:
                system, controller = systems[m]
                _set_head(system, chosen[m].head)
                controller.drive(point)
                task_loss = system.cost(batch)
                target = chosen[m].delta
                recon = (projections.maps[m].offset(intrinsic[m]) - target).pow(2).sum() / target.pow(2).sum()
                loss = loss + task_loss + config.recon_weight * recon
                running[f"task.{m}"] += task_loss.item()
                running[f"recon.{m}"] += recon.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"subspace approximation diverged at step {step} (loss {loss.item()}); "
                                         "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running["loss"] += loss.item()
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                n = (step % config.log_every) + 1
                entry = {"step": step + 1, **{k: v / n for k, v in running.items()}}
                with torch.no_grad():
                    vecs = [projections.maps[m].encode(chosen[m].delta) for m in methods]
                    entry["intrinsic_distance"] = float(torch.stack(
                        [torch.dist(a, b) for i, a in enumerate(vecs) for b in vecs[i + 1:]]).mean())
                log.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
                running.clear()
        for _, controller in systems.values():
            controller.drive(None)
        with torch.no_grad():
            projections.intrinsic = {m: torch.stack([projections.maps[m].encode(s.delta) for s in solutions
                                                     if s.run.method == m]) for m in methods}
        projections.info["log"] = log
        projections.info["reconstruction"] = reconstruction_scores(
            loaded, projections, solutions, {t: data[t] for t in tasks}, config, systems)
        projections.info["seconds"] = time.perf_counter() - start
    return projections


def span_coordinates(w: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``z* = argmin_z ‖W z − Δθ‖`` and the condition number σ₁/σ_d of ``W``: (D, d), (D,) -> (d,), float.

    Solved in float64 with the pseudo-inverse.  In float32, ``torch.linalg.lstsq``'s default cut-off
    (eps·max(D, d)·σ₁, 5.5e-3·σ₁ for D = 46,080) drops directions of a well-conditioned ``W``: a prefix
    decoder with σ_d/σ₁ = 2.2e-3 lost its fourth coordinate (0.00003 against 0.746).  ``z*`` comes back in
    ``w``'s dtype.
    """
    w64, d64 = w.detach().to(torch.float64), delta.detach().to(torch.float64)
    sv = torch.linalg.svdvals(w64)
    z = torch.linalg.pinv(w64) @ d64
    return z.to(w.dtype), float(sv[0] / sv[-1]) if float(sv[-1]) > 0 else float("inf")


def reconstruction_scores(loaded: LoadedModel, projections: UnifiedProjections, solutions: Sequence[Solution],
                          data: dict[str, tuple], config: ApproximationConfig,
                          systems: dict[str, tuple[ResidualSystem, UnifiedSubspace]] | None = None
                          ) -> list[dict[str, Any]]:
    """Per method and source task: dev scores of the first solution and of ``θ⁰ + W E(Δθ)``
    (``systems``: the driven systems of :func:`driven_systems`, made here when not given)."""
    out = []
    if systems is None:
        systems = driven_systems(loaded, projections, next(iter(data.values()))[0].num_labels,
                                 solutions[0].run.pooling)
    for method, (system, controller) in systems.items():
        for task, (spec, _, dev) in data.items():
            sol = next(s for s in solutions if s.run.method == method and s.run.task == task)
            dev_rows = dev[:config.eval_size] if config.eval_size else dev
            _set_head(system, sol.head)
            with torch.no_grad():
                # θ(z) = θ exactly when s W z = Δθ; the least-squares z shows how much of Δθ the span of W holds.
                w = projections.maps[method].scale * projections.maps[method].decoder.weight
                original_z, condition = span_coordinates(w, sol.delta)
                encoded_z = projections.maps[method].encode(sol.delta)
            row = {"method": method, "task": task, "metric": spec.metric, "n_dev": len(dev_rows),
                   "span_solve": "float64 pseudo-inverse", "span_condition_number": condition}
            for label, z in (("reconstructed", encoded_z), ("span_projection", original_z)):
                controller.drive(z)
                row[label] = evaluate(system, dev_rows, spec, loaded.tokenizer, max_length=config.max_length)
            controller.drive(None)
            row["original"] = original_score(loaded, sol, spec, dev_rows, config.max_length)
            with torch.no_grad():
                decoded = projections.maps[method].offset(encoded_z)
            row["relative_reconstruction_error"] = float((decoded - sol.delta).norm() / sol.delta.norm())
            out.append(row)
    return out


def original_score(loaded: LoadedModel, solution: Solution, spec: TaskSpec, dev: Sequence[Example],
                   max_length: int) -> dict[str, float]:
    """Dev scores of a source solution as trained (its own run's deltas)."""
    run = solution.run
    system, _ = reference_system(loaded, run.method, run.options, spec.num_labels, run.pooling)
    checkpoint.load(system, reported_deltas(run.run_dir))
    return evaluate(system, dev, spec, loaded.tokenizer, max_length=max_length)


# --- stage 3 and the landscape --------------------------------------------------------------------
def transfer_scores(loaded: LoadedModel, projections: str | Path, run_dir: str | Path, task: str,
                    methods: Sequence[str] | None = None, dev_size: int | None = None, max_length: int = 128,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Stage 3: the z (and head) of a trained ``unified_subspace`` run decoded by each method; dev scores.

    The run's own method is included (its row reproduces the run's dev score).
    """
    proj = UnifiedProjections.load(projections, dtype=next(loaded.model.parameters()).dtype)
    spec = resolve_task(task)
    dev = load_split(spec, "dev", n=dev_size, seed=seed)
    header = checkpoint.read_header(reported_deltas(run_dir))
    if header.get("methods") != ["unified_subspace"]:
        raise ValueError(f"{run_dir} holds deltas of {header.get('methods')}, not of a unified_subspace run")
    out = []
    for method in methods or proj.methods:
        system = ResidualSystem(copy.deepcopy(loaded), num_labels=spec.num_labels, seed=0)
        system.add(UnifiedSubspace(proj, delta=method))
        checkpoint.load(system, reported_deltas(run_dir))
        scores = evaluate(system, dev, spec, loaded.tokenizer, max_length=max_length)
        out.append({"method": method, "task": task, "metric": spec.metric, "score": scores[spec.metric],
                    "scores": scores, "n_dev": len(dev)})
    return out


PLANES = ("methods", "tasks")
"""Landscape planes: ``methods``, through the three methods' intrinsic vectors of one task (the paper's);
``tasks``, through three source tasks' intrinsic vectors (each the mean over the methods).  An aligned
approximation makes the methods' vectors of a task (nearly) equal, which collapses the first plane to a point."""


def plane_points(points: dict[str, torch.Tensor], grid: Sequence[float]) -> list[tuple[float, float, torch.Tensor]]:
    """``(α, β, α P_a + β P_b + (1−α−β) P_c)`` for α, β on ``grid`` (three named points a, b, c)."""
    if len(points) != 3:
        raise ValueError(f"an interpolation plane needs three points, got {sorted(points)}")
    a, b, c = points.values()
    return [(float(x), float(y), x * a + y * b + (1 - x - y) * c) for x in grid for y in grid]


def _plane(proj: UnifiedProjections, by_method: dict[str, list[dict]], task: str, kind: str
           ) -> dict[str, torch.Tensor]:
    """The three named points of a landscape plane (see :data:`PLANES`)."""
    if kind == "methods":
        return {m: proj.intrinsic[m][next(i for i, s in enumerate(rows) if s["task"] == task)]
                for m, rows in by_method.items()}
    tasks = [task] + [t for t in proj.info.get("tasks", []) if t != task]
    if len(tasks) < 3:
        raise ValueError(f"a plane of tasks needs three source tasks; these projections have {tasks}")
    return {t: torch.stack([proj.intrinsic[m][next(i for i, s in enumerate(rows) if s["task"] == t)]
                            for m, rows in by_method.items()]).mean(0) for t in tasks[:3]}


def landscape(loaded: LoadedModel, projections: str | Path, task: str, grid: Sequence[float],
              dev_size: int | None = 256, max_length: int = 128, seed: int = 0,
              plane: str = "methods") -> dict[str, Any]:
    """Every method's dev score on ``task`` over an interpolation plane of intrinsic vectors (:data:`PLANES`).

    Each method is scored with the head of its own source solution on ``task`` (a source task of the
    projections); its first source solution on a task stands for it.  Returns ``{task, metric, methods,
    plane_kind, plane (the three points' names), plane_distances, grid, points: [{alpha, beta, scores}]}``.
    """
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r} is not one of {', '.join(PLANES)}")
    like = next(loaded.model.parameters())
    proj = UnifiedProjections.load(projections, dtype=like.dtype)
    sources = proj.info.get("sources", [])
    spec = resolve_task(task)
    dev = load_split(spec, "dev", n=dev_size, seed=seed)
    # intrinsic[m] holds method m's sources in the order of info["sources"]
    by_method = {m: [s for s in sources if s["method"] == m] for m in proj.methods}
    first = {m: next((i for i, s in enumerate(rows) if s["task"] == task), None) for m, rows in by_method.items()}
    if None in first.values():
        raise ProjectionFileError(f"{task!r} is not a source task of every method of these projections "
                                  f"(source tasks: {sorted({s['task'] for s in sources})})")
    points3 = _plane(proj, by_method, task, plane)
    heads = {}
    for m in proj.methods:
        run = SourceRun.read(by_method[m][first[m]]["run_dir"])
        system, _ = reference_system(loaded, m, run.options, spec.num_labels, run.pooling)
        checkpoint.load(system, reported_deltas(run.run_dir))
        heads[m] = {c.name: c.param.detach().clone() for c in system.readout.controls()}
    systems = driven_systems(loaded, proj, spec.num_labels, run.pooling)
    points = []
    for alpha, beta, z in plane_points(points3, grid):
        scores = {}
        for m, (system, controller) in systems.items():
            _set_head(system, heads[m])
            controller.drive(z)
            scores[m] = evaluate(system, dev, spec, loaded.tokenizer, max_length=max_length)[spec.metric]
        points.append({"alpha": alpha, "beta": beta, "scores": scores})
    names = list(points3)
    distances = {f"{a}-{b}": float(torch.dist(points3[a], points3[b])) for i, a in enumerate(names)
                 for b in names[i + 1:]}
    return {"task": task, "metric": spec.metric, "methods": proj.methods, "plane_kind": plane, "plane": names,
            "plane_distances": distances, "grid": list(grid), "n_dev": len(dev), "points": points}


__all__ = ["PLANES", "ApproximationConfig", "Solution", "SourceRun", "approximate", "landscape", "load_solutions",
           "plane_points", "reconstruction_scores", "transfer_scores"]
