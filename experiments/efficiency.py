"""Efficiency (issue 15; Ding et al. 2023): peak memory and step time per method at batch sizes 1, 8 and 32.

The founding paper's claim: delta tuning saves up to 3/4 of the peak memory of full fine-tuning at small
batch sizes and at least 1/3 at large ones.  Here, per (model, method, batch size), a fresh Python process
(one torch thread, float32, CPU) loads the model, attaches the method, takes ``batch`` seeded SST-2 training
rows (padded to 64 positions), and runs 2 warm-up and 5 timed training steps (forward,
backward, AdamW step over the method's controls and the classification head).  Measured:

* ``peak_mb``: the process's peak resident memory during the steps (Linux ``VmHWM``, reset after the
  model is loaded and the method attached) minus its resident memory before the model was loaded — the
  memory of the weights, gradients, optimiser states and activations of training;
* ``saved_mb``: the bytes of the tensors autograd saves for backward in one step, weights left out
  (activations; exact, independent of other processes);
* ``step_s``: the median step time (the machine is shared: compare methods within one run, not across runs).

Methods: full fine-tuning, LoRA (r=8 on q, v), adapter (bottleneck 64), prefix (10), prompt (20) and BitFit
on MiniLM; on SmolLM2 BitFit is refused (no biases) and LayerNorm tuning (norm gains) stands in for it.
Rows are appended to ``results/efficiency.jsonl`` as cells finish (a rerun skips finished cells);
``results/efficiency.json`` holds the summary: per (model, batch) each method's peak memory as a fraction of
full fine-tuning's, and whether the claim holds.

    .venv/bin/python experiments/efficiency.py                  # both models (~15 min at one thread)
    .venv/bin/python experiments/efficiency.py --models minilm   # ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROWS, SUMMARY = RESULTS / "efficiency.jsonl", RESULTS / "efficiency.json"
METHODS = {
    "minilm": {"full": {}, "lora": {"rank": 8, "alpha": 16, "targets": ["q", "v"]}, "adapter": {"bottleneck": 64},
               "prefix": {"length": 10}, "prompt": {"n_tokens": 20}, "bitfit": {}},
    "smollm2": {"full": {}, "lora": {"rank": 8, "alpha": 16, "targets": ["q", "v"]}, "adapter": {"bottleneck": 64},
                "prefix": {"length": 10}, "prompt": {"n_tokens": 20}, "layernorm": {}},
}
BATCHES = (1, 8, 32)
WARMUP, STEPS, MAX_LENGTH = 2, 5, 64


def measure(model: str, method: str, options: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """One cell, in this process (call it in a fresh one): see the module docstring."""
    import torch

    from controltune import ResidualSystem, load_model
    from controltune.batching import Collator
    from controltune.controllers.spec import build_spec
    from controltune.data import load_split, resolve_task
    from controltune.resources import peak_rss_mb, reset_peak_rss, rss_mb

    torch.set_num_threads(1)
    before = rss_mb()
    loaded = load_model(model)
    system = ResidualSystem(loaded, num_labels=2)
    build_spec(system, method, options, 0, "sst2")
    system.train(False)  # dropout off, as in every training run of the package
    rows = load_split(resolve_task("sst2"), "train", n=batch_size, seed=0)
    batch = _padded(Collator(loaded.tokenizer, MAX_LENGTH)(rows), MAX_LENGTH)
    params = [c.param for c in system.controls()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    weights = {p.untyped_storage().data_ptr() for p in system.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # activations only: each storage once, weights left out
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def step(record: bool) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if record:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = system.cost(batch)
        else:
            loss = system.cost(batch)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    reset = reset_peak_rss()
    for _ in range(WARMUP):
        step(False)
    times = [step(i == 0) for i in range(STEPS)]
    peak = peak_rss_mb() if reset else None
    return {"model": model, "method": method, "options": options, "batch": batch_size,
            "tokens": int(batch["attention_mask"].sum()), "width": int(batch["input_ids"].shape[1]),
            "n_trainable": sum(p.numel() for p in params), "step_s": statistics.median(times), "step_times": times,
            "peak_mb": None if peak is None else peak - before, "rss_before_mb": before,
            "saved_mb": sum(saved.values()) / 2 ** 20, "threads": torch.get_num_threads()}


def _padded(batch: dict, width: int) -> dict:
    """Every row padded (mask 0, id 0) to ``width`` positions: memory and time at a fixed sequence length."""
    import torch.nn.functional as F

    grow = width - batch["input_ids"].shape[1]
    return {k: (F.pad(v, (0, grow)) if k in ("input_ids", "attention_mask", "token_type_ids") else v)
            for k, v in batch.items()}


def run_cell(model: str, method: str, options: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The cell in a fresh process (its peak memory is its own)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cell = json.dumps({"model": model, "method": method, "options": options, "batch": batch_size})
    out = subprocess.run([sys.executable, __file__, "--cell", cell], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        return {"model": model, "method": method, "options": options, "batch": batch_size, "status": "failed",
                "reason": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "status": "done"}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (model, batch): each method's peak memory and step time as fractions of full fine-tuning's."""
    from controltune.results import stamp

    out = []
    for model in METHODS:
        for b in BATCHES:
            cell = {r["method"]: r for r in rows if r["model"] == model and r["batch"] == b and r["status"] == "done"}
            full = cell.get("full")
            for method, r in cell.items():
                out.append({"model": model, "batch": b, "method": method, "peak_mb": r["peak_mb"],
                            "saved_mb": r["saved_mb"], "step_s": r["step_s"], "n_trainable": r["n_trainable"],
                            "peak_vs_full": (r["peak_mb"] / full["peak_mb"]) if full and r["peak_mb"] else None,
                            "step_vs_full": (r["step_s"] / full["step_s"]) if full else None})
    claims = []
    for model in METHODS:
        deltas = [r for r in out if r["model"] == model and r["method"] != "full" and r["peak_vs_full"]]
        if not deltas:
            continue
        small = [r["peak_vs_full"] for r in deltas if r["batch"] == min(BATCHES)]
        large = [r["peak_vs_full"] for r in deltas if r["batch"] == max(BATCHES)]
        claims.append({"model": model,
                       "largest_saving_small_batch": 1 - min(small) if small else None,
                       "smallest_saving_large_batch": 1 - max(large) if large else None,
                       "up_to_three_quarters_at_small": (1 - min(small) >= 0.75) if small else None,
                       "at_least_one_third_at_large": (1 - max(large) >= 1 / 3) if large else None})
    return {**stamp({"batches": list(BATCHES), "warmup": WARMUP, "steps": STEPS, "max_length": MAX_LENGTH,
                     "methods": METHODS, "command": "python experiments/efficiency.py"}),
            "rows": out, "claims": claims}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        c = json.loads(args.cell)
        print(json.dumps(measure(c["model"], c["method"], c["options"], c["batch"])))
        return
    from controltune.results import append_jsonl, read_jsonl, write_json

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; accepted: {', '.join(METHODS)}")
    done = {(r["model"], r["method"], r["batch"]) for r in read_jsonl(ROWS) if r.get("status") == "done"}
    for model in models:
        for b in BATCHES:
            for method, options in METHODS[model].items():
                if (model, method, b) in done:
                    continue
                row = run_cell(model, method, options, b)
                append_jsonl(ROWS, row)
                shown = (f"peak {row['peak_mb']:.0f} MB, saved {row['saved_mb']:.1f} MB, step {row['step_s']:.3f} s"
                         if row["status"] == "done" else row["reason"])
                print(f"{model} {method} batch {b}: {shown}", flush=True)
                write_json(SUMMARY, summarise(read_jsonl(ROWS)))
    write_json(SUMMARY, summarise(read_jsonl(ROWS)))


if __name__ == "__main__":
    main()
