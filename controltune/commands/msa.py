"""``controltune msa``: train a delta method with (E-)MSA on a task and score the dev set.

Each iteration solves the co-states on a batch and raises every layer's augmented
Hamiltonian (:mod:`controltune.msa`).  Example::

    controltune msa --model minilm --method lora --opt rank=4 --task sst2 --iterations 60 --rho 0.1 \\
        --inner-steps 3 --lr 1e-3 --batch-size 16 --max-length 64 --dev-size 256 --eval-every 10 --json msa.json
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import torch

from ..results import stamp, write_json

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm, random:<family> or a checkpoint folder")
    parser.add_argument("--method", default="lora", help="a registered controller (see `controltune methods`)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="controller option")
    parser.add_argument("--task", default="sst2", help="sst2, mrpc, rte, cola or a path to JSONL data")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--rho", type=float, default=0.1, help="E-MSA penalty ρ (0: basic MSA)")
    parser.add_argument("--inner-steps", type=int, default=3, help="optimiser steps on each H̃_l per iteration")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the inner optimiser")
    parser.add_argument("--inner-optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--no-costate-penalty", action="store_true",
                        help="drop the ‖p_l − ∇_x H_l‖² term (no double backward; cheaper)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=None, help="seeded subsample of N training rows")
    parser.add_argument("--dev-size", type=int, default=256, help="seeded subsample of N dev rows")
    parser.add_argument("--eval-every", type=int, default=10)


def run(args: argparse.Namespace) -> int:
    from ..batching import make_loader
    from ..controllers import build
    from ..controllers.spec import parse_options
    from ..data import load_split, resolve_task
    from ..evaluation import evaluate
    from ..msa import MSAConfig, train_msa
    from ..system import ResidualSystem
    from ..zoo import check_length, load_model

    torch.manual_seed(args.seed)
    config = MSAConfig(rho=args.rho, inner_steps=args.inner_steps, lr=args.lr, optimizer=args.inner_optimizer,
                       costate_penalty=not args.no_costate_penalty)
    spec = resolve_task(args.task, holdout_seed=args.seed)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    check_length(loaded, args.max_length)
    system = ResidualSystem(loaded, num_labels=spec.num_labels, seed=args.seed)
    build(args.method, system, **parse_options(args.opt))
    system.eval()
    train = load_split(spec, "train", n=args.train_size, seed=args.seed)
    dev = load_split(spec, "dev", n=args.dev_size, seed=args.seed)
    loader = make_loader(train, loaded.tokenizer, args.batch_size, shuffle=True, seed=args.seed,
                         max_length=args.max_length)
    device = torch.device(args.device)
    batches = _OnDevice(loader, device)
    curve: list[dict[str, Any]] = []
    start = time.perf_counter()

    def score(i: int, stats: dict[str, float]) -> None:
        row = {"iteration": i, "train_cost": stats["cost"], "seconds": time.perf_counter() - start}
        if i % args.eval_every == 0 or i == args.iterations:
            row.update({f"dev_{k}": v for k, v in evaluate(system, dev, spec, loaded.tokenizer,
                                                           max_length=args.max_length).items()})
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
        curve.append(row)

    train_msa(system, batches, args.iterations, config, score)
    if args.json:
        cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json(args.json, {**stamp(cfg), "curve": curve})
    return 0


class _OnDevice:
    """Re-iterable view of a loader that moves each batch to ``device``."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield {k: v.to(self.device) for k, v in batch.items()}
