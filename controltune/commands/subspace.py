"""``controltune subspace``: a unified optimisation subspace of several delta methods (Yi et al., 2022).

The pipeline, one stage per call::

    # 1. approximation: projections of adapter, prefix and LoRA solutions trained on source tasks
    controltune subspace approximate --model minilm --dim 4 --out sub.safetensors \\
        --source runs/lora-sst2 --source runs/adapter-sst2 --source runs/prefix-sst2 \\
        --source runs/lora-mrpc --source runs/adapter-mrpc --source runs/prefix-mrpc
    # 2. optimisation: train only z (and a fresh head) of one method's up-projection on an unseen task
    controltune subspace optimize --projections sub.safetensors --delta adapter --task rte --out runs/z-rte
    # 3. transfer: the z found with the adapter, decoded by every method, scored on dev
    controltune subspace transfer --projections sub.safetensors --run runs/z-rte --task rte
    # the landscape: every method on a plane of intrinsic vectors (--plane methods: the three methods'
    # vectors of the task, the paper's; --plane tasks: three source tasks' vectors, for aligned projections)
    controltune subspace landscape --projections sub.safetensors --task sst2 --grid=-0.5,1.5,9 --plane tasks

A source is a run folder of ``controltune train`` (or a sweep's run folder: ``metrics.json`` and
``deltas.safetensors``) of one method; its solution is the deltas the run reports (``best.safetensors``,
best on validation, when it had validation rows).  Every method needs a solution on every source task,
and the runs of one method must share their options.  Stage 2 is ``controltune train --method
unified_subspace --opt projections=... --opt delta=...`` with the training options given here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..results import stamp, write_json
from .models import vars_of

if TYPE_CHECKING:
    from ..zoo import LoadedModel

STAGES = ("approximate", "optimize", "transfer", "landscape")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n", 1)[1]
    parser.add_argument("stage", choices=STAGES, help="which stage to run (see above)")
    parser.add_argument("--model", default="minilm", help="minilm, smollm2, random:<family> or a checkpoint folder")
    parser.add_argument("--projections", metavar="FILE", help="the projections file (written by approximate)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own setting)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = parser.add_argument_group("approximate")
    a.add_argument("--source", action="append", default=[], metavar="RUN", help="a source run folder (repeat)")
    a.add_argument("--dim", type=int, default=4, help="the subspace dimension d (the paper: 4 for one task, "
                                                      "100 for many)")
    a.add_argument("--steps", type=int, default=600, help="approximation steps (each: one batch of one source "
                                                          "task through every method)")
    a.add_argument("--lr", type=float, default=None, help="Adam learning rate of the projections (approximate, "
                                                          "default 1e-2) or peak rate of z (optimize, default 1e-2)")
    a.add_argument("--recon-weight", type=float, default=1.0, help="λ_rec of the relative reconstruction error")
    a.add_argument("--init", choices=["aligned", "random"], default="aligned",
                   help="aligned: start at an exact reconstruction, the methods' intrinsic vectors of a task equal "
                        "(default); random: the paper's small random weights")
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--train-size", type=int, default=2000, help="seeded training rows per source task (0: all)")
    a.add_argument("--eval-size", type=int, default=400, help="dev rows for the reconstruction scores (0: all)")
    a.add_argument("--out", metavar="PATH", help="approximate: the projections file to write; optimize: the run "
                                                 "folder")
    o = parser.add_argument_group("optimize, transfer, landscape")
    o.add_argument("--task", help="the task (optimize, transfer: an unseen task; landscape: a source task)")
    o.add_argument("--delta", help="optimize: the method whose up-projection z drives")
    o.add_argument("--z-init", default="zero", choices=["zero", "mean"],
                   help="optimize: start at θ⁰ (zero) or at the mean source intrinsic vector")
    o.add_argument("--epochs", type=float, default=None, help="optimize: epochs (default 3)")
    o.add_argument("--val-size", type=float, default=None, help="optimize: held-out training rows for selection")
    o.add_argument("--eval-every", type=int, default=None, help="optimize: validation every N steps")
    o.add_argument("--run", metavar="DIR", help="transfer: the run folder of an optimize stage")
    o.add_argument("--to", default=None, help="transfer: comma-separated methods (default: every method)")
    o.add_argument("--dev-size", type=int, default=None, help="transfer, landscape: seeded dev rows (default all; "
                                                              "landscape 256)")
    o.add_argument("--grid", default="-0.5,1.5,9", help="landscape: LOW,HIGH,N points per axis for α and β")
    o.add_argument("--plane", choices=["methods", "tasks"], default="methods",
                   help="landscape: through the three methods' intrinsic vectors of --task (the paper's), or "
                        "through three source tasks' vectors (an aligned approximation makes the methods' "
                        "vectors of a task nearly equal)")


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"subspace {args.stage} needs {', '.join(missing)}")


def grid_values(text: str) -> list[float]:
    """``"-0.5,1.5,9"`` -> 9 evenly spaced values from -0.5 to 1.5."""
    try:
        low, high, n = text.split(",")
        low_f, high_f, count = float(low), float(high), int(n)
    except ValueError as err:
        raise ValueError(f"--grid {text!r} is not LOW,HIGH,N (e.g. -0.5,1.5,9)") from err
    if count < 1 or not high_f >= low_f:
        raise ValueError(f"--grid {text!r}: need N >= 1 and HIGH >= LOW")
    return [low_f + (high_f - low_f) * i / max(count - 1, 1) for i in range(count)]


def run(args: argparse.Namespace) -> int:
    return {"approximate": _approximate, "optimize": _optimize, "transfer": _transfer,
            "landscape": _landscape}[args.stage](args)


def _loaded(args: argparse.Namespace) -> LoadedModel:
    from ..zoo import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)


def _approximate(args: argparse.Namespace) -> int:
    from ..unified_subspace import ApproximationConfig, SourceRun, approximate

    _need(args, "source", "out")
    runs = [SourceRun.read(s) for s in args.source]
    models = {r.model for r in runs}
    if models != {args.model}:
        raise ValueError(f"the source runs were trained on {sorted(models)}, --model is {args.model!r}")
    config = ApproximationConfig(dim=args.dim, steps=args.steps, lr=args.lr or 1e-2, recon_weight=args.recon_weight,
                                 init=args.init, batch_size=args.batch_size, max_length=args.max_length,
                                 train_size=args.train_size or None, eval_size=args.eval_size, seed=args.seed,
                                 threads=args.threads, progress=not args.no_progress)
    projections = approximate(_loaded(args), runs, config, model_name=args.model)
    path = projections.save(args.out)
    for row in projections.info["reconstruction"]:
        m = row["metric"]
        print(f"{row['method']:>8} on {row['task']}: original {m} {row['original'][m]:.4f}, reconstructed "
              f"{row['reconstructed'][m]:.4f}, best in span {row['span_projection'][m]:.4f} "
              f"(relative error of Δθ {row['relative_reconstruction_error']:.3f})")
    print(f"wrote {path} (d = {args.dim}, methods {', '.join(projections.methods)}, "
          f"{projections.info['seconds']:.0f} s)")
    if args.json:
        write_json(args.json, {**stamp(vars_of(args)), "info": projections.info})
    return 0


def _optimize(args: argparse.Namespace) -> int:
    from ..cli import build_parser

    _need(args, "projections", "delta", "task")
    if not Path(args.projections).is_file():
        raise ValueError(f"--projections {args.projections} is not a file")
    argv = ["train", "--model", args.model, "--task", args.task, "--method", "unified_subspace",
            "--opt", f"projections={args.projections}", "--opt", f"delta={args.delta}",
            "--opt", f"z_init={args.z_init}", "--lr", str(args.lr or 1e-2), "--epochs", str(args.epochs or 3),
            "--max-length", str(args.max_length), "--seed", str(args.seed), "--dtype", args.dtype,
            "--device", args.device, "--warmup", "0.06", "--grad-clip", "1.0"]
    for flag, value in (("--val-size", args.val_size), ("--eval-every", args.eval_every), ("--out", args.out),
                        ("--threads", args.threads), ("--json", args.json)):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_progress:
        argv.append("--no-progress")
    train_args = build_parser().parse_args(argv)
    return int(train_args._run(train_args) or 0)


def _transfer(args: argparse.Namespace) -> int:
    from ..unified_subspace import transfer_scores

    _need(args, "projections", "run", "task")
    methods = [m.strip() for m in args.to.split(",") if m.strip()] if args.to else None
    rows = transfer_scores(_loaded(args), args.projections, args.run, args.task, methods, dev_size=args.dev_size,
                           max_length=args.max_length, seed=args.seed)
    for row in rows:
        print(f"{row['method']:>8}: {row['metric']} {row['score']:.4f} on {row['n_dev']} dev rows of {row['task']}")
    if args.json:
        write_json(args.json, {**stamp(vars_of(args)), "rows": rows})
    return 0


def _landscape(args: argparse.Namespace) -> int:
    from ..unified_subspace import landscape

    _need(args, "projections", "task")
    result = landscape(_loaded(args), args.projections, args.task, grid_values(args.grid),
                       dev_size=256 if args.dev_size is None else args.dev_size, max_length=args.max_length,
                       seed=args.seed, plane=args.plane)
    best = {m: max(p["scores"][m] for p in result["points"]) for m in result["methods"]}
    print(f"landscape of {args.task} on the plane of {result['plane_kind']} {', '.join(result['plane'])}: "
          f"{len(result['points'])} points; "
          "best " + ", ".join(f"{m} {v:.4f}" for m, v in best.items()))
    if args.json:
        write_json(args.json, {**stamp(vars_of(args)), **result})
    return 0
