"""Memory a training checkpoint costs: the transient peak of writing the resume state, against the state's size.

A training run keeps the best-on-validation deltas (a delta file's bytes, :func:`checkpoint.to_bytes`) and
writes its resume state (:func:`run_folder.save_state`: deltas, AdamW moments, the best deltas) every few
evaluations.  With full fine-tuning every weight is a delta, so on SmolLM2 (134.5M parameters) each of
these is hundreds of MB, and the scale study's full-FT cells (batch 16, length 64) reported a peak of
12.1 GB where the efficiency study's training steps alone peak at ~3.6 GB (batch 8) to ~6.4 GB (batch 32).
Two such cells side by side reach the memory limit of this 24 GiB machine.

Per (model, method), a fresh process (one torch thread, float32, CPU) loads the model, attaches the method,
takes one AdamW step on a batch of 16 seeded SST-2 rows (so the optimiser holds its moments), then measures
with the Linux ``VmHWM`` reset before each phase:

* ``to_bytes``: the peak above the resident memory before it of serialising the deltas
  (:func:`checkpoint.to_bytes`, as a new best-on-validation checkpoint does);
* ``save_state``: the same for writing the resume state (:func:`run_folder.save_state`) with those best deltas;
* the sizes those are compared with: the deltas' tensors (``deltas_mb``) and the whole state's tensors
  (deltas, best deltas and AdamW's two moments, ``state_mb``).

``overhead_over_deltas`` is each phase's peak over ``deltas_mb``: a writer that streams tensors to the file
adds ~0 for ``save_state`` and ~1 for ``to_bytes`` (the returned bytes themselves).

    .venv/bin/python experiments/bench_checkpoint_memory.py                  # MiniLM and SmolLM2, full FT and LoRA
    .venv/bin/python experiments/bench_checkpoint_memory.py --models minilm  # seconds
    PYTHONPATH=/path/to/other/tree .venv/bin/python experiments/bench_checkpoint_memory.py --append  # another version

Each row names the controltune it measured (``library``: folder, commit, uncommitted changes or not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "bench_checkpoint_memory.json"
METHODS = {"full": {}, "lora": {"rank": 8, "alpha": 16, "targets": ["q", "v"]}}
BATCH, MAX_LENGTH = 16, 64


def measure(model: str, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """One cell, in this process (call it in a fresh one): see the module docstring."""
    import torch

    from controltune import ResidualSystem, load_model
    from controltune import checkpoint as ckpt
    from controltune.batching import Collator
    from controltune.controllers.spec import build_spec
    from controltune.data import load_split, resolve_task
    from controltune.resources import peak_rss_mb, reset_peak_rss, rss_mb
    from controltune.run_folder import save_state

    torch.set_num_threads(1)
    loaded = load_model(model)
    system = ResidualSystem(loaded, num_labels=2)
    build_spec(system, method, options, 0, "sst2")
    system.train(False)
    rows = load_split(resolve_task("sst2"), "train", n=BATCH, seed=0)
    batch = Collator(loaded.tokenizer, MAX_LENGTH)(rows)
    params = [c.param for c in system.controls()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    system.cost(batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not reset_peak_rss():
        raise RuntimeError("this measurement needs Linux's /proc/self/clear_refs")

    def phase(fn: Callable[[], Any]) -> tuple[Any, float, float]:
        """(fn's value, peak above the resident memory before it in MB, seconds)."""
        before = rss_mb()
        reset_peak_rss()
        start = time.perf_counter()
        value = fn()
        return value, peak_rss_mb() - before, time.perf_counter() - start

    deltas_mb = sum(c.param.numel() * c.param.element_size() for c in ckpt.saved_controls(system)) / 2 ** 20
    moments_mb = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t) and t.dim() > 0) / 2 ** 20
    best, to_bytes_mb, to_bytes_s = phase(lambda: ckpt.to_bytes(system, {}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        _, save_mb, save_s = phase(lambda: save_state(path, system, optimizer, scheduler, 1, {"wall_time_s": 0.0},
                                                      {}, {"model": model}, best))
        file_mb = path.stat().st_size / 2 ** 20
    return {"model": model, "method": method, "options": options, "batch": BATCH,
            "n_trainable": sum(p.numel() for p in params), "deltas_mb": deltas_mb,
            "state_mb": 2 * deltas_mb + moments_mb, "file_mb": file_mb,
            "to_bytes": {"peak_mb": to_bytes_mb, "seconds": to_bytes_s,
                         "overhead_over_deltas": to_bytes_mb / deltas_mb},
            "save_state": {"peak_mb": save_mb, "seconds": save_s, "overhead_over_deltas": save_mb / deltas_mb},
            "threads": torch.get_num_threads()}


def library() -> dict[str, Any]:
    """Which controltune the cells import: its folder, and the commit of the tree it sits in (dirty or not)."""
    import controltune

    folder = Path(controltune.__file__).resolve().parent
    git = ["git", "-C", str(folder)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True,
                           check=False).stdout.strip()
    return {"path": str(folder), "commit": commit or None, "dirty": bool(dirty)}


def run_cell(model: str, method: str) -> dict[str, Any]:
    """The cell in a fresh process (its peak memory is its own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cell = json.dumps({"model": model, "method": method})
    out = subprocess.run([sys.executable, __file__, "--cell", cell], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{model} {method}: " + (out.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated models")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out (e.g. of another controltune on PYTHONPATH)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        cell = json.loads(args.cell)
        print(json.dumps(measure(cell["model"], cell["method"], METHODS[cell["method"]])))
        return {}
    from controltune.results import stamp, write_json

    rows = json.loads(args.out.read_text())["rows"] if args.append and args.out.is_file() else []
    lib = library()
    for model in args.models.split(","):
        for method in METHODS:
            row = {**run_cell(model, method), "library": lib}
            rows.append(row)
            phases = ", ".join(f"{k} +{row[k]['peak_mb']:.0f} MB ({row[k]['overhead_over_deltas']:.2f}x)"
                               for k in ("to_bytes", "save_state"))
            print(f"{model} {method}: deltas {row['deltas_mb']:.1f} MB; {phases}", flush=True)
    result = {**stamp({"models": args.models.split(","), "methods": METHODS, "batch": BATCH,
                       "max_length": MAX_LENGTH, "command": "python experiments/bench_checkpoint_memory.py"}),
              "method": __doc__.split("\n\n")[2], "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
