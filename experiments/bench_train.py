"""Training throughput (issue 14): LoRA on MiniLM, SST-2, three ways measured side by side.

Variants, interleaved in one run with the same torch threads (the order rotates each round):

* ``old``: controltune's trainer as it was before issue 14: batches are slices of one
  random permutation, padded to their longest sequence (``TrainConfig.group_by_length=False``);
* ``new``: controltune's trainer now: length-grouped batches (shuffled by group), padded to
  their longest sequence, the split tokenised once;
* ``hf_peft``: a plain ``transformers.Trainer`` with a peft LoRA (same rank, alpha, targets)
  and ``train_sampling_strategy="group_by_length"`` (transformers 5's name for ``group_by_length=True``).

Same configuration in all three: MiniLM float32, LoRA rank 8 (alpha 16) on q and v, the
classifier head trained, batch 32, max length 128, dropout off, AdamW.  By default each
measurement is one full epoch; with ``--steps N`` it is N optimiser steps from the start of
an epoch (a random sample of the epoch's batches in every variant), extrapolated to one
epoch as ``tokenise_s + steps_s / N * steps_per_epoch``; the JSON says which.  Tokenising
the split is timed separately, once per measurement, from a cold cache.

    python experiments/bench_train.py                      # writes experiments/results/bench_train.json
    python experiments/bench_train.py --steps 20 --rounds 1 --rows 1000 --out /tmp/b.json   # a quick look
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from controltune import ResidualSystem, load_model
from controltune.batching import clear_token_cache, encode
from controltune.controllers import build
from controltune.data import load_split, resolve_task
from controltune.resources import default_threads
from controltune.results import stamp, write_json
from controltune.schedule import epoch_batches
from controltune.train import TrainConfig, train
from controltune.zoo import minilm_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from controltune.data import Example

OUT = Path(__file__).resolve().parent / "results" / "bench_train.json"
VARIANTS = ("old", "new", "hf_peft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=5000, help="seeded SST-2 training rows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per measurement (default: one epoch)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per variant (interleaved)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


# --- controltune ----------------------------------------------------------------------------
def run_controltune(rows: list[Example], tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace,
                    grouped: bool) -> dict[str, float]:
    """Time tokenising the split (cold) and ``args.steps`` steps of :func:`controltune.train.train`."""
    system = ResidualSystem(load_model("minilm"), num_labels=2, seed=0)
    build("lora", system, rank=8, alpha=16.0, targets=["q", "v"])
    clear_token_cache()
    t0 = time.perf_counter()
    encode(rows, tokenizer, args.max_length)
    tokenise_s = time.perf_counter() - t0
    config = TrainConfig(lr=5e-4, steps=args.steps, epochs=None if args.steps else 1.0, batch_size=args.batch_size,
                         max_length=args.max_length,
                         progress=False, group_by_length=grouped, checkpoint_minutes=None)
    t0 = time.perf_counter()
    train(system, rows, None, resolve_task("sst2"), config, tokenizer=tokenizer)
    return {"tokenise_s": tokenise_s, "steps_s": time.perf_counter() - t0}


# --- transformers.Trainer + peft ---------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    """Tokenised rows as the dicts ``Trainer`` batches (``LengthGroupedSampler`` reads ``input_ids``)."""

    def __init__(self, features: list[dict[str, Any]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def hf_features(rows: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer([r.text_a for r in rows], truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": r.label} for i, r in enumerate(rows)]


def run_hf_peft(rows: list[Example], tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace) -> dict[str, float]:
    """Time tokenising (cold) and ``args.steps`` steps of a plain HF Trainer with a peft LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(
        str(minilm_path()), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                                             task_type="SEQ_CLS"))
    t0 = time.perf_counter()
    data = _Rows(hf_features(rows, tokenizer, args.max_length))
    tokenise_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                                  max_steps=args.steps or -1, num_train_epochs=1,
                                  learning_rate=5e-4, lr_scheduler_type="linear", warmup_steps=0,
                                  train_sampling_strategy="group_by_length", report_to="none", save_strategy="no",
                                  logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                                  seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        t0 = time.perf_counter()
        trainer.train()
        steps_s = time.perf_counter() - t0
    return {"tokenise_s": tokenise_s, "steps_s": steps_s}


# --- padding accounting -------------------------------------------------------------------------
def padded_tokens(lengths: list[int], batches: list[list[int]]) -> dict[str, float]:
    """Mean padded width and the fraction of computed positions that are padding, over one epoch."""
    widths = [max(lengths[i] for i in b) for b in batches]
    computed = sum(w * len(b) for w, b in zip(widths, batches))
    return {"mean_batch_width": statistics.fmean(widths), "padding_fraction": 1 - sum(lengths) / computed}


def padding_report(lengths: list[int], batch_size: int, max_length: int) -> dict[str, dict[str, float]]:
    from transformers.trainer_pt_utils import get_length_grouped_indices

    hf_order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(0))
    return {"old": padded_tokens(lengths, epoch_batches(lengths, batch_size, 0, 0, group_by_length=False)),
            "new": padded_tokens(lengths, epoch_batches(lengths, batch_size, 0, 0)),
            "hf_peft": padded_tokens(lengths, [hf_order[i:i + batch_size] for i in range(0, len(lengths), batch_size)]),
            "pad_to_max_length": {"mean_batch_width": float(max_length),
                                  "padding_fraction": 1 - sum(lengths) / (max_length * len(lengths))}}


# --- the run ---------------------------------------------------------------------------------------
def measure(variant: str, rows: list[Example], tokenizer: PreTrainedTokenizerBase,
            args: argparse.Namespace) -> dict[str, float]:
    if variant == "hf_peft":
        return run_hf_peft(rows, tokenizer, args)
    return run_controltune(rows, tokenizer, args, grouped=variant == "new")


def summarise(runs: list[dict[str, float]], steps: int, per_epoch: int) -> dict[str, Any]:
    epochs = [r["tokenise_s"] + r["steps_s"] / steps * per_epoch for r in runs]
    return {"runs": runs, "step_s": [r["steps_s"] / steps for r in runs], "epoch_s": epochs,
            "epoch_s_median": statistics.median(epochs), "epoch_s_min": min(epochs)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    loaded = load_model("minilm")
    tokenizer = loaded.tokenizer
    rows = load_split("sst2", "train", n=args.rows, seed=0)
    per_epoch = math.ceil(len(rows) / args.batch_size)
    steps = args.steps or per_epoch
    lengths = encode(rows, tokenizer, args.max_length).lengths
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for variant in order:
            result = {**measure(variant, rows, tokenizer, args), "load_average_1min": os.getloadavg()[0]}
            assert torch.get_num_threads() == threads, f"{variant} changed the thread count"
            runs[variant].append(result)
            print(f"round {r + 1}/{args.rounds} {variant:8s} tokenise {result['tokenise_s']:.2f} s, "
                  f"{steps} steps {result['steps_s']:.1f} s", flush=True)
    summary = {v: summarise(runs[v], steps, per_epoch) for v in VARIANTS}
    ratio = {"new_over_old": summary["new"]["epoch_s_median"] / summary["old"]["epoch_s_median"],
             "new_over_hf_peft": summary["new"]["epoch_s_median"] / summary["hf_peft"]["epoch_s_median"],
             "new_over_old_min": summary["new"]["epoch_s_min"] / summary["old"]["epoch_s_min"],
             "new_over_hf_peft_min": summary["new"]["epoch_s_min"] / summary["hf_peft"]["epoch_s_min"],
             "new_over_old_per_round": [n / o for n, o in zip(summary["new"]["epoch_s"], summary["old"]["epoch_s"])],
             "statistic": "new_over_old and new_over_hf_peft compare medians over rounds; *_min compare the "
                          "fastest round of each (the least disturbed by other jobs on the shared machine)"}
    payload = {**stamp({"task": "sst2", "rows": len(rows), "row_seed": 0, "model": "minilm", "dtype": "float32",
                        "method": "lora", "rank": 8, "alpha": 16, "targets": ["q", "v"], "batch_size": args.batch_size,
                        "max_length": args.max_length, "threads": threads, "steps_per_measurement": steps,
                        "rounds": args.rounds, "steps_per_epoch": per_epoch}),
               "method": (f"each measurement is one full epoch ({per_epoch} steps): epoch_s = tokenise_s + steps_s"
                          if not args.steps else
                          f"each measurement runs {steps} optimiser steps from the start of epoch 0 (a random sample "
                          f"of the epoch's batches) and is extrapolated to one epoch of {per_epoch} steps as "
                          "tokenise_s + steps_s / steps * steps_per_epoch")
                         + "; variants interleaved in one process, order rotated each round, same torch threads; "
                           "model loading is not timed",
               "variants": {"old": "controltune before issue 14: random order, padding to the longest in each batch "
                                   "(TrainConfig.group_by_length=False)",
                            "new": "controltune now: length-grouped batches shuffled by group, tokenised once",
                            "hf_peft": "transformers.Trainer + peft LoRA, train_sampling_strategy='group_by_length', "
                                       "DataCollatorWithPadding, dropout 0 (as controltune)"},
               "goals": {"new_over_old": "<= 0.40", "new_over_hf_peft": "<= 1.0"},
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "padding": padding_report(lengths, args.batch_size, args.max_length),
               "results": summary, "ratios": ratio}
    write_json(args.out, payload)
    print(f"epoch (median of {args.rounds}): old {summary['old']['epoch_s_median']:.1f} s, new "
          f"{summary['new']['epoch_s_median']:.1f} s, hf_peft {summary['hf_peft']['epoch_s_median']:.1f} s; "
          f"new/old {ratio['new_over_old']:.2f} (fastest rounds {ratio['new_over_old_min']:.2f}), new/hf_peft "
          f"{ratio['new_over_hf_peft']:.2f} ({ratio['new_over_hf_peft_min']:.2f}) -> {args.out}")
    return payload


if __name__ == "__main__":
    main()
