"""A certified Lipschitz bound of one block, composed operation by operation.

For block l and two inputs/controls, ``‖f(x,u) − f(x',u')‖ ≤ A·‖x − x'‖ + Σ_site b_site ‖Δ_site‖``
on a stated :class:`~controltune.bounds.domain.LayerDomain` (pre-LN: ``a`` bounds
``G = f − x`` and Grönwall uses ``A = 1 + a``; post-LN: ``A = a``).  The block's
layout (which maps, which norm precedes which sub-block, the activation, the
heads) is its family's :class:`~controltune.families.base.BlockAnatomy`.
Per operation (``e`` the perturbation of an input, ``Δ`` of a weight):

* linear ``y = W a + c``: ``‖W a − W' a'‖ ≤ ‖W‖₂ e + ‖A'‖₂ ‖Δ‖_F``;
* LayerNorm, per token, for *any* two inputs (no convexity needed):
  ``‖LN(a) − LN(b)‖ ≤ ‖γ‖_∞ ‖a − b‖ / sqrt(σ_a σ_b)`` with ``σ = sqrt(var + eps)``
  (from ``‖â − b̂‖ ≤ ‖a − b‖ / sqrt(‖a‖‖b‖)`` applied to ``[a − ā; sqrt(d·eps)]``);
  on the domain ``σ ≥ σ_min`` this is ``‖γ‖_∞ / σ_min``; globally ``σ ≥ sqrt(eps)``;
* softmax attention on the ball ``‖x_t‖ ≤ R`` (convex, so the bound holds along
  segments), per head with ``M = W̃_qᵀ W̃_k`` (biases appended, ``R̃² = R² + 1``):
  ``L_h = ‖W_v‖ ‖P‖₂ + 2‖W_v‖R · scale·‖M‖R̃ · (1 + sqrt(T))``,
  ``‖P‖₂² ≤`` max column sum of P ``≤ Σ_i 1 / (1 + (n_i − 1) e^{−2 s})``,
  ``s = scale·‖M‖R̃²`` (n_i keys seen by query i); heads combine in quadrature;
* the FFN activation: its global Lipschitz constant (measured on a fine grid).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..controllers.base import UnsupportedMethodError
from .domain import LayerDomain
from .norms import spectral_norm
from .weights import BlockWeights, block_weights

if TYPE_CHECKING:
    from ..system import ResidualSystem

_ACT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def activation_lipschitz(act: Callable[[torch.Tensor], torch.Tensor], lo: float = -30.0, hi: float = 30.0,
                         step: float = 1e-4) -> float:
    """``max |act'(z)|`` on a fine float64 grid, plus ``1e-6`` for the grid's O(step²) error at a smooth maximum.

    Also checks ``|act(z)| ≤ |z|`` on the grid (used to bound the FFN's second input);
    raises if the activation violates it.
    """
    key = (lo, hi, step)
    try:
        cached = _ACT_CACHE.get(act, {})
    except TypeError:  # not weak-referenceable: no caching
        cached = {}
    if key in cached:
        return cached[key]
    z = torch.arange(lo, hi, step, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = act(z)
        (g,) = torch.autograd.grad(y.sum(), z)
    if bool((y.detach().abs() > z.detach().abs() + 1e-12).any()):
        raise UnsupportedMethodError("the FFN activation does not satisfy |act(z)| <= |z|; composed bound unavailable")
    value = float(g.abs().max()) + 1e-6
    try:
        _ACT_CACHE.setdefault(act, {})[key] = value
    except TypeError:
        pass
    return value


def _column_sum_bound(n: int, s: float, causal: bool) -> float:
    """Upper bound on the largest column sum of a softmax matrix with logits in ``[−s, s]``.

    A weight is at most ``1 / (1 + (k − 1) e^{−2s})`` for a query seeing k keys.
    """
    q = math.exp(-2.0 * min(s, 350.0))
    if causal:
        return float(sum(1.0 / (1.0 + (k - 1) * q) for k in range(1, n + 1)))
    return n / (1.0 + (n - 1) * q)


@dataclass
class _Affine:
    """``e_out ≤ s·e_in + Σ_site c_site ‖Δ_site‖``: a bound propagated through a block."""

    s: float = 0.0
    c: dict[str, float] = field(default_factory=dict)

    def scale(self, k: float) -> _Affine:
        return _Affine(self.s * k, {n: v * k for n, v in self.c.items()})

    def __add__(self, other: _Affine) -> _Affine:
        keys = set(self.c) | set(other.c)
        return _Affine(self.s + other.s, {n: self.c.get(n, 0.0) + other.c.get(n, 0.0) for n in keys})

    def site(self, name: str, coef: float) -> _Affine:
        c = dict(self.c)
        c[name] = c.get(name, 0.0) + coef
        return _Affine(self.s, c)


@dataclass
class ComposedBound:
    """Composed bound of one block: ``‖f(x,u) − f(x',u')‖ ≤ A·‖x−x'‖ + Σ_site b_site ‖Δ_site‖``
    (pre-LN: ``a`` bounds G, A = 1 + a; post-LN: A = a), valid on ``domain``."""

    a: float
    b: dict[str, float]
    domain: LayerDomain
    ops: dict[str, float]

    @property
    def b_total(self) -> float:
        """Constant for the whole layer control: ``sqrt(Σ b_site²)`` (Cauchy–Schwarz)."""
        return math.sqrt(sum(v * v for v in self.b.values()))


def _attention_bound(wu: BlockWeights, wv: BlockWeights, dom: LayerDomain) -> tuple[float, dict[str, float], dict]:
    """State constant (weights u) and control constants (weights on the segment u–v) of
    multi-head softmax attention (without the output map) on the ball ``‖x_t‖ ≤ R``."""
    anatomy = wu.anatomy
    scale = anatomy.scaling
    r = dom.radius
    ra = math.sqrt(r * r + 1.0)
    n, nt = dom.max_len, dom.n_tokens
    x2 = dom.input_norm[anatomy.attn_input_role]
    hu, hv = wu.head_norms(), wv.head_norms()
    l_sq, cq, ck, cv = 0.0, 0.0, 0.0, 0.0
    for h in range(wu.n_heads):
        m, wv_h = hu["qk"][h], hu["v"][h]
        p2 = math.sqrt(_column_sum_bound(n, scale * m * ra * ra, dom.causal))
        l_h = wv_h * p2 + 2.0 * wv_h * r * scale * m * ra * (1.0 + math.sqrt(n))
        l_sq += l_h * l_h
        # Along the weight segment every norm is at most the larger endpoint's (convexity).
        qn, kn, vn = (max(hu[t][h], hv[t][h]) for t in ("q", "k", "v"))
        p2s = math.sqrt(_column_sum_bound(n, scale * qn * kn * ra * ra, dom.causal))
        spread = 2.0 * vn * r
        cv = max(cv, p2s * x2)
        cq = max(cq, math.sqrt(nt) * spread * scale * r * kn * ra)
        ck = max(ck, math.sqrt(nt) * spread * scale * r * qn * ra)
    if anatomy.fused_qkv:  # one map carries all three: its Δ moves q, k and v together
        controls = {anatomy.qkv[0]: math.sqrt(cq * cq + ck * ck + cv * cv)}
    else:
        controls = dict(zip(anatomy.qkv, (cq, ck, cv)))
    return math.sqrt(l_sq), controls, {"attn_max_qk_norm": max(hu["qk"])}


def composed_block_bound(system: ResidualSystem, layer: int, domain: LayerDomain, weights: BlockWeights | None = None,
                         other: BlockWeights | None = None) -> ComposedBound:
    """Compose per-operation bounds through block ``layer`` on ``domain``.

    ``weights`` (default: current) are those of u; ``other`` those of u' (default: u).
    The state constant uses u's weights (Grönwall evaluates f(·, u) at two states); the
    control constants hold along the whole segment u–u' at a fixed block input.
    """
    wu = weights if weights is not None else block_weights(system, layer)
    wv = other if other is not None else wu
    anatomy = wu.anatomy
    if "act" not in wu.cache:
        wu.cache["act"] = activation_lipschitz(anatomy.activation)
        wu.cache["linear"] = {r: spectral_norm(w) for r, (w, _) in wu.linear.items()}
    lact, lin = wu.cache["act"], wu.cache["linear"]
    ln = {r: float(g.abs().max()) / domain.sigma_min[r] for r, (g, _, _) in wu.norms.items()}
    l_att, c_att, extra = _attention_bound(wu, wv, domain)

    def linear(e: _Affine, role: str) -> _Affine:
        return e.scale(lin[role]).site(role, domain.input_norm[role])

    def attention(e: _Affine) -> _Affine:
        out = e.scale(l_att)
        for role, coef in c_att.items():
            out = out.site(role, coef)
        return out

    def ffn(e: _Affine) -> _Affine:
        return linear(linear(e, "ffn_in").scale(lact), "ffn_out")

    x = _Affine(1.0)
    if system.family.post_ln:  # h = N_f(x + o(A(x))), f = N_out(h + FFN(h))
        h = (x + linear(attention(x), "o")).scale(ln[anatomy.ffn_norm])
        out = (h + ffn(h)).scale(ln[anatomy.out_norm])
        a, b = out.s, out.c
    else:  # G = o(A(N_a x)) + FFN(N_f(x + o(A(N_a x))))
        o = linear(attention(x.scale(ln[anatomy.attn_norm])), "o")
        g = o + ffn((x + o).scale(ln[anatomy.ffn_norm]))  # G = f − x: its state constant; controls those of f
        a, b = g.s, g.c
    ops = {"attention": l_att, "activation": lact, **{f"linear_{k}": v for k, v in lin.items()},
           **{f"layernorm_{k}": v for k, v in ln.items()}, **extra}
    return ComposedBound(a, b, domain, ops)


__all__ = ["ComposedBound", "activation_lipschitz", "composed_block_bound"]
