"""Certified bound of sup_{‖d‖≤ε} |J(u*+d) − J(u*)| on MiniLM beside the attack and the gap (issue 17).

Trains the reference (a rank-16 LoRA on q, v of all-MiniLM-L6-v2, SST-2) unless ``--reference``
already holds a finished run, then runs ``controltune bound --certified`` on it and writes
``experiments/results/bound_certified_minilm.json`` (read by the ``bound_vs_gap`` figure).
About 3 min of training and 15 min of bounds and attacks at one thread::

    OMP_NUM_THREADS=1 python experiments/bound_certified.py --reference runs/lora16_sst2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controltune.cli import main

TRAIN = ["train", "--model", "minilm", "--method", "lora", "--opt", "rank=16", "--opt", "alpha=32", "--opt",
         "targets=q,v", "--task", "sst2", "--train-size", "2000", "--steps", "400", "--no-progress"]
GRID = "1e-14,1e-12,1e-10,1e-8,1e-6,1e-4,1e-2,1"


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default="runs/lora16_sst2", help="trained run (made here when missing)")
    parser.add_argument("--sizes", default="1,4")
    parser.add_argument("--epsilons", default="0.01,0.1,0.3,1,10")
    parser.add_argument("--grid", default=GRID)
    parser.add_argument("--attack-steps", default="12")
    parser.add_argument("--attack-restarts", default="0")
    parser.add_argument("--json", default="experiments/results/bound_certified_minilm.json")
    args = parser.parse_args(argv)
    if not (Path(args.reference) / "metrics.json").is_file():
        code = main([*TRAIN, "--out", args.reference])
        if code:
            return code
    return main(["bound", "--reference", args.reference, "--dtype", "float64", "--structure", "rank", "--sizes",
                 args.sizes, "--certified", "--epsilons", args.epsilons, "--grid", args.grid, "--attack-steps",
                 args.attack_steps, "--attack-restarts", args.attack_restarts, "--no-progress", "--json", args.json])


if __name__ == "__main__":
    raise SystemExit(run())
