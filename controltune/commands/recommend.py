"""``controltune recommend``: LoRA targets, ranks and initial weights from the co-state, as a peft adapter folder.

Loads the model with its HF sequence-classification head (with ``--head-init probe`` its classifier fitted first
as a linear probe on ``--probe-rows`` training rows: :mod:`controltune.probe`), attaches ``recommended_lora``
(:mod:`controltune.controllers.designed.recommended_lora`: ranks allocated by the singular values of
``−∂J/∂W`` per parameter under ``--budget``, a trust-region co-state start) on seeded training
rows of ``--task``, and writes ``--out`` with :func:`controltune.peft_export.to_peft`, plus
``recommendation.json`` (configuration, versions, ranks, scores, trust-region trials).  Load it with

    base = AutoModelForSequenceClassification.from_pretrained(<model folder>, num_labels=C)
    model = PeftModel.from_pretrained(base, <out>, is_trainable=True)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..controllers import build
from ..data import load_split, resolve_task
from ..peft_export import to_peft
from ..probe import HEAD_INITS, init_head
from ..results import stamp, write_json
from ..system import ResidualSystem
from ..zoo import load_model
from .models import vars_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm, smollm2, random:<family> or a checkpoint folder")
    parser.add_argument("--task", default="sst2", help="a GLUE task name or a task folder (train.jsonl, dev.jsonl)")
    parser.add_argument("--budget", type=int, default=None, metavar="N",
                        help="trainable LoRA parameters (default: those of LoRA rank 8 on q and v of every layer)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the peft adapter folder to write")
    parser.add_argument("--max-rank", type=int, default=16, help="largest rank of one map")
    parser.add_argument("--alpha-per-rank", type=float, default=2.0, help="each map's alpha = this x its rank")
    parser.add_argument("--targets", default=None,
                        help="comma-separated roles to consider (default: every linear map of the family)")
    parser.add_argument("--init", default="costate", choices=["costate", "standard"],
                        help="costate: the trust-region co-state start; standard: LoRA's own (B = 0)")
    parser.add_argument("--radius", type=float, default=0.05,
                        help="largest trust radius, as a fraction of the chosen maps' weight norm")
    parser.add_argument("--n-design", type=int, default=64, help="seeded training rows (half score, half search)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--head-init", default="random", choices=list(HEAD_INITS),
                        help="random: the HF head's fresh classifier; probe: the classifier fitted first as a linear "
                             "probe (its L2 penalty chosen on a seeded tenth of the rows), so that the co-state runs "
                             "through a head that knows the task and the folder carries the fitted classifier")
    parser.add_argument("--probe-rows", type=int, default=4000, metavar="N",
                        help="with --head-init probe: a seeded subsample of N training rows to fit it on")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--out {out} exists and is not an empty folder; pass --overwrite to replace it")
    if args.head_init == "probe" and args.probe_rows < 10:
        raise ValueError(f"--probe-rows must be at least 10 (the probe's rows and a held-out tenth that chooses its "
                         f"penalty), got {args.probe_rows}")
    spec = resolve_task(args.task)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                        head="sequence_classification", num_labels=spec.num_labels)
    system = ResidualSystem(loaded, readout="sequence_classifier", num_labels=spec.num_labels)
    probe_rows = load_split(spec, "train", n=args.probe_rows, seed=args.seed) if args.head_init == "probe" else []
    head_fit = init_head(system, args.head_init, probe_rows, loaded.tokenizer, val_size=0.1, val_seed=args.seed,
                         max_length=args.max_length)
    options = {"budget": args.budget, "max_rank": args.max_rank, "alpha_per_rank": args.alpha_per_rank,
               "init": args.init, "radius": args.radius, "task": args.task, "n_design": args.n_design,
               "design_seed": args.seed, "max_length": args.max_length, "seed": args.seed}
    if args.targets:
        options["targets"] = [t.strip() for t in args.targets.split(",") if t.strip()]
    ctrl = build("recommended_lora", system, **options)
    to_peft(system, out)
    report = ctrl.report
    ranks = report["ranks"]
    payload = {**stamp(vars_of(args)), "model": args.model, "task": args.task, "options": options,
               "budget": report["budget"], "used": report["used"], "ranks": ranks, "scores": report["scores"],
               "top_sigma2": report["top_sigma2"], "trust_region": report.get("trust_region"), "head_fit": head_fit,
               "load": "PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(<model folder>, "
                       f"num_labels={spec.num_labels}), {str(out)!r}, is_trainable=True)"}
    write_json(out / "recommendation.json", payload)
    roles: dict[str, int] = {}
    for key, r in ranks.items():
        role = key.split("_", 1)[1]
        roles[role] = roles.get(role, 0) + r
    print(f"recommended LoRA for {args.model} on {args.task}: {report['used']:,} of {report['budget']:,} parameters "
          f"on {len(ranks)} maps; rank by role: " + ", ".join(f"{k} {v}" for k, v in sorted(roles.items())))
    if head_fit is not None:
        print(f"classifier: linear probe on {head_fit['rows']} training rows, L2 {head_fit['l2']:g}, held-out "
              f"accuracy {head_fit['held_out_accuracy']:.4f} on {head_fit['held_out']} rows")
    tr = report.get("trust_region")
    if tr is not None:
        state = (f"step accepted at radius {tr['radius']:.3g} (held-out J {tr['j0']:.4f} -> "
                 f"{tr['trials'][-1]['j']:.4f})" if tr["accepted"] else "no radius accepted: LoRA's own start")
        print(f"co-state start: {state}")
    print(f"wrote {out} (adapter_config.json, adapter_model.safetensors, recommendation.json); load with "
          f"{payload['load']}")
    if args.json:
        write_json(args.json, payload)
    return 0
