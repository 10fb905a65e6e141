"""``controltune sweep SPEC``: run a grid of training runs (on Ray), one JSONL row per cell, resumable.

Examples::

    controltune sweep glue.yaml                           # embedded local Ray, 1 CPU per cell
    controltune sweep glue.yaml --cpus-per-cell 2 --out runs/glue.jsonl
    controltune sweep glue.yaml --address ray://head:10001   # an existing Ray cluster
    controltune sweep glue.yaml --executor local          # no Ray: cells one by one in this process
    controltune sweep glue.yaml --dry-run                 # list the cells and which are finished

The spec format is described in :mod:`controltune.sweep`.  Rerunning the same command skips
the finished cells (``done`` or ``diverged``) and runs the rest.  Exit status 0 when every
cell finished, 1 when some failed (their rows say why), 2 on a bad spec or option.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sweep_spec import SweepSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="YAML or JSON grid over model, method, options, task, seed, lr (+ train settings)")
    parser.add_argument("--out", default=None, metavar="JSONL",
                        help="the sweep's JSONL (default: the spec's `out`, else <spec>.jsonl beside the spec)")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (e.g. ray://head:10001); default: an embedded local Ray")
    parser.add_argument("--cpus-per-cell", type=int, default=1, metavar="N",
                        help="CPUs reserved for each cell, and its torch threads (default 1)")
    parser.add_argument("--cpus", type=int, default=None, metavar="N",
                        help="CPUs of the embedded local Ray (default: every core)")
    parser.add_argument("--executor", default="auto", choices=["auto", "ray", "local"],
                        help="auto: Ray, falling back to this process with a notice; ray: Ray or an error; "
                             "local: cells one by one in this process")
    parser.add_argument("--runs", default=None, metavar="DIR",
                        help="also keep each cell's run folder (metrics, deltas, checkpoints) under DIR; "
                             "a cell stopped midway then resumes from its checkpoint")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep finished cells' resume states (checkpoint.pt) under --runs; by default each is "
                             "deleted once the cell's row is written (its metrics and deltas stay)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether each is finished")


def default_out(spec_path: str, spec_out: Path | None) -> Path:
    """The JSONL: the spec's ``out``, else ``<spec stem>.jsonl`` beside the spec."""
    if spec_out is not None:
        return spec_out
    path = Path(spec_path)
    return path.with_suffix(".jsonl")


def dry_run(spec: SweepSpec, out: Path, defaults: dict) -> int:
    from ..results import read_jsonl
    from ..sweep import finished_configs
    from ..sweep_spec import canonical_config, describe, expand, varying_keys

    cells = expand(spec, defaults)
    finished = finished_configs(read_jsonl(out))
    varying = varying_keys(cells)
    for i, cell in enumerate(cells, 1):
        mark = "finished" if canonical_config(cell) in finished else "to run"
        print(f"[{i}/{len(cells)}] {mark}: {describe(cell, varying)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..results import write_json
    from ..sweep import run_sweep
    from ..sweep_spec import load_spec

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else default_out(args.spec, spec.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the sweep's JSONL file")
    defaults = {"dtype": args.dtype, "device": args.device, "seed": args.seed}
    if args.dry_run:
        return dry_run(spec, out, defaults)
    summary = run_sweep(spec, out, address=args.address, cpus_per_cell=args.cpus_per_cell, cpus=args.cpus,
                        executor=args.executor, runs_dir=args.runs, defaults=defaults,
                        keep_checkpoints=args.keep_checkpoints)
    print(f"sweep {spec.name}: {summary['ran']} ran ({summary['done']} done, {summary['diverged']} diverged, "
          f"{summary['failed']} failed), {summary['skipped']} skipped -> {out}")
    if args.json:
        write_json(args.json, summary)
    return 1 if summary["failed"] else 0
