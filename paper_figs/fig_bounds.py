"""Figure: bounds, co-state estimate and measured gap of low-dimensional delta approximations.

Reads only ``experiments/results/bound_study_*.json`` (written by
``experiments/bound_study.py``) and writes ``paper_figs/fig_bounds.pdf`` and
``.png``: one row per task, one column per structure (rank, subspace, sparse,
layers); x = size, y = |J(u*) − J(Πu*)|, the co-state estimate and the
trajectory-local bounds, log scales.  The composed certified and global bounds
are vacuous (> 1e30) and are printed in each panel rather than drawn.

    python paper_figs/fig_bounds.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
OUT = Path(__file__).resolve().parent / "fig_bounds"
STRUCTURES = ("rank", "subspace", "sparse", "layers")
XLABEL = {"rank": "rank r", "subspace": "subspace dimension d", "sparse": "non-zeros k", "layers": "layers kept k"}
SERIES = (  # (key in row["bounds"] or a row field, label, style); vacuous bounds are printed, not drawn
    ("local", "Grönwall, local Jacobian norms", dict(color="tab:orange", marker="^")),
    ("adjoint", "adjoint-weighted local", dict(color="tab:purple", marker="s")),
    ("tangent", "‖∇Φ‖·‖δx_L‖ (linearised)", dict(color="tab:brown", marker="D")),
    ("costate_cs", "Σ‖∇_u H_l‖‖Δu_l‖", dict(color="tab:green", marker="P")),
    ("costate", "|co-state estimate|", dict(color="tab:blue", marker="x", linestyle="--")),
    ("gap", "measured gap |ΔJ|", dict(color="black", marker="o", linewidth=2)),
)


def _value(row: dict, key: str) -> float:
    if key == "gap":
        return row["gap"]
    if key == "costate":
        return abs(row["costate_estimate"])
    return row["bounds"][key]["cost"]


def main() -> int:
    files = sorted(RESULTS.glob("bound_study_*.json"))
    if not files:
        print(f"no {RESULTS}/bound_study_*.json; run experiments/bound_study.py first", file=sys.stderr)
        return 1
    studies = [json.loads(f.read_text()) for f in files]
    fig, axes = plt.subplots(len(studies), len(STRUCTURES), figsize=(3.2 * len(STRUCTURES), 2.8 * len(studies)),
                             squeeze=False)
    for i, study in enumerate(studies):
        for j, structure in enumerate(STRUCTURES):
            ax = axes[i][j]
            rows = sorted((r for r in study["rows"] if r["structure"] == structure), key=lambda r: r["size"])
            rows = [r for r in rows if r["gap"] > 0]
            for key, label, style in SERIES:
                if rows:
                    ax.plot([r["size"] for r in rows], [_value(r, key) for r in rows], label=label, markersize=4,
                            **style)
            ax.set_xscale("log", base=10 if structure == "sparse" else 2)
            ax.set_yscale("log")
            ax.set_xlabel(XLABEL[structure])
            ax.set_title(f"{study['task']}: {structure}", fontsize=9)
            if j == 0:
                ax.set_ylabel("|J(u*) − J(Πu*)| and bounds")
            if rows:
                cert = [r["bounds"]["certified"]["cost"] for r in rows]
                glob = [r["bounds"]["global"]["cost"] for r in rows]
                ax.text(0.02, 0.97, f"certified (probed domain): {min(cert):.0e}–{max(cert):.0e}\n"
                        f"global: {min(glob):.0e}–{max(glob):.0e}", transform=ax.transAxes, fontsize=6, va="top")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    for ext in ("pdf", "png"):
        fig.savefig(OUT.with_suffix(f".{ext}"), dpi=150)
    print(f"wrote {OUT}.pdf and .png from {len(studies)} studies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
