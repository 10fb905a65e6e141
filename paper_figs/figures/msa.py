"""Figures ``msa_toy`` and ``msa_minilm``: training by the method of successive approximations.

Sources: ``msa_toy.json`` (``experiments/msa_toy.py``: the 20-layer residual tanh net of
Li, Chen, Tai & E 2018 fitting sin, every optimiser at a few rates; ``best`` names each
method's best rate) and ``msa_minilm.json`` (``experiments/msa_minilm.py``: LoRA on real
MiniLM, SST-2, evaluation rows every few iterations).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import argv_from_config, load_json, sci, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TOY_SOURCE = "msa_toy.json"
MINILM_SOURCE = "msa_minilm.json"

# (label, colour, line style, line width): the MSA family solid and thick, gradient methods dashed.
TOY_STYLE: dict[str, tuple[str, str, str, float]] = {
    "msa": ("MSA", "tab:blue", "-", 1.3),
    "emsa": ("E-MSA", "tab:red", "-", 1.3),
    "sgd": ("SGD", "tab:gray", "--", 1.2),
    "adagrad": ("Adagrad", "tab:green", "--", 1.2),
    "adam": ("Adam", "tab:purple", "--", 1.2),
}
MINILM_STYLE: dict[str, tuple[str, str, str, str]] = {  # (label, colour, line style, marker)
    "emsa": ("E-MSA (ρ=0.1, co-state penalty)", "tab:red", "-", "o"),
    "emsa_state": ("E-MSA (ρ=0.1, state penalty only)", "tab:orange", ":", "s"),
    "msa": ("MSA (ρ=0)", "tab:blue", "-", "^"),
    "adamw": ("AdamW", "tab:purple", "--", "D"),
    "sgd_lr0.03": ("SGD (lr 0.03)", "tab:gray", "--", "v"),
    "sgd_lr0.3": ("SGD (lr 0.3)", "black", "-.", "x"),
}


def best_run(payload: dict[str, Any], method: str) -> dict[str, Any]:
    """The run of ``method`` at the rate (and ρ) the experiment marked best."""
    best = payload["best"][method]
    for run in payload["runs"]:
        if run["method"] == method and run["lr"] == best["lr"] and run.get("rho") == best.get("rho"):
            return run
    raise ValueError(f"msa_toy result: no run of {method} at its best rate lr={best['lr']} rho={best.get('rho')}")


def _toy_label(method: str, best: dict[str, Any]) -> str:
    label = TOY_STYLE[method][0]
    rho = f", ρ={best['rho']}" if best.get("rho") is not None else ""
    return f"{label} (lr {best['lr']}{rho})"


def draw_toy(results_dir: Path) -> Figure:
    """Train and test loss per iteration, each method at its best rate (log y)."""
    payload = load_json(results_dir, TOY_SOURCE)
    fig = new_figure(9.0, 3.6)
    axes = fig.subplots(1, 2, sharey=True)
    for method in [m for m in TOY_STYLE if m in payload["best"]]:
        run = best_run(payload, method)
        _, colour, style, width = TOY_STYLE[method]
        label = _toy_label(method, payload["best"][method])
        for ax, key in zip(axes, ("train_loss", "test_loss")):
            curve = run[key]
            ax.plot(range(1, len(curve) + 1), curve, color=colour, linestyle=style, linewidth=width, label=label)
    cfg = payload["config"]
    for ax, what in zip(axes, (f"training loss ({cfg['n_train']} points, full batch)",
                               f"test loss ({cfg['n_test']}-point grid)")):
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(what)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("loss  ½·mean (ŷ − sin t)²")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=5, frameon=False)
    fig.suptitle(f"Fitting sin on [−π, π] with a {cfg['layers']}-layer residual tanh net (width {cfg['width']}, "
                 f"δ = {cfg['delta']}): MSA / E-MSA vs gradient methods", fontsize=9)
    return fig


def caption_toy(results_dir: Path) -> str:
    payload = load_json(results_dir, TOY_SOURCE)
    cfg = payload["config"]
    best = payload["best"]
    command = argv_from_config(["python", "experiments/msa_toy.py"], cfg, ("iterations", "n_train", "seed"))
    rows = "; ".join(f"{TOY_STYLE[m][0]} {sci(b['final_train_loss'])} (lowest {sci(b['min_train_loss'])}, "
                     f"below 1e-2 after {b['iterations_to_1e-2']} iterations, {b['seconds']:.0f} s)"
                     for m, b in best.items() if m in TOY_STYLE)
    grid = "; ".join(f"{TOY_STYLE[m][0]}: {', '.join(str(v) for v in values)}" for m, values in cfg["grid"].items()
                     if m in TOY_STYLE)
    return (
        f"The toy of Li, Chen, Tai & E (JMLR 2018): x_(l+1) = x_l + δ·tanh(W_l x_l + b_l), {cfg['layers']} layers of "
        f"width {cfg['width']}, δ = {cfg['delta']}, zero-initialised controls, fitting sin on [−π, π] from "
        f"{cfg['n_train']} training points (full batch; test loss on a {cfg['n_test']}-point grid), loss "
        f"½·mean squared error with no weight decay, float64, seed "
        f"{cfg['seed']}, {cfg['iterations']} iterations. MSA and E-MSA maximise the (augmented) Hamiltonian layer by "
        f"layer with {cfg['inner_steps']} inner Adam steps per iteration (E-MSA: penalty ρ with the co-state "
        "term, i.e. double backward); SGD, Adagrad and Adam take one step per iteration. Each method was run at "
        f"every rate of the grid ({grid}; MSA/E-MSA entries are (inner lr, ρ)) and is drawn at the rate with the "
        "lowest mean log10 training loss over all iterations. An MSA iteration costs one co-state solve plus "
        f"the inner steps, so per iteration it is more expensive than a gradient step. Final training loss: "
        f"{rows}. Command: `{' '.join(command)}` ({versions_line(payload)}).")


def draw_minilm(results_dir: Path) -> Figure:
    """Mini-batch training cost and dev accuracy against iteration, and dev accuracy against training time."""
    payload = load_json(results_dir, MINILM_SOURCE)
    curves = payload["curves"]
    fig = new_figure(11.0, 3.4)
    axes = fig.subplots(1, 3)
    for method in [m for m in MINILM_STYLE if m in curves]:
        label, colour, style, marker = MINILM_STYLE[method]
        rows = curves[method]
        kw = dict(color=colour, linestyle=style, marker=marker, markersize=4, label=label)
        trained = [r for r in rows if r["train_cost"] is not None]
        axes[0].plot([r["iteration"] for r in trained], [r["train_cost"] for r in trained], **kw)
        axes[1].plot([r["iteration"] for r in rows], [r["dev_accuracy"] for r in rows], **kw)
        axes[2].plot([r["seconds"] for r in rows], [r["dev_accuracy"] for r in rows], **kw)
    cfg = payload["config"]
    axes[0].set(xlabel="iteration", ylabel="training cost J on that iteration's mini-batch",
                title=f"training cost (batch {cfg['batch_size']})")
    axes[1].set(xlabel="iteration", ylabel="dev accuracy", title=f"SST-2 dev accuracy ({cfg['dev_size']} sentences)")
    axes[2].set(xlabel="training time (s, 1 CPU thread, evaluation excluded)", ylabel="dev accuracy",
                title="dev accuracy against time")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=4, frameon=False)
    fig.suptitle(f"E-MSA and MSA vs AdamW and SGD training LoRA (rank {cfg['rank']} on q, v) + head of "
                 "all-MiniLM-L6-v2 on SST-2",
                 fontsize=9)
    return fig


def caption_minilm(results_dir: Path) -> str:
    payload = load_json(results_dir, MINILM_SOURCE)
    cfg = payload["config"]
    command = argv_from_config(["python", "experiments/msa_minilm.py"], cfg, ("iterations", "eval_every", "seed"))
    command += ["--methods", ",".join(payload["curves"])]
    summary = "; ".join(f"{MINILM_STYLE[m][0]}: {s['final_dev_accuracy']:.3f} after {s['iterations']} iterations "
                        f"({s['seconds']:.0f} s)" for m, s in payload["summary"].items() if m in MINILM_STYLE)
    runs = "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in hp.items()) for m, hp in cfg["runs"].items())
    return (
        f"Real all-MiniLM-L6-v2 (float32) with LoRA of rank {cfg['rank']} on the q and v projections plus the "
        f"classification head, trained on SST-2 ({cfg['train_size']}-sentence training subsample, mini-batches of "
        f"{cfg['batch_size']}, ≤{cfg['max_length']} tokens, seed {cfg['seed']}) for {cfg['iterations']} iterations "
        "from the same initialisation on the same sequence of mini-batches. Dev accuracy on a seeded subsample of "
        f"{cfg['dev_size']} SST-2 dev sentences every {cfg['eval_every']} iterations; the training cost is J on "
        "the mini-batch of that iteration (one batch: noisy). An MSA/E-MSA iteration is one co-state solve plus "
        f"{cfg['inner_steps']} Adam steps on the decoupled Hamiltonians; the co-state penalty of E-MSA needs a "
        f"double backward (eager attention), hence the time axis. Settings: {runs}. Final dev accuracy: "
        f"{summary}. One seed and {cfg['iterations']} iterations: differences of a few points are within the "
        f"noise of {cfg['dev_size']} dev sentences (±{100 * math.sqrt(0.25 / cfg['dev_size']):.1f} points, one "
        f"binomial standard error at 50 %). Command: `{' '.join(command)}` ({versions_line(payload)}).")


FIGURES = [
    FigureSpec(
        name="msa_toy",
        title="MSA and E-MSA against SGD, Adagrad and Adam on the residual tanh toy (loss per iteration)",
        sources=(TOY_SOURCE,),
        draw=draw_toy,
        caption=caption_toy,
        recompute=(("python", "experiments/msa_toy.py"),),
    ),
    FigureSpec(
        name="msa_minilm",
        title="E-MSA and MSA against AdamW and SGD on real MiniLM with LoRA, SST-2 (training cost and dev accuracy)",
        sources=(MINILM_SOURCE,),
        draw=draw_minilm,
        caption=caption_minilm,
        recompute=(("python", "experiments/msa_minilm.py"),),
    ),
]
