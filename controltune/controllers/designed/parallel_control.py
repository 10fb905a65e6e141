"""State-based parallel control (``parallel_control``; Zhang, Ren, Cheng & Li, ICML 2025).

"From Weight-Based to State-Based Fine-Tuning: Further Memory Reduction on LoRA with Parallel
Control": instead of a weight delta ``ΔW`` on a linear map inside a sub-block, a low-rank linear
controller reads the residual-stream *state* entering a sub-block and adds its output beside the
whole sub-block.  Block l is ``f_l = ffn_l ∘ attn_l`` (DESIGN.md §1), with ``m_l`` the state between
its two sub-blocks.  The controlled block is

    m_l     = attn_l(x_l)                                   (+ α B'_l A'_l x_l   with sublayers=attn,ffn)
    x_{l+1} = ffn_l(m_l) + α B_l A_l m_l,                    per token, row convention: Δ = α (m Aᵀ) Bᵀ

where ``attn_l`` and ``ffn_l`` are the *whole* frozen sub-blocks, residual sum and norms included:

* pre-LN (GPT-2, LLaMA): ``m_l = x_l + Attn(N_a x_l)``, ``ffn_l(m) = m + FFN(N_f m)``; the controller
  reads ``m_l`` *before* the norm ``N_f`` (the input of role ``ln_ffn``) and its output joins the FFN
  output (role ``ffn``), i.e. the residual sum: ``x_{l+1} = m_l + FFN(N_f m_l) + α B A m_l``.  This is a
  LoRA of the residual stream's identity path, ``m (I + α AᵀBᵀ)``;
* post-LN (BERT, RoBERTa, MiniLM): ``m_l = LN_1(x_l + Attn(x_l))`` (the input of role ``ffn_in``),
  ``ffn_l(m) = LN_2(m + FFN(m))`` (the output of role ``ffn``), so the control is added *after* the
  block's last LayerNorm: ``x_{l+1} = LN_2(m_l + FFN(m_l)) + α B A m_l``.

The attention-side control (the paper's ``double_control``, used in its LLaMA runs) reads the
block input ``x_l`` (pre-LN: input of ``ln_attn``; post-LN: input of ``attn``) and adds at the
attention sub-block's output (pre-LN: output of ``attn``, before the residual sum; post-LN: output
of ``ln_attn``); the FFN-side controller then reads the controlled ``m_l``, as in the paper.

Shapes: ``x_l, m_l`` S×T×d; ``A_l ∈ R^{r×d}``, ``B_l ∈ R^{d×r}`` (torch layout, as LoRA).
Initialisation: ``B_l = 0`` (the delta is zero, the pretrained trajectory is the nominal one);
``A_l`` Kaiming-uniform ``U(±1/√d)`` (the paper's LLaMA and ViT code) or, with ``init_std``,
``N(0, init_std²)`` (its RoBERTa code, ``initializer_range`` = 0.02).  Defaults follow its GLUE
(RoBERTa) script: rank 16 on the FFN only, ``α = 1`` (no ``1/r``), which spends exactly LoRA's
budget at r = 8 on q, v (the paper's "2r for one block instead of Q and V").
Controls: ``(A_l, B_l)`` per controlled sub-block, layer controls of block l; ``2·d·r`` scalars
each.  Running cost: the usual weight decay ``(λ/2)(‖A_l‖² + ‖B_l‖²)``.

Differences from the paper's code (``RoBERTa/glue/src/model.py``, ``LlaMA/peft/src/peft/tuners/control.py``,
``ViT/models/{Controller,custom_modules}.py`` of github.com/czhang024/ParallelControl):
no control dropout (its default is 0), no biases (only its ViT variant has them), one rank for
both sub-blocks (its ``double_control_rank`` is a separate option, set equal in its scripts),
parameters in the model's dtype (it keeps them in float32 for mixed precision), and the
classification head is the readout's terminal control as for every controller here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapter import InputTap
from ..base import (
    Control,
    Controller,
    Site,
    UnsupportedMethodError,
    positive_float,
    positive_int,
    register,
    resolve_targets,
    seeded_generator,
    wrap,
)

if TYPE_CHECKING:
    from typing import Any

    from ...system import ResidualSystem

SUBLAYERS = ("attn", "ffn")
"""The sub-blocks a parallel controller can sit beside (in the order they run)."""

PLACES: dict[str, dict[bool, tuple[str, str]]] = {
    # sub-block -> {post_ln: (role whose first input is the state read, role whose output gets the delta)}
    "attn": {False: ("ln_attn", "attn"), True: ("attn", "ln_attn")},
    "ffn": {False: ("ln_ffn", "ffn"), True: ("ffn_in", "ffn")},
}


def sublayer_names(sublayers: Sequence[str] | str, who: str) -> tuple[str, ...]:
    """``sublayers`` as a non-empty tuple of distinct names from :data:`SUBLAYERS`, in block order."""
    items = [sublayers] if isinstance(sublayers, str) else sublayers
    if not isinstance(items, Sequence) or not items or len(set(map(str, items))) != len(items) \
            or not all(isinstance(s, str) and s in SUBLAYERS for s in items):
        raise ValueError(f"{who}: sublayers must be distinct names among {SUBLAYERS} (e.g. ffn or attn,ffn), "
                         f"got {sublayers!r}")
    return tuple(s for s in SUBLAYERS if s in items)


class StateControl(nn.Module):
    """``g(m) = α (m Aᵀ) Bᵀ``: m ``...×d`` -> ``...×d``; A r×d, B d×r (B = 0 at initialisation)."""

    def __init__(self, d: int, rank: int, alpha: float, init_std: float | None, gen: torch.Generator,
                 like: torch.Tensor) -> None:
        super().__init__()
        if init_std is None:  # kaiming_uniform(a=√5) on an r×d matrix: U(±1/√d)
            a = (torch.rand(rank, d, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(d)
        else:
            a = init_std * torch.randn(rank, d, generator=gen, dtype=torch.float64)
        self.A = nn.Parameter(a.to(like))
        self.B = nn.Parameter(torch.zeros(d, rank, dtype=like.dtype, device=like.device))
        self.alpha = alpha

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.alpha * (m @ self.A.T) @ self.B.T


class ParallelControlDelta(nn.Module):
    """``out = base(*a) + g(s)``, s the state ``tap`` read earlier in the same block (tuples: first item)."""

    def __init__(self, control: StateControl, tap: InputTap) -> None:
        super().__init__()
        self.control = control
        self.tap = tap

    def forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor | tuple[Any, ...]:
        out = base(*args, **kwargs)
        delta = self.control(self.tap.read("parallel_control"))
        if isinstance(out, tuple):  # attention modules return (output, weights)
            return (out[0] + delta, *out[1:])
        return out + delta


@register
class ParallelControl(Controller):
    """Low-rank linear state feedback beside the FFN (and optionally attention) sub-block of ``layers``.

    Args:
        rank: r of ``A_l ∈ R^{r×d}``, ``B_l ∈ R^{d×r}`` (paper: 16 on GLUE).
        alpha: α, the scale of ``α B A m`` (not divided by r; paper: 1).
        sublayers: ``ffn`` (default, the paper's single control) and/or ``attn`` (its double control).
        init_std: None for Kaiming-uniform ``A``, else the std of a normal ``A`` (paper's RoBERTa: 0.02).
        layers: blocks (all by default).
        seed: seed of the ``A`` initialisation.
        weight_decay: λ of ``R_l = (λ/2)‖u_l‖²``.
    """

    method = "parallel_control"
    group = "addition"
    form = ("x_{l+1} = ffn_l(m_l) + alpha B_l A_l m_l,  m_l = attn_l(x_l) [+ alpha B'_l A'_l x_l]  "
            "(state entering the sub-block, B = 0 at init)")

    def __init__(self, rank: int = 16, alpha: float = 1.0, sublayers: Sequence[str] | str = ("ffn",),
                 init_std: float | None = None, layers: Sequence[int] | None = None, seed: int = 0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.rank = positive_int(rank, "rank", self.method)
        self.alpha = positive_float(alpha, "alpha", self.method)
        self.sublayers = sublayer_names(sublayers, self.method)
        self.init_std = None if init_std is None else positive_float(init_std, "init_std", self.method)
        self.layers = layers
        self.seed = int(seed)
        self.deltas = nn.ModuleDict()
        self.placed: list[tuple[str, Site]] = []

    def attach(self, system: ResidualSystem) -> None:
        fam = system.family
        places = {sub: PLACES[sub][bool(fam.post_ln)] for sub in self.sublayers}
        missing = sorted({r for pair in places.values() for r in pair if r not in fam.roles})
        if missing:
            raise UnsupportedMethodError(f"{self.method}: family {fam.name!r} has no role(s) {missing}; the parallel "
                                         "control reads a sub-block's input state and adds at its output")
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        d = system.d_model
        per_sub = {sub: (resolve_targets(system, (read,), self.layers), resolve_targets(system, (add,), self.layers))
                   for sub, (read, add) in places.items()}
        n_sites = len(per_sub[self.sublayers[0]][0])
        for i in range(n_sites):  # block by block, attention before FFN: one seeded draw order
            for sub in self.sublayers:
                read_site, add_site = per_sub[sub][0][i], per_sub[sub][1][i]
                tap = InputTap()
                delta = ParallelControlDelta(StateControl(d, self.rank, self.alpha, self.init_std, gen, like), tap)
                self.deltas[f"{add_site.layer}_{sub}"] = delta
                wrap(system.base, read_site.path, tap)
                wrap(system.base, add_site.path, delta)
                self.sites.append(add_site)
                self.placed.append((sub, add_site))

    def controls(self) -> list[Control]:
        out = []
        for sub, site in self.placed:
            g = self.deltas[f"{site.layer}_{sub}"].control
            out += [Control(f"{self.method}.{site.layer}.{sub}.A", g.A, "layer", (site.layer,)),
                    Control(f"{self.method}.{site.layer}.{sub}.B", g.B, "layer", (site.layer,))]
        return out
