"""Training-step cost of controltune's controllers against the peft library, side by side.

For LoRA, (IA)³, prefix and prompt tuning on MiniLM, one training step
(forward, backward, AdamW step) of the same configuration — batch 32, sequence
length 64 and 128, same targets / rank / prefix length, mean pooling + linear
head + cross-entropy, dropout off — is timed for controltune and for peft in
interleaved repetitions (ct, peft, ct, peft, ...), so load changes on a shared
machine hit both alike.  Reported: median step time, the ratio ct/peft, and
memory: the bytes autograd saves for backward in one step (activations, the
dominant term of training memory; parameters excluded), plus — with ``--rss`` —
the peak RSS of a fresh process running a few steps of each configuration.

    nice -n 10 .venv/bin/python experiments/bench_peft.py [--reps 7] [--rss]

Writes ``experiments/results/bench_peft.json``; re-running continues the
repetitions already stored (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from controltune import ResidualSystem, load_model
from controltune.controllers import build
from controltune.data import load_split, resolve_task
from controltune.results import stamp, write_json

if TYPE_CHECKING:
    from collections.abc import Callable

    from peft import PeftModel

OUT = Path(__file__).parent / "results" / "bench_peft.json"
METHODS = {
    "lora": ({"rank": 8, "alpha": 16, "targets": ["q", "v"]},
             "LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=['query', 'value'])"),
    "ia3": ({"targets": ["k", "v", "ffn_out"], "rescale_input": ["ffn_out"]},
            # Regexes (full match): a plain 'output.dense' would also catch attention.output.dense.
            r"IA3Config(target_modules=r'.*\.(key|value|\d+\.output\.dense)', "
            r"feedforward_modules=r'.*\.\d+\.output\.dense')"),
    "prefix": ({"length": 10}, "PrefixTuningConfig(task_type='FEATURE_EXTRACTION', num_virtual_tokens=10)"),
    "prompt": ({"n_tokens": 20}, "PromptTuningConfig(task_type='FEATURE_EXTRACTION', num_virtual_tokens=20)"),
}
BATCH = 32


def make_batch(seq_len: int) -> dict[str, torch.Tensor]:
    """32 SST-2 dev sentences padded/truncated to exactly ``seq_len`` tokens."""
    examples = load_split(resolve_task("sst2"), "dev", n=BATCH, seed=0)
    tok = load_model("random:bert").tokenizer
    enc = tok([e.text_a for e in examples], padding="max_length", truncation=True, max_length=seq_len,
              return_tensors="pt")
    return {**dict(enc), "labels": torch.tensor([e.label for e in examples])}


def controltune_step(method: str) -> tuple[Callable[[dict[str, torch.Tensor]], float], int, ResidualSystem]:
    """A closure running one training step of the controltune controller; and its trainable count."""
    system = ResidualSystem(load_model("minilm"), seed=0)
    build(method, system, **METHODS[method][0])
    params = [c.param for c in system.controls()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = system.cost(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step, sum(p.numel() for p in params), system


def peft_step(method: str) -> tuple[Callable[[dict[str, torch.Tensor]], float], int, PeftModel]:
    """The same step with peft (the head and pooling written the same way)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: F401

    model = get_peft_model(load_model("minilm").model, eval(METHODS[method][1]))
    model.eval()
    head = torch.nn.Linear(384, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    prompt_learning = method in ("prefix", "prompt")

    def step(batch: dict[str, torch.Tensor]) -> float:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if not prompt_learning:
            inputs["token_type_ids"] = batch["token_type_ids"]
        hidden = model(**inputs).last_hidden_state
        mask = batch["attention_mask"]
        if hidden.shape[1] > mask.shape[1]:  # prompt tokens are real positions
            mask = torch.cat([mask.new_ones(mask.shape[0], hidden.shape[1] - mask.shape[1]), mask], dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        loss = F.cross_entropy(head((hidden * m).sum(1) / m.sum(1)), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step, sum(p.numel() for p in params) - sum(p.numel() for p in head.parameters()), model


def saved_activation_mb(step: Callable[[dict[str, torch.Tensor]], float], batch: dict[str, torch.Tensor],
                        module: torch.nn.Module) -> float:
    """MB of distinct tensor storages autograd saves for backward in one step (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(seen.values()) / 2**20


def child_rss(impl: str, method: str, seq_len: int) -> float:
    """Peak RSS (MB) of a fresh process that loads MiniLM and runs 3 steps of one configuration."""
    code = (f"import sys, resource, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "torch.set_num_threads(1); import bench_peft as b; "
            f"step = (b.controltune_step if {impl!r} == 'controltune' else b.peft_step)({method!r})[0]; "
            f"batch = b.make_batch({seq_len}); [step(batch) for _ in range(3)]; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per configuration")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in fresh processes (slow)")
    parser.add_argument("--fresh", action="store_true", help="ignore stored repetitions")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = {"model": "minilm", "batch_size": BATCH, "seq_lens": args.seq_lens, "reps": args.reps,
              "threads": 1, "dtype": "float32", "dropout": "off (eval mode) in both",
              "step": "forward + backward + AdamW(lr=1e-4) step; mean pooling + linear head + cross-entropy",
              "methods": {m: {"controltune": METHODS[m][0], "peft": METHODS[m][1]} for m in args.methods}}
    old = json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {}
    # Stored repetitions count only if they were measured with the same method configuration.
    results: dict = {k: e for k, e in old.get("results", {}).items()
                     if e["method"] not in args.methods or e.get("config") == config["methods"][e["method"]]}
    impls = {}
    for m in args.methods:
        impls[(m, "controltune")] = controltune_step(m)
        impls[(m, "peft")] = peft_step(m)
    batches = {t: make_batch(t) for t in args.seq_lens}
    keys = [(m, t) for t in args.seq_lens for m in args.methods]
    for m, t in keys:  # warm-up and activation memory, once per configuration
        entry = results.setdefault(f"{m}@{t}", {"method": m, "seq_len": t, "config": config["methods"][m],
                                                 "controltune": {}, "peft": {}})
        for impl in ("controltune", "peft"):
            step, n_trainable, module = impls[(m, impl)]
            step(batches[t])
            entry[impl]["n_trainable"] = n_trainable
            entry[impl]["saved_activations_mb"] = saved_activation_mb(step, batches[t], module)
            entry[impl].setdefault("step_s", [])
    todo = max(0, args.reps - min(len(results[f"{m}@{t}"]["controltune"]["step_s"]) for m, t in keys))
    for _ in tqdm(range(todo), desc="repetitions"):
        for m, t in keys:
            entry = results[f"{m}@{t}"]
            for impl in ("controltune", "peft"):  # interleaved: ct then peft, per configuration and repetition
                step = impls[(m, impl)][0]
                start = time.perf_counter()
                step(batches[t])
                entry[impl]["step_s"].append(time.perf_counter() - start)
        summarise(results)
        write_json(args.out, {**stamp(config), "results": results})
    if args.rss:
        for m, t in tqdm(keys, desc="peak RSS"):
            for impl in ("controltune", "peft"):
                results[f"{m}@{t}"][impl]["peak_rss_mb"] = child_rss(impl, m, t)
            write_json(args.out, {**stamp(config), "results": results})
    summarise(results)
    write_json(args.out, {**stamp(config), "results": results})
    for key, e in results.items():
        print(f"{key:<12} ct {e['controltune']['median_step_s']:.3f}s  peft {e['peft']['median_step_s']:.3f}s  "
              f"ratio {e['ratio_step_time']:.2f}  activations ct {e['controltune']['saved_activations_mb']:.0f} MB "
              f"peft {e['peft']['saved_activations_mb']:.0f} MB")


def summarise(results: dict) -> None:
    for e in results.values():
        for impl in ("controltune", "peft"):
            if e[impl]["step_s"]:
                e[impl]["median_step_s"] = statistics.median(e[impl]["step_s"])
        if e["controltune"].get("median_step_s") and e["peft"].get("median_step_s"):
            e["ratio_step_time"] = e["controltune"]["median_step_s"] / e["peft"]["median_step_s"]
            e["ratio_activations"] = e["controltune"]["saved_activations_mb"] / e["peft"]["saved_activations_mb"]


if __name__ == "__main__":
    main()
