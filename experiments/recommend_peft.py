"""The recommender as a peft user meets it: its folder trained in plain peft against peft's LoRA (issue 18).

The design table trains ``recommended_lora`` inside the residual-stream system (mean-pooled head), and
``tests/test_recommend.py`` shows that training its folder in plain peft follows the system step for step.  This
study takes the user's path end to end on a real task: for each seed the recommender scores MiniLM's maps with the
model's own ``BertForSequenceClassification`` head (the CLI's ``controltune recommend``, with the validation rows
withheld from its design rows), :func:`controltune.peft_export.to_peft` writes the folder, and from there only
transformers, peft and PyTorch run: ``PeftModel.from_pretrained(AutoModelForSequenceClassification..., folder,
is_trainable=True)`` and a plain training loop (:func:`train_plain`: AdamW, linear warm-up and decay, gradient
clipping, ``model.train()`` so BERT's dropout is on, as a user's loop has it) with the GLUE harness's batch size,
epochs, validation rows and evaluation cadence, at the design table's chosen rate; the adapter is kept at its best
validation score.  peft's LoRA at the same budget (r = 2 on query and value, α = 4 for b18k) goes through the
same loop from the same seeded head.  Verdict by the two-standard-error rule, on dev at the best validation score
(the table's report) and at the last step.

    .venv/bin/python experiments/recommend_peft.py [--task mrpc] [--budget b18k] [--seeds 0,1,2]

Appends one row per (arm, seed) to ``results/recommend_peft.jsonl`` as it finishes (a stopped run starts its
(arm, seed) again) and writes ``results/recommend_peft.json``: per (task, budget) run, the two arms' cells and the
verdicts (``pairs``).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from controltune.results import append_jsonl, read_jsonl, stamp, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the experiments' shared modules, run or imported
from verdicts import mean_std, two_se  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = RESULTS / "recommend_peft.jsonl"
SUMMARY = RESULTS / "recommend_peft.json"

def _harness() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The train settings and per-task overrides of ``glue_select.yaml`` (the GLUE table's and the design table's
    harness), read from the file rather than restated."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parent / "glue_select.yaml").read_text())
    keys = ("batch_size", "eval_batch_size", "max_length", "warmup", "weight_decay", "grad_clip", "val_seed")
    per_task = {o["where"]["task"]: dict(o["set"]) for o in spec["overrides"]}
    return {k: spec["train"][k] for k in keys}, per_task


HARNESS, PER_TASK = _harness()
"""glue_select.yaml's train settings this loop uses, and its per-task overrides (rows, validation rows, epochs,
evaluation cadence)."""
LORA = {"b74k": {"r": 8, "lora_alpha": 16, "budget": 73728}, "b18k": {"r": 2, "lora_alpha": 4, "budget": 18432}}
"""The design table's LoRA at each budget (on q and v of every layer) and its trainable count, the recommender's
budget."""
RECOMMEND = {"max_rank": 16, "alpha_per_rank": 2.0, "init": "costate", "radius": 0.05, "n_design": 64,
             "max_length": 64}
"""``controltune recommend``'s defaults."""


def chosen_rate(task: str, budget: str, label: str) -> float:
    """The design table's chosen rate of ``label`` (lora, recommended_lora) on ``task`` at ``budget``."""
    import json

    cells = json.loads((RESULTS / "design_table.json").read_text())["cells"]
    for c in cells:
        if (c["task"], c["budget"], c["method"]) == (task, budget, label):
            return float(c["lr"])
    raise SystemExit(f"design_table.json has no {label} cell for {task} at {budget}: run the design table first")


def recommend_folder(task: str, budget: str, seed: int, withheld: Sequence[Any], out: Path) -> dict[str, Any]:
    """``controltune recommend --model minilm --task T --budget N --seed S`` (its defaults, :data:`RECOMMEND`) with
    the ``withheld`` validation rows kept out of its design rows; writes the peft folder ``out`` and returns the
    recommender's report (ranks, trust region)."""
    from controltune.controllers import build
    from controltune.data import resolve_task
    from controltune.design.linearize import withheld_from_design
    from controltune.peft_export import to_peft
    from controltune.system import ResidualSystem
    from controltune.zoo import load_model

    spec = resolve_task(task)
    loaded = load_model("minilm", seed=seed, head="sequence_classification", num_labels=spec.num_labels)
    system = ResidualSystem(loaded, readout="sequence_classifier", num_labels=spec.num_labels)
    with withheld_from_design(withheld):
        ctrl = build("recommended_lora", system, budget=LORA[budget]["budget"], task=task, design_seed=seed,
                     seed=seed, **RECOMMEND)
    to_peft(system, out)
    report = ctrl.report
    tr = report.get("trust_region") or {}
    return {"used": report["used"], "maps": len(report["ranks"]), "ranks": report["ranks"],
            "trust_radius": tr.get("radius") if tr.get("accepted") else None}


def peft_model(arm: str, task: str, budget: str, seed: int, folder: Path | None) -> torch.nn.Module:
    """The HF model with its seeded head (as ``load_model`` starts it: transformers' init under
    ``torch.manual_seed(seed)``) and the arm's adapter: the recommender's folder, or peft's LoRA on query and value."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from controltune.data import resolve_task
    from controltune.zoo import minilm_path

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=resolve_task(task).num_labels)
    if arm == "recommended":
        return PeftModel.from_pretrained(base, folder, is_trainable=True)
    config = LoraConfig(r=LORA[budget]["r"], lora_alpha=LORA[budget]["lora_alpha"], lora_dropout=0.0,
                        target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(base, config)


def _encode(tokenizer: Any, rows: Sequence[Any], max_length: int) -> list[dict[str, Any]]:
    pair = rows[0].text_b is not None
    enc = tokenizer([r.text_a for r in rows], [r.text_b for r in rows] if pair else None, truncation=True,
                    max_length=max_length)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": r.label} for i, r in enumerate(rows)]


def _batch(tokenizer: Any, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return tokenizer.pad(items, return_tensors="pt")


@torch.no_grad()
def scores(model: torch.nn.Module, tokenizer: Any, items: list[dict[str, Any]], spec: Any,
           batch_size: int) -> dict[str, float]:
    """The task's metrics of ``model`` (in eval mode, then restored) on encoded rows."""
    from controltune.metrics import compute_metrics

    was = model.training
    model.eval()
    preds = []
    for start in range(0, len(items), batch_size):
        batch = _batch(tokenizer, items[start:start + batch_size])
        batch.pop("labels")
        preds.append(model(**batch).logits.argmax(-1))
    model.train(was)
    return compute_metrics(spec, torch.cat(preds).numpy(), [it["labels"] for it in items])


def train_plain(model: torch.nn.Module, tokenizer: Any, train: Sequence[Any], val: Sequence[Any], dev: Sequence[Any],
                spec: Any, metric: str, lr: float, epochs: int, eval_every: int, seed: int,
                settings: dict[str, Any] = HARNESS) -> dict[str, Any]:
    """Train ``model``'s trainable parameters with a plain loop: AdamW (``weight_decay``), linear warm-up over
    ``warmup`` of the steps then linear decay to 0, the global gradient norm clipped to ``grad_clip``, batches of
    ``batch_size`` reshuffled each epoch by a generator seeded with ``seed``; every ``eval_every`` steps and at the
    end the validation rows are scored and the trainable state with the best ``metric`` kept.

    Returns ``{val_curve, best_val, dev_at_best_val, dev_end, steps, diverged}`` (dev scored at the end and at the
    best validation state, restored)."""
    from transformers import get_linear_schedule_with_warmup

    train_items = _encode(tokenizer, train, settings["max_length"])
    val_items, dev_items = (_encode(tokenizer, rows, settings["max_length"]) for rows in (val, dev))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings["weight_decay"])
    per_epoch = math.ceil(len(train_items) / settings["batch_size"])
    total = per_epoch * epochs
    sched = get_linear_schedule_with_warmup(opt, round(settings["warmup"] * total), total)
    gen = torch.Generator().manual_seed(seed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    best: dict[str, Any] = {"score": -math.inf}
    curve, step, diverged = [], 0, None
    model.train()

    def evaluate() -> None:
        got = scores(model, tokenizer, val_items, spec, settings["eval_batch_size"])
        curve.append({"step": step, **got})
        if got[metric] > best["score"]:
            best.update(score=got[metric], step=step, scores=got,
                        state={n: t.detach().clone() for n, t in model.state_dict().items() if n in trainable})

    for _ in range(epochs):
        order = torch.randperm(len(train_items), generator=gen).tolist()
        for start in range(0, len(order), settings["batch_size"]):
            batch = _batch(tokenizer, [train_items[i] for i in order[start:start + settings["batch_size"]]])
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                diverged = {"step": step, "loss": float(loss)}
                break
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"])
            opt.step()
            sched.step()
            step += 1
            if step % eval_every == 0:
                evaluate()
        if diverged:
            break
    if not diverged and (not curve or curve[-1]["step"] != step):
        evaluate()
    dev_end = None if diverged else scores(model, tokenizer, dev_items, spec, settings["eval_batch_size"])
    dev_best = None
    if "state" in best:
        model.load_state_dict(best.pop("state"), strict=False)
        dev_best = scores(model, tokenizer, dev_items, spec, settings["eval_batch_size"])
    return {"val_curve": curve, "best_val": {k: v for k, v in best.items() if k != "score"} or None,
            "dev_at_best_val": dev_best, "dev_end": dev_end, "steps": step, "total_steps": total,
            "diverged": diverged}


def run_one(arm: str, task: str, budget: str, seed: int) -> dict[str, Any]:
    """One (arm, seed): the folder (recommended arm), the model, the plain loop; its row."""
    from transformers import AutoTokenizer

    from controltune.data import BUILTIN_TASKS, load_split, resolve_task
    from controltune.evaluation import validation_split
    from controltune.zoo import minilm_path

    spec = resolve_task(task)
    metric = BUILTIN_TASKS[task].metric
    opts = PER_TASK[task]
    train_all = load_split(spec, "train", n=opts.get("train_size"), seed=0)
    dev = load_split(spec, "dev", seed=0)
    train, val = validation_split(train_all, opts["val_size"], HARNESS["val_seed"])
    lr = chosen_rate(task, budget, "recommended_lora" if arm == "recommended" else "lora")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rec = recommend_folder(task, budget, seed, val, Path(tmp)) if arm == "recommended" else None
        model = peft_model(arm, task, budget, seed, Path(tmp))
        n_trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        out = train_plain(model, AutoTokenizer.from_pretrained(minilm_path()), train, val, dev, spec, metric, lr,
                          opts["epochs"], opts["eval_every"], seed)
    best, end = out["dev_at_best_val"], out["dev_end"]
    return {**stamp({"arm": arm, "task": task, "budget": budget, "seed": seed, "lr": lr, **HARNESS, **opts,
                     "recommend": RECOMMEND if arm == "recommended" else None,
                     "lora": LORA[budget] if arm == "lora" else None}),
            "status": "diverged" if out["diverged"] else "done", "metric": metric, "n_lora_trainable": n_trainable,
            "score": best[metric] if best else None, "score_end": end[metric] if end else None,
            "recommendation": rec, **out, "seconds": time.perf_counter() - start}


def summarize(rows: list[dict[str, Any]], task: str, budget: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Per arm ``{mean, std, n_seeds}`` of dev at the best validation score and at the end, and the recommender's
    verdict against LoRA by the two-standard-error rule under each report; complete when every seed of both arms
    has a row."""
    mine = [r for r in rows if r["config"]["task"] == task and r["config"]["budget"] == budget
            and r["config"]["seed"] in seeds]
    cells: dict[str, dict[str, Any]] = {}
    for arm in ("recommended", "lora"):
        done = [r for r in mine if r["config"]["arm"] == arm and r["status"] == "done"]
        for key, field in (("best", "score"), ("end", "score_end")):
            m, s = mean_std([r[field] for r in done])
            cells.setdefault(arm, {})[key] = {"mean": m, "std": s, "n_seeds": len(done)}
        cells[arm]["diverged_seeds"] = sorted(r["config"]["seed"] for r in mine
                                              if r["config"]["arm"] == arm and r["status"] == "diverged")
    verdicts = {}
    for key in ("best", "end"):
        sign, diff, se = two_se(cells["lora"][key], cells["recommended"][key])  # recommended − LoRA
        verdicts[key] = {"verdict": None if sign is None else {1: "win", -1: "loss", 0: "tie"}[sign],
                         "difference": diff, "se": se}
    finished = {(r["config"]["arm"], r["config"]["seed"]) for r in mine}
    return {"cells": cells, "verdict": verdicts,
            "complete": all((arm, s) in finished for arm in ("recommended", "lora") for s in seeds)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mrpc", choices=sorted(PER_TASK))
    p.add_argument("--budget", default="b18k", choices=sorted(LORA))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    torch.set_num_threads(args.threads)
    for seed in [] if args.summary_only else seeds:
        for arm in ("recommended", "lora"):
            have = read_jsonl(ROWS) if ROWS.exists() else []
            if any(r["config"]["task"] == args.task and r["config"]["budget"] == args.budget
                   and r["config"]["arm"] == arm and r["config"]["seed"] == seed for r in have):
                continue
            row = run_one(arm, args.task, args.budget, seed)
            append_jsonl(ROWS, row)
            print(f"{arm} seed {seed}: dev {row['metric']} {row['score']} at the best validation step, "
                  f"{row['score_end']} at the end ({row['seconds']:.0f} s)", flush=True)
    rows = read_jsonl(ROWS) if ROWS.exists() else []
    pairs = sorted({(r["config"]["task"], r["config"]["budget"]) for r in rows} | {(args.task, args.budget)})
    payload = {**stamp({"seeds": seeds, "command": "python experiments/recommend_peft.py"}),
               "pairs": [{"task": t, "budget": b, **summarize(rows, t, b, seeds)} for t, b in pairs]}
    write_json(SUMMARY, payload)
    return payload


if __name__ == "__main__":
    main()
