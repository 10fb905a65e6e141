"""Co-state norm profile ‖p_l‖, l = 0..L, of MiniLM on SST-2 per delta method, before and after training.

For each method the system (MiniLM + controller + classification head) is solved with
:func:`controltune.pmp.solve_costate` on a fixed batch of S held-out *training* rows
(never dev), at initialisation and after a short AdamW training on other training rows.
The co-state of a batch is ``p_l = −∂J/∂x_l`` with ``J = (1/S) Σ_s Φ_s``, so each
sequence's slice carries a factor 1/S; the reported norm removes it:

    ‖p_l‖ := (1/S) Σ_s ‖S·p_{l,s}‖_F = Σ_s ‖p_{l,s}‖_F,

the mean over sequences of the Frobenius norm (over tokens × features) of the
per-sequence co-state ``−∂Φ_s/∂x_{l,s}``; it does not depend on S.  Padding tokens carry
zero co-state (masked out of attention and pooling), so they do not count.  Rows also
hold the batch Frobenius norm ``‖p_l‖_F`` and the per-sequence RMS over valid tokens.

Methods that are the identity at initialisation (LoRA B = 0, adapters' up-projection 0,
(IA)³ = 1, BitFit, full) share the pretrained trajectory at init; prefix and prompt
tuning do not.  The classification head (the terminal control) is trained with every method.

    nice -n 10 python experiments/costate_profile.py   # -> experiments/results/costate_profile.json

Measured cost (one thread on a shared 2-core machine): ~22 min of training in all, from ~2 min (BitFit,
(IA)³, LoRA) to ~6.5 min (prompt tuning) per method; use ``--methods`` / ``--steps`` for a quicker run.

Resume-safe: one JSONL row per (method, phase) is appended as it finishes; a method whose
``after`` row exists is skipped, an interrupted one is redone.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

import controltune as ct
from controltune.batching import Collator, make_loader
from controltune.controllers import build
from controltune.data import Example, load_split, resolve_task
from controltune.pmp import CoStateSolution, solve_costate
from controltune.results import append_jsonl, read_jsonl, stamp, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from controltune.system import ResidualSystem
    from controltune.zoo import LoadedModel

RESULTS = Path(__file__).parent / "results"
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 8, "alpha": 16, "targets": ("q", "v")},
    "adapter": {"bottleneck": 64},
    "prefix": {"length": 10},
    "prompt": {"n_tokens": 20},
    "bitfit": {},
    "ia3": {},
    "full": {},
}
"""Controller options (those of ``sweep_glue.py``; (IA)³ with its defaults: k, v, ffn_out)."""
LR = {"full": 5e-5, "lora": 5e-4, "adapter": 5e-4, "bitfit": 5e-4, "ia3": 3e-3, "prefix": 5e-3, "prompt": 5e-3}
"""Constant AdamW learning rates, the usual scale of each method (as in ``sweep_glue.py``; (IA)³ ~3e-3)."""


def split_train(task: str, n_train: int, n_measure: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Disjoint seeded subsets of the *train* split: ``n_train`` rows to train on, ``n_measure`` to measure on."""
    rows = load_split(resolve_task(task), "train")
    if n_train + n_measure > len(rows):
        raise ValueError(f"{task}: asked for {n_train} + {n_measure} rows but the train split has {len(rows)}")
    idx = random.Random(seed).sample(range(len(rows)), n_train + n_measure)
    return [rows[i] for i in idx[:n_train]], [rows[i] for i in idx[n_train:]]


def costate_norms(solution: CoStateSolution, attention_mask: torch.Tensor) -> dict[str, list[float]]:
    """Per layer l = 0..L: ``mean_seq`` (Σ_s ‖p_{l,s}‖_F, module docstring), ``batch_fro`` (‖p_l‖_F of the
    S×T×d tensor) and ``rms_seq`` (mean over s of ``S·‖p_{l,s}‖_F / sqrt(T_s·d)``, T_s the valid tokens).

    ``attention_mask`` (S×T) counts the valid tokens; the prompt tokens of prompt tuning, which are
    prepended to x_0 and have no entry in the mask, count as valid.
    """
    if any(p is None for p in solution.costates):
        raise ValueError("costate_norms needs p_0 .. p_L: solve with initial_costate=True")
    s = attention_mask.shape[0]
    out: dict[str, list[float]] = {"mean_seq": [], "batch_fro": [], "rms_seq": []}
    for p in solution.costates:
        per_seq = p.double().flatten(1).norm(dim=1)                     # ‖p_{l,s}‖_F, shape (S,)
        extra = p.shape[1] - attention_mask.shape[1]                    # prompt tokens in the state
        tokens = attention_mask.sum(1).double() + extra
        out["mean_seq"].append(float(per_seq.sum()))
        out["batch_fro"].append(float(per_seq.pow(2).sum().sqrt()))
        out["rms_seq"].append(float((s * per_seq / (tokens * p.shape[-1]).sqrt()).mean()))
    return out


def measure(system: ResidualSystem, batch: dict) -> dict[str, Any]:
    """Co-state norms and the batch's loss and accuracy at the current controls."""
    was_training = system.training
    system.eval()
    sol = solve_costate(system, batch)
    with torch.no_grad():
        acc = float((system(batch).argmax(-1) == batch["labels"]).double().mean())
    system.train(was_training)
    return {**costate_norms(sol, batch["attention_mask"]), "loss": sol.terminal_cost, "accuracy": acc,
            "hamiltonian": sol.hamiltonian.tolist()}


def train_steps(system: ResidualSystem, examples: list[Example], tokenizer: PreTrainedTokenizerBase, steps: int,
                lr: float, batch_size: int, max_length: int, seed: int, progress: bool = True) -> list[float]:
    """``steps`` AdamW steps (constant ``lr``, no weight decay, dropout off) on ``J``; returns the losses."""
    params = list({id(c.param): c.param for c in system.controls()}.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loader = make_loader(examples, tokenizer, batch_size, shuffle=True, seed=seed, max_length=max_length)
    system.eval()
    losses: list[float] = []
    batches = iter(loader)
    for _ in tqdm(range(steps), desc="train", leave=False, disable=not progress):
        try:
            batch = next(batches)
        except StopIteration:  # a new epoch
            batches = iter(loader)
            batch = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = system.cost(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def make_system(loaded: LoadedModel, method: str, seed: int, options: dict[str, Any] | None = None) -> ResidualSystem:
    """A fresh system (deep copy of ``loaded``) with ``method`` attached."""
    torch.manual_seed(seed)
    system = ct.ResidualSystem(copy.deepcopy(loaded), seed=seed)
    build(method, system, **(METHODS[method] if options is None else options))
    system.eval()
    return system


def profile_method(loaded: LoadedModel, method: str, train: list[Example], batch: dict, cfg: dict[str, Any],
                   options: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """The ``before`` and ``after`` rows of one method (see module docstring)."""
    system = make_system(loaded, method, cfg["seed"], options)
    n_params = sum(p.numel() for p in {id(c.param): c.param for c in system.controls()}.values())
    base = {"method": method, "n_params": n_params, "n_layers": system.n_layers}
    before = {**base, "phase": "before", "step": 0, **measure(system, batch)}
    start = time.perf_counter()
    losses = train_steps(system, train, loaded.tokenizer, cfg["steps"], cfg["lr"][method], cfg["batch_size"],
                         cfg["max_length"], cfg["seed"], progress)
    after = {**base, "phase": "after", "step": cfg["steps"], "train_seconds": time.perf_counter() - start,
             "train_loss_first10": sum(losses[:10]) / max(1, len(losses[:10])),
             "train_loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])), **measure(system, batch)}
    return [before, after]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-measure", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "costate_profile.json"))
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The recorded configuration (JSON-normalised: tuples become lists, so resumed rows compare equal)."""
    cfg = {"model": args.model, "task": "sst2", "dtype": "float32", "steps": args.steps, "n_train": args.n_train,
           "n_measure": args.n_measure, "batch_size": args.batch_size, "max_length": args.max_length,
           "seed": args.seed, "optimizer": "AdamW, constant lr, weight_decay 0, dropout off",
           "lr": LR, "options": METHODS, "norm": "mean_seq = sum_s ||p_{l,s}||_F (mean over sequences of the "
           "per-sequence co-state -dPhi_s/dx_l)"}
    return json.loads(json.dumps(cfg))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    cfg = config(args)
    train, held_out = split_train("sst2", args.n_train, args.n_measure, args.seed)
    loaded = ct.load_model(args.model, seed=args.seed)
    batch = Collator(loaded.tokenizer, args.max_length)(held_out)
    jsonl = Path(args.out).with_suffix(".jsonl")
    for method in tqdm(methods, desc="methods"):
        done = [r for r in read_jsonl(jsonl) if r.get("config") == cfg and r["method"] == method]
        if any(r["phase"] == "after" for r in done):
            continue
        for row in profile_method(loaded, method, train, batch, cfg):
            append_jsonl(jsonl, {"config": cfg, **row})
    latest: dict[tuple[str, str], dict] = {}
    for r in read_jsonl(jsonl):  # a redone method's rows replace the interrupted ones
        if r.get("config") == cfg:
            latest[(r["method"], r["phase"])] = {k: v for k, v in r.items() if k != "config"}
    rows = [latest[(m, ph)] for m in methods for ph in ("before", "after") if (m, ph) in latest]
    write_json(args.out, {**stamp(cfg), "rows": rows})
    for r in rows:
        p = r["mean_seq"]
        print(f"{r['method']:8s} {r['phase']:6s} loss {r['loss']:.3f} acc {r['accuracy']:.3f} "
              f"|p_0| {p[0]:.3g} |p_L| {p[-1]:.3g} ratio {p[0] / p[-1]:.3g}")


if __name__ == "__main__":
    main()
