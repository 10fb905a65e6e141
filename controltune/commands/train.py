"""``controltune train``: train a delta method on a task and write ``metrics.json``.

Examples::

    controltune train --model minilm --method lora --task sst2 --opt rank=8 --opt targets=q,v --out runs/lora
    controltune train --model minilm --method lora+bitfit --opt lora.rank=4 --task rte --steps 200
    controltune train --model minilm --method full --task sst2 --train-size 5000 --lr 5e-5 --epochs 2 --out runs/full
    controltune train ... --out runs/full --resume      # after a stop: same command plus --resume
    controltune train --method lora --task rte --epochs 5 --val-size 250 --eval-every 50 --out runs/rte
        # select the deltas on 250 held-out training rows, report dev at that checkpoint

``--method a+b`` combines controllers simultaneously (:class:`~controltune.controllers.composition.Simultaneous`);
an option ``--opt a.key=value`` then goes to part ``a`` only.  With ``--sequential`` the parts are trained one
after another instead (:class:`~controltune.controllers.composition.Sequential`): part a for ``--epochs``/
``--steps``, then frozen into the model, then part b, ...; each stage writes its own ``<out>/stage<i>-<method>``::

    controltune train --method prompt+bitfit+adapter --sequential --task sst2 --epochs 1 --out runs/seq
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..controllers.spec import controller_spec, parse_options
from ..data import load_split, resolve_task
from ..metrics import AUXILIARY_KEYS

if TYPE_CHECKING:
    from ..data import TaskSpec
    from ..zoo import LoadedModel


def _part_scales(text: str | None) -> list[float] | None:
    """``"25,1"`` -> ``[25.0, 1.0]``; a clear error for anything but positive numbers."""
    if text is None:
        return None
    try:
        scales = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--part-lr-scales {text!r}: give comma-separated positive numbers, e.g. 25,1") from None
    if not scales or any(not k > 0 for k in scales):
        raise ValueError(f"--part-lr-scales {text!r}: every scale must be a positive number")
    return scales


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm, random:<family> or a checkpoint folder")
    parser.add_argument("--method", required=True,
                        help="a registered controller (see `controltune methods`), or several joined by '+'")
    parser.add_argument("--sequential", action="store_true",
                        help="with --method a+b+...: train the parts one after another (each frozen before the next "
                             "is added), each for --epochs/--steps, into <out>/stage<i>-<method>")
    parser.add_argument("--part-lr-scales", default=None, metavar="K1,K2,...",
                        help="with --method a+b+... (trained together): part i at --lr times K_i, the head at --lr "
                             "(e.g. --method prompt+adapter --lr 2e-3 --part-lr-scales 25,1)")
    parser.add_argument("--task", required=True, help="sst2, mrpc, rte, cola or a path to JSONL data")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="controller option (repeatable); lists comma-separated: targets=q,v; "
                             "for a '+' combination prefix the part: lora.rank=4")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per method, see "
                                                                "controltune.commands.train.DEFAULT_LR)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None)
    length.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--train-size", type=int, default=None, help="seeded subsample of N training rows")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the --train-size subsample")
    parser.add_argument("--dev-size", type=int, default=None, help="seeded subsample of N dev rows (default: all)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluation every N steps: of the --val-size rows when given, else of dev")
    parser.add_argument("--val-size", type=float, default=None, metavar="N",
                        help="hold out N training rows (a fraction if < 1) as validation rows: the deltas best on "
                             "them (scored every --eval-every steps and at the end) are selected and reported on dev")
    parser.add_argument("--val-seed", type=int, default=0, help="seed of the --val-size hold-out (default 0)")
    parser.add_argument("--train-score-size", type=int, default=1000, metavar="N",
                        help="also score the reported deltas on N seeded rows they were trained on (train_scores in "
                             "metrics.json: the generalisation gap); 0 to skip")
    parser.add_argument("--warmup", type=float, default=0.0, help="fraction (<1) or number of warm-up steps")
    parser.add_argument("--schedule", default="linear", choices=["linear", "constant"],
                        help="after warm-up: linear decay to 0, or constant")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"])
    parser.add_argument("--head-init", default="random", choices=["random", "probe"],
                        help="how the classification head starts: random (seeded), or probe: fitted as a linear "
                             "probe on the training rows before the method attaches (LP-FT; a control-designed "
                             "method then designs through it; with --val-size those rows choose its L2 penalty)")
    parser.add_argument("--dropout", action="store_true", help="train with the model's dropout on")
    parser.add_argument("--out", default=None, metavar="DIR", help="write metrics.json, deltas and checkpoints here")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out (refused if the configuration differs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results an existing --out holds (otherwise they are never overwritten)")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="KEY",
                        help="with --resume, let KEY (e.g. lr, steps, options.rank, or options for all of them) "
                             "differ from the checkpoint's configuration; repeatable; recorded in metrics.json")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="write the resume state every N steps (besides each dev evaluation)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0, metavar="M",
                        help="write the resume state after M minutes of wall time since the last (default 5)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads for the run (default: torch's own setting, which is every core, or "
                             "$OMP_NUM_THREADS when set)")
    parser.add_argument("--no-group-by-length", action="store_true",
                        help="draw batches as slices of one random permutation instead of grouping similar lengths")
    parser.add_argument("--token-cache", action="store_true",
                        help="also keep the tokenised splits on disk under the controltune cache folder")
    parser.add_argument("--budget", type=float, default=None,
                        help="after training, methods with a sparsity budget (diff pruning) are projected onto "
                             "this many entries (or this fraction if < 1)")


def _stage_out(out: str | None, stage: int, method: str) -> str | None:
    """``<out>/stage<i>-<method>``: each stage of a sequential run keeps its own metrics, deltas and checkpoints."""
    return None if out is None else str(Path(out) / f"stage{stage}-{method}")


DEFAULT_LR = {"full": 5e-5, "prefix": 5e-3, "prompt": 5e-3}
"""Peak learning rates by method when ``--lr`` is not given (others: 5e-4)."""


def input_files(spec: TaskSpec, model: str) -> list[Path]:
    """Files the run reads: the task's data files and, when ``model`` is a path, the model's files."""
    files = [spec.file] if spec.file is not None else [f for f in spec.folder.iterdir() if f.is_file()]
    model_path = Path(model)
    if model_path.is_dir():
        files += [f for f in model_path.rglob("*") if f.is_file()]
    elif model_path.is_file():
        files.append(model_path)
    return files


def check_json_path(json_path: str, spec: TaskSpec, model: str, out: str | None) -> None:
    """Refuse a ``--json`` path that would replace one of the run's inputs or its resume state, before training.

    The ``metrics.json`` of ``--out`` is allowed (it is rewritten with the same result anyway).
    """
    target = Path(json_path)
    if target.is_dir():
        raise ValueError(f"--json {json_path} is a folder; give a file path")
    if not target.exists():
        return
    protected = input_files(spec, model)
    if out is not None:
        protected += [Path(out) / name for name in ("deltas.safetensors", "checkpoint.pt", ".controltune-train.lock")]
    for path in protected:
        if path.exists() and os.path.samefile(target, path):
            raise ValueError(f"--json {json_path} is {path}, an input of this run: it would be overwritten; "
                             "choose another path")


def check_max_length(loaded: LoadedModel, max_length: int) -> None:
    """Refuse ``--max-length`` beyond the model's position table (before any training step)."""
    from ..zoo import check_length

    check_length(loaded, max_length, "--max-length")


def _scores(scores: dict | None, skip: tuple[str, ...] = ("step", "top_class_share")) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in (scores or {}).items() if k not in skip)


def _scores_text(result: dict) -> str:
    """``accuracy=0.8812, loss=0.31`` (dev after the last step); with validation rows, the dev scores of the
    selected deltas first, then their validation scores and the last step's dev scores."""
    if "best_val" not in result:
        return _scores(result.get("final"))
    best_val, at_best, skip = result["best_val"] or {}, result.get("dev_at_best_val"), AUXILIARY_KEYS
    return (f"dev at best validation (step {best_val.get('step')}): {_scores(at_best, skip)} "
            f"[validation {_scores(best_val, skip)}]; dev after the last step: {_scores(result.get('final'), skip)}")


def _one_class_warning(result: dict) -> str | None:
    """A warning when the reported deltas give every dev row the same class (a collapse the score alone hides:
    a constant prediction scores the majority class's level)."""
    reported = result.get("dev_at_best_val") or result.get("final") or {}
    if reported.get("top_class_share") == 1.0:
        return ("warning: the reported deltas predict one class for every dev row (the score is that of a constant "
                "prediction); try a smaller learning rate or more steps")
    return None


def run(args: argparse.Namespace) -> int:
    from ..controllers import build
    from ..design.linearize import withheld_from_design
    from ..divergence import TrainingDiverged
    from ..evaluation import validation_rows
    from ..probe import init_head
    from ..system import ResidualSystem
    from ..train import check_output_folder, train, train_stages
    from ..train_config import TrainConfig
    from ..zoo import load_model

    if args.resume and args.out is None:
        raise ValueError("--resume needs --out, the folder holding the run's checkpoint")
    if args.sequential and "+" not in args.method:
        raise ValueError(f"--sequential trains the parts of a combination one after another; --method {args.method!r} "
                         "has one part (join several with '+', e.g. --method prompt+bitfit+adapter)")
    scales = _part_scales(args.part_lr_scales)
    if scales is not None and (args.sequential or len(args.method.split("+")) != len(scales)):
        raise ValueError(f"--part-lr-scales gives {len(scales)} scale(s): it needs --method with as many parts "
                         f"joined by '+', trained together (not --sequential); got --method {args.method!r}")
    if args.sequential and args.resume:
        raise ValueError("--resume is not supported with --sequential yet: rerun the stages with --overwrite")
    if args.out is not None:  # before the model loads: a wrong --out should cost nothing
        check_output_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    spec = resolve_task(args.task, holdout_seed=args.data_seed)
    if args.json:
        check_json_path(args.json, spec, args.model, args.out)
    train_ex = load_split(spec, "train", n=args.train_size, seed=args.data_seed)
    dev_ex = load_split(spec, "dev", n=args.dev_size, seed=args.data_seed)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    check_max_length(loaded, args.max_length)
    system = ResidualSystem(loaded, num_labels=spec.num_labels, pooling=args.pooling, seed=args.seed)
    head_fit = init_head(system, args.head_init, train_ex, loaded.tokenizer, val_size=args.val_size,
                         val_seed=args.val_seed, max_length=args.max_length, batch_size=args.eval_batch_size)
    if head_fit is not None:
        print(f"head: linear probe on {head_fit['rows']} training rows, L2 {head_fit['l2']:g}, training accuracy "
              f"{head_fit['train_accuracy']:.4f}" + (f", held-out accuracy {head_fit['held_out_accuracy']:.4f}"
                                                      if head_fit["held_out"] else ""))
    name, options = controller_spec(args.method, parse_options(args.opt), args.seed, args.task)
    if args.sequential:
        name, options = "sequential", {"stages": options["parts"]}
    with withheld_from_design(validation_rows(train_ex, args.val_size, args.val_seed)):
        controller = build(name, system, **options)
    extra = {"model": args.model, "method": name, "options": options, "task": args.task, "pooling": args.pooling,
             "train_size": args.train_size, "data_seed": args.data_seed, "dev_size": args.dev_size,
             "dtype": args.dtype, "device": args.device, **({"head_init": "probe"} if head_fit is not None else {})}
    stages = [part for part, _ in options["stages"]] if args.sequential else [args.method]
    configs = [TrainConfig(
        lr=args.lr if args.lr is not None else DEFAULT_LR.get(stage, 5e-4), epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, max_length=args.max_length, warmup=args.warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every, seed=args.seed,
        out=_stage_out(args.out, i, stage) if args.sequential else args.out, resume=args.resume,
        dropout=args.dropout, progress=not args.no_progress, budget=args.budget,
        checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
        overwrite=args.overwrite, allow_config_change=list(args.allow_config_change),
        group_by_length=not args.no_group_by_length, token_cache=args.token_cache,
        threads=args.threads, val_size=args.val_size, val_seed=args.val_seed, train_score_size=args.train_score_size,
        part_lr_scales=scales, extra={**extra, **({"stage": i, "stage_method": stage} if args.sequential else {})},
    ) for i, stage in enumerate(stages)]
    from ..results import write_json

    try:
        if args.sequential:
            results = train_stages(system, controller, train_ex, dev_ex, spec, configs, tokenizer=loaded.tokenizer)
        else:
            results = [train(system, train_ex, dev_ex, spec, configs[0], tokenizer=loaded.tokenizer)]
    except TrainingDiverged as err:  # a failure, not a result: one line, no score, exit 3
        if args.json:
            write_json(args.json, err.result)
        where = f"; metrics in {Path(err.result['config']['out']) / 'metrics.json'}" \
            if err.result.get("config", {}).get("out") else ""
        print(f"controltune train: {err}{where}", file=sys.stderr)
        return 3
    for i, (stage, result) in enumerate(zip(stages, results)):
        label = f"stage {i} ({stage}) of {args.method}" if args.sequential else args.method
        print(f"{label} on {spec.name} ({args.model}): {_scores_text(result)}; {result['n_trainable']:,} trainable "
              f"({100 * result['trainable_fraction']:.3f}% of base), {result['wall_time_s']:.1f} s, "
              f"peak {result['peak_memory_mb']:.0f} MB")
        if warning := _one_class_warning(result):
            print(f"{label}: {warning}", file=sys.stderr)
    result = results[-1] if not args.sequential else {**results[-1], "stages": results}
    if head_fit is not None:
        result = {**result, "head_fit": head_fit}
    if args.json:
        write_json(args.json, result)
    return 0
