"""Certified per-token enclosures of a block's activations over a ball of weight deltas.

For a reference control u* (weight deltas, :mod:`controltune.bounds.weight_deltas`) and
a ball ``‖d‖ ≤ ε`` of further deltas on the same maps, every activation ``y`` of the
rollout at ``u(τ) = u* + τ d`` (``τ ∈ [0, 1]``) is enclosed per token by three radii
around its value ``c`` at u* (a :class:`Radii`, each ``S×T``):

* ``rho ≥ ‖y(u* + d) − c‖``         (zeroth order: the enclosure itself),
* ``a   ≥ ‖dy/dτ‖``                  (first derivative along any segment in the ball),
* ``b   ≥ ‖d²y/dτ²‖``                (second derivative),

valid for *every* ``d`` with each site's ``‖d_site‖₂ ≤ ‖d_site‖_F ≤ ε`` (a superset of the
ball) and every ``τ``.  Radii compose operation by operation with constants evaluated on
the enclosure, never global ones.  The rules (``e = ε`` when the map carries a delta, else 0;
``R = ‖c_in‖ + rho_in`` bounds the input norm on the ball):

* linear ``y = (W̄ + τ d) x + β`` with ``W̄ = W + ΔW*``:
  ``rho_y = ‖W̄‖ rho_x + e R``, ``a_y = ‖W̄‖ a_x + e (a_x + R)``, ``b_y = ‖W̄‖ b_x + e (b_x + 2 a_x)``;
  when x is a LayerNorm output ``γ ⊙ n + β`` the W̄-terms use ``‖W̄ diag γ‖`` and the radii of n;
* elementwise activation φ with ``|φ'| ≤ L₁``, ``|φ''| ≤ L₂``:
  ``rho_y = L₁ rho_x``, ``a_y = L₁ a_x``, ``b_y = L₁ b_x + L₂ a_x²`` (``‖ẋ ⊙ ẋ‖₂ ≤ ‖ẋ‖₂²``);
* LayerNorm ``n(x) = P x / σ(x)``, ``σ = sqrt(‖P x‖²/d + eps)``, ``σ ≥ σ_min = max(σ(c) − rho/√d, √eps)``
  on the enclosure: ``‖n(x) − n(c)‖ ≤ ‖P(x − c)‖ / sqrt(σ(c) σ(x))`` (and ``≤ ‖n(c)‖ + √d``),
  ``‖J_n‖ ≤ 1/σ``, ``‖n''[h, h]‖ ≤ 3‖h‖² / (√d σ²)``, so
  ``a_n = a_x / σ_min``, ``b_n = b_x / σ_min + 3 a_x² / (√d σ_min²)``; the output
  ``γ ⊙ n + β`` has radii ``‖γ‖_∞ ×`` those of n;
* residual sums add radii; softmax attention: :mod:`controltune.bounds.attention_enclosure`.

Padding positions are carried with zero radii: keys there are masked and readouts never
pool them.  The block layout is the family's :class:`~controltune.families.base.BlockAnatomy`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..controllers.base import UnsupportedMethodError
from . import attention_enclosure as att
from .norms import spectral
from .radii import Radii, State
from .weight_deltas import delta_controller, key_layer, key_role
from .weights import block_weights

if TYPE_CHECKING:
    from ..families.base import Context
    from ..system import ResidualSystem


def linear_radii(inp: State, w_norm: float, e: float, r_in: torch.Tensor) -> Radii:
    """Radii of ``(W̄ + τ d) x + β``; ``w_norm`` is ``‖W̄ diag γ‖`` when ``inp`` is a LayerNorm output
    (radii of n), else ``‖W̄‖``; ``r_in ≥ ‖x‖`` on the ball; ``e = ε`` if the map carries a delta."""
    r = inp.z if inp.z is not None else inp.x
    x = inp.x
    return Radii(w_norm * r.rho + e * r_in, w_norm * r.a + e * (x.a + r_in), w_norm * r.b + e * (x.b + 2 * x.a))


def activation_radii(r: Radii, l1: float, l2: float) -> Radii:
    """Radii of an elementwise φ with ``|φ'| ≤ l1``, ``|φ''| ≤ l2``."""
    return Radii(l1 * r.rho, l1 * r.a, l1 * r.b + l2 * r.a * r.a)


def layernorm_radii(r: Radii, sigma_c: torch.Tensor, n_norm: torch.Tensor, gamma: torch.Tensor,
                    eps: float) -> State:
    """Enclosure of ``γ ⊙ n(x) + β`` from the radii of its input (``sigma_c = σ(c)``, ``n_norm = ‖n(c)‖``)."""
    d = gamma.numel()
    sd = math.sqrt(d)
    sigma_min = torch.clamp(sigma_c - r.rho / sd, min=math.sqrt(eps))
    zeta = torch.minimum(r.rho / torch.sqrt(sigma_c * sigma_min), n_norm + sd)
    z = Radii(zeta, r.a / sigma_min, r.b / sigma_min + 3.0 * r.a * r.a / (sd * sigma_min * sigma_min))
    return State(z.scale(float(gamma.abs().max())), z, gamma)


_SECOND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def activation_constants(act: Callable[[torch.Tensor], torch.Tensor], lo: float = -40.0, hi: float = 40.0,
                         step: float = 1e-4) -> tuple[float, float]:
    """``(L1, L2) >= (max |φ'|, max |φ''|)``: maxima on a fine float64 grid over ``[lo, hi]``, each plus
    the grid's margin (``step·max|φ''|``, resp. ``step·max|φ'''|``, φ''' by central differences) and ``1e-6``.

    Outside ``[−40, 40]`` the families' FFN activations (GELU, its tanh form, SiLU) have φ' within
    ``1e-15`` of 0 or 1 and ``|φ''| < 1e-15``, far under the grid maxima.
    """
    key = (lo, hi, step)
    try:
        cached = _SECOND.setdefault(act, {})
    except TypeError:  # not weak-referenceable: no caching
        cached = {}
    if key in cached:
        return cached[key]
    z = torch.arange(lo, hi, step, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = act(z)
        (g1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        (g2,) = torch.autograd.grad(g1.sum(), z)
    g1, g2 = g1.detach(), g2.detach()
    g3 = (g2[2:] - g2[:-2]).abs().max() / (2 * step)
    l1 = float(g1.abs().max() + step * g2.abs().max()) + 1e-6
    l2 = float(g2.abs().max() + step * g3) + 1e-6
    cached[key] = (l1, l2)
    return l1, l2


# --- the trace at u*: every value the radii rules need, computed once ---------------------------


@dataclass
class LayerNormTrace:
    """Centre of a LayerNorm: ``σ(c)`` and ``‖n(c)‖`` of its input per token, its ``(γ, β, eps)``, its output."""

    sigma: torch.Tensor
    n_norm: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float
    out: torch.Tensor


def layernorm_trace(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> LayerNormTrace:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1)
    sigma = torch.sqrt(var + eps)
    n = (x - mu) / sigma[..., None]
    return LayerNormTrace(sigma, n.norm(dim=-1), gamma, beta, eps, F.layer_norm(x, (x.shape[-1],), gamma, beta, eps))


@dataclass
class BlockTrace:
    """Block l at u*: centres, the norms its rules use, and which maps carry a delta."""

    post_ln: bool
    attn_norm: LayerNormTrace | None
    attention: att.AttentionTrace
    o_in_norm: torch.Tensor
    o_norm: float
    ffn_norm: LayerNormTrace
    ffn_in_norm: float
    act_out_norm: torch.Tensor
    ffn_out_norm: float
    out_norm: LayerNormTrace | None
    sites: dict[str, bool]
    output: torch.Tensor
    extra: dict = field(default_factory=dict)


def _sites(system: ResidualSystem, layer: int) -> dict[str, bool]:
    """Roles of block ``layer`` that carry a delta of the system's :class:`DeltaWeights`."""
    dw = delta_controller(system)
    return {key_role(k): True for k in dw.values() if key_layer(k) == layer}


def trace_block(system: ResidualSystem, layer: int, x: torch.Tensor, key_mask: torch.Tensor,
                in_gamma: torch.Tensor | None) -> BlockTrace:
    """Re-evaluate block ``layer`` at its input ``x`` (S×T×d) from its effective weights at u*,
    keeping every quantity the radii rules need.  ``in_gamma``: γ of the LayerNorm whose output
    x is (post-LN), else None."""
    w = block_weights(system, layer)
    an = w.anatomy
    if an.heads.n_kv_heads != an.heads.n_heads:
        raise UnsupportedMethodError("certified enclosures are derived for one key/value head per query head")
    sites = _sites(system, layer)
    unknown = set(sites) - set(an.linear_roles)
    if unknown:
        raise UnsupportedMethodError(f"deltas on {sorted(unknown)} are outside the block's linear maps "
                                     f"{an.linear_roles}; certified enclosures cover those maps only")
    lin = w.linear
    if an.attn_norm is not None:
        g, b, eps = w.norms[an.attn_norm]
        ln_a = layernorm_trace(x, g, b, eps)
        a_in, gamma = ln_a.out, g
    else:
        ln_a, a_in, gamma = None, x, in_gamma
    attn = att.trace_attention(a_in, w.qkv(), an.heads.n_heads, an.scaling, key_mask, gamma, an.fused_qkv)
    wo, bo = lin["o"]
    o = attn.out @ wo.T + (bo if bo is not None else 0)
    r1 = x + o
    g, b, eps = w.norms[an.ffn_norm]
    ln_f = layernorm_trace(r1, g, b, eps)
    win, bin_ = lin["ffn_in"]
    hid = an.activation(ln_f.out @ win.T + (bin_ if bin_ is not None else 0))
    wout, bout = lin["ffn_out"]
    ffn = hid @ wout.T + (bout if bout is not None else 0)
    if system.family.post_ln:
        g, b, eps = w.norms[an.out_norm]
        ln_o = layernorm_trace(ln_f.out + ffn, g, b, eps)
        out = ln_o.out
    else:
        ln_o, out = None, r1 + ffn
    return BlockTrace(
        post_ln=system.family.post_ln, attn_norm=ln_a, attention=attn, o_in_norm=attn.out.norm(dim=-1),
        o_norm=float(spectral(wo)), ffn_norm=ln_f, ffn_in_norm=float(spectral(win * ln_f.gamma)),
        act_out_norm=hid.norm(dim=-1), ffn_out_norm=float(spectral(wout)), out_norm=ln_o,
        sites={r: sites.get(r, False) for r in an.linear_roles}, output=out,
        extra={"activation": activation_constants(an.activation)})


def key_mask_of(system: ResidualSystem, ctx: Context) -> torch.Tensor:
    """``S×1×T×T`` boolean: query i may attend key j (real key; and j ≤ i for causal families)."""
    am = ctx.attention_mask.bool()
    t = am.shape[1]
    mask = am[:, None, None, :].expand(-1, 1, t, -1)
    if system.family.causal:
        mask = mask & torch.ones(t, t, dtype=torch.bool, device=am.device).tril()[None, None]
    return mask


@dataclass
class Trace:
    """The rollout at u* re-evaluated from the effective weights, block by block."""

    blocks: list[BlockTrace]
    final: torch.Tensor
    real: torch.Tensor
    x0_gamma: torch.Tensor | None


@torch.no_grad()
def trace(system: ResidualSystem, batch: dict) -> Trace:
    """:class:`Trace` of ``batch`` at the system's current controls (the centre u* of the ball)."""
    if system.family.anatomy is None:
        raise UnsupportedMethodError(
            f"family {system.family.name!r} declares no block anatomy (rotary attention, gated FFN or RMSNorm): "
            "certified enclosures are derived for LayerNorm blocks with softmax attention and an elementwise FFN")
    x, ctx = system.embed(batch)
    if ctx.n_prompt:
        raise UnsupportedMethodError("certified enclosures take weight deltas only (no prompt tokens)")
    km = key_mask_of(system, ctx)
    gamma = None
    if system.family.post_ln and system.family.embedding_norm is not None:
        gamma = system.base.get_submodule(system.family.embedding_norm).weight.detach()
    x0_gamma, blocks = gamma, []
    for layer in range(system.n_layers):
        bt = trace_block(system, layer, x, km, gamma)
        blocks.append(bt)
        x = bt.output
        gamma = bt.out_norm.gamma if bt.out_norm is not None else None
    return Trace(blocks, x, ctx.attention_mask.to(x.dtype), x0_gamma)


def propagate_block(bt: BlockTrace, inp: State, eps: float, real: torch.Tensor) -> tuple[State, dict[str, float]]:
    """Radii of block l's output from those of its input, for the ball of radius ``eps``.

    Returns the output :class:`State` and, per operation, the largest ratio ``rho_out / rho_in``
    over real tokens (a diagnostic of which operation inflates the enclosure).
    """
    e = {r: eps if on else 0.0 for r, on in bt.sites.items()}
    gains: dict[str, float] = {}

    def gain(name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        b = float((before * real).max())
        gains[name] = float((after * real).max()) / b if b > 0 else float("inf") if float(after.max()) > 0 else 0.0

    if bt.attn_norm is not None:
        ln = bt.attn_norm
        a_state = layernorm_radii(inp.x, ln.sigma, ln.n_norm, ln.gamma, ln.eps)
    else:
        a_state = inp
    o_pre = att.attention_radii(bt.attention, a_state, e).masked(real)
    gain("attention", a_state.x.rho, o_pre.rho)
    o = linear_radii(State(o_pre), bt.o_norm, e["o"], bt.o_in_norm + o_pre.rho)
    r1 = (inp.x + o).masked(real)
    h = layernorm_radii(r1, bt.ffn_norm.sigma, bt.ffn_norm.n_norm, bt.ffn_norm.gamma, bt.ffn_norm.eps)
    gain("ln_ffn_input", r1.rho, h.x.rho)
    u = linear_radii(h, bt.ffn_in_norm, e["ffn_in"], bt.ffn_norm.out.norm(dim=-1) + h.x.rho)
    l1, l2 = bt.extra["activation"]
    g = activation_radii(u, l1, l2)
    f = linear_radii(State(g), bt.ffn_out_norm, e["ffn_out"], bt.act_out_norm + g.rho)
    gain("ffn", h.x.rho, f.rho)
    if bt.post_ln:
        r2 = (h.x + f).masked(real)
        ln = bt.out_norm
        out = layernorm_radii(r2, ln.sigma, ln.n_norm, ln.gamma, ln.eps)
        gain("ln_out", r2.rho, out.x.rho)
        out = State(out.x.masked(real), out.z.masked(real), out.gamma)
    else:
        out = State((r1 + f).masked(real))
    gain("block", inp.x.rho, out.x.rho)
    return out, gains


def propagate(tr: Trace, eps: float) -> tuple[State, list[dict[str, float]]]:
    """Radii of ``x_L`` over the ball ``‖d‖ ≤ eps`` and the per-block operation gains."""
    zero = Radii.zeros(tr.real)
    state = State(zero, zero if tr.x0_gamma is not None else None, tr.x0_gamma)
    gains = []
    for bt in tr.blocks:
        state, g = propagate_block(bt, state, eps, tr.real)
        gains.append(g)
    return state, gains


__all__ = ["BlockTrace", "LayerNormTrace", "Radii", "State", "Trace", "activation_constants", "activation_radii",
           "key_mask_of", "layernorm_radii", "layernorm_trace", "linear_radii", "propagate", "propagate_block",
           "spectral", "trace", "trace_block"]
