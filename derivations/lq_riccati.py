"""Linear-quadratic case: the PMP conditions give the finite-horizon Riccati feedback, and MSA finds it.

Problem (state ``x_l ∈ R^n``, control ``u_l ∈ R^m``, horizon L):

    x_{l+1} = A_l x_l + B_l u_l,
    J = ½ x_Lᵀ Q_f x_L + Σ_l ½ (x_lᵀ Q_l x_l + u_lᵀ R_l u_l),      R_l ≻ 0.

Hamiltonian with the state-dependent running cost (pmp_chain_rule.py, item 4):
``H_l(x, p, u) = pᵀ(A_l x + B_l u) − ½ xᵀQ_l x − ½ uᵀR_l u``; co-state ``p_L = −Q_f x_L``,
``p_l = ∇_x H_l = A_lᵀ p_{l+1} − Q_l x_l``; stationarity ``∇_u H_l = B_lᵀ p_{l+1} − R_l u_l = 0``
(and ``∇²_u H_l = −R_l ≺ 0``, so here the maximum condition holds and the stationary u maximises H).

Symbolic part (generic symbolic matrices, n = 2 and m ∈ {1, 2}): backward induction.  Base:
``p_L = −P_L x_L`` with ``P_L = Q_f``.  Step: if ``p_{l+1} = −P_{l+1} x_{l+1}`` then solving
``∇_u H_l = 0`` gives

    u_l = −K_l x_l,          K_l = (R_l + B_lᵀ P_{l+1} B_l)⁻¹ B_lᵀ P_{l+1} A_l,
    p_l = −P_l x_l,          P_l = Q_l + A_lᵀ P_{l+1} (A_l − B_l K_l),

and P_l is symmetric when P_{l+1} is.  Then, for a horizon-3 problem with exact rational matrices
and a symbolic x_0, the Riccati feedback equals the unique minimiser of J (``∇_u J = 0`` solved
directly), so PMP ⇒ Riccati ⇒ global optimum.

Numerical part (torch float64, n = 4, m = 2, L = 5, random Schur-stable A_l): the method of
successive approximations, written here because ``controltune.msa`` raises H by optimiser steps
and its systems have control-only running costs, while for LQ ``argmax_u H`` is closed form:

    forward  x_{l+1} = A_l x_l + B_l u_l;   backward  p_L = −Q_f x_L, p_l = A_lᵀ p_{l+1} − Q_l x_l;
    E-MSA    u_l ← argmax_u [H_l(x_l, p_{l+1}, u) − (ρ/2)‖x_{l+1} − A_l x_l − B_l u‖²]
                 = (R_l + ρ B_lᵀB_l)⁻¹ (B_lᵀ p_{l+1} + ρ B_lᵀB_l u_l)

(the co-state penalty of E-MSA is constant in u for LQ, ``∇_x H_l`` not depending on u; ρ = 0 is
basic MSA, ``u ← R⁻¹Bᵀp``, which is the fixed-point iteration ``u ← u − R⁻¹∇J(u)`` and diverges
when ``R⁻¹∇²J`` has an eigenvalue above 2).  The error to the Riccati control is reported per
iteration and must fall below 1e-10; the Riccati gains are compared with
``controltune.design.riccati.dlqr``.

Run: ``python derivations/lq_riccati.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, TexFragment, eq, mat, report, require, sym_mat, vanishes, vec  # noqa: E402

NAME = "lq_riccati"
TOLERANCE = 1e-10
RHO = 8.0  # E-MSA penalty of the numerical check (predicted rate ≈ 0.89 on its problem)


# ---------------------------------------------------------------------------------------------
# Symbolic: one step of the backward induction with generic matrices.
# ---------------------------------------------------------------------------------------------

def induction_step(n: int, m: int) -> dict[str, bool]:
    """``p_{l+1} = −P' x_{l+1}`` and ``∇_u H_l = 0``  ⇒  ``u = −K x``, ``p_l = −P x``, ``P = Pᵀ``."""
    A, B, x, u = mat("A", n, n), mat("B", n, m), vec("x", n), vec("u", m)
    P_next, Q, R = sym_mat("P'", n), sym_mat("Q", n), sym_mat("R", m)
    p_next = -P_next * (A * x + B * u)
    stationarity = B.T * p_next - R * u  # ∇_u H_l with H_l as in the module docstring
    solution = sp.solve(list(stationarity), list(u), dict=True)
    tag = f"n={n}, m={m}"
    if len(solution) != 1:
        return {f"[{tag}] grad_u H = 0 has a unique solution": False}
    u_star = u.subs(solution[0])
    K = (R + B.T * P_next * B).inv() * B.T * P_next * A
    P = Q + A.T * P_next * (A - B * K)
    p_l = (A.T * p_next - Q * x).subs(solution[0])  # ∇_x H_l at the stationary control
    return {f"[{tag}] grad_u H = 0  =>  u_l = -K_l x_l": vanishes(u_star + K * x),
            f"[{tag}] p_l = grad_x H_l = -P_l x_l": vanishes(p_l + P * x),
            f"[{tag}] P_l symmetric": vanishes(P - P.T)}


def base_case(n: int) -> dict[str, bool]:
    """``p_L = −∂Φ/∂x_L = −Q_f x_L``: the induction starts with ``P_L = Q_f``."""
    Qf, x = sym_mat("Q_f", n), vec("x", n)
    phi = (x.T * Qf * x)[0] / 2
    p_L = -sp.Matrix([sp.diff(phi, xi) for xi in x])
    return {f"[n={n}] p_L = -Q_f x_L": vanishes(p_L + Qf * x)}


def rational_problem(n: int, m: int, horizon: int, seed: int = 3
                     ) -> tuple[list[sp.Matrix], list[sp.Matrix], list[sp.Matrix], list[sp.Matrix], sp.Matrix]:
    """Exact rational ``A_l, B_l, Q_l (PSD), R_l (PD), Q_f`` drawn from a seeded generator."""
    import random

    rng = random.Random(seed)

    def rmat(rows: int, cols: int) -> sp.Matrix:
        return sp.Matrix(rows, cols, lambda *_: sp.Rational(rng.randint(-9, 9), 10))

    def psd(k: int, shift: sp.Expr | int) -> sp.Matrix:
        G = rmat(k, k)
        return G.T * G + shift * sp.eye(k)

    A = [rmat(n, n) for _ in range(horizon)]
    B = [rmat(n, m) for _ in range(horizon)]
    Q = [psd(n, 0) for _ in range(horizon)]
    R = [psd(m, sp.Rational(1, 2)) for _ in range(horizon)]
    return A, B, Q, R, psd(n, 0)


def riccati_sympy(A: list[sp.Matrix], B: list[sp.Matrix], Q: list[sp.Matrix], R: list[sp.Matrix],
                  Qf: sp.Matrix) -> tuple[list[sp.Matrix], list[sp.Matrix]]:
    """``P_L = Q_f``, ``K_l``, ``P_l`` of the module docstring (exact)."""
    horizon = len(A)
    P, K = [None] * (horizon + 1), [None] * horizon
    P[horizon] = Qf
    for layer in reversed(range(horizon)):
        K[layer] = (R[layer] + B[layer].T * P[layer + 1] * B[layer]).inv() * B[layer].T * P[layer + 1] * A[layer]
        P[layer] = Q[layer] + A[layer].T * P[layer + 1] * (A[layer] - B[layer] * K[layer])
    return K, P


def global_optimum(n: int = 2, m: int = 1, horizon: int = 3) -> dict[str, bool]:
    """Riccati feedback = the minimiser of J (``∇_u J = 0`` solved directly), exactly, for symbolic x_0;
    and the PMP co-states along it are ``−P_l x_l`` with ``∇_u H_l = 0``."""
    A, B, Q, R, Qf = rational_problem(n, m, horizon)
    x0 = vec("x0", n)
    us = [vec(f"u{layer}", m) for layer in range(horizon)]
    xs = [x0]
    for layer in range(horizon):
        xs.append(A[layer] * xs[-1] + B[layer] * us[layer])
    J = (xs[-1].T * Qf * xs[-1])[0] / 2 + sum(((xs[k].T * Q[k] * xs[k])[0] + (us[k].T * R[k] * us[k])[0]) / 2
                                             for k in range(horizon))
    flat = [ui for u in us for ui in u]
    optimum = sp.solve([sp.diff(J, ui) for ui in flat], flat, dict=True)[0]
    K, P = riccati_sympy(A, B, Q, R, Qf)
    x, ok_u, ok_p, ok_stat = x0, True, True, True
    p_next = [None] * horizon
    states = [x0]
    for layer in range(horizon):
        u = -K[layer] * x
        ok_u &= vanishes(u - us[layer].subs(optimum))
        x = A[layer] * x + B[layer] * u
        states.append(x)
    p = -Qf * states[-1]
    for layer in reversed(range(horizon)):
        p_next[layer] = p
        ok_stat &= vanishes(B[layer].T * p + R[layer] * K[layer] * states[layer])  # ∇_u H_l at u = −K x
        p = A[layer].T * p - Q[layer] * states[layer]
        ok_p &= vanishes(p + P[layer] * states[layer])
    tag = f"rational n={n}, m={m}, L={horizon}"
    return {f"[{tag}] Riccati feedback = argmin J": bool(ok_u),
            f"[{tag}] grad_u H_l = 0 along the Riccati trajectory": bool(ok_stat),
            f"[{tag}] PMP co-state p_l = -P_l x_l": bool(ok_p)}


# ---------------------------------------------------------------------------------------------
# Numerical: MSA / E-MSA on a random stable LQ problem converges to the Riccati control.
# ---------------------------------------------------------------------------------------------

def random_lq(n: int = 4, m: int = 2, horizon: int = 5, seed: int = 0) -> dict:
    """Seeded float64 LQ problem: Schur-stable ``A_l`` (spectral radius 0.9), PSD ``Q_l``, ``R = I``."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    A = []
    for _ in range(horizon):
        a = randn(n, n)
        A.append(0.9 * a / torch.linalg.eigvals(a).abs().max())
    B = [randn(n, m) / n**0.5 for _ in range(horizon)]
    Q = [(g := randn(n, n)) @ g.T / n for _ in range(horizon)]
    Qf = (g := randn(n, n)) @ g.T / n + torch.eye(n, dtype=torch.float64)
    R = torch.eye(m, dtype=torch.float64)
    return {"A": A, "B": B, "Q": Q, "Qf": Qf, "R": R, "x0": randn(n)}


def riccati_torch(prob: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``K_l``, ``P_l`` from the derived recursion (float64)."""
    A, B, Q, R = prob["A"], prob["B"], prob["Q"], prob["R"]
    P, K = [None] * (len(A) + 1), [None] * len(A)
    P[-1] = prob["Qf"]
    for layer in reversed(range(len(A))):
        K[layer] = torch.linalg.solve(R + B[layer].T @ P[layer + 1] @ B[layer], B[layer].T @ P[layer + 1] @ A[layer])
        P[layer] = Q[layer] + A[layer].T @ P[layer + 1] @ (A[layer] - B[layer] @ K[layer])
    return K, P


def forward(prob: dict, u: list[torch.Tensor]) -> list[torch.Tensor]:
    xs = [prob["x0"]]
    for layer, (a, b) in enumerate(zip(prob["A"], prob["B"])):
        xs.append(a @ xs[-1] + b @ u[layer])
    return xs


def backward(prob: dict, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``p_L = −Q_f x_L``, ``p_l = A_lᵀ p_{l+1} − Q_l x_l``."""
    p = [None] * len(xs)
    p[-1] = -prob["Qf"] @ xs[-1]
    for layer in reversed(range(len(xs) - 1)):
        p[layer] = prob["A"][layer].T @ p[layer + 1] - prob["Q"][layer] @ xs[layer]
    return p


def msa_sweep(prob: dict, u: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """One (E-)MSA iteration: forward, co-state backward, ``u_l ← argmax_u H̃_l`` (closed form)."""
    xs = forward(prob, u)
    p = backward(prob, xs)
    out = []
    for layer, b in enumerate(prob["B"]):
        btb = rho * b.T @ b
        out.append(torch.linalg.solve(prob["R"] + btb, b.T @ p[layer + 1] + btb @ u[layer]))
    return out


def msa(prob: dict, u_star: list[torch.Tensor], rho: float, iterations: int) -> list[float]:
    """(E-)MSA from ``u = 0``; returns ``max_l ‖u_l − u_l*‖_∞`` after each iteration."""
    u = [torch.zeros_like(v) for v in u_star]
    errors = []
    for _ in range(iterations):
        u = msa_sweep(prob, u, rho)
        errors.append(max(float((a - s).abs().max()) for a, s in zip(u, u_star)))
        if not errors[-1] < 1e6:  # diverged: keep the record, stop iterating
            break
    return errors


def cost(prob: dict, u: torch.Tensor) -> torch.Tensor:
    """J of the stacked controls ``u`` (L·m)."""
    us = list(u.reshape(len(prob["A"]), -1))
    xs = forward(prob, us)
    running = sum(0.5 * (x @ q @ x + v @ prob["R"] @ v) for x, q, v in zip(xs, prob["Q"], us))
    return running + 0.5 * xs[-1] @ prob["Qf"] @ xs[-1]


def predicted_rate(prob: dict, rho: float) -> float:
    """Spectral radius of ``I − D_ρ⁻¹ ∇²J``, ``D_ρ = blkdiag(R + ρB_lᵀB_l)``: (E-)MSA's linear rate.

    For LQ one (E-)MSA sweep is ``u ← u − D_ρ⁻¹ ∇J(u)`` (``B_lᵀp_{l+1} = R u_l − ∂J/∂u_l``), a
    preconditioned gradient step; it converges iff the eigenvalues of ``D_ρ⁻¹∇²J`` lie in (0, 2).
    """
    m = prob["B"][0].shape[1]
    hess = torch.autograd.functional.hessian(lambda u: cost(prob, u),
                                             torch.zeros(len(prob["A"]) * m, dtype=torch.float64))
    D = torch.block_diag(*[prob["R"] + rho * b.T @ b for b in prob["B"]])
    eig = torch.linalg.eigvals(torch.linalg.solve(D, hess)).real
    return float((1 - eig).abs().max())


def numerical_check(iterations: int = 400, rho: float = RHO) -> tuple[dict[str, bool], dict]:
    from controltune.design.riccati import dlqr

    prob = random_lq()
    K, P = riccati_torch(prob)
    lib = dlqr(prob["A"], prob["B"], prob["Q"], prob["R"], Q_L=prob["Qf"])
    gain_gap = max(float((a - b).abs().max()) for a, b in zip(K, lib.K))
    value_gap = max(float((a - b).abs().max()) for a, b in zip(P, lib.P))
    xs = [prob["x0"]]
    u_star = []
    for layer in range(len(K)):
        u_star.append(-K[layer] @ xs[-1])
        xs.append(prob["A"][layer] @ xs[-1] + prob["B"][layer] @ u_star[-1])
    p = backward(prob, xs)
    costate_gap = max(float((p[k] + P[k] @ xs[k]).abs().max()) for k in range(len(xs)))
    # One sweep from a random u is the preconditioned gradient step u − D_ρ⁻¹∇J(u) (autograd ∇J).
    u_rand = torch.randn(len(u_star) * u_star[0].numel(), generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).requires_grad_(True)
    grad_J, = torch.autograd.grad(cost(prob, u_rand), u_rand)
    D = torch.block_diag(*[prob["R"] + rho * b.T @ b for b in prob["B"]])
    step = (u_rand - torch.linalg.solve(D, grad_J)).detach()
    sweep = torch.cat(msa_sweep(prob, list(u_rand.detach().reshape(len(u_star), -1)), rho))
    sweep_gap = float((sweep - step).abs().max())
    plain = msa(prob, u_star, rho=0.0, iterations=iterations)
    emsa = msa(prob, u_star, rho=rho, iterations=iterations)
    first_below = next((k + 1 for k, e in enumerate(emsa) if e < TOLERANCE), None)
    # Measured linear rate over a window before round-off (~1e-14) takes over.
    window = [k for k, e in enumerate(emsa) if 1e-12 < e < 1e-3]
    measured = (emsa[window[-1]] / emsa[window[0]]) ** (1 / (window[-1] - window[0]))
    numbers = {"gain_gap_vs_dlqr": gain_gap, "value_gap_vs_dlqr": value_gap,
               "costate_gap": costate_gap, "sweep_gap": sweep_gap, "msa_errors": plain, "emsa_errors": emsa,
               "emsa_first_iteration_below_tol": first_below, "rho": rho,
               "predicted_rate_msa": predicted_rate(prob, 0.0), "predicted_rate_emsa": predicted_rate(prob, rho),
               "measured_rate_emsa": measured}
    checks = {"[float64] derived recursion = controltune dlqr (K, P to 1e-12)":
              gain_gap < 1e-12 and value_gap < 1e-12,
              "[float64] p_l = -P_l x_l along the Riccati trajectory (1e-12)": costate_gap < 1e-12,
              f"[float64] E-MSA (rho={rho:g}) error to the Riccati control < {TOLERANCE:g}": emsa[-1] < TOLERANCE,
              "[float64] one E-MSA sweep = u - D_rho^-1 grad J(u) (autograd, 1e-12)": sweep_gap < 1e-12,
              "[float64] basic MSA diverges here (predicted rate > 1 and measured growth)":
              numbers_diverge(plain, predicted_rate(prob, 0.0)),
              "[float64] E-MSA measured rate = predicted rate (within 2%)":
              abs(measured - numbers["predicted_rate_emsa"]) < 0.02 * numbers["predicted_rate_emsa"]}
    return checks, numbers


def sci(value: float) -> str:
    """``3.2\\cdot 10^{-5}`` for 3.2e-05."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}\\cdot 10^{{{int(exponent)}}}"


def numbers_diverge(errors: list[float], rate: float) -> bool:
    return rate > 1 and errors[-1] > 1e3 * errors[0]


def latex_fragment(numbers: dict) -> TexFragment:
    tex = TexFragment(NAME, "Linear-quadratic control: PMP gives the Riccati feedback")
    tex.add("Hamiltonian of step $l$ (state and control costs).",
            "H_l = p_{l+1}^\\top (A_l x_l + B_l u_l) - \\tfrac12 x_l^\\top Q_l x_l - \\tfrac12 u_l^\\top R_l u_l",
            "hamiltonian")
    tex.add("PMP co-state and stationarity.",
            "p_L = -Q_f x_L,\\qquad p_l = A_l^\\top p_{l+1} - Q_l x_l,\\qquad "
            "\\nabla_{u_l} H_l = B_l^\\top p_{l+1} - R_l u_l = 0", "pmp")
    n, m = sp.symbols("n m", integer=True, positive=True)
    A, Q, P_next = (sp.MatrixSymbol(name, n, n) for name in ("A_l", "Q_l", "P_{l+1}"))
    B, R = sp.MatrixSymbol("B_l", n, m), sp.MatrixSymbol("R_l", m, m)
    K = sp.MatrixSymbol("K_l", m, n)
    tex.add("Backward induction from $p_{l+1} = -P_{l+1} x_{l+1}$ (proved for generic $2\\times2$ $A_l$, "
            "$m = 1, 2$) gives the feedback gain", eq(K, sp.Inverse(R + B.T * P_next * B) * B.T * P_next * A), "gain")
    tex.add("and the finite-horizon Riccati recursion ($P_L = Q_f$), with $u_l = -K_l x_l$ and co-state "
            "$p_l = -P_l x_l$ along the optimal trajectory", eq("P_l", Q + A.T * P_next * (A - B * K)), "riccati")
    emsa = numbers["emsa_errors"]
    # Up to the first iteration below the tolerance: later errors are round-off and machine-dependent.
    first = numbers["emsa_first_iteration_below_tol"]
    shown = [k for k in (1, 10, 40, 80, 160) if k < first] + [first]
    row = ",\\ ".join(f"e_{{{k}}} = {sci(emsa[k - 1])}" for k in shown)
    tex.add(f"E-MSA ($\\rho = {numbers['rho']:g}$) on a random stable problem ($n=4$, $m=2$, $L=5$, float64): error "
            "$e_k = \\max_l \\|u_l^{(k)} - u_l^*\\|_\\infty$ to the Riccati control after $k$ iterations "
            f"(below $10^{{-10}}$ from $k = {first}$; round-off level $\\approx 10^{{-15}}$ afterwards).",
            row, "emsa")
    tex.add("For LQ an (E-)MSA sweep is the preconditioned gradient step below, whose predicted linear rate is "
            f"{numbers['predicted_rate_emsa']:.3f} (measured {numbers['measured_rate_emsa']:.3f}); basic MSA "
            f"($\\rho = 0$) has rate {numbers['predicted_rate_msa']:.1f} here and diverges.",
            "u^{(k+1)} = u^{(k)} - D_\\rho^{-1}\\nabla_u J(u^{(k)}),\\qquad "
            "D_\\rho = \\operatorname{blkdiag}_l(R_l + \\rho B_l^\\top B_l)", "msa_rate")
    return tex


def run(out_dir: str | Path = OUT_DIR) -> tuple[dict[str, bool], dict]:
    """All checks (asserted) and the measured numbers of the numerical part; writes the LaTeX."""
    checks: dict[str, bool] = {}
    checks.update(base_case(2))
    for m in (1, 2):
        checks.update(induction_step(2, m))
    checks.update(global_optimum())
    numeric, numbers = numerical_check()
    checks.update(numeric)
    require(checks, NAME)
    latex_fragment(numbers).write(out_dir)
    return checks, numbers


def main(out_dir: str | Path = OUT_DIR) -> dict[str, bool]:
    return run(out_dir)[0]


if __name__ == "__main__":
    results, nums = run()
    report(results)
    print(f"K, P gap to dlqr: {nums['gain_gap_vs_dlqr']:.1e}, {nums['value_gap_vs_dlqr']:.1e}; "
          f"co-state gap {nums['costate_gap']:.1e}")
    print(f"predicted rates: MSA {nums['predicted_rate_msa']:.3f}, E-MSA {nums['predicted_rate_emsa']:.4f}; "
          f"measured E-MSA {nums['measured_rate_emsa']:.4f}")
    for label, key in (("MSA (rho=0)", "msa_errors"), (f"E-MSA (rho={nums['rho']:g})", "emsa_errors")):
        errs = nums[key]
        print(f"{label}: " + " ".join(f"{k + 1}:{e:.2e}" for k, e in enumerate(errs) if k < 10 or (k + 1) % 10 == 0))
    print(f"E-MSA below {TOLERANCE:g} from iteration {nums['emsa_first_iteration_below_tol']}")
