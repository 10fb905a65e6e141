"""``controltune models``: the model zoo with family, layers, width and parameter count."""

from __future__ import annotations

import argparse

from ..families import FAMILIES
from ..results import stamp, write_json
from ..zoo import builtin_names, load_model, model_note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="only these models (repeatable; a name or a checkpoint folder)")


def describe(name: str, dtype: str, device: str, seed: int) -> dict:
    """One row: name, family, kind, layers, width, heads, parameters, context inputs."""
    loaded = load_model(name, dtype=dtype, device=device, seed=seed)
    cfg = loaded.model.config
    fam = loaded.family
    heads = fam.head_geometry(cfg)
    return {
        "model": name, "family": fam.name, "post_ln": fam.post_ln, "causal": fam.causal,
        "n_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size, "n_heads": heads.n_heads,
        "n_kv_heads": heads.n_kv_heads,
        "n_params": loaded.n_params, "context": list(fam.context_inputs), "note": model_note(name),
    }


def run(args: argparse.Namespace) -> int:
    rows = [describe(n, args.dtype, args.device, args.seed) for n in (args.model or builtin_names())]
    print(f"{'model':<16} {'family':<8} {'kind':<14} {'layers':>6} {'width':>6} {'heads':>6} {'params':>12}")
    for r in rows:
        kind = ("decoder" if r["causal"] else "encoder") + (", post-LN" if r["post_ln"] else ", pre-LN")
        heads = f"{r['n_heads']}/{r['n_kv_heads']}" if r["n_kv_heads"] != r["n_heads"] else str(r["n_heads"])
        print(f"{r['model']:<16} {r['family']:<8} {kind:<14} {r['n_layers']:>6} {r['d_model']:>6} {heads:>6} "
              f"{r['n_params'] / 1e6:>10.2f} M  {r['note']}")
    print(f"supported families: {', '.join(FAMILIES)}; also any local checkpoint folder of these families")
    if args.json:
        write_json(args.json, {**stamp(vars_of(args)), "models": rows})
    return 0


def vars_of(args: argparse.Namespace) -> dict:
    """The command's configuration without argparse internals (for JSON stamps)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}
