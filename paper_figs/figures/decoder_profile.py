"""Figures ``decoder_costates`` and ``decoder_lipschitz``: a real decoder (SmolLM2-135M) beside MiniLM.

Sources: ``decoder_profile_{smollm2,minilm}.json`` (``experiments/decoder_profile.py``): per model a
``before`` row (LoRA at initialisation) and an ``after`` row (after a short AdamW training), each with
the co-state norm profile ``mean_seq`` (l = 0..L), per-token state and co-state norms (``tokens``:
the jump block, the massive tokens, per-layer means over massive and other tokens, the first
sequence's token norms), ``‖∇_{u_l} H_l‖`` (``stationarity``), the trajectory-local Lipschitz
constants (``lipschitz``: ``local_a``, ``local_b``) and the maximum-condition probe (``max_condition``).
Depth is drawn as l / L so that 6 and 30 blocks share an axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controltune.figures import FigureSpec, new_figure

from ._common import argv_from_config, load_json, sci, versions_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODELS = ("minilm", "smollm2")
SOURCES = tuple(f"decoder_profile_{m}.json" for m in MODELS)
LABEL = {"minilm": "MiniLM-L6 (post-LN encoder)", "smollm2": "SmolLM2-135M (pre-LN decoder)"}
COLOUR = {"minilm": "tab:blue", "smollm2": "tab:red"}
PHASE_STYLE = {"before": "--", "after": "-"}
PHASE_LABEL = {"before": "init", "after": "trained"}
RECOMPUTE = tuple(("python", "experiments/decoder_profile.py", "--model", m) for m in reversed(MODELS))
FLAGS = ("model", "steps", "n_train", "n_measure", "batch_size", "max_length", "iters", "tol", "n_directions",
         "seed")


def _load(results_dir: Path) -> dict[str, dict[str, Any]]:
    return {m: load_json(results_dir, s) for m, s in zip(MODELS, SOURCES)}


def _rows(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["phase"]: r for r in payload["rows"]}


def _depth(n: int) -> list[float]:
    """``l / (n − 1)`` for n points (n − 1 = L for states, L for blocks' indices 0..L−1 use n = L + 1)."""
    return [i / (n - 1) for i in range(n)] if n > 1 else [0.0]


def _blocks_depth(n_blocks: int) -> list[float]:
    """Block l drawn at the depth of its input state, ``l / L``."""
    return [i / n_blocks for i in range(n_blocks)]


def draw_costates(results_dir: Path) -> Figure:
    """Left: ‖p_l‖ against depth, both models; middle and right: per-token ‖x_l‖ and ‖p_l‖, massive vs other."""
    data = _load(results_dir)
    fig = new_figure(11.0, 3.8)
    ax_p, ax_x, ax_t = fig.subplots(1, 3)
    for model, payload in data.items():
        rows = _rows(payload)
        for phase, row in rows.items():
            p = row["mean_seq"]
            ax_p.plot(_depth(len(p)), p, color=COLOUR[model], linestyle=PHASE_STYLE[phase], marker=".",
                      markersize=3, label=f"{LABEL[model]}, {PHASE_LABEL[phase]}")
        row = rows["after"]
        tokens = row["tokens"]
        depth = _depth(len(tokens["x_other"]))
        ax_x.plot(depth, tokens["x_other"], color=COLOUR[model], marker=".", markersize=3,
                  label=f"{model}: other tokens")
        ax_t.plot(depth, tokens["p_other"], color=COLOUR[model], marker=".", markersize=3,
                  label=f"{model}: other tokens")
        if tokens["n_massive"]:
            ax_x.plot(depth, tokens["x_massive"], color=COLOUR[model], linestyle=":", marker="^", markersize=3,
                      label=f"{model}: {tokens['n_massive']} massive tokens")
            ax_t.plot(depth, tokens["p_massive"], color=COLOUR[model], linestyle=":", marker="^", markersize=3,
                      label=f"{model}: {tokens['n_massive']} massive tokens")
            jump = (tokens["jump_block"] + 1) / (len(depth) - 1)
            for ax in (ax_x, ax_t):
                ax.axvline(jump, color=COLOUR[model], linewidth=0.6, alpha=0.5)
    ax_p.set(ylabel=r"$\Vert p_l\Vert$ = mean over sequences of $\Vert\partial\Phi_s/\partial x_l\Vert_F$",
             title="co-state norm profile (LoRA + head)")
    ax_x.set(ylabel=r"mean per-token $\Vert x_{l,t}\Vert$", title="state norm per token (trained)")
    ax_t.set(ylabel=r"mean per-token $\Vert\partial\Phi_s/\partial x_{l,t}\Vert$",
             title="co-state norm per token (trained)")
    for ax in (ax_p, ax_x, ax_t):
        ax.set_yscale("log")
        ax.set_xlabel(r"relative depth $l/L$ ($x_l$ enters block $l$)")
        ax.grid(True, which="major", alpha=0.3)
    ax_p.legend(frameon=False, fontsize=6)
    ax_x.legend(frameon=False, fontsize=6)
    ax_t.legend(frameon=False, fontsize=6)
    fig.suptitle("Co-states of a real decoder beside MiniLM on SST-2: the massive-activation tokens "
                 "(vertical line: first state after the jump block)", fontsize=9)
    return fig


def draw_lipschitz(results_dir: Path) -> Figure:
    """Per block: local a_l, local b_l, ‖∇_{u_l} H_l‖ and the fraction of max-condition probes passing."""
    data = _load(results_dir)
    fig = new_figure(12.0, 3.5)
    axes = fig.subplots(1, 4)
    for model, payload in data.items():
        for phase, row in _rows(payload).items():
            lip = row["lipschitz"]
            depth = _blocks_depth(len(lip["local_a"]))
            style = dict(color=COLOUR[model], linestyle=PHASE_STYLE[phase], marker=".", markersize=3,
                         label=f"{LABEL[model]}, {PHASE_LABEL[phase]}")
            axes[0].plot(depth, lip["local_a"], **style)
            axes[1].plot(depth, lip["local_b"], **style)
            axes[2].plot(depth, row["stationarity"], **style)
            probe = row["max_condition"]["layers"]
            axes[3].plot([r["layer"] / len(depth) for r in probe], [r["fraction_local_max"] for r in probe], **style)
    axes[0].set(ylabel=r"$a_l$ = $\Vert\partial G_l/\partial x\Vert_2$ (pre-LN) or $\Vert\partial f_l/\partial "
                       r"x\Vert_2$ (post-LN)", title="state constant, trajectory-local")
    axes[1].set(ylabel=r"$b_l = \Vert\partial f_l/\partial u_l\Vert_2$ (LoRA factors of block $l$)",
                title="control constant, trajectory-local")
    axes[2].set(ylabel=r"$\Vert\nabla_{u_l}H_l\Vert$", title="first-order stationarity")
    axes[3].set(ylabel="fraction of probes with\n" r"$H_l(u^*\pm\varepsilon v)\leq H_l(u^*)$",
                title="maximum condition (all radii)", ylim=(-0.02, 1.02))
    for ax in axes:
        if ax is not axes[3]:
            ax.set_yscale("log")
        ax.set_xlabel(r"relative depth $l/L$ of block $l$")
        ax.grid(True, which="major", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, frameon=False, fontsize=7)
    fig.suptitle("Per-block Lipschitz constants, stationarity and the maximum condition: SmolLM2-135M beside "
                 "MiniLM (LoRA rank 8 on q, v + head, SST-2)", fontsize=9)
    return fig


def _command(payload: dict[str, Any]) -> str:
    return " ".join(argv_from_config(["python", "experiments/decoder_profile.py"], payload["config"], FLAGS))


def _setup(data: dict[str, dict[str, Any]]) -> str:
    cfg = data["smollm2"]["config"]
    rows = {m: _rows(p) for m, p in data.items()}
    scores = "; ".join(f"{m}: loss {r['before']['loss']:.3f}→{r['after']['loss']:.3f}, batch accuracy "
                       f"{r['before']['accuracy']:.2f}→{r['after']['accuracy']:.2f}" for m, r in rows.items())
    commands = "; ".join(f"`{_command(p)}` ({versions_line(p)})" for p in data.values())
    return (f"Each model ({cfg['dtype']}) with LoRA (rank {cfg['options']['rank']}, alpha {cfg['options']['alpha']}, "
            f"on q, v) and a classification readout (the model's final norm if it has one, mean pooling over the "
            f"real tokens, a linear head) on SST-2: measured at initialisation and after {cfg['steps']} AdamW "
            f"steps (lr {cfg['lr']}, batch {cfg['batch_size']}, ≤{cfg['max_length']} tokens, {cfg['n_train']} "
            f"seeded training sentences, seed {cfg['seed']}) on a fixed batch of {cfg['n_measure']} training "
            f"sentences held out from them ({scores}). Commands: {commands}.")


def caption_costates(results_dir: Path) -> str:
    data = _load(results_dir)
    smol = _rows(data["smollm2"])
    mini = _rows(data["minilm"])
    t = smol["after"]["tokens"]
    j = t["jump_block"]
    lines = []
    for model, rows in (("smollm2", smol), ("minilm", mini)):
        for phase in ("before", "after"):
            p = rows[phase]["mean_seq"]
            lines.append(f"{model} {PHASE_LABEL[phase]}: ‖p_0‖ {sci(p[0], 2)}, ‖p_L‖ {sci(p[-1], 2)}, ratio "
                         f"{p[0] / p[-1]:.3g}")
    mini_t = mini["after"]["tokens"]
    massive = (f"In SmolLM2 block {j} multiplies the norm of {t['n_massive']} of the {t['n_tokens']} real tokens "
               f"(at most ×{t['max_growth']:.0f}; positions {_positions(t)}): their mean state norm goes from "
               f"{t['x_massive'][j]:.4g} (x_{j}) to {t['x_massive'][j + 1]:.4g} (x_{j + 1}), while the other "
               f"tokens stay at {t['x_other'][j]:.4g} → {t['x_other'][j + 1]:.4g}. Their per-token co-state "
               f"‖∂Φ_s/∂x_(l,t)‖ drops from {sci(t['p_massive'][j], 2)} to {sci(t['p_massive'][j + 1], 2)} "
               f"(×{t['p_massive'][j + 1] / t['p_massive'][j]:.3g}) across that block, the other tokens' from "
               f"{sci(t['p_other'][j], 2)} to {sci(t['p_other'][j + 1], 2)}; the product ‖p‖·‖x‖ (the change of "
               f"Φ_s per unit relative perturbation of the token) of the massive tokens is "
               f"{sci(t['px_massive'][j], 2)} → {sci(t['px_massive'][j + 1], 2)}. "
               if t["n_massive"] else "SmolLM2 shows no massive tokens on this batch. ")
    return (
        "Left: the co-state norm ‖p_l‖ = Σ_s ‖p_(l,s)‖_F (the mean over sequences of the per-sequence co-state "
        "−∂Φ_s/∂x_l, controltune.pmp.solve_costate) against the relative depth l/L, at initialisation (dashed) "
        "and trained (solid). Middle and right (trained): per-token norms of the state x_(l,t) and of the "
        "per-sequence co-state ∂Φ_s/∂x_(l,t), averaged over the *massive* tokens (those whose state norm grows "
        f"more than ×{t['massive_threshold']:g} in the jump block, the block with the largest per-token growth; "
        "dotted) and over the other real tokens (solid). "
        + massive
        + f"MiniLM (post-LN: every state is LayerNorm-ed) has {mini_t['n_massive']} such tokens (largest "
        f"per-token growth in one block ×{mini_t['max_growth']:.2f}). Co-state profiles: {'; '.join(lines)}. "
        + _setup(data)
    )


def _positions(tokens: dict[str, Any]) -> str:
    pos = sorted({p["pos"] for p in tokens["massive_positions"]})
    return ", ".join(map(str, pos))


def caption_lipschitz(results_dir: Path) -> str:
    data = _load(results_dir)
    parts = []
    for model, payload in data.items():
        for phase, row in _rows(payload).items():
            lip = row["lipschitz"]
            a, b = lip["local_a"], lip["local_b"]
            mc = row["max_condition"]
            amax = max(range(len(a)), key=a.__getitem__)
            parts.append(
                f"{model} {PHASE_LABEL[phase]}: a_l {sci(min(a))}–{sci(max(a))} (largest at block {amax}), b_l "
                f"{sci(min(b))}–{sci(max(b))}, power iterations converged {sum(lip['converged_a'])}/{len(a)} "
                f"(a) and {sum(lip['converged_b'])}/{len(b)} (b); ‖∇_(u_l)H_l‖ {sci(min(row['stationarity']))}–"
                f"{sci(max(row['stationarity']))}; maximum condition holds in {mc['fraction_local_max']:.2f} of "
                "the probes")
    cfg = data["smollm2"]["config"]
    radii = ", ".join(f"{r:g}" for r in cfg["radii"])
    return (
        "Per block l, against the relative depth l/L, at initialisation (dashed) and trained (solid): the "
        "trajectory-local Lipschitz constants (controltune.bounds.lipschitz.local_state_lipschitz / "
        "local_control_lipschitz: the spectral norm of the block's Jacobian at the measured batch's trajectory, "
        f"by power iteration with JVPs and VJPs, eager attention, at most {cfg['iters']} iterations, stopping at "
        f"a relative change below {cfg['tol']:g}) — in the state, a_l of the residual branch G_l = f_l − x for "
        "the pre-LN decoder (Grönwall uses 1 + a_l) and of the whole block f_l for the post-LN encoder; in the "
        "control, b_l over both LoRA factors of block l; first-order stationarity ‖∇_(u_l)H_l‖ "
        "(controltune.diagnostics.stationarity); and the maximum-condition probe "
        f"(controltune.diagnostics.maximum_condition_probe: {cfg['n_directions']} random unit directions v per "
        f"block at radii ε ∈ {{{radii}}}·‖u*_l‖, x* and p* fixed; a probe passes when H_l(u* ± εv) ≤ H_l(u*)). "
        "Estimates at one batch, not certificates: the composed, certified bounds are in `lipschitz_constants`. "
        f"Measured: {'; '.join(parts)}. " + _setup(data)
    )


FIGURES = [
    FigureSpec(
        name="decoder_costates",
        title="Co-state norms per layer and per token of SmolLM2-135M beside MiniLM: the massive activations",
        sources=SOURCES,
        draw=draw_costates,
        caption=caption_costates,
        recompute=RECOMPUTE,
    ),
    FigureSpec(
        name="decoder_lipschitz",
        title="Per-block trajectory-local Lipschitz constants, stationarity and maximum condition of SmolLM2 "
              "beside MiniLM",
        sources=SOURCES,
        draw=draw_lipschitz,
        caption=caption_lipschitz,
        recompute=RECOMPUTE,
    ),
]

__all__ = ["FIGURES", "caption_costates", "caption_lipschitz", "draw_costates", "draw_lipschitz"]
