"""Finite-horizon, time-varying discrete LQR with an affine terminal cost (backward Riccati recursion).

Problem (one per batch element when the matrices carry a leading batch dimension):

    z_{l+1} = A_l z_l + B_l u_l,                 l = 0 .. L-1,
    J = Σ_l [½ z_lᵀ Q_l z_l + ½ u_lᵀ R u_l] + ½ z_Lᵀ Q_L z_L + q_Lᵀ z_L.

The value function is ``V_l(z) = ½ zᵀ P_l z + s_lᵀ z + const`` with ``P_L = Q_L``, ``s_L = q_L`` and

    M_l = R + B_lᵀ P_{l+1} B_l,
    K_l = M_l⁻¹ B_lᵀ P_{l+1} A_l                       (feedback gain),
    k_l = −M_l⁻¹ B_lᵀ s_{l+1}                          (feed-forward),
    P_l = Q_l + A_lᵀ P_{l+1} A_l − A_lᵀ P_{l+1} B_l K_l,
    s_l = (A_l − B_l K_l)ᵀ s_{l+1},

and the optimal control is ``u_l = −K_l z_l + k_l``.  In the PMP sign convention the
co-state of the linear-quadratic problem is ``p_l = −∇V_l(z_l) = −(P_l z_l + s_l)``; with
``Q_L = 0`` (no terminal curvature) ``P ≡ 0``, ``K ≡ 0`` and the feed-forward is one
Hamiltonian-maximisation step ``k_l = R⁻¹ B_lᵀ p_{l+1}`` with ``p_{l+1} = −s_{l+1}``.

Residual-stream Jacobians are not Schur-stable (DESIGN.md §5): only this
finite-horizon recursion is used, never the infinite-horizon DARE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LQRSolution", "dlqr", "lqr_rollout"]


@dataclass
class LQRSolution:
    """Gains and value function of :func:`dlqr` (leading batch dims allowed).

    Attributes:
        K: L feedback gains ``…×m×k_l``;  k: L feed-forward terms ``…×m``.
        P: L+1 value Hessians ``…×k_l×k_l``;  s: L+1 value gradients ``…×k_l``.
    """

    K: list[torch.Tensor]
    k: list[torch.Tensor]
    P: list[torch.Tensor]
    s: list[torch.Tensor]

    def costate(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``p_l = −(P_l z + s_l)`` (PMP sign convention) at state ``z`` (…×k_l)."""
        return -((self.P[layer] @ z.unsqueeze(-1)).squeeze(-1) + self.s[layer])


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _as_matrix(R: torch.Tensor | float, m: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(R, (int, float)) or (torch.is_tensor(R) and R.dim() == 0):
        value = float(R)
        if value <= 0:
            raise ValueError(f"the control cost R must be positive definite; got the scalar {value}")
        return value * torch.eye(m, dtype=like.dtype, device=like.device)
    if R.shape[-2:] != (m, m):
        raise ValueError(f"R must be {m}×{m} (the control dimension), got {tuple(R.shape)}")
    return R.to(like)


def dlqr(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], Q: Sequence[torch.Tensor | None] | None,
         R: torch.Tensor | float, Q_L: torch.Tensor | None = None, q_L: torch.Tensor | None = None) -> LQRSolution:
    """Backward Riccati recursion of the finite-horizon time-varying LQR (module docstring).

    The argument order is python-control's ``dlqr(A, B, Q, R)``: running state cost, then
    control cost; the finite horizon adds the terminal cost ``½ z_Lᵀ Q_L z_L + q_Lᵀ z_L``.

    Args:
        A: L state matrices ``…×k_{l+1}×k_l``; B: L input matrices ``…×k_{l+1}×m``.
        Q: running state costs ``Q_0..Q_{L-1}`` (``…×k_l×k_l``; entries may be None), or None.
        R: control cost, a positive scalar (``R = λI``) or an m×m SPD matrix.
        Q_L: terminal curvature ``…×k_L×k_L`` (symmetric PSD; default zero).
        q_L: terminal gradient ``…×k_L`` (default zero: a pure regulator).

    Returns:
        :class:`LQRSolution`.
    """
    if Q_L is None:
        last = A[-1]
        Q_L = torch.zeros((*last.shape[:-1], last.shape[-2]), dtype=last.dtype, device=last.device)
    n = len(A)
    if len(B) != n:
        raise ValueError(f"A has {n} matrices but B has {len(B)}; give one (A_l, B_l) pair per step")
    if Q is not None and len(Q) != n:
        raise ValueError(f"the running costs Q must have one entry per step ({n}), got {len(Q)}")
    m = B[0].shape[-1]
    Rm = _as_matrix(R, m, Q_L)
    P = Q_L
    s = torch.zeros(Q_L.shape[:-1], dtype=Q_L.dtype, device=Q_L.device) if q_L is None else q_L.to(Q_L)
    Ks: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
    ks: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
    Ps, ss = [P], [s]
    for layer in reversed(range(n)):
        a, b = A[layer].to(Q_L), B[layer].to(Q_L)
        if a.shape[-2] != P.shape[-1] or b.shape[-2] != P.shape[-1]:
            raise ValueError(f"step {layer}: A is {tuple(a.shape)} and B is {tuple(b.shape)} but the next "
                             f"state has dimension {P.shape[-1]}")
        pb = P @ b
        M = Rm + _t(b) @ pb
        K = torch.linalg.solve(M, _t(pb) @ a)
        k = -torch.linalg.solve(M, (_t(b) @ s.unsqueeze(-1))).squeeze(-1)
        P_new = _t(a) @ P @ a - _t(a) @ pb @ K
        if Q is not None and Q[layer] is not None:
            P_new = P_new + Q[layer].to(Q_L)
        # Round-off makes P drift from symmetric over many steps; the exact P is symmetric.
        P_new = 0.5 * (P_new + _t(P_new))
        s = (_t(a - b @ K) @ s.unsqueeze(-1)).squeeze(-1)
        P = P_new
        Ks[layer], ks[layer] = K, k
        Ps.append(P)
        ss.append(s)
    return LQRSolution(K=Ks, k=ks, P=Ps[::-1], s=ss[::-1])


def lqr_rollout(sol: LQRSolution, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
                z0: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Closed-loop trajectory ``z_0..z_L`` and controls ``u_l = −K_l z_l + k_l`` from ``z0`` (…×k_0)."""
    z, zs, us = z0, [z0], []
    for layer in range(len(A)):
        u = -(sol.K[layer] @ z.unsqueeze(-1)).squeeze(-1) + sol.k[layer]
        z = (A[layer].to(z) @ z.unsqueeze(-1)).squeeze(-1) + (B[layer].to(z) @ u.unsqueeze(-1)).squeeze(-1)
        us.append(u)
        zs.append(z)
    return zs, us
