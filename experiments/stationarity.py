"""First-order PMP stationarity and the maximum condition along AdamW training of MiniLM on SST-2.

Each method (LoRA rank 8 on q, v; Houlsby adapter, bottleneck 64) plus the classification
head is trained with AdamW (linear decay to 0, no weight decay, dropout off) on ``n_train``
seeded SST-2 training rows.  Every ``k`` steps (and at step 0) the co-state is solved on a
fixed batch of ``n_fixed`` of those training rows (the objective being minimised, so
stationarity is a property of it) and the script records

* ``‖∇_{u_l} H_l‖`` for l = 0..L-1 (:func:`controltune.diagnostics.stationarity`; equal to
  ``‖∂J/∂u_l‖`` by the PMP identity, DESIGN.md §1), and of the head (``term``);
* ``J`` on the fixed batch, and the dev loss and accuracy on ``n_dev`` seeded dev rows.

At initialisation and after the last step, :func:`controltune.diagnostics.maximum_condition_probe`
perturbs the controls of one block at a time, ``u_l = u*_l ± ε‖u*_l‖ v`` (v random unit, x* and
p* fixed), and reports per layer the fraction of probes where ``H_l`` did not increase
(u* a local maximiser of H_l along ±v at radius ε).

    nice -n 10 python experiments/stationarity.py     # -> experiments/results/stationarity.json (~9 min, 1 thread)

Resume-safe: rows are appended to ``stationarity.jsonl``; a method whose final probe row
exists is skipped, an interrupted method is redone from scratch (same seed, same batches).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

import controltune as ct
from controltune.batching import Collator, make_loader
from controltune.controllers import build
from controltune.data import Example, load_split, resolve_task
from controltune.diagnostics import maximum_condition_probe, stationarity
from controltune.evaluation import evaluate
from controltune.pmp import solve_costate
from controltune.results import append_jsonl, read_jsonl, stamp, write_json
from controltune.schedule import linear_schedule

if TYPE_CHECKING:
    from collections.abc import Iterator

    from transformers import PreTrainedTokenizerBase

    from controltune.data import TaskSpec
    from controltune.system import ResidualSystem
    from controltune.zoo import LoadedModel

RESULTS = Path(__file__).parent / "results"
METHODS: dict[str, dict[str, Any]] = {"lora": {"rank": 8, "alpha": 16, "targets": ("q", "v")},
                                      "adapter": {"bottleneck": 64}}
LR = {"lora": 5e-4, "adapter": 5e-4}
RADII = (1e-3, 1e-2, 1e-1, 1.0)
"""Probe radii ε, relative to ‖u*_l‖ (the norm of every control acting in block l)."""
N_LINES, LINE_POINTS = 2, 11
"""Directions per block along which ``H_l(u* + t v) − H_l(u*)`` is recorded for t ∈ [−max ε, max ε]·‖u*_l‖."""


def point(system: ResidualSystem, batch: dict, step: int, dev: list[Example] | None, spec: TaskSpec,
          tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, Any]:
    """One curve row: per-layer stationarity on ``batch`` and the dev scores (when ``dev``)."""
    sol = solve_costate(system, batch, initial_costate=False)
    st = stationarity(sol)
    row = {"kind": "curve", "step": step, "layer": st["layer"], "term": st["term"], "total": st["total"],
           "fixed_batch_loss": sol.terminal_cost}
    if dev:
        scores = evaluate(system, dev, spec, tokenizer, batch_size=64, max_length=max_length)
        row.update(dev_loss=scores["loss"], dev_accuracy=scores["accuracy"])
    return row


def probe(system: ResidualSystem, batch: dict, phase: str, n_directions: int, seed: int,
          radii: tuple[float, ...] = RADII) -> dict[str, Any]:
    """The maximum-condition probe row: per layer the fractions, ``max_increase`` and ``N_LINES`` lines
    ``{"t", "dH"}`` of ``H_l(u* + t‖u*_l‖v) − H_l(u*)``."""
    res = maximum_condition_probe(system, batch, n_directions=n_directions, radii=radii, seed=seed,
                                  n_lines=N_LINES, line_points=LINE_POINTS)
    return {"kind": "probe", "phase": phase, "layers": res["layers"], "fraction_local_max": res["fraction_local_max"],
            "n_directions": res["n_directions"], "radii": res["radii"], "relative": res["relative"]}


def run_method(loaded: LoadedModel, method: str, options: dict[str, Any], train: list[Example], fixed: dict,
               dev: list[Example] | None, spec: TaskSpec, cfg: dict[str, Any], progress: bool = True
               ) -> Iterator[dict[str, Any]]:
    """Yield the rows of one method: probe before, curve points every ``cfg['every']`` steps, probe after."""
    torch.manual_seed(cfg["seed"])
    system = ct.ResidualSystem(copy.deepcopy(loaded), num_labels=spec.num_labels, seed=cfg["seed"])
    build(method, system, **options)
    system.eval()
    tok = loaded.tokenizer
    yield probe(system, fixed, "before", cfg["n_directions"], cfg["seed"])
    yield point(system, fixed, 0, dev, spec, tok, cfg["max_length"])
    params = list({id(c.param): c.param for c in system.controls()}.values())
    opt = torch.optim.AdamW(params, lr=cfg["lr"][method], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(0, cfg["steps"]))
    loader = make_loader(train, tok, cfg["batch_size"], shuffle=True, seed=cfg["seed"], max_length=cfg["max_length"])
    batches = iter(loader)
    for step in tqdm(range(1, cfg["steps"] + 1), desc=method, leave=False, disable=not progress):
        try:
            batch = next(batches)
        except StopIteration:  # next epoch
            batches = iter(loader)
            batch = next(batches)
        opt.zero_grad(set_to_none=True)
        system.cost(batch).backward()
        opt.step()
        sched.step()
        if step % cfg["every"] == 0 or step == cfg["steps"]:
            yield point(system, fixed, step, dev, spec, tok, cfg["max_length"])
    yield probe(system, fixed, "after", cfg["n_directions"], cfg["seed"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-fixed", type=int, default=32)
    p.add_argument("--n-dev", type=int, default=256)
    p.add_argument("--n-directions", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "stationarity.json"))
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The recorded configuration (JSON-normalised: tuples become lists, so resumed rows compare equal)."""
    cfg = {"model": args.model, "task": "sst2", "dtype": "float32", "steps": args.steps, "every": args.every,
           "n_train": args.n_train, "n_fixed": args.n_fixed, "n_dev": args.n_dev, "n_directions": args.n_directions,
           "radii": RADII, "n_lines": N_LINES, "line_points": LINE_POINTS, "batch_size": args.batch_size,
           "max_length": args.max_length, "seed": args.seed,
           "lr": LR, "options": METHODS, "optimizer": "AdamW, linear decay to 0, weight_decay 0, dropout off",
           "fixed_batch": "the first n_fixed of the n_train training rows"}
    return json.loads(json.dumps(cfg))


def collect(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``method -> {"curve": [rows by step], "probe": {"before", "after"}}``; later rows (a redone
    method) replace earlier ones."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = out.setdefault(r["method"], {"curve": {}, "probe": {}})
        body = {k: v for k, v in r.items() if k not in ("config", "method", "kind")}
        if r["kind"] == "curve":
            entry["curve"][r["step"]] = body
        else:
            entry["probe"][r["phase"]] = body
    return {m: {"curve": [e["curve"][s] for s in sorted(e["curve"])], "probe": e["probe"]} for m, e in out.items()}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    cfg = config(args)
    spec = resolve_task("sst2")
    train = load_split(spec, "train", n=args.n_train, seed=args.seed)
    dev = load_split(spec, "dev", n=args.n_dev, seed=args.seed)
    loaded = ct.load_model(args.model, seed=args.seed)
    fixed = Collator(loaded.tokenizer, args.max_length)(train[:args.n_fixed])
    jsonl = Path(args.out).with_suffix(".jsonl")
    for method in methods:
        rows = [r for r in read_jsonl(jsonl) if r.get("config") == cfg and r["method"] == method]
        if any(r["kind"] == "probe" and r["phase"] == "after" for r in rows):
            continue
        for row in run_method(loaded, method, cfg["options"][method], train, fixed, dev, spec, cfg):
            append_jsonl(jsonl, {"config": cfg, "method": method, **row})
    methods_out = collect([r for r in read_jsonl(jsonl) if r.get("config") == cfg])
    write_json(args.out, {**stamp(cfg), "methods": methods_out})
    for m, e in methods_out.items():
        c0, c1 = e["curve"][0], e["curve"][-1]
        print(f"{m}: |grad_u H| total {c0['total']:.3g} -> {c1['total']:.3g}; per layer "
              + ", ".join(f"{a:.2g}->{b:.2g}" for a, b in zip(c0["layer"], c1["layer"]))
              + f"; dev acc {c0.get('dev_accuracy', float('nan')):.3f} -> {c1.get('dev_accuracy', float('nan')):.3f}")
        for ph, pr in e["probe"].items():
            print(f"  max-condition {ph}: overall {pr['fraction_local_max']:.2f}; per layer "
                  + ", ".join(f"{r['fraction_local_max']:.2f}" for r in pr["layers"]))


if __name__ == "__main__":
    main()
