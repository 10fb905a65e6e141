"""Certified enclosure of multi-head softmax attention over a ball of weight deltas.

Per head h, query i and key j (shapes ``S×H×T×T``), with centres at u*
``q_i, k_j, v_j``, ``s_ij = scale·q_i·k_j``, ``p_i = softmax(s_i)`` over the keys query i
may see and ``o_i = Σ_j p_ij v_j``; the input ``x`` (a LayerNorm output ``γ ⊙ n + β`` or a
plain state) has radii ``r`` (of n, resp. of x), ``R = ‖x‖ + rho`` and x-space
derivative radii ``A^x, B^x`` (:mod:`controltune.bounds.enclosure`).  With
``W_h = ‖W̄_h diag γ‖`` per head, ``κ_j = ‖diag γ W̄_{q,h}ᵀ k_j‖``, ``λ_i = ‖diag γ W̄_{k,h}ᵀ q_i‖``:

* ``rq_i = W_{q,h} r_i + e_q R_i`` (same for k, v); the logit deviation
  ``|Δs_ij| ≤ m_ij = scale·(r_i κ_j + e_q R_i ‖k_j‖ + r_j λ_i + e_k R_j ‖q_i‖ + rq_i rk_j)``;
* softmax under logit deviations ``|δ_j| ≤ m_j``: ``p'_j ∈ [lo_j, hi_j]`` exactly,
  ``hi_j = p_j e^{m_j} / (p_j e^{m_j} + Σ_{k≠j} p_k e^{−m_k})`` (``lo`` with the signs swapped);
  ``w_j = max(hi_j − p_j, p_j − lo_j)``, evaluated without cancellation (:func:`softmax_interval`);
* ``Δo_i = Σ_j (p'_ij − p_ij)(v_j − o_i) + Σ_j p'_ij Δv_j``:
  ``rho_o ≤ (Σ_h T1²)^½ + (Σ_h (W_{v,h} ⟨r⟩)²)^½ + e_v max_h ⟨R⟩`` with
  ``T1 = min(Σ_j w_j ‖v_j − o_i‖, 2 max_j ‖v_j − o_i‖)`` and ``⟨x⟩ = min(max_j x_j, Σ_j hi_j x_j) ≥ Σ_j p'_j x_j``;
  the delta of W_v acts on all heads at once: ``Σ_h ‖d_{v,h}‖² ≤ ε²``;
* derivatives along ``u* + τ d``: ``ṡ = scale(q̇·k' + q'·k̇)``, ``|ṡ_ij| ≤ S1_ij``, ``|s̈_ij| ≤ S2_ij``;
  ``Σ_j ṗ_j v'_j = Cov_{p'}(ṡ, v')`` and ``Σ_j p̈_j v'_j = E_{p'}[((ṡ − ⟨ṡ⟩)² − Var ṡ)(v' − v̄)] + Cov(s̈, v')``, so
  ``‖ȯ_i‖ ≤ σ₁ D + ⟨‖v̇‖⟩``, ``‖ö_i‖ ≤ (2 max_j S1 · σ₁ + σ₂) D + 2 σ₁ D_v̇ + ⟨‖v̈‖⟩``,
  ``σ_k² = ⟨S_k²⟩ ≥ E_{p'} ṡ²`` (resp. s̈), ``D² = ⟨(‖v_j − o_i‖ + rv_j)²⟩``, ``D_v̇² = ⟨‖v̇_j‖²⟩``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .norms import spectral
from .radii import Radii, State

if TYPE_CHECKING:
    from .weights import Linear


@dataclass
class AttentionTrace:
    """Multi-head attention at u*: what :func:`attention_radii` needs (``S×H×T[×T]`` per head).

    ``wq, wk, wv`` (H,): ``‖W̄_h diag γ‖`` (γ = 1 for a plain input); ``in_norm`` (S×T): ``‖x_t‖``;
    ``qn, kn``: ``‖q_i‖, ‖k_j‖``; ``kappa, lam``: ``‖diag γ W̄_qᵀ k_j‖, ‖diag γ W̄_kᵀ q_i‖``;
    ``logp, p``: the attention; ``dist``: ``‖v_j − o_i‖``; ``mask`` (S×1×T×T): query i sees key j;
    ``out`` (S×T×d): heads concatenated (before the output map).
    """

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    in_norm: torch.Tensor
    qn: torch.Tensor
    kn: torch.Tensor
    kappa: torch.Tensor
    lam: torch.Tensor
    logp: torch.Tensor
    p: torch.Tensor
    dist: torch.Tensor
    mask: torch.Tensor
    scale: float
    out: torch.Tensor
    roles: tuple[str, str, str]


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """S×T×(H·dh) -> S×H×T×dh."""
    s, n, _ = t.shape
    return t.view(s, n, h, -1).transpose(1, 2)


def trace_attention(x: torch.Tensor, qkv: tuple[Linear, Linear, Linear], n_heads: int, scale: float, mask: torch.Tensor,
                    gamma: torch.Tensor | None, fused: bool = False) -> AttentionTrace:
    """Attention of input ``x`` (S×T×d) with effective ``((W_q, b_q), (W_k, b_k), (W_v, b_v))`` at u*."""

    g = gamma if gamma is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    (wq, bq), (wk, bk), (wv, bv) = qkv

    def proj(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return _heads(x @ w.T + (b if b is not None else 0), n_heads)

    q, k, v = proj(wq, bq), proj(wk, bk), proj(wv, bv)
    d = x.shape[-1]
    wqh, wkh, wvh = (w.reshape(n_heads, -1, d) for w in (wq, wk, wv))
    logits = scale * q @ k.transpose(-1, -2)
    logits = logits.masked_fill(~mask, float("-inf"))
    seen = mask.any(-1, keepdim=True)
    logp = torch.where(seen, torch.log_softmax(logits.masked_fill(~seen, 0.0), -1), float("-inf"))
    p = logp.exp()
    o = p @ v
    s, h, t, dh = o.shape
    dist = torch.cdist(o.reshape(s * h, t, dh), v.reshape(s * h, t, dh),
                       compute_mode="donot_use_mm_for_euclid_dist").view(s, h, t, t)
    kappa = (torch.einsum("shte,hed->shtd", k, wqh) * g).norm(dim=-1)
    lam = (torch.einsum("shte,hed->shtd", q, wkh) * g).norm(dim=-1)
    return AttentionTrace(
        wq=spectral(wqh * g), wk=spectral(wkh * g), wv=spectral(wvh * g), in_norm=x.norm(dim=-1),
        qn=q.norm(dim=-1), kn=k.norm(dim=-1), kappa=kappa, lam=lam, logp=logp, p=p, dist=dist,
        mask=mask.expand(-1, 1, -1, -1), scale=scale, out=o.transpose(1, 2).reshape(s, t, h * dh),
        roles=("qkv",) * 3 if fused else ("q", "k", "v"))


def _excl(t: torch.Tensor) -> torch.Tensor:
    """``Σ_{k≠j} t_k`` for every j (last dim) of non-negative ``t``, without cancellation: ``total − t_j``
    except at the largest term (the only one that can exceed half the total), which is summed directly."""
    total = t.sum(-1, keepdim=True)
    top = t.argmax(-1, keepdim=True)
    direct = t.scatter(-1, top, 0.0).sum(-1, keepdim=True)
    is_top = torch.zeros(t.shape, dtype=torch.bool, device=t.device).scatter(-1, top, True)
    return torch.where(is_top, direct, (total - t).clamp(min=0.0))


def softmax_interval(logp: torch.Tensor, m: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, hi)``: ``|p'_j − p_j| ≤ w_j`` and ``p'_j ≤ hi_j`` for every softmax whose logits move by
    ``|δ_j| ≤ m_j`` from those of ``p = exp(logp)`` (last dimension; masked keys give 0).

    Exact interval, every difference written as a sum of non-negative terms:
    ``hi_j − p_j = p_j Σ_{k≠j} p_k (e^{m_j} − e^{−m_k}) / (p_j e^{m_j} + Σ_{k≠j} p_k e^{−m_k})``,
    ``p_j − lo_j = p_j Σ_{k≠j} p_k (e^{m_k} − e^{−m_j}) / (p_j e^{−m_j} + Σ_{k≠j} p_k e^{m_k})`` with
    ``e^{a} − e^{−b} = expm1(a) − expm1(−b)``; a row with some ``m > 600`` gets the trivial ``[0, 1]``.
    """
    p = logp.exp().masked_fill(~mask, 0.0)
    m = m.masked_fill(~mask, 0.0)
    huge = m.amax(-1, keepdim=True) > 600.0
    m = m.masked_fill(huge, 0.0)
    p_other = _excl(p)
    e_down = _excl(p * -torch.expm1(-m))  # Σ_{k≠j} p_k (1 − e^{−m_k})
    e_up = _excl(p * torch.expm1(m))  # Σ_{k≠j} p_k (e^{m_k} − 1)
    up = p * (p_other * torch.expm1(m) + e_down) / (p * torch.exp(m) + _excl(p * torch.exp(-m)))
    down = p * (e_up - p_other * torch.expm1(-m)) / (p * torch.exp(-m) + _excl(p * torch.exp(m)))
    w = torch.where(huge, torch.maximum(p, 1.0 - p), torch.maximum(up, down))
    hi = torch.where(huge, 1.0, p + up)
    keep = mask & mask.any(-1, keepdim=True)
    return torch.where(keep, w, 0.0).nan_to_num(0.0), torch.where(keep, hi, 0.0).clamp(max=1.0).nan_to_num(0.0)


def _avg(x: torch.Tensor, hi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``⟨x⟩_i = min(max_j x_ij, Σ_j hi_ij x_ij) ≥ Σ_j p'_ij x_ij`` for ``x ≥ 0`` (keys on the last dim)."""
    x = x.expand(hi.shape).masked_fill(~mask, 0.0)
    return torch.minimum(x.amax(-1), (hi * x).sum(-1))


def attention_radii(tr: AttentionTrace, inp: State, e: dict[str, float]) -> Radii:
    """Radii of the heads-concatenated attention output (before the output map) per token."""

    r = inp.z if inp.z is not None else inp.x
    x = inp.x
    eq, ek, ev = (e[role] for role in tr.roles)
    mask = tr.mask
    wq, wk, wv = (w[None, :, None] for w in (tr.wq, tr.wk, tr.wv))
    big_r = (tr.in_norm + x.rho)[:, None]  # S×1×T
    rr, ra, rb = r.rho[:, None], r.a[:, None], r.b[:, None]
    xa, xb = x.a[:, None], x.b[:, None]
    rq, rk, rv = wq * rr + eq * big_r, wk * rr + ek * big_r, wv * rr + ev * big_r  # S×H×T

    def qi(t: torch.Tensor) -> torch.Tensor:  # query-indexed -> S×H×T×1
        return t[..., :, None]

    def kj(t: torch.Tensor) -> torch.Tensor:  # key-indexed -> S×H×1×T
        return t[..., None, :]

    m = tr.scale * (qi(rr) * kj(tr.kappa) + eq * qi(big_r) * kj(tr.kn) + kj(rr) * qi(tr.lam)
                    + ek * kj(big_r) * qi(tr.qn) + qi(rq) * kj(rk))
    w, hi = softmax_interval(tr.logp, m, mask)
    dist = tr.dist.masked_fill(~mask, 0.0)
    t1 = torch.minimum((w * dist).sum(-1), 2.0 * dist.amax(-1))
    v1 = tr.wv[None, :, None] * _avg(kj(rr), hi, mask)
    v2 = ev * _avg(kj(big_r), hi, mask).amax(1)
    rho = t1.pow(2).sum(1).sqrt() + v1.pow(2).sum(1).sqrt() + v2

    # Derivatives along u* + τ d.
    aq, ak, av = wq * ra + eq * (xa + big_r), wk * ra + ek * (xa + big_r), wv * ra + ev * (xa + big_r)
    big_q, big_k = tr.qn + rq, tr.kn + rk
    kq = kj(tr.kappa) + wq[..., None] * kj(rk)  # ≥ ‖diag γ W̄_qᵀ k'_j‖
    lk = qi(tr.lam) + wk[..., None] * qi(rq)  # ≥ ‖diag γ W̄_kᵀ q'_i‖
    s1 = tr.scale * (qi(ra) * kq + eq * qi(xa + big_r) * kj(big_k) + kj(ra) * lk + ek * kj(xa + big_r) * qi(big_q))
    s2 = tr.scale * (qi(rb) * kq + eq * qi(xb + 2 * xa) * kj(big_k) + 2 * qi(aq) * kj(ak) + kj(rb) * lk
                     + ek * kj(xb + 2 * xa) * qi(big_q))
    s1, s2 = s1.masked_fill(~mask, 0.0), s2.masked_fill(~mask, 0.0)
    sig1, sig2 = _avg(s1 * s1, hi, mask).sqrt(), _avg(s2 * s2, hi, mask).sqrt()
    d_v = _avg((dist + kj(rv)).pow(2), hi, mask).sqrt()
    d_vdot = _avg(kj(av).pow(2), hi, mask).sqrt()
    a_w = sig1 * d_v + tr.wv[None, :, None] * _avg(kj(ra), hi, mask)
    a_d = ev * _avg(kj(xa + big_r), hi, mask).amax(1)
    b_w = ((2 * s1.amax(-1) * sig1 + sig2) * d_v + 2 * sig1 * d_vdot
           + tr.wv[None, :, None] * _avg(kj(rb), hi, mask))
    b_d = ev * _avg(kj(xb + 2 * xa), hi, mask).amax(1)
    return Radii(rho, a_w.pow(2).sum(1).sqrt() + a_d, b_w.pow(2).sum(1).sqrt() + b_d)


__all__ = ["AttentionTrace", "attention_radii", "softmax_interval", "trace_attention"]
