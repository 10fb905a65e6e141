"""``controltune rollout``: a batch through the residual-stream system, per-layer
state norms, and the agreement of every state with HF's own ``output_hidden_states``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch

from ..results import stamp, write_json
from ..system import ResidualSystem
from ..zoo import check_length, load_model
from .models import vars_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SENTENCES = [
    "the film is a charming and often affecting journey .",
    "it 's a bad sign when you 're rooting for the villain .",
    "an utterly compelling portrait of a life in art , told with wit and grace",
    "dull",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default=None, help="take the batch from this task's dev split (e.g. sst2)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--kernel", default="sdpa", choices=["sdpa", "eager"])


def _batch(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> dict:
    if args.task:
        from ..batching import Collator
        from ..data import load_split

        examples = load_split(args.task, "dev", n=args.batch_size, seed=args.seed)
        return Collator(tokenizer, args.max_length)(examples)
    texts = (SENTENCES * (args.batch_size // len(SENTENCES) + 1))[: args.batch_size]
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"))


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    check_length(loaded, args.max_length, "--max-length")
    system = ResidualSystem(loaded, kernel=args.kernel)
    batch = {k: v.to(args.device) for k, v in _batch(args, loaded.tokenizer).items()}
    with torch.no_grad():
        traj = system.rollout(batch)
    errs = system.hf_agreement(batch)
    tol = 1e-12 if args.dtype == "float64" else 1e-5
    mask = traj.ctx.attention_mask.bool()
    print(f"{args.model}: family {system.family.name} ({'post' if system.family.post_ln else 'pre'}-LN), "
          f"{system.n_layers} blocks, d = {system.d_model}, batch {tuple(batch['input_ids'].shape)} "
          f"({int((~mask).sum())} padded positions), {args.dtype}, kernel {args.kernel}")
    print(f"context inputs: {'; '.join(system.family.context_inputs)}")
    print(f"{'state':<6} {'mean ‖x_l‖ per token':>22} {'max |x_l - HF_l|':>18}")
    rows = []
    for layer, (x, err) in enumerate(zip(traj.states, errs)):
        norm = x.norm(dim=-1)[mask].mean().item()
        label = f"x_{layer}" + ("*" if layer == system.n_layers and system.family.final_norm else "")
        print(f"{label:<6} {norm:>22.4f} {err:>18.3e}")
        rows.append({"layer": layer, "mean_token_norm": norm, "max_abs_err_vs_hf": err})
    if system.family.final_norm:
        print("* pre-LN decoder: HF's last hidden state is norm(x_L); it is compared with the readout's norm(x_L)")
    ok = max(errs) <= tol
    print(f"agreement with HF output_hidden_states: max abs error {max(errs):.3e} "
          f"({'within' if ok else 'ABOVE'} the {args.dtype} tolerance {tol:g})")
    if args.json:
        write_json(args.json, {**stamp(vars_of(args)), "family": system.family.name, "states": rows,
                               "max_abs_err": max(errs), "tolerance": tol, "passed": ok})
    return 0 if ok else 1
