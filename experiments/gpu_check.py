"""GPU check: ``controltune verify`` on SmolLM2 in float32 and float64, and the co-state benchmark, on CUDA.

For a machine with a GPU (none was available when this was written; every path of the
library is device-agnostic, and this script is how to confirm it):

1. ``controltune verify --model smollm2 --methods all --dtype {float32,float64} --device cuda``
   (the public command, so its rows are those of a CPU run): per method the co-states and
   ``∇_u H`` against autograd, forward-mode AD and finite differences;
2. the co-state benchmark of ``experiments/bench_costate.py`` (its ``operation``: ``backward``,
   ``graph``, ``graph_no_p0``, ``recompute``) on MiniLM and SmolLM2 with LoRA rank 8 on q, v,
   batch ``--bench-batch-size`` × ``--bench-seq-len`` tokens of joined SST-2 text, float32:
   median wall time (``torch.cuda.synchronize`` around each operation, repetitions interleaved
   after a warm-up) and peak allocated memory above the model and batch
   (``torch.cuda.max_memory_allocated``), with the ratios to ``backward``.

Everything lands in one JSON (default ``experiments/results/gpu_check.json``)::

    python experiments/gpu_check.py                     # --device cuda; ~minutes on a GPU
    python experiments/gpu_check.py --device cuda:1 --methods lora,prefix --dtypes float64

Without CUDA it stops at once with exit status 2 and one line saying so (nothing is written).
``--device cpu`` runs the same machinery on the CPU (slow on SmolLM2; useful with
``--model random:llama`` to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from controltune.system import ResidualSystem

RESULTS = Path(__file__).parent / "results"
DTYPES = ("float32", "float64")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="a CUDA device (cuda, cuda:1); cpu runs the machinery on the CPU")
    p.add_argument("--model", default="smollm2", help="model of the verify runs")
    p.add_argument("--methods", default="all", help="verify: 'all' or a comma-separated list of methods")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="verify: comma-separated dtypes")
    p.add_argument("--bench-models", default="minilm,smollm2", help="co-state benchmark: comma-separated models")
    p.add_argument("--bench-batch-size", type=int, default=32)
    p.add_argument("--bench-seq-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=5, help="co-state benchmark: timed repetitions per operation")
    p.add_argument("--skip-verify", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "gpu_check.json"))
    return p


def require_device(device: str) -> torch.device:
    """``device`` if this machine has it; else exit 2 with one line naming what is missing."""
    from controltune.zoo import available_devices, check_device

    try:
        return check_device(device)
    except ValueError as err:
        cuda = "CUDA is not available on this machine" if not torch.cuda.is_available() else str(err)
        print(f"gpu_check: cannot run on {device!r}: {cuda} (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}; devices here: {', '.join(available_devices())}). "
              "Run it on a machine with a GPU and a CUDA build of torch, or pass --device cpu to exercise "
              "the script on the CPU.", file=sys.stderr)
        raise SystemExit(2) from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_verify(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """One ``controltune verify`` run (the CLI, in process); its JSON rows, exit code and wall time."""
    from controltune.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "verify.json"
        argv = ["verify", "--model", args.model, "--methods", args.methods, "--dtype", dtype,
                "--device", args.device, "--seed", str(args.seed), "--json", str(out)]
        start = time.perf_counter()
        code = cli(argv)
        seconds = time.perf_counter() - start
        payload = json.loads(out.read_text()) if out.is_file() else {}
    rows = payload.get("results", [])
    return {"argv": ["controltune", *argv[:-2]], "exit_code": code, "seconds": seconds,
            "passed": sum(r.get("status") == "passed" for r in rows),
            "failed": [r.get("method") for r in rows if r.get("status") == "failed"],
            "skipped": {r.get("method"): r.get("reason") for r in rows if r.get("status") == "skipped"},
            "batch_source": payload.get("batch_source"), "results": rows}


def bench_system(model: str, device: torch.device, batch_size: int, seq_len: int, seed: int
                 ) -> tuple[ResidualSystem, dict[str, torch.Tensor]]:
    """``model`` in float32 on ``device`` with LoRA (rank 8 on q, v) and a batch of joined SST-2 text
    filling ``seq_len`` tokens per row (no padding), as ``bench_costate.build`` does for MiniLM."""
    import controltune as ct
    from controltune.controllers import build
    from controltune.data import load_split

    loaded = ct.load_model(model, dtype="float32", device=device, seed=seed)
    system = ct.ResidualSystem(loaded)
    build("lora", system, rank=8, targets=("q", "v"))
    system.eval()
    texts = [ex.text_a for ex in load_split("sst2", "train", n=40 * batch_size, seed=seed)]
    rows = [" ".join(texts[i::batch_size]) for i in range(batch_size)]
    tok = loaded.tokenizer
    enc = tok(rows, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    batch["labels"] = (torch.arange(batch_size) % 2).to(device)
    return system, batch


def run_bench(model: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Median time and peak memory of each co-state configuration of ``bench_costate.py`` on ``device``."""
    from bench_costate import CONFIGS, operation

    system, batch = bench_system(model, device, args.bench_batch_size, args.bench_seq_len, args.seed)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    peak: dict[str, float | None] = {}
    for name in CONFIGS:  # warm-up, and the peak memory of one run of each
        if device.type == "cuda":
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        operation(name, system, batch)
        synchronize(device)
        peak[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
        for c in system.controls():
            c.param.grad = None
    for rep in range(args.reps):
        for name in CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]:
            synchronize(device)
            start = time.perf_counter()
            operation(name, system, batch)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    median = {c: statistics.median(v) for c, v in times.items()}
    out: dict[str, Any] = {"model": model, "n_layers": system.n_layers, "batch_shape": list(batch["input_ids"].shape),
                           "time_median_s": median, "times_s": times, "peak_increment_mb": peak,
                           "time_ratio_to_backward": {c: median[c] / median["backward"] for c in CONFIGS}}
    if all(v is not None for v in peak.values()) and peak["backward"]:
        out["memory_ratio_to_backward"] = {c: peak[c] / peak["backward"] for c in CONFIGS}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = require_device(args.device)
    from controltune.results import stamp, write_json

    config = {k: v for k, v in vars(args).items() if k != "out"}
    config["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    payload: dict[str, Any] = {**stamp(config), "verify": {}, "bench": {}}
    failed = False
    if not args.skip_verify:
        for dtype in args.dtypes.split(","):
            print(f"gpu_check: verify {args.model} {dtype} on {device}", flush=True)
            payload["verify"][dtype] = run_verify(args, dtype)
            failed |= payload["verify"][dtype]["exit_code"] != 0
            write_json(args.out, payload)
    if not args.skip_bench:
        for model in args.bench_models.split(","):
            print(f"gpu_check: co-state benchmark {model} on {device}", flush=True)
            payload["bench"][model] = run_bench(model, device, args)
            write_json(args.out, payload)
            ratio = payload["bench"][model]["time_ratio_to_backward"]
            print("  time / backward: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()), flush=True)
    write_json(args.out, payload)
    for dtype, run in payload["verify"].items():
        print(f"verify {dtype}: {run['passed']} passed, failed {run['failed'] or 'none'}, "
              f"{len(run['skipped'])} skipped, {run['seconds']:.0f} s")
    print(f"gpu_check: wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
