"""Symbolic check of the PMP identities of DESIGN.md §1 on a two-layer residual
system with a LoRA control, in exact arithmetic (sympy).

System: ``x_{l+1} = f_l(x_l, u_l) = x_l + σ((W_l + s B_l A_l) x_l)`` with the
polynomial activation ``σ(z) = z − z³/3`` (tanh to third order: the identities do
not depend on σ, and a polynomial keeps every check an exact polynomial identity), ``u_l = (A_l, B_l)``,
cost ``J = ½‖x_2 − y‖² + Σ_l (λ/2)(‖A_l‖² + ‖B_l‖²)``.
Hamiltonian ``H_l = p_{l+1}·f_l(x_l, u_l) − R_l(u_l)``; co-state ``p_2 = −∂Φ/∂x_2``,
``p_l = (∂f_l/∂x)ᵀ p_{l+1}``.  Derived and checked:

1. ``p_l = −∂J/∂x_l`` for l = 0, 1, 2;
2. ``∇_{u_l} H_l = −∂J/∂u_l`` for every entry of A_l, B_l;
3. the closed forms ``∇_A H_l = s Bᵀ (g ⊙ p_{l+1}) x_lᵀ − λA`` and
   ``∇_B H_l = s (g ⊙ p_{l+1}) (A x_l)ᵀ − λB`` with ``g = σ'(z_l) = 1 − z_l²``, used by
   ``controltune.pmp`` for LoRA and by the co-state LoRA initialisation.

Run: ``python derivations/costate.py`` (prints each identity, asserts it, and writes
``derivations/out/costate.tex``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, TexFragment, report, require  # noqa: E402

NAME = "costate"

D, R = 2, 1


def sigma(z: sp.Expr) -> sp.Expr:
    return z - z**3 / 3


_POINTS: list[dict] = []


def is_zero(expr: sp.Expr) -> bool:
    """Polynomial identity test (Schwartz–Zippel): exact rational evaluation at random
    points; a non-zero polynomial of degree k vanishes at a uniform point of
    {1..N}^n with probability <= k/N (here <= 27/10⁶ per point, 3 points)."""
    return all(expr.xreplace(pt) == 0 for pt in _POINTS)


def _draw_points(symbols: set[sp.Symbol], n: int = 3, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    _POINTS.clear()
    for _ in range(n):
        _POINTS.append({sym: sp.Rational(rng.randint(1, 10**6), 10**6) for sym in symbols})


def mat(name: str, rows: int, cols: int) -> sp.Matrix:
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{i}{j}"))


def derive() -> dict[str, bool]:
    s, lam = sp.Symbol("s"), sp.Symbol("lambda")
    x0, y = mat("x0", D, 1), mat("y", D, 1)
    W = [mat(f"W{layer}", D, D) for layer in range(2)]
    A = [mat(f"A{layer}", R, D) for layer in range(2)]
    B = [mat(f"B{layer}", D, R) for layer in range(2)]

    def f(layer: int, x: sp.Matrix) -> sp.Matrix:
        return x + ((W[layer] + s * B[layer] * A[layer]) * x).applyfunc(sigma)

    xs = [x0]
    for layer in range(2):
        xs.append(f(layer, xs[-1]))
    running = sum(lam / 2 * (sum(a**2 for a in A[k]) + sum(b**2 for b in B[k])) for k in range(2))
    phi = sum((xs[2][i] - y[i]) ** 2 for i in range(D)) / 2
    J = phi + running

    # Co-states from the Hamiltonian, with x_l kept as free symbols so ∂/∂x is local.
    free = [mat(f"z{layer}", D, 1) for layer in range(3)]
    phi_free = sum((free[2][i] - y[i]) ** 2 for i in range(D)) / 2
    p = [None, None, -sp.Matrix([sp.diff(phi_free, free[2][i]) for i in range(D)]).subs(dict(zip(free[2], xs[2])))]
    for layer in (1, 0):
        jac = f(layer, free[layer]).jacobian(free[layer]).subs(dict(zip(free[layer], xs[layer])))
        p[layer] = jac.T * p[layer + 1]

    checks: dict[str, bool] = {}
    _draw_points(J.free_symbols | {sym for m in free for sym in m} | {sp.Symbol(f"p{k}_{i}0") for k in (1, 2)
                                                                      for i in range(D)})
    # 1. p_l = -dJ/dx_l: differentiate J through the later layers from a free x_l.
    for layer in (0, 1):
        x = free[layer]
        later = x
        for k in range(layer, 2):
            later = f(k, later)
        j_from = sum((later[i] - y[i]) ** 2 for i in range(D)) / 2
        grad = sp.Matrix([sp.diff(j_from, x[i]) for i in range(D)]).subs(dict(zip(x, xs[layer])))
        checks[f"p_{layer} = -dJ/dx_{layer}"] = all(is_zero(e) for e in p[layer] + grad)

    # 2./3. Hamiltonian gradients.
    for layer in (0, 1):
        z = (W[layer] + s * B[layer] * A[layer]) * xs[layer]
        g = z.applyfunc(lambda v: 1 - v**2)
        gp = sp.matrix_multiply_elementwise(g, p[layer + 1])
        closed_A = s * B[layer].T * gp * xs[layer].T - lam * A[layer]
        closed_B = s * gp * (A[layer] * xs[layer]).T - lam * B[layer]
        # p_{l+1} is held fixed in H: differentiate H with p as constants.
        p_sym = mat(f"p{layer + 1}", D, 1)
        H_free = (p_sym.T * f(layer, xs[layer]))[0] - lam / 2 * (
            sum(a**2 for a in A[layer]) + sum(b**2 for b in B[layer]))
        sub = dict(zip(p_sym, p[layer + 1]))
        ok_J, ok_A, ok_B = True, True, True
        for k, a in enumerate(A[layer]):
            dH = sp.diff(H_free, a).subs(sub)
            ok_J &= is_zero(dH + sp.diff(J, a))
            ok_A &= is_zero(dH - closed_A[k])
        for k, b in enumerate(B[layer]):
            dH = sp.diff(H_free, b).subs(sub)
            ok_J &= is_zero(dH + sp.diff(J, b))
            ok_B &= is_zero(dH - closed_B[k])
        checks[f"grad_u H_{layer} = -dJ/du_{layer}"] = bool(ok_J)
        checks[f"closed form grad_A H_{layer}"] = bool(ok_A)
        checks[f"closed form grad_B H_{layer}"] = bool(ok_B)
    return checks


def latex_fragment() -> TexFragment:
    """The identities checked by :func:`derive`, as LaTeX."""
    tex = TexFragment(NAME, "PMP identities and the LoRA Hamiltonian gradient (two-layer residual system)")
    tex.add("Dynamics with a LoRA control $u_l = (A_l, B_l)$, polynomial activation "
            "$\\sigma(z) = z - z^3/3$, and cost (exact rational arithmetic, $d = 2$, $r = 1$):",
            "x_{l+1} = x_l + \\sigma\\big((W_l + s B_l A_l) x_l\\big),\\qquad "
            "J = \\tfrac12\\|x_2 - y\\|^2 + \\sum_l \\tfrac{\\lambda}{2}(\\|A_l\\|^2 + \\|B_l\\|^2)",
            "system")
    tex.add("The co-state of the Hamiltonian $H_l = p_{l+1}\\cdot f_l(x_l, u_l) - R_l(u_l)$ is the negative "
            "adjoint of backpropagation, and $\\nabla_u H$ the negative gradient:",
            "p_l = \\Big(\\frac{\\partial f_l}{\\partial x}\\Big)^{\\!\\top} p_{l+1} = "
            "-\\frac{\\partial J}{\\partial x_l},\\qquad \\nabla_{u_l} H_l = -\\frac{\\partial J}{\\partial u_l}",
            "pmp")
    tex.add("Closed forms used by \\texttt{controltune.pmp} and the co-state LoRA initialisation, with "
            "$g = \\sigma'(z_l)$, $z_l = (W_l + sB_lA_l)x_l$:",
            "\\nabla_A H_l = s B_l^{\\top} (g \\odot p_{l+1}) x_l^{\\top} - \\lambda A_l,\\qquad "
            "\\nabla_B H_l = s (g \\odot p_{l+1}) (A_l x_l)^{\\top} - \\lambda B_l",
            "lora_grad")
    return tex


def main(out_dir: str | Path = OUT_DIR) -> dict[str, bool]:
    checks = derive()
    require(checks, NAME)
    latex_fragment().write(out_dir)
    return checks


if __name__ == "__main__":
    report(main())
