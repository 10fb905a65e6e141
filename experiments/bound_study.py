"""Approximation error of low-dimensional deltas vs Lipschitz/Grönwall bounds (MiniLM, SST-2 and RTE).

For each task: train a rank-16 LoRA reference u* on q, v (2k-example subsample,
max length 64), write it as weight deltas, then for every structure (rank
truncation, random subspace, top-k sparse, top-k layers) and size compare u*
with its projection Πu*: distance, measured gap |J(u*) − J(Πu*)| on a fixed dev
batch (float64), co-state estimate, every bound and the dev-score change.

Rows are appended to ``experiments/results/bound_study_<task>.jsonl`` as they are
computed; a re-run skips rows already there (the trained reference and the
per-layer constants are cached under ``runs/bound_study/``).  The JSON
``experiments/results/bound_study_<task>.json`` (header, constants, rows) is
rewritten at the end of each task.

    nice -n 10 python experiments/bound_study.py            # both tasks
    nice -n 10 python experiments/bound_study.py --tasks sst2 --steps 100   # quicker
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from controltune.bounds import (
    Reference,
    ReferenceConstants,
    as_reference,
    dev_scorer,
    evaluation_batch,
    reference_constants,
    sweep,
    trained_deltas,
)
from controltune.controllers import build
from controltune.data import load_split, resolve_task
from controltune.results import append_jsonl, read_jsonl, stamp, write_json
from controltune.system import ResidualSystem
from controltune.train import TrainConfig, train
from controltune.zoo import load_model

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parents[1] / "runs" / "bound_study"
SIZES = {"rank": [1, 4, 8], "subspace": [8, 64], "sparse": [1000, 30000, 1000000],
         "layers": [1, 3]}
REFERENCES = ("lora:<rank>", "full")


def parse_reference(text: str) -> tuple[str, int | None]:
    """``"lora:16"`` -> ``("lora", 16)``, ``"full"`` -> ``("full", None)``."""
    if text == "full":
        return "full", None
    if text.startswith("lora:") and text[5:].isdigit() and int(text[5:]) >= 1:
        return "lora", int(text[5:])
    raise ValueError(f"reference {text!r} is not one of {REFERENCES} (e.g. lora:16)")


def train_reference(model: str, task: str, reference: str = "lora:16", targets: Sequence[str] = ("q", "v"),
                    train_size: int | None = 2000, steps: int = 400, batch_size: int = 16, max_length: int = 64,
                    lr: float | None = None, seed: int = 0, device: str = "cpu", dtype: str = "float64",
                    cache: str | None = None, progress: bool = True) -> Reference:
    """Train u* on ``task`` (float32) and return it as weight deltas on ``targets`` in ``dtype``.

    ``lora:R`` trains a rank-R LoRA on ``targets`` (α = 2R) and the head; ``full``
    trains every parameter, then the ``targets`` maps' deltas become the control
    (other fine-tuned parameters stay, shared by u* and Πu*).  Training is
    :func:`controltune.train.train`.  With ``cache`` (a file path) a LoRA reference
    is saved there and re-used by a later call with the same arguments.
    """
    kind, rank = parse_reference(reference)
    spec = resolve_task(task)
    config = {"model": model, "task": spec.name, "reference": reference, "targets": list(targets),
              "train_size": train_size, "steps": steps, "batch_size": batch_size, "max_length": max_length,
              "lr": lr, "seed": seed}
    loaded = load_model(model, dtype="float32", device=device, seed=seed)
    system = ResidualSystem(loaded, num_labels=spec.num_labels, seed=seed)
    cached = None
    if cache is not None and kind == "lora" and Path(cache).is_file():
        cached = torch.load(cache, weights_only=False)
        if cached.get("config") != config:
            cached = None
    if cached is None:
        if kind == "lora":
            build("lora", system, rank=rank, alpha=2.0 * rank, targets=tuple(targets), seed=seed)
        else:
            build("full", system)
        examples = load_split(spec, "train", n=train_size, seed=seed)
        rate = lr if lr is not None else (5e-5 if kind == "full" else 5e-4)
        metrics = train(system, examples, None, spec, TrainConfig(
            lr=rate, steps=steps, batch_size=batch_size, max_length=max_length, warmup=0.1, seed=seed,
            progress=progress), tokenizer=loaded.tokenizer)
        info = {**config, "lr": rate, "final_train_loss": metrics["curves"]["train_loss"][-1],
                "wall_time_s": metrics["wall_time_s"]}
        roles, values = trained_deltas(system, None if kind == "lora" else targets)
        if cache is not None and kind == "lora":
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"config": config, "values": values, "roles": roles, "info": info,
                        "head": {k: v.detach().clone() for k, v in system.readout.head.state_dict().items()}}, cache)
    else:
        values, roles, info = cached["values"], cached["roles"], cached["info"]
        system.readout.head.load_state_dict(cached["head"])
    return as_reference(system, roles, values, spec, loaded.tokenizer, info, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,rte")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--reference", default="lora:16")
    parser.add_argument("--targets", default="q,v")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=8)
    parser.add_argument("--dev-size", type=int, default=100)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--structures", default=",".join(SIZES))
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for task in args.tasks.split(","):
        run_task(task, args)


def run_task(task: str, args: argparse.Namespace) -> None:
    t0 = time.time()
    config = {k: v for k, v in vars(args).items() if k != "tasks"} | {"task": task, "sizes": SIZES,
                                                                        "dtype": "float64"}
    rows_path = RESULTS / f"bound_study_{task}.jsonl"
    cache = CACHE / f"{task}_{args.reference.replace(':', '')}_{args.steps}.pt"
    ref = train_reference(args.model, task, args.reference, args.targets.split(","), args.train_size, args.steps,
                          args.batch_size, args.max_length, args.lr, args.seed, "cpu", "float64", cache=str(cache))
    batch = evaluation_batch(ref, args.eval_size, args.max_length, args.seed)
    const_cache = cache.with_suffix(".constants.pt")
    constants = None
    if const_cache.is_file():
        saved = torch.load(const_cache, weights_only=False)
        if saved["config"] == config:
            constants = ReferenceConstants(**saved["constants"])
    if constants is None:
        constants = reference_constants(ref.system, batch, iters=args.iters, progress=True)
        torch.save({"config": config, "constants": constants.__dict__}, const_cache)
    dev = dev_scorer(ref, args.dev_size, args.max_length, args.seed)
    dev_reference = dev()
    done = {(r["structure"], r["size"]) for r in read_jsonl(rows_path) if r.get("config") == config}
    for structure in args.structures.split(","):
        sweep(ref, batch, constants, structure, SIZES[structure], dev, args.seed, done=done,
              on_row=lambda row: append_jsonl(rows_path, {"config": config, **row}))
    rows = [r for r in read_jsonl(rows_path) if r.get("config") == config]
    write_json(RESULTS / f"bound_study_{task}.json", {
        **stamp(config), "task": task, "reference": ref.info, "dev_reference": dev_reference,
        "eval_batch": {"sequences": int(batch["input_ids"].shape[0]),
                       "real_tokens": int(batch["attention_mask"].sum())},
        "constants": constants.to_dict(), "rows": [{k: v for k, v in r.items() if k != "config"} for r in rows],
        "wall_time_s_this_run": time.time() - t0})
    print(f"{task}: {len(rows)} rows in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
