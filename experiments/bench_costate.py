"""Cost of the co-state solve vs one autograd backward on MiniLM (batch 32 × 128 tokens, float32, LoRA).

Three configurations, each including its forward pass:

* ``backward``:  ``J = system.cost(batch); J.backward()`` (the reference);
* ``graph``:     ``solve_costate(system, batch, "graph")``;
* ``graph_no_p0``: the same without ``p_0`` (``initial_costate=False``): backprop does not
  differentiate through block 0 with respect to its input either (frozen embedding);
* ``recompute``: ``solve_costate(system, batch, "recompute")``.

Time: in one process, repetitions interleaved (the order rotates every round),
medians reported, ratios to ``backward``.  Peak memory: CPU has no allocator
statistics, so each configuration runs once in a *fresh subprocess* which loads
the model, builds the batch, records its resident set size (``/proc/self/statm``)
and then ``ru_maxrss`` after the operation; the operation's peak is
``ru_maxrss − RSS before`` (valid when the operation, not model loading, set the
high-water mark: checked and recorded).  Subprocesses are interleaved too and
medians taken.  As an allocator-independent cross-check, the bytes of tensors
saved for backward (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by
storage) are counted for ``backward`` and ``graph``.

    nice -n 10 python experiments/bench_costate.py   # -> experiments/results/bench_costate.json (~5 min)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from controltune.system import ResidualSystem

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("backward", "graph", "graph_no_p0", "recompute")


def build(batch_size: int, seq_len: int, seed: int) -> tuple[ResidualSystem, dict[str, torch.Tensor]]:
    """MiniLM float32 with LoRA (rank 8 on q, v) and a batch of real SST-2 text filling ``seq_len`` tokens."""
    import controltune as ct
    from controltune.controllers import build as build_controller
    from controltune.data import load_split

    loaded = ct.load_model("minilm", dtype="float32", seed=seed)
    system = ct.ResidualSystem(loaded)
    build_controller("lora", system, rank=8)
    system.eval()
    texts = [ex.text_a for ex in load_split("sst2", "train", n=40 * batch_size, seed=seed)]
    # Join sentences so every row has seq_len real tokens (no padding: the full S×T cost).
    rows = [" ".join(texts[i::batch_size]) for i in range(batch_size)]
    enc = loaded.tokenizer(rows, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    batch["labels"] = torch.arange(batch_size) % 2
    return system, batch


def operation(name: str, system: ResidualSystem, batch: dict[str, torch.Tensor]) -> None:
    from controltune.pmp import solve_costate

    if name == "backward":
        for c in system.controls():
            c.param.grad = None
        system.cost(batch).backward()
    elif name == "graph_no_p0":
        solve_costate(system, batch, mode="graph", initial_costate=False)
    else:
        solve_costate(system, batch, mode=name)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def child(name: str, batch_size: int, seq_len: int, seed: int) -> None:
    torch.set_num_threads(1)
    system, batch = build(batch_size, seq_len, seed)
    before_rss = rss_mb()
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    operation(name, system, batch)
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": name, "rss_before_mb": before_rss, "maxrss_before_mb": before_max,
                      "maxrss_after_mb": after_max, "peak_increment_mb": after_max - before_rss,
                      "valid": after_max > before_max}))


def saved_bytes(name: str, system: ResidualSystem, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of distinct storages saved for backward during the forward of ``name`` (graph kept)."""
    from controltune.pmp import solve_costate

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if name == "backward":
            system.cost(batch).backward()
        else:
            solve_costate(system, batch, mode="graph", initial_costate=name == "graph")
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mem-reps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "bench_costate.json"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch_size, args.seq_len, args.seed)
        return
    from controltune.results import stamp, write_json

    torch.set_num_threads(1)
    config = {k: v for k, v in vars(args).items() if k != "child"}
    config.update(model="minilm", dtype="float32", controller="lora rank 8 on q,v", threads=1)

    memory: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for rep in range(args.mem_reps):
        for name in CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--batch-size", str(args.batch_size),
                                  "--seq-len", str(args.seq_len), "--seed", str(args.seed)],
                                 capture_output=True, text=True, check=True)
            memory[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print("memory", memory[name][-1], flush=True)

    system, batch = build(args.batch_size, args.seq_len, args.seed)
    for name in CONFIGS:  # warm-up
        operation(name, system, batch)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for rep in range(args.reps):
        for name in CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]:
            start = time.perf_counter()
            operation(name, system, batch)
            times[name].append(time.perf_counter() - start)
        print("times", {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
    saved = {name: saved_bytes(name, system, batch) / 2**20 for name in ("backward", "graph", "graph_no_p0")}

    t = {c: statistics.median(v) for c, v in times.items()}
    m = {c: statistics.median(r["peak_increment_mb"] for r in memory[c]) for c in CONFIGS}
    summary = {
        "time_median_s": t, "peak_increment_median_mb": m, "saved_for_backward_mb": saved,
        "graph_time_ratio": t["graph"] / t["backward"], "graph_memory_ratio": m["graph"] / m["backward"],
        "graph_no_p0_time_ratio": t["graph_no_p0"] / t["backward"],
        "graph_no_p0_memory_ratio": m["graph_no_p0"] / m["backward"],
        "recompute_time_ratio": t["recompute"] / t["backward"],
        "recompute_memory_ratio": m["recompute"] / m["backward"],
        "recompute_memory_saving": 1 - m["recompute"] / m["graph"],
        "all_memory_measurements_valid": all(r["valid"] for rs in memory.values() for r in rs),
    }
    method = ("time: perf_counter around each operation (forward included), repetitions interleaved with a rotating "
              "order after one warm-up each, median; memory: one fresh subprocess per configuration and repetition "
              "(interleaved): ru_maxrss after the operation minus the RSS just before it (model and batch already "
              "built), median; 'valid' says the operation set the process's high-water mark; saved_for_backward_mb "
              "counts distinct storages packed by saved_tensors_hooks during the operation.")
    write_json(args.out, {**stamp(config), "method": method, "summary": summary, "times_s": times,
                          "memory": memory})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
