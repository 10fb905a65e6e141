"""Time of ``controltune verify`` per method and per leg on MiniLM (float64): new legs vs the legacy FD ladder.

For every registered method (as ``controltune verify --methods all`` builds it: example
options, weight decay, control-designed controllers on ``--design-examples`` train rows,
controls perturbed by ``--perturb``) on a 2×16-token SST-2 dev batch:

* ``new``: :func:`controltune.verification.verify` with the autograd, forward-mode and
  directional finite-difference legs (the default of ``controltune verify``);
* ``legacy`` (for ``--legacy-methods``): the same system, autograd plus the former
  finite-difference check, one central difference per control on the step ladder
  (``fd_mode="legacy"``, no forward leg) — the old code path of ``controltune verify``.

Per method: seconds of each leg (``solve``, ``autograd``, ``forward``, ``fd``) and of the
build, the largest error of each leg and pass/fail.  The summary sums the legs over the
methods, the wall time of the whole new path (what ``controltune verify --methods all``
costs, model loading aside) and, on the methods run both ways, the ratio of FD times.
Single process, ``--threads`` torch threads (1 by default: the machine is shared);
the load average is recorded before and after, because other processes slow every leg.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python experiments/bench_verify.py \\
        --legacy-methods lora,prompt,adapter,bitfit,masking,prefix   # -> results/bench_verify.json (~3 min)
    ... --legacy-methods all                                          # the full old path (~8 min more)
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from controltune.verification.report import Verification
    from controltune.zoo import LoadedModel

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--methods", default="all", help="'all' or a comma-separated list")
    parser.add_argument("--legacy-methods", default="lora,prompt,adapter,bitfit,masking,prefix",
                        help="methods also timed with the legacy FD ladder: 'all', 'none' or a list")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--perturb", type=float, default=0.02)
    parser.add_argument("--design-examples", type=int, default=8)
    parser.add_argument("--state-directions", type=int, default=2)
    parser.add_argument("--fd-state-directions", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "bench_verify.json"))
    return parser.parse_args()


def method_list(spec: str, registry: dict) -> list[str]:
    """``all`` (the registry in ``controltune verify`` order), ``none`` or a comma-separated list."""
    if spec == "all":
        return sorted(registry, key=lambda m: (registry[m].group, m))
    if spec == "none":
        return []
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in registry]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}")
    return names


def leg_errors(report: Verification) -> dict[str, Any]:
    """Largest error and tolerance of each leg that ran, and the verdict."""
    return {"legs": report.legs, "passed": report.passed, "failures": report.failures()[:5]}


def bench_method(loaded: LoadedModel, method: str, batch: dict, args: argparse.Namespace,
                 legacy: bool) -> dict[str, Any]:
    """One row: build time, the new legs' times and errors, and (when ``legacy``) the old FD ladder's."""
    from controltune.commands.verify import method_options, perturb
    from controltune.controllers import REGISTRY, UnsupportedMethodError
    from controltune.system import ResidualSystem
    from controltune.verification import verify

    cls = REGISTRY[method]
    start = time.perf_counter()
    system = ResidualSystem(copy.deepcopy(loaded), seed=args.seed)
    try:
        system.add(cls(**method_options(cls, args.weight_decay, args.design_examples, args.seq_len)))
    except UnsupportedMethodError as err:
        return {"method": method, "status": "skipped", "reason": str(err)}
    system.eval()
    perturb(system.controls(), args.perturb, args.seed)
    row: dict[str, Any] = {"method": method, "group": cls.group, "n_controls": len(system.controls()),
                           "build_s": time.perf_counter() - start}
    clock = time.perf_counter()
    report = verify(system, batch, n_state_directions=args.state_directions,
                    fd_state_directions=args.fd_state_directions, seed=args.seed)
    row["new"] = {"seconds": {**report.seconds, "total": time.perf_counter() - clock}, **leg_errors(report)}
    if legacy:
        clock = time.perf_counter()
        old = verify(system, batch, n_state_directions=args.state_directions, forward=False, fd_mode="legacy",
                     seed=args.seed)
        row["legacy"] = {"seconds": {**old.seconds, "total": time.perf_counter() - clock}, **leg_errors(old)}
        row["fd_speedup"] = old.seconds["fd"] / report.seconds["fd"]
    return row


def summarise(rows: list[dict[str, Any]], wall_new: float) -> dict[str, Any]:
    """Sums of the legs over the methods; FD ratio on the methods run both ways."""
    ran = [r for r in rows if "new" in r]
    legs = ("solve", "autograd", "forward", "fd", "total")
    new = {leg: sum(r["new"]["seconds"].get(leg, 0.0) for r in ran) for leg in legs}
    both = [r for r in ran if "legacy" in r]
    summary: dict[str, Any] = {
        "methods": len(rows), "ran": len(ran), "all_passed": all(r["new"]["passed"] for r in ran),
        "new_seconds_by_leg": new, "build_seconds": sum(r["build_s"] for r in ran),
        "new_wall_seconds_incl_build": wall_new,
    }
    if both:
        summary["methods_run_both_ways"] = [r["method"] for r in both]
        summary["fd_seconds_new_vs_legacy"] = {
            "new": sum(r["new"]["seconds"]["fd"] for r in both),
            "legacy": sum(r["legacy"]["seconds"]["fd"] for r in both)}
        summary["fd_speedup_on_those"] = (summary["fd_seconds_new_vs_legacy"]["legacy"]
                                          / summary["fd_seconds_new_vs_legacy"]["new"])
        summary["legacy_all_passed"] = all(r["legacy"]["passed"] for r in both)
    return summary


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import controltune as ct
    from controltune.commands.verify import check_batch
    from controltune.controllers import REGISTRY
    from controltune.results import stamp, write_json

    methods = method_list(args.methods, REGISTRY)
    legacy = set(method_list(args.legacy_methods, REGISTRY))
    load_before = os.getloadavg()
    loaded = ct.load_model(args.model, dtype=args.dtype, seed=args.seed)
    batch, source = check_batch(loaded.tokenizer, args.batch_size, args.seq_len, args.seed)
    rows, wall_new = [], 0.0
    for method in methods:
        row = bench_method(loaded, method, batch, args, method in legacy)
        rows.append(row)
        if "new" in row:
            wall_new += row["build_s"] + row["new"]["seconds"]["total"]
            old = f"  legacy fd {row['legacy']['seconds']['fd']:.1f}s" if "legacy" in row else ""
            print(f"{method:<20} {row['n_controls']:>4} controls  new: " +
                  " ".join(f"{k} {v:.2f}" for k, v in row["new"]["seconds"].items()) +
                  f"  {'passed' if row['new']['passed'] else 'FAILED'}{old}", flush=True)
        else:
            print(f"{method:<20} skipped: {row['reason']}", flush=True)
    config = {**vars(args), "out": os.path.relpath(args.out, Path(__file__).parent.parent),
              "batch_source": source, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "command": f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} python "
                         f"experiments/bench_verify.py --threads {args.threads} --legacy-methods {args.legacy_methods}"}
    summary = summarise(rows, wall_new)
    write_json(args.out, {**stamp(config), "summary": summary, "rows": rows})
    print({k: v for k, v in summary.items() if k != "methods_run_both_ways"})


if __name__ == "__main__":
    main()
