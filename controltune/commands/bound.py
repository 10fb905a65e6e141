"""``controltune bound``: Lipschitz bounds on the error of a low-dimensional delta approximation.

Takes a trained reference u* — ``--reference DIR``, the output folder of a finished
``controltune train`` run of ``lora`` or ``full`` (``metrics.json`` and
``deltas.safetensors``; model, task and options are read from the run) — projects
it onto a structure (``--structure rank|subspace|sparse|layers``) of each size in
``--sizes``, and prints, per size, the distance ‖u* − Πu*‖, the measured gap
|J(u*) − J(Πu*)| on a fixed dev batch, the co-state estimate and every bound with
its tightness (bound / gap).  Example::

    controltune train --model minilm --method lora --opt rank=16 --opt alpha=32 --opt targets=q,v \\
        --task sst2 --train-size 2000 --steps 400 --batch-size 16 --max-length 64 --out runs/lora16
    controltune bound --reference runs/lora16 --structure rank --sizes 1,2,4,8 --dtype float64 \\
        --json runs/bound_rank.json

With ``--certified`` it instead prints, per size, the certified bound
``B(ε) ≥ sup_{‖d‖≤ε} |J(u*+d) − J(u*)|`` at ``ε = ‖u* − Πu*‖`` (the least of the
Taylor, enclosure and readout-range routes of :mod:`controltune.bounds.certified`),
an attack lower bound of the same supremum (projected gradient ascent) and the gap;
``--json`` then writes ``{"rows": [{"structure", "size", "epsilon", "gap", "attack",
"certified", "route", "seconds", ...}], "curve": [...]}`` (``curve``: the radii of
``--epsilons``)::

    controltune bound --reference runs/lora16 --structure rank --sizes 1,4 --dtype float64 --certified \\
        --json runs/bound_certified.json
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..bounds import STRUCTURES, dev_scorer, evaluation_batch, load_reference, reference_constants, sweep
from ..bounds.reference import RUN_FILES
from ..results import stamp, write_json

if TYPE_CHECKING:
    from ..bounds.reference import Reference

BOUNDS = ("certified", "global", "local", "sampled", "adjoint", "tangent", "costate_cs")


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--epsilons takes comma-separated radii such as 0.01,0.1,1, got {text!r}") \
            from err
    if any(not (v >= 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"--epsilons needs finite non-negative radii, got {text!r}")
    return values


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers such as 1,2,4,8, got {text!r}") \
            from err
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"--sizes needs non-negative integers, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, metavar="DIR",
                        help="output folder of a finished `controltune train` run of lora or full "
                             "(metrics.json + deltas.safetensors)")
    parser.add_argument("--structure", required=True, choices=STRUCTURES)
    parser.add_argument("--sizes", type=_sizes, required=True, help="comma-separated sizes (rank r, dim d, k)")
    parser.add_argument("--targets", default=None,
                        help="for a full fine-tuning reference: the linear maps (roles, comma-separated) whose "
                             "θ − θ₀ is the control (default q,v); a LoRA reference carries its own")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=32, help="dev sequences in the batch J is measured on")
    parser.add_argument("--dev-size", type=int, default=None, help="dev rows scored per projection (default all)")
    parser.add_argument("--iters", type=int, default=20, help="power iterations per Jacobian norm")
    parser.add_argument("--no-progress", action="store_true")
    cert = parser.add_argument_group("certified bound (--certified)")
    cert.add_argument("--certified", action="store_true",
                      help="certified bound of sup over the ball ‖d‖ ≤ ε = ‖u* − Πu*‖ beside an attack lower bound "
                           "(replaces the Lipschitz bounds table)")
    cert.add_argument("--epsilons", type=_epsilons, default=[],
                      help="also certify and attack these radii (comma-separated), written as the JSON's curve")
    cert.add_argument("--grid", type=_epsilons, default=[],
                      help="certificates only (no attack) at these radii, written as the JSON's grid")
    cert.add_argument("--attack-steps", type=int, default=10, help="ascent steps per attack start")
    cert.add_argument("--attack-restarts", type=int, default=2, help="random attack starts (besides ±∇J and Πu* − u*)")


def _check_json_path(json_path: str | None, reference: str) -> None:
    """Refuse a ``--json`` path that would replace a file of the reference run (before any work)."""
    if json_path is None or not Path(json_path).exists():
        return
    for name in RUN_FILES:
        path = Path(reference) / name
        if path.exists() and os.path.samefile(json_path, path):
            raise ValueError(f"--json {json_path} is {path}, a file of the reference run: it would be overwritten; "
                             "choose another path")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)
    progress = not args.no_progress
    targets = [t for t in args.targets.split(",") if t] if args.targets is not None else None
    _check_json_path(args.json, args.reference)
    if not args.certified and (args.epsilons or args.grid):
        raise ValueError("--epsilons and --grid apply with --certified only")
    if args.attack_steps < 0 or args.attack_restarts < 0:
        raise ValueError("--attack-steps and --attack-restarts must be >= 0")
    ref = load_reference(args.reference, targets, dtype=args.dtype, device=args.device)
    batch = {k: v.to(args.device) for k, v in evaluation_batch(ref, args.eval_size, args.max_length,
                                                                args.seed).items()}
    if args.certified:
        return _run_certified(args, ref, batch)
    constants = reference_constants(ref.system, batch, iters=args.iters, progress=progress)
    dev = dev_scorer(ref, args.dev_size, args.max_length, args.seed)
    dev_reference = dev()
    rows = sweep(ref, batch, constants, args.structure, args.sizes, dev, args.seed, progress=progress)
    metric = ref.spec.metric
    print(f"reference {ref.info['method']} run {args.reference} on {ref.spec.name}: dev {metric} "
          f"{dev_reference[metric]:.4f}; J = {rows[0]['J_reference'] if rows else float('nan'):.6g} on "
          f"{args.eval_size} dev sequences")
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


def _run_certified(args: argparse.Namespace, ref: Reference, batch: dict) -> int:
    """``--certified``: certificate, attack and gap per size (and per radius of ``--epsilons``)."""
    from ..bounds.certified import certified_sweep

    out = certified_sweep(ref, batch, args.structure, args.sizes, args.epsilons, args.attack_steps,
                          args.attack_restarts, args.seed, args.grid, progress=not args.no_progress)
    rows, curve = out["rows"], out["curve"]
    print(f"reference {ref.info['method']} run {args.reference} on {ref.spec.name}: certified bound of "
          f"sup_(‖d‖≤ε) |J(u*+d) − J(u*)| on {args.eval_size} dev sequences")

    def ratio(x: float | None) -> str:
        return f"{x:10.3g}" if x is not None else f"{'-':>10}"

    print(f"{'size':>8} {'epsilon':>10} {'gap':>10} {'attack':>10} {'certified':>10} {'route':>10} "
          f"{'cert/att':>10} {'cert/gap':>10}")
    for r in rows:
        print(f"{r['size']:>8} {r['epsilon']:10.4g} {r['gap']:10.4g} {r['attack']:10.4g} {r['certified']:10.4g} "
              f"{r['route']:>10} {ratio(r['tightness_attack'])} {ratio(r['tightness_gap'])}")
    for r in curve:
        print(f"{'ball':>8} {r['epsilon']:10.4g} {'-':>10} {r['attack']:10.4g} {r['certified']:10.4g} "
              f"{r['route']:>10} {ratio(r['tightness_attack'])} {'-':>10}")
    if out["grid"]:
        print("certificates only: " + "; ".join(f"ε {g['epsilon']:.3g}: {g['certified']:.4g} ({g['route']})"
                                                for g in out["grid"]))
    if args.json:
        write_json(args.json, {**stamp({k: v for k, v in vars(args).items() if not k.startswith("_")}),
                               "task": ref.spec.name, "reference": ref.info, **out})
    return 0
