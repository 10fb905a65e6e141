"""Co-states, trajectory-local Lipschitz constants and the maximum condition of a real decoder, beside MiniLM.

One model (``smollm2`` — SmolLM2-135M, LLaMA family, 30 pre-LN blocks — or ``minilm``,
6 post-LN blocks) with LoRA (rank 8 on q, v; the options of ``costate_profile.py``) and a
*classification* readout (the final norm, if any, then mean pooling over the real tokens and a
linear head: the same readout for both models) on SST-2, float32.  At initialisation
(``before``) and after ``--steps`` AdamW steps (``after``; constant lr, no weight decay,
dropout off) on seeded training rows, the script solves the co-state on a fixed batch of
``--n-measure`` training rows held out from those and records:

* the co-state norm profile ``‖p_l‖`` (``mean_seq`` = Σ_s ‖p_{l,s}‖_F, as ``costate_profile.py``);
* per-token norms of the states ``‖x_{l,s,t}‖`` and co-states ``‖S·p_{l,s,t}‖ = ‖∂Φ_s/∂x_{l,s,t}‖``:
  the *jump block* ``l*`` (the block with the largest per-token growth ``‖x_{l+1,t}‖/‖x_{l,t}‖``),
  the *massive* tokens (those growing more than ``MASSIVE_GROWTH``× in block ``l*``: the "massive
  activations" of real LLMs) and, per layer, the mean over massive and over the other tokens of
  ``‖x‖``, ``‖p‖`` and ``‖p‖·‖x‖`` (the change of Φ_s per unit *relative* perturbation of the token);
  and the per-token norms of the first sequence (a heat map);
* ``‖∇_{u_l} H_l‖`` per block (:func:`controltune.diagnostics.stationarity`);
* per block the trajectory-local Lipschitz constants ``a_l = ‖∂G_l/∂x‖₂`` (pre-LN, ``f = x + G``) or
  ``‖∂f_l/∂x‖₂`` (post-LN) and ``b_l = ‖∂f_l/∂u_l‖₂`` (u_l the LoRA factors of block l) at the batch's
  trajectory, by power iteration (:mod:`controltune.bounds.lipschitz`, eager attention);
* the maximum-condition probe (:func:`controltune.diagnostics.maximum_condition_probe`): the
  fraction of ``u*_l ± ε‖u*_l‖v`` probes that do not increase ``H_l`` (x*, p* fixed), per block.

    OMP_NUM_THREADS=1 nice -n 10 python experiments/decoder_profile.py --model smollm2
        # -> experiments/results/decoder_profile_smollm2.json (~10 min, one thread)
    OMP_NUM_THREADS=1 nice -n 10 python experiments/decoder_profile.py --model minilm
        # -> experiments/results/decoder_profile_minilm.json (~2 min)

Resume-safe: one JSONL row per phase is appended as it finishes; a finished ``after`` row ends
the run, a finished ``before`` row is not measured again (training is redone: it is seeded).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from costate_profile import costate_norms, split_train, train_steps

import controltune as ct
from controltune.batching import Collator
from controltune.bounds.lipschitz import local_control_lipschitz, local_state_lipschitz
from controltune.controllers import build
from controltune.diagnostics import maximum_condition_probe, stationarity
from controltune.pmp import CoStateSolution, solve_costate
from controltune.results import append_jsonl, read_jsonl, stamp, write_json

if TYPE_CHECKING:
    from controltune.system import ResidualSystem

RESULTS = Path(__file__).parent / "results"
LORA = {"rank": 8, "alpha": 16, "targets": ("q", "v")}
LR = 5e-4
RADII = (1e-3, 1e-2, 1e-1, 1.0)
"""Probe radii ε of the maximum condition, relative to ‖u*_l‖ (as ``stationarity.py``)."""
MASSIVE_GROWTH = 10.0
"""A token is *massive* when its state norm grows more than this factor in the jump block."""
PHASES = ("before", "after")


def token_profile(solution: CoStateSolution, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Per-token state and co-state norms, the jump block and the massive tokens (module docstring).

    ``‖p‖`` is the per-sequence co-state ``S·p_{l,s,t}`` (the batch co-state carries 1/S).
    """
    real = attention_mask.bool()
    s = attention_mask.shape[0]
    xs = torch.stack([x.double().norm(dim=-1) for x in solution.states])            # (L+1)×S×T
    ps = torch.stack([s * p.double().norm(dim=-1) for p in solution.costates])
    growth = xs[1:] / xs[:-1].clamp_min(1e-30)                                       # L×S×T
    growth = torch.where(real[None], growth, torch.zeros_like(growth))
    jump = int(growth.flatten(1).max(dim=1).values.argmax())
    massive = real & (growth[jump] > MASSIVE_GROWTH)
    ordinary = real & ~massive

    def mean(t: torch.Tensor, where: torch.Tensor) -> list[float | None]:
        if not where.any():
            return [None] * t.shape[0]
        return [float(v) for v in t[:, where].mean(dim=1)]

    def median(t: torch.Tensor, where: torch.Tensor) -> list[float | None]:
        if not where.any():
            return [None] * t.shape[0]
        return [float(v) for v in t[:, where].median(dim=1).values]

    positions = massive.nonzero().tolist()
    n0 = int(real[0].sum())
    return {
        "jump_block": jump, "max_growth": float(growth[jump].max()), "massive_threshold": MASSIVE_GROWTH,
        "n_massive": int(massive.sum()), "n_tokens": int(real.sum()),
        "massive_positions": [{"seq": a, "pos": b} for a, b in positions],
        "x_massive": mean(xs, massive), "x_other": mean(xs, ordinary), "x_other_median": median(xs, ordinary),
        "p_massive": mean(ps, massive), "p_other": mean(ps, ordinary), "p_other_median": median(ps, ordinary),
        "px_massive": mean(ps * xs, massive), "px_other": mean(ps * xs, ordinary),
        "x_max": [float(v) for v in xs[:, real].max(dim=1).values],
        "seq0": {"x": xs[:, 0, :n0].tolist(), "p": ps[:, 0, :n0].tolist()},
    }


def lipschitz_profile(system: ResidualSystem, solution: CoStateSolution, iters: int, tol: float,
                      seed: int) -> dict[str, Any]:
    """Per block ``a_l`` and ``b_l`` (trajectory-local Jacobian norms, power iteration) and convergence."""
    out: dict[str, list] = {"local_a": [], "local_b": [], "converged_a": [], "converged_b": [],
                            "iterations_a": [], "iterations_b": []}
    ctx = solution.ctx
    with system.using_kernel("eager"):
        for layer in range(system.n_layers):
            x = solution.states[layer]
            a = local_state_lipschitz(system, layer, x, ctx, iters=iters, tol=tol, seed=seed)
            b = local_control_lipschitz(system, layer, x, ctx, iters=iters, tol=tol, seed=seed)
            out["local_a"].append(a.sigma)
            out["local_b"].append(b.sigma)
            out["converged_a"].append(a.converged)
            out["converged_b"].append(b.converged)
            out["iterations_a"].append(a.iterations)
            out["iterations_b"].append(b.iterations)
    out["state_constant_of"] = "G_l = f_l - x (pre-LN)" if not system.family.post_ln else "f_l (post-LN)"
    return out


def measure(system: ResidualSystem, batch: dict, cfg: dict[str, Any]) -> dict[str, Any]:
    """Every quantity of one phase (module docstring), with the seconds each took."""
    system.eval()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    sol = solve_costate(system, batch)
    seconds["solve"] = time.perf_counter() - start
    with torch.no_grad():
        acc = float((system(batch).argmax(-1) == batch["labels"]).double().mean())
    row: dict[str, Any] = {"loss": sol.terminal_cost, "accuracy": acc,
                           **costate_norms(sol, batch["attention_mask"]),
                           "stationarity": stationarity(sol)["layer"],
                           "tokens": token_profile(sol, batch["attention_mask"])}
    start = time.perf_counter()
    row["lipschitz"] = lipschitz_profile(system, sol, cfg["iters"], cfg["tol"], cfg["seed"])
    seconds["lipschitz"] = time.perf_counter() - start
    start = time.perf_counter()
    probe = maximum_condition_probe(system, batch, solution=sol, n_directions=cfg["n_directions"], radii=RADII,
                                    n_lines=2, line_points=11, seed=cfg["seed"])
    seconds["max_condition"] = time.perf_counter() - start
    row["max_condition"] = {"fraction_local_max": probe["fraction_local_max"],
                            "layers": [{k: v for k, v in r.items() if k != "lines"} for r in probe["layers"]],
                            "lines": [r["lines"][0] if r["lines"] else None for r in probe["layers"]]}
    row["seconds"] = seconds
    return row


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or minilm (any zoo name works)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-measure", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--iters", type=int, default=20, help="power iterations per Lipschitz constant")
    p.add_argument("--tol", type=float, default=1e-3, help="relative change that ends a power iteration")
    p.add_argument("--n-directions", type=int, default=4, help="maximum-condition directions per block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: experiments/results/decoder_profile_<model>.json")
    return p


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The recorded configuration (JSON-normalised, so resumed rows compare equal)."""
    cfg = {"model": args.model, "task": "sst2", "dtype": "float32", "method": "lora", "options": LORA, "lr": LR,
           "readout": "classification: final norm (if any), mean pooling over real tokens, linear head",
           "steps": args.steps, "n_train": args.n_train, "n_measure": args.n_measure,
           "batch_size": args.batch_size, "max_length": args.max_length, "iters": args.iters, "tol": args.tol,
           "n_directions": args.n_directions, "radii": RADII, "seed": args.seed,
           "optimizer": "AdamW, constant lr, weight_decay 0, dropout off",
           "massive_growth": MASSIVE_GROWTH}
    return json.loads(json.dumps(cfg))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out) if args.out else RESULTS / f"decoder_profile_{args.model.replace(':', '_')}.json"
    jsonl = out.with_suffix(".jsonl")
    cfg = config(args)
    done = {r["phase"]: r for r in read_jsonl(jsonl) if r.get("config") == cfg}
    if "after" not in done:
        train, held_out = split_train("sst2", args.n_train, args.n_measure, args.seed)
        loaded = ct.load_model(args.model, seed=args.seed)
        batch = Collator(loaded.tokenizer, args.max_length)(held_out)
        torch.manual_seed(args.seed)
        system = ct.ResidualSystem(copy.deepcopy(loaded), seed=args.seed)
        build("lora", system, **LORA)
        system.eval()
        base = {"model": args.model, "family": system.family.name, "n_layers": system.n_layers,
                "d_model": system.d_model, "post_ln": system.family.post_ln,
                "n_params": sum(c.param.numel() for c in system.controls()),
                "batch_tokens": int(batch["attention_mask"].sum()), "batch_shape": list(batch["input_ids"].shape)}
        if "before" not in done:
            print(f"{args.model}: measuring at initialisation", flush=True)
            done["before"] = {**base, "phase": "before", "step": 0, **measure(system, batch, cfg)}
            append_jsonl(jsonl, {"config": cfg, **done["before"]})
        print(f"{args.model}: {args.steps} training steps", flush=True)
        start = time.perf_counter()
        losses = train_steps(system, train, loaded.tokenizer, args.steps, LR, args.batch_size, args.max_length,
                             args.seed)
        train_seconds = time.perf_counter() - start
        print(f"{args.model}: measuring after training", flush=True)
        done["after"] = {**base, "phase": "after", "step": args.steps, "train_seconds": train_seconds,
                         "train_loss_first10": sum(losses[:10]) / max(1, len(losses[:10])),
                         "train_loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
                         **measure(system, batch, cfg)}
        append_jsonl(jsonl, {"config": cfg, **done["after"]})
    rows = [{k: v for k, v in done[ph].items() if k != "config"} for ph in PHASES]
    write_json(out, {**stamp(cfg), "rows": rows})
    for r in rows:
        t = r["tokens"]
        jump = t["jump_block"]
        print(f"{r['phase']:6s} loss {r['loss']:.3f} acc {r['accuracy']:.2f} |p_0|/|p_L| "
              f"{r['mean_seq'][0] / r['mean_seq'][-1]:.3g}; jump block {jump} (x{t['max_growth']:.3g}), "
              f"{t['n_massive']} massive of {t['n_tokens']} tokens; max-condition "
              f"{r['max_condition']['fraction_local_max']:.2f}; a_l {min(r['lipschitz']['local_a']):.3g}.."
              f"{max(r['lipschitz']['local_a']):.3g}; seconds {r['seconds']}")
        if t["n_massive"]:
            for layer in (jump, jump + 1):
                print(f"   x_{layer}: |x| massive {t['x_massive'][layer]:.4g} other {t['x_other'][layer]:.4g}; "
                      f"|p| massive {t['p_massive'][layer]:.3g} other {t['p_other'][layer]:.3g}")
    if any(math.isnan(v) for r in rows for v in r["mean_seq"]):
        raise SystemExit("a co-state norm is NaN")


if __name__ == "__main__":
    main()
