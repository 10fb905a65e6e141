"""The PMP co-state recursion is the reverse-mode chain rule, for GENERIC smooth dynamics (sympy).

System (DESIGN.md §1): a residual system of L = 3 layers with state ``x_l ∈ R^n`` (n = 1 and 2),

    x_{l+1} = f_l(x_l, u_l) = x_l + g_l(x_l, u_l),
    J = Φ(x_L) + Σ_l R_l(u_l),

where ``g_l``, ``Φ`` and ``R_l`` are *undefined* sympy functions (any smooth maps), so nothing below
depends on the form of a Transformer block.  The controls are ``u_0 = u_2 = θ`` (one control
*shared* by layers 0 and 2, like a tied delta or a global subspace vector) and ``u_1`` (a
control of layer 1 alone, 2-d when n = 2).  With the Hamiltonian
``H_l(x, p, u) = p·f_l(x, u) − R_l(u)`` and the co-state

    p_L = −∂Φ/∂x_L,        p_l = ∇_x H_l(x_l, p_{l+1}, u_l) = (∂f_l/∂x)ᵀ p_{l+1},

the script proves (each difference ``expand``s to exactly zero):

1. ``p_l = −∂J/∂x_l`` for l = 0 .. L−1, where ``∂J/∂x_l`` differentiates the cost-to-go of a
   free state ``x_l`` through the later layers (ordinary backpropagation);
2. ``∇_{u_1} H_1(x_1, p_2, u_1) = −∂J/∂u_1`` (p held fixed inside H, as PMP prescribes);
3. ``∇_θ H_0 + ∇_θ H_2 = −∂J/∂θ`` for the shared control, and that one layer's part alone is
   NOT the gradient (``∇_θ H_0 + ∂J/∂θ ≠ 0``), so the sum over the control's layers is needed;
4. the same with running costs that also depend on the state, ``R_l(x_l, u_l)``: then
   ``p_l = ∇_x H_l = (∂f_l/∂x)ᵀ p_{l+1} − ∂R_l/∂x`` (the form lq_riccati.py uses);
5. DESIGN.md's batch form (S = 2 samples sharing the controls, ``J = (1/S) Σ_s Φ(x_{s,L}, y_s) + Σ_l R_l``):
   ``p_{s,L} = −(1/S) ∂Φ/∂x_{s,L}`` gives ``p_{s,l} = −∂J/∂x_{s,l}`` and ``∇_u H_l = −∂J/∂u_l`` with
   ``H_l = Σ_s p_{s,l+1}·f_l(x_{s,l}, u) − R_l(u)`` (a control shared by the samples, like one shared by layers).

Run: ``python derivations/pmp_chain_rule.py`` (prints each identity, asserts it, writes
``derivations/out/pmp_chain_rule.tex``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, TexFragment, eq, nonzero_witness, report, require, vanishes, vec  # noqa: E402

NAME = "pmp_chain_rule"
N_LAYERS = 3
SHARED_LAYERS = (0, 2)  # layers where θ acts


class GenericSystem:
    """``x_{l+1} = x_l + g_l(x_l, u_l)``, ``J = Φ(x_L) + Σ_l R_l(·)`` with undefined g, Φ, R.

    Args:
        n: state dimension.
        state_cost: running costs ``R_l(x_l, u_l)`` instead of ``R_l(u_l)``.
    """

    def __init__(self, n: int, state_cost: bool) -> None:
        self.n, self.state_cost = n, state_cost
        self.theta = vec("theta", 1)
        self.u1 = vec("u1", 1 if n == 1 else 2)
        self.controls = [self.theta if layer in SHARED_LAYERS else self.u1 for layer in range(N_LAYERS)]
        self.g = [[sp.Function(f"g_{{{layer}{i}}}") for i in range(n)] for layer in range(N_LAYERS)]
        self.R = [sp.Function(f"R_{{{layer}}}") for layer in range(N_LAYERS)]
        self.Phi = sp.Function("Phi")
        self.x0 = vec("x0", n)
        self.states = [self.x0]
        for layer in range(N_LAYERS):
            self.states.append(self.f(layer, self.states[-1], self.controls[layer]))
        self.J = self.cost_to_go(0, self.x0)

    def f(self, layer: int, x: sp.Matrix, u: sp.Matrix) -> sp.Matrix:
        return x + sp.Matrix([g(*x, *u) for g in self.g[layer]])

    def running(self, layer: int, x: sp.Matrix, u: sp.Matrix) -> sp.Expr:
        return self.R[layer](*x, *u) if self.state_cost else self.R[layer](*u)

    def cost_to_go(self, layer: int, x: sp.Matrix) -> sp.Expr:
        """``Σ_{k ≥ layer} R_k + Φ(x_L)`` from the state ``x`` entering ``layer``."""
        total = sp.Integer(0)
        for k in range(layer, N_LAYERS):
            total += self.running(k, x, self.controls[k])
            x = self.f(k, x, self.controls[k])
        return total + self.Phi(*x)

    def hamiltonian(self, layer: int, x: sp.Matrix, p: sp.Matrix, u: sp.Matrix) -> sp.Expr:
        """``H_l(x, p, u) = p·f_l(x, u) − R_l``."""
        return (p.T * self.f(layer, x, u))[0] - self.running(layer, x, u)

    def costates(self) -> list[sp.Matrix]:
        """``p_L = −∂Φ/∂x_L``, ``p_l = ∇_x H_l(x_l, p_{l+1}, u_l)``, evaluated on the trajectory."""
        z, p_sym = vec("z", self.n), vec("q", self.n)
        at = lambda x: dict(zip(z, x))  # noqa: E731
        p = [None] * (N_LAYERS + 1)
        p[N_LAYERS] = -grad(self.Phi(*z), z).subs(at(self.states[-1]), simultaneous=True)
        for layer in reversed(range(N_LAYERS)):
            dH = grad(self.hamiltonian(layer, z, p_sym, self.controls[layer]), z)
            p[layer] = dH.subs({**at(self.states[layer]), **dict(zip(p_sym, p[layer + 1]))}, simultaneous=True)
        return p

    def grad_u_hamiltonian(self, layer: int, p_next: sp.Matrix) -> sp.Matrix:
        """``∇_u H_l(x_l, p_{l+1}, u)`` at ``u = u_l`` with x_l and p_{l+1} held fixed."""
        z, p_sym, v = vec("z", self.n), vec("q", self.n), vec("v", len(self.controls[layer]))
        dH = grad(self.hamiltonian(layer, z, p_sym, v), v)
        sub = {**dict(zip(z, self.states[layer])), **dict(zip(p_sym, p_next)), **dict(zip(v, self.controls[layer]))}
        return dH.subs(sub, simultaneous=True)


def grad(expr: sp.Expr, wrt: sp.Matrix) -> sp.Matrix:
    return sp.Matrix([sp.diff(expr, w) for w in wrt])


def check_system(n: int, state_cost: bool) -> dict[str, bool]:
    sys_ = GenericSystem(n, state_cost)
    tag = f"n={n}, R_l({'x,u' if state_cost else 'u'})"
    p = sys_.costates()
    checks: dict[str, bool] = {}
    z = vec("z", n)
    for layer in range(N_LAYERS):
        dJ = grad(sys_.cost_to_go(layer, z), z).subs(dict(zip(z, sys_.states[layer])), simultaneous=True)
        checks[f"[{tag}] p_{layer} = -dJ/dx_{layer}"] = vanishes(p[layer] + dJ)
    checks[f"[{tag}] grad_u1 H_1 = -dJ/du_1"] = vanishes(sys_.grad_u_hamiltonian(1, p[2]) + grad(sys_.J, sys_.u1))
    dJ_theta = grad(sys_.J, sys_.theta)
    parts = [sys_.grad_u_hamiltonian(layer, p[layer + 1]) for layer in SHARED_LAYERS]
    checks[f"[{tag}] grad_theta (H_0 + H_2) = -dJ/dtheta (shared control)"] = vanishes(parts[0] + parts[1] + dJ_theta)
    # A counterexample (concrete g, Φ, R at a rational point) shows one layer's part is not the gradient.
    point = {s: sp.Rational(k + 2, 7) for k, s in enumerate([*sys_.x0, *sys_.theta, *sys_.u1])}
    checks[f"[{tag}] grad_theta H_0 alone != -dJ/dtheta"] = nonzero_witness(parts[0] + dJ_theta, point)
    return checks


def check_batch(n_samples: int = 2, n_layers: int = 2) -> dict[str, bool]:
    """DESIGN.md's batch form: J = (1/S) Σ_s Φ(x_{s,L}, y_s) + Σ_l R_l(u_l), controls shared by the S samples.

    ``p_{s,L} = −(1/S) ∂Φ/∂x_{s,L}``, ``p_{s,l} = (∂f_l/∂x)(x_{s,l}) p_{s,l+1}`` and
    ``H_l = Σ_s p_{s,l+1} f_l(x_{s,l}, u) − R_l(u)`` (scalar states, generic g_l, Φ, R_l).
    """
    g = [sp.Function(f"g_{layer}") for layer in range(n_layers)]
    R = [sp.Function(f"R_{layer}") for layer in range(n_layers)]
    Phi = sp.Function("Phi")
    u = sp.symbols(f"u_0:{n_layers}")
    x0, y = sp.symbols(f"x_0:{n_samples}"), sp.symbols(f"y_0:{n_samples}")
    z, v = sp.symbols("z v")
    S = sp.Integer(n_samples)

    def f(layer: int, x: sp.Expr, control: sp.Expr) -> sp.Expr:
        return x + g[layer](x, control)

    states = []  # states[s][l]
    for s_ in range(n_samples):
        xs = [x0[s_]]
        for layer in range(n_layers):
            xs.append(f(layer, xs[-1], u[layer]))
        states.append(xs)
    J = sum(Phi(states[s_][-1], y[s_]) for s_ in range(n_samples)) / S + sum(R[k](u[k]) for k in range(n_layers))
    p = [[None] * (n_layers + 1) for _ in range(n_samples)]
    checks: dict[str, bool] = {}
    for s_ in range(n_samples):
        p[s_][n_layers] = -sp.diff(Phi(z, y[s_]), z).subs(z, states[s_][-1]) / S
        for layer in reversed(range(n_layers)):
            p[s_][layer] = sp.diff(f(layer, z, u[layer]), z).subs(z, states[s_][layer]) * p[s_][layer + 1]
        for layer in range(n_layers):
            later = z
            for k in range(layer, n_layers):
                later = f(k, later, u[k])
            dJ = sp.diff(Phi(later, y[s_]) / S, z).subs(z, states[s_][layer])
            checks[f"[batch S={n_samples}] p_(s={s_},{layer}) = -dJ/dx_(s,{layer})"] = vanishes(p[s_][layer] + dJ)
    p_free, x_free = sp.symbols(f"q_0:{n_samples}"), sp.symbols(f"w_0:{n_samples}")
    for layer in range(n_layers):
        H = sum(p_free[s_] * f(layer, x_free[s_], v) for s_ in range(n_samples)) - R[layer](v)
        sub = {v: u[layer], **{p_free[s_]: p[s_][layer + 1] for s_ in range(n_samples)},
               **{x_free[s_]: states[s_][layer] for s_ in range(n_samples)}}
        dH = sp.diff(H, v).subs(sub, simultaneous=True)
        checks[f"[batch S={n_samples}] grad_u H_{layer} (sum over samples) = -dJ/du_{layer}"] = vanishes(
            dH + sp.diff(J, u[layer]))
    return checks


def latex_fragment() -> TexFragment:
    """The recursion and its unrolled scalar form, with the states ``x_l`` as plain symbols."""
    tex = TexFragment(NAME, "PMP co-states are the reverse-mode chain rule (generic residual system)")
    x = sp.symbols("x_0:4")
    theta, u1 = sp.symbols("theta u_1")
    g = [sp.Function(f"g_{layer}") for layer in range(N_LAYERS)]
    R = [sp.Function(f"R_{layer}") for layer in range(N_LAYERS)]
    Phi = sp.Function("Phi")
    controls = [theta, u1, theta]
    p_next = sp.Symbol("p_{l+1}")
    xl, ul = sp.symbols("x_l u_l")
    gl, Rl = sp.Function("g_l"), sp.Function("R_l")
    H = p_next * (xl + gl(xl, ul)) - Rl(ul)
    tex.add("Residual dynamics with generic smooth $g_l$, terminal cost $\\Phi$ and running costs $R_l$.",
            eq("x_{l+1}", xl + gl(xl, ul)), "dynamics")
    tex.add("Hamiltonian of layer $l$ (sign convention of DESIGN.md).", eq("H_l", H), "hamiltonian")
    tex.add("Co-state recursion: $p_L = -\\partial\\Phi/\\partial x_L$ and $p_l = \\nabla_x H_l$.",
            eq("p_l", sp.diff(H, xl)), "costate")
    # Unrolled scalar co-state of the 3-layer chain, states as symbols.
    p = -sp.diff(Phi(x[3]), x[3])
    for layer in reversed(range(N_LAYERS)):
        p = sp.diff(x[layer] + g[layer](x[layer], controls[layer]), x[layer]) * p
    tex.add("Unrolled for $L=3$ (scalar state), this is exactly backpropagation: proved "
            "$p_l = -\\partial J/\\partial x_l$ for $n=1,2$.", eq("p_0", p) + " = -\\frac{\\partial J}{\\partial x_0}",
            "unrolled")
    shared = sum(sp.diff(sp.Symbol(f"p_{k + 1}") * (x[k] + g[k](x[k], theta)) - R[k](theta), theta)
                 for k in SHARED_LAYERS)
    tex.add("A control $\\theta$ shared by layers 0 and 2: the gradient is the sum of the layers' parts "
            "(one part alone is not).", eq("\\nabla_\\theta H_0 + \\nabla_\\theta H_2", shared)
            + " = -\\frac{\\partial J}{\\partial \\theta}", "shared")
    tex.add("Own control of layer 1.", eq("\\nabla_{u_1} H_1", sp.Symbol("p_2") * sp.diff(g[1](x[1], u1), u1)
                                          - sp.diff(R[1](u1), u1)) + " = -\\frac{\\partial J}{\\partial u_1}",
            "own")
    S, s_ = sp.symbols("S s")
    p_sL, x_sl, p_sl1 = sp.Symbol("p_{s,L}"), sp.Symbol("x_{s,l}"), sp.Symbol("p_{s,l+1}")
    tex.add("Batch form (controls shared by the $S$ samples of the batch, $J = \\frac1S\\sum_s\\Phi + \\sum_l R_l$).",
            eq(p_sL, -sp.Derivative(Phi(sp.Symbol("x_{s,L}")), sp.Symbol("x_{s,L}")) / S) + ",\\qquad "
            + eq("H_l", sp.Sum(p_sl1 * (x_sl + gl(x_sl, ul)), (s_, 1, S)) - Rl(ul)), "batch")
    Hx = p_next * (xl + gl(xl, ul)) - Rl(xl, ul)
    tex.add("With state-dependent running costs $R_l(x_l,u_l)$ the same identities hold with",
            eq("p_l", sp.diff(Hx, xl)), "costate_state_cost")
    return tex


def main(out_dir: str | Path = OUT_DIR) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    for state_cost in (False, True):
        for n in (1, 2):
            checks.update(check_system(n, state_cost))
    checks.update(check_batch())
    require(checks, NAME)
    latex_fragment().write(out_dir)
    return checks


if __name__ == "__main__":
    report(main())
