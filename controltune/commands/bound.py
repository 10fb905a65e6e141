"""``controltune bound``: Lipschitz bounds on the error of a low-dimensional delta approximation.

Trains a reference u* (``--reference lora:R`` or ``full``) on a task, projects it
onto a structure (``--structure rank|subspace|sparse|layers``) of each size in
``--sizes``, and prints, per size, the distance ‖u* − Πu*‖, the measured gap
|J(u*) − J(Πu*)| on a fixed dev batch, the co-state estimate and every bound with
its tightness (bound / gap).  Example::

    controltune bound --model minilm --task sst2 --reference lora:16 --structure rank --sizes 1,2,4,8 \\
        --train-size 2000 --steps 400 --dtype float64 --json runs/bound_rank.json
"""

from __future__ import annotations

import argparse

from ..approximation import (
    STRUCTURES,
    dev_scorer,
    evaluation_batch,
    parse_reference,
    reference_constants,
    sweep,
    train_reference,
)
from ..results import stamp, write_json

BOUNDS = ("certified", "global", "local", "sampled", "adjoint", "tangent", "costate_cs")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers such as 1,2,4,8, got {text!r}") \
            from err
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"--sizes needs non-negative integers, got {text!r}")
    return sizes


def _reference(text: str) -> str:
    try:
        parse_reference(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm, random:<family> or a checkpoint folder")
    parser.add_argument("--task", required=True, help="sst2, mrpc, rte, cola or a path to JSONL data")
    parser.add_argument("--reference", type=_reference, default="lora:16", help="lora:<rank> or full")
    parser.add_argument("--structure", required=True, choices=STRUCTURES)
    parser.add_argument("--sizes", type=_sizes, required=True, help="comma-separated sizes (rank r, dim d, k)")
    parser.add_argument("--targets", default="q,v", help="linear maps carrying the delta (roles), comma-separated")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=32, help="dev sequences in the batch J is measured on")
    parser.add_argument("--dev-size", type=int, default=None, help="dev rows scored per projection (default all)")
    parser.add_argument("--iters", type=int, default=20, help="power iterations per Jacobian norm")
    parser.add_argument("--cache", default=None, metavar="FILE", help="re-use/save the trained LoRA reference here")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)
    progress = not args.no_progress
    targets = [t for t in args.targets.split(",") if t]
    ref = train_reference(args.model, args.task, args.reference, targets, args.train_size, args.steps,
                          args.batch_size, args.max_length, args.lr, args.seed, args.device, args.dtype,
                          cache=args.cache, progress=progress)
    batch = {k: v.to(args.device) for k, v in evaluation_batch(ref, args.eval_size, args.max_length,
                                                                args.seed).items()}
    constants = reference_constants(ref.system, batch, iters=args.iters, progress=progress)
    dev = dev_scorer(ref, args.dev_size, args.max_length, args.seed)
    dev_reference = dev()
    rows = sweep(ref, batch, constants, args.structure, args.sizes, dev, args.seed, progress=progress)
    metric = ref.spec.metric
    print(f"reference {args.reference} on {ref.spec.name}: dev {metric} {dev_reference[metric]:.4f}; "
          f"J = {rows[0]['J_reference'] if rows else float('nan'):.6g} on {args.eval_size} dev sequences")
    print(f"{'size':>8} {'dist':>9} {'gap':>10} {'co-state':>10} " + " ".join(f"{b:>12}" for b in BOUNDS)
          + f" {'d' + metric:>8}")
    for r in rows:
        tight = " ".join(f"{r['bounds'][b]['cost']:12.3g}" for b in BOUNDS)
        dm = r["dev_projected"][metric] - dev_reference[metric]
        print(f"{r['size']:>8} {r['distance']:9.3g} {r['gap']:10.3g} {r['costate_estimate']:10.3g} {tight} {dm:8.4f}")
    tight = {b: [r["bounds"][b]["tightness"] for r in rows if r["bounds"][b]["tightness"] is not None] for b in BOUNDS}
    if all(tight.values()):
        print("tightness (bound / gap): " + "; ".join(f"{b} {min(t):.3g}-{max(t):.3g}" for b, t in tight.items()))
    if args.json:
        write_json(args.json, {**stamp({k: v for k, v in vars(args).items() if not k.startswith("_")}),
                               "task": ref.spec.name, "reference": ref.info, "dev_reference": dev_reference,
                               "constants": constants.to_dict(), "rows": rows})
    return 0
