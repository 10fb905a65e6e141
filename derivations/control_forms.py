"""Control forms G of the delta-tuning controllers, derived from each method's definition (sympy).

Setting: a symbolic block of width d = 2 in the row-vector convention of PyTorch (a token is a row
``x ∈ R^{1×d}``; a linear map is ``x ↦ x Wᵀ + b`` with ``W ∈ R^{d_out×d_in}``), one attention head
``Attn(q, K, V) = softmax(c·q Kᵀ) V`` over T = 2 keys (``c`` the symbolic scale, ``softmax`` with
explicit exponentials), and an FFN ``σ(x W_1ᵀ + b_1) W_2ᵀ + b_2`` of width 3 with a GENERIC smooth
activation σ (an undefined sympy function), so nothing depends on GELU/ReLU.  For each method the
script builds the block as the method defines it, subtracts the frozen block, and proves
(difference ``expand``s / ``cancel``s to zero) that the additive change is the He et al. unified form

    Δh = s · f(x W_down) W_up          (DESIGN.md §2)

with the W_down, f, W_up stated below (row-vector convention, so W_down = Aᵀ for a torch A):

* LoRA, ``W → W + s B A`` (A ∈ R^{r×d_in}, B ∈ R^{d_out×r}): ``Δh = s x Aᵀ Bᵀ`` (W_down = Aᵀ, f = id,
  W_up = Bᵀ).  On the value map of a head the change of the head output is the same form read at the
  attention-averaged input ``x̄_t = Σ_j a_tj x_j``: ``Δ = s x̄_t Aᵀ Bᵀ``.  On the query map it is
  ``Δq = s x Aᵀ Bᵀ`` but the head output is NOT additive in s (non-zero ∂²/∂s², shown by a witness).
* sequential adapter (Houlsby/Pfeiffer) on a sub-block output h: ``Δh = s(φ(h W_down + b_down) W_up + b_up)``
  (f = φ, generic); parallel adapter on the FFN: the same with the FFN *input* x.
* prefix tuning of one head: ``Attn(q, [P_k; K], [P_v; V]) = (1 − λ(q)) Attn(q, K, V) + λ(q) softmax(c q P_kᵀ) P_v``
  with ``λ(q) = Σ_i e^{c q·P_k,i} / (Σ_i e^{c q·P_k,i} + Σ_j e^{c q·k_j})``: a gated parallel adapter
  ``Δh = λ(x)(softmax(x W_qᵀ (c P_k)ᵀ) P_v − h)`` with W_down = c W_qᵀ P_kᵀ, f = softmax, W_up = P_v.
* (IA)³: output scaling ``y ↦ y ⊙ ℓ`` gives ``Δh = (x Wᵀ + b) diag(ℓ − 1)`` (W_down = Wᵀ with its bias,
  f = id, W_up = diag(ℓ − 1)); input scaling of the FFN output map ``a ↦ a ⊙ ℓ`` gives
  ``Δh = σ(x W_1ᵀ + b_1) diag(ℓ − 1) W_2ᵀ``: a parallel adapter whose down projection is the FROZEN
  W_1 (bottleneck d_ff, f = σ) and whose up projection is ``diag(ℓ − 1) W_2ᵀ``.
* BitFit: on a bias the block writes to the residual stream (attention output, FFN output, norm β),
  ``Δh = Δb``, a constant (state-independent, ``∂Δh/∂x = 0``) control; on the FFN's inner bias the
  change is state-dependent, ``Δh = (σ'(x W_1ᵀ + b_1) ⊙ Δb_1) W_2ᵀ + O(‖Δb_1‖²)``.
* state-based parallel control (Zhang et al., ICML 2025) beside the FFN sub-block of block l:
  ``x_{l+1} = ffn_l(m_l) + s m_l Aᵀ Bᵀ`` with m_l the state entering the sub-block (W_down = Aᵀ, f = id,
  W_up = Bᵀ, read before the FFN norm when pre-LN, added after LN_2 when post-LN); pre-LN it is a LoRA
  of the residual stream's identity path, ``m (I + s AᵀBᵀ) + FFN(N m)``, with a constant state Jacobian s B A.
* prompt tuning: an initial control, ``x_0 ↦ [P; x_0]``, the blocks unchanged; at the first attention
  layer a real token sees exactly prefix tuning with ``P_k = P W_kᵀ + b_k``, ``P_v = P W_vᵀ + b_v``, i.e.
  the gated adapter above with ``λ`` from the prompt's keys.

The numerical cross-check (float64, random:bert, one wrapped linear each) compares controltune's
LoRA, (IA)³ and adapter deltas, and its prefix attention kernel, with these closed forms.

Run: ``python derivations/control_forms.py`` (writes ``derivations/out/control_forms.tex``).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT_DIR, TexFragment, eq, mat, nonzero_witness, report, require, vanishes  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

NAME = "control_forms"
D, T, D_FF, RANK, N_PREFIX = 2, 2, 3, 2, 2
sigma, phi = sp.Function("sigma"), sp.Function("phi")
s, c = sp.symbols("s c", positive=True)


# --- block primitives (rows are tokens) ------------------------------------------------------

def linear(X: sp.Matrix, W: sp.Matrix, b: sp.Matrix) -> sp.Matrix:
    """``X Wᵀ + 1 b`` for X ``rows×d_in``, W ``d_out×d_in``, b ``1×d_out``."""
    return X * W.T + sp.ones(X.rows, 1) * b


def softmax(z: sp.Matrix) -> sp.Matrix:
    e = z.applyfunc(sp.exp)
    return e / sum(e)


def attention(q: sp.Matrix, K: sp.Matrix, V: sp.Matrix) -> sp.Matrix:
    """``softmax(c q Kᵀ) V`` for one query row q."""
    return softmax(c * q * K.T) * V


def ffn(X: sp.Matrix, W1: sp.Matrix, b1: sp.Matrix, W2: sp.Matrix, b2: sp.Matrix,
        a1: sp.Matrix | None = None) -> sp.Matrix:
    """``σ(X W_1ᵀ + b_1) W_2ᵀ + b_2``; ``a1`` optionally replaces the activation σ(·) (a hook)."""
    a = linear(X, W1, b1).applyfunc(sigma) if a1 is None else a1
    return linear(a, W2, b2)


def applied(name: str, arg: sp.MatrixExpr) -> sp.MatrixSymbol:
    """A matrix symbol printed ``name(arg)``: an element-wise map of a matrix expression, for LaTeX only."""
    return sp.MatrixSymbol(f"{name}\\left({sp.latex(arg)}\\right)", *arg.shape)


class Block:
    """Frozen weights of the symbolic block and a token x (1×d) in a sequence X (T×d)."""

    def __init__(self) -> None:
        self.x = mat("x", 1, D)
        self.X = mat("X", T, D)
        self.W, self.b = mat("W", D, D), mat("b", 1, D)
        self.Wq, self.Wk, self.Wv = mat("W^q", D, D), mat("W^k", D, D), mat("W^v", D, D)
        self.bq, self.bk, self.bv = mat("b^q", 1, D), mat("b^k", 1, D), mat("b^v", 1, D)
        self.W1, self.b1 = mat("W^1", D_FF, D), mat("b^1", 1, D_FF)
        self.W2, self.b2 = mat("W^2", D, D_FF), mat("b^2", 1, D)

    def head(self, t: int, Wq: sp.Matrix | None = None, Wv: sp.Matrix | None = None) -> sp.Matrix:
        """Head output at position t of X (weights overridable for the method under study)."""
        Wq = self.Wq if Wq is None else Wq
        Wv = self.Wv if Wv is None else Wv
        q = linear(self.X[t, :], Wq, self.bq)
        return attention(q, linear(self.X, self.Wk, self.bk), linear(self.X, Wv, self.bv))

    def ffn(self, X: sp.Matrix) -> sp.Matrix:
        return ffn(X, self.W1, self.b1, self.W2, self.b2)


# --- the methods ------------------------------------------------------------------------------

def lora(blk: Block, tex: TexFragment) -> dict[str, bool]:
    A, B = mat("A", RANK, D), mat("B", D, RANK)
    dh = linear(blk.x, blk.W + s * B * A, blk.b) - linear(blk.x, blk.W, blk.b)
    unified = s * blk.x * A.T * B.T
    checks = {"LoRA on a linear map: dh = s x A^T B^T": vanishes(dh - unified)}
    # On W_v: the head output moves by the same form at the attention-averaged input.
    t = 0
    weights = softmax(c * linear(blk.X[t, :], blk.Wq, blk.bq) * linear(blk.X, blk.Wk, blk.bk).T)
    x_bar = weights * blk.X
    d_head = blk.head(t, Wv=blk.Wv + s * B * A) - blk.head(t)
    checks["LoRA on W_v: d head = s xbar A^T B^T, xbar = softmax(.) X"] = vanishes(d_head - s * x_bar * A.T * B.T)
    # On W_q: additive on the query, but the head output is not linear in s (softmax).
    d_q = linear(blk.x, blk.Wq + s * B * A, blk.bq) - linear(blk.x, blk.Wq, blk.bq)
    checks["LoRA on W_q: dq = s x A^T B^T"] = vanishes(d_q - s * blk.x * A.T * B.T)
    head_q = blk.head(t, Wq=blk.Wq + s * B * A)
    rng = random.Random(0)
    point = {sym: sp.Rational(rng.choice([-1, 1]) * rng.randint(1, 9), 5)
             for sym in sorted(head_q.free_symbols - {s}, key=str)}
    second = sp.diff(head_q.xreplace(point), s, 2).subs(s, 1)
    # A 40-digit evaluation of a closed form in exponentials of rationals: far from round-off.
    checks["LoRA on W_q: head output not linear in s (d2/ds2 != 0 at a point)"] = any(
        abs(sp.N(v, 40)) > 1e-20 for v in second)
    xs, As, Bs = sp.MatrixSymbol("x", 1, D), sp.MatrixSymbol("A", RANK, D), sp.MatrixSymbol("B", D, RANK)
    tex.add("LoRA ($W \\to W + sBA$) on a linear map: $W_{\\rm down} = A^\\top$, $f = \\mathrm{id}$, "
            "$W_{\\rm up} = B^\\top$; on $W_v$ the same form at the attention-averaged input $\\bar x_t$.",
            eq("\\Delta h", s * xs * As.T * Bs.T) + ",\\qquad "
            + eq("\\Delta\\,\\mathrm{head}_t", s * sp.MatrixSymbol("\\bar{x}_t", 1, D) * As.T * Bs.T), "lora")
    return checks


def adapters(blk: Block, tex: TexFragment) -> dict[str, bool]:
    m = 2
    Wd, bd, Wu, bu = mat("W^d", D, m), mat("b^d", 1, m), mat("W^u", m, D), mat("b^u", 1, D)

    def bottleneck(h: sp.Matrix) -> sp.Matrix:
        return s * ((h * Wd + bd).applyfunc(phi) * Wu + bu)

    x = blk.x
    h = blk.ffn(x)
    frozen = x + h  # residual update of a pre-LN FFN sub-block (the norm is inside F for post-LN)
    sequential = x + (h + bottleneck(h))  # adapter after the FFN output map
    parallel = x + (h + bottleneck(x))  # adapter reading the FFN input, added to its output
    checks = {"sequential adapter: dh = s(phi(h W_down + b_down) W_up + b_up), h = FFN(x)":
              vanishes(sequential - frozen - s * ((h * Wd + bd).applyfunc(phi) * Wu + bu)),
              "parallel adapter: dh = s(phi(x W_down + b_down) W_up + b_up)":
              vanishes(parallel - frozen - s * ((x * Wd + bd).applyfunc(phi) * Wu + bu))}
    hs, xs = sp.MatrixSymbol("h", 1, D), sp.MatrixSymbol("x", 1, D)
    Wds, Wus = sp.MatrixSymbol("W_{down}", D, m), sp.MatrixSymbol("W_{up}", m, D)
    bds, bus = sp.MatrixSymbol("b_{down}", 1, m), sp.MatrixSymbol("b_{up}", 1, D)
    tex.add("Sequential adapter on a sub-block output $h = F(x)$ ($f = \\varphi$, any activation).",
            eq("\\Delta h", s * (applied("\\varphi", hs * Wds + bds) * Wus + bus)), "adapter_sequential")
    tex.add("Parallel adapter on the FFN: the same form read at the sub-block input $x$.",
            eq("\\Delta h", s * (applied("\\varphi", xs * Wds + bds) * Wus + bus)), "adapter_parallel")
    return checks


def prefix(blk: Block, tex: TexFragment) -> dict[str, bool]:
    q, K, V = mat("q", 1, D), mat("k", T, D), mat("v", T, D)
    Pk, Pv = mat("P^k", N_PREFIX, D), mat("P^v", N_PREFIX, D)
    z_prefix = sum((c * q * Pk.T).applyfunc(sp.exp))
    z_keys = sum((c * q * K.T).applyfunc(sp.exp))
    lam = z_prefix / (z_prefix + z_keys)
    prefixed = attention(q, Pk.col_join(K), Pv.col_join(V))
    gated = (1 - lam) * attention(q, K, V) + lam * softmax(c * q * Pk.T) * Pv
    checks = {"prefix tuning = gated parallel adapter (one head)": vanishes(prefixed - gated)}
    # Unified form in x: q = x W_qᵀ (+ b_q); Δh = λ (softmax(x W_down) W_up − h) with W_down = c W_qᵀ P_kᵀ.
    x = blk.x
    qx = linear(x, blk.Wq, blk.bq)
    h = attention(qx, K, V)
    lam_x = lam.subs(dict(zip(q, qx)), simultaneous=True)
    W_down, b_down = c * blk.Wq.T * Pk.T, c * blk.bq * Pk.T
    unified = lam_x * (softmax(x * W_down + b_down) * Pv - h)
    checks["prefix: dh = lambda(x)(softmax(x W_down + b_down) P_v - h), W_down = c W_q^T P_k^T"] = vanishes(
        attention(qx, Pk.col_join(K), Pv.col_join(V)) - h - unified)
    qs, Pks, Pvs = sp.MatrixSymbol("q", 1, D), sp.MatrixSymbol("P_k", N_PREFIX, D), sp.MatrixSymbol("P_v", N_PREFIX, D)
    softmax_p = sp.latex(applied("\\mathrm{softmax}", c * qs * Pks.T) * Pvs)
    tex.add("Prefix tuning of one head is a gated mixture (proved with explicit exponentials, $T = 2$ keys, "
            "2 prefix rows) ...", "\\mathrm{Attn}(q, [P_k; K], [P_v; V]) = (1 - \\lambda(q))\\,\\mathrm{Attn}(q, K, V)"
            f" + \\lambda(q)\\, {softmax_p}", "prefix")
    i, j = sp.symbols("i j")
    pk_i, k_j = sp.Symbol("q \\cdot P_{k,i}"), sp.Symbol("q \\cdot k_j")
    gate = sp.Sum(sp.exp(c * pk_i), (i, 1, N_PREFIX))
    tex.add("... with the gate", eq("\\lambda(q)", gate / (gate + sp.Sum(sp.exp(c * k_j), (j, 1, T)))), "prefix_gate")
    xs, Wqs = sp.MatrixSymbol("x", 1, D), sp.MatrixSymbol("W_q", D, D)
    adapter = sp.latex(applied("\\mathrm{softmax}", c * xs * Wqs.T * Pks.T) * Pvs)
    tex.add("so $\\Delta h$ is a gated parallel adapter with $W_{\\rm down} = c\\,W_q^\\top P_k^\\top$, "
            "$f = \\mathrm{softmax}$, $W_{\\rm up} = P_v$ (bias $b_q$ omitted here, included in the proof).",
            eq("\\Delta h", f"\\lambda(x)\\left({adapter} - h\\right)"), "prefix_unified")
    return checks


def ia3(blk: Block, tex: TexFragment) -> dict[str, bool]:
    ell = mat("ell", 1, D)
    x = blk.x
    y = linear(x, blk.W, blk.b)
    dh_out = y.multiply_elementwise(ell) - y
    ell_minus_one = sp.diag(*(ell - sp.ones(1, D)))
    checks = {"IA3 output scaling: dh = (x W^T + b) diag(l - 1)": vanishes(dh_out - y * ell_minus_one)}
    ell_ff = mat("ell^{ff}", 1, D_FF)
    a = linear(x, blk.W1, blk.b1).applyfunc(sigma)
    dh_in = ffn(x, blk.W1, blk.b1, blk.W2, blk.b2, a1=a.multiply_elementwise(ell_ff)) - blk.ffn(x)
    unified = a * sp.diag(*(ell_ff - sp.ones(1, D_FF))) * blk.W2.T
    checks["IA3 on the FFN: dh = sigma(x W1^T + b1) diag(l - 1) W2^T (adapter, frozen W_down = W1^T)"] = vanishes(
        dh_in - unified)
    # On the value map inside a head: the head output is rescaled column-wise.
    t = 0
    scaled_v = attention(linear(blk.X[t, :], blk.Wq, blk.bq), linear(blk.X, blk.Wk, blk.bk),
                         linear(blk.X, blk.Wv, blk.bv) * sp.diag(*ell))
    checks["IA3 on v: d head = head diag(l_v - 1)"] = vanishes(scaled_v - blk.head(t) - blk.head(t) * ell_minus_one)
    xs, Ws, W1s, W2s = (sp.MatrixSymbol(n, *shape) for n, shape in
                        (("x", (1, D)), ("W", (D, D)), ("W_1", (D_FF, D)), ("W_2", (D, D_FF))))
    bs, b1s = sp.MatrixSymbol("b", 1, D), sp.MatrixSymbol("b_1", 1, D_FF)
    L1, Lff = sp.MatrixSymbol("\\operatorname{diag}(\\ell - 1)", D, D), sp.MatrixSymbol(
        "\\operatorname{diag}(\\ell_{ff} - 1)", D_FF, D_FF)
    tex.add("(IA)$^3$ output scaling $y \\mapsto y \\odot \\ell$: $W_{\\rm down} = W^\\top$ (with its bias), "
            "$f = \\mathrm{id}$, $W_{\\rm up} = \\operatorname{diag}(\\ell - 1)$.",
            eq("\\Delta h", (xs * Ws.T + bs) * L1), "ia3")
    tex.add("(IA)$^3$ on the FFN activation: a parallel adapter with the frozen $W_{\\rm down} = W_1^\\top$, "
            "$f = \\sigma$ and $W_{\\rm up} = \\operatorname{diag}(\\ell_{ff} - 1) W_2^\\top$.",
            eq("\\Delta h", applied("\\sigma", xs * W1s.T + b1s) * Lff * W2s.T), "ia3_ffn")
    return checks


def bitfit(blk: Block, tex: TexFragment) -> dict[str, bool]:
    db, db1, eps = mat("\\Delta b", 1, D), mat("\\Delta b^1", 1, D_FF), sp.Symbol("epsilon")
    x = blk.x
    dh = linear(x, blk.W, blk.b + db) - linear(x, blk.W, blk.b)
    checks = {"BitFit on an output bias: dh = db": vanishes(dh - db),
              "BitFit on an output bias: d(dh)/dx = 0 (state-independent control)": vanishes(dh.jacobian(x))}
    moved = ffn(x, blk.W1, blk.b1 + eps * db1, blk.W2, blk.b2)
    first_order = sp.diff(moved, eps).subs(eps, 0)
    z = linear(x, blk.W1, blk.b1)
    sigma_prime = z.applyfunc(_sigma_prime_at)
    checks["BitFit on the FFN inner bias: d/de dh = (sigma'(z) * db1) W2^T (state-dependent)"] = vanishes(
        first_order - sigma_prime.multiply_elementwise(db1) * blk.W2.T)
    point = {sym: sp.Rational((k % 5) + 1, 6) for k, sym in enumerate(sorted(first_order.free_symbols, key=str))}
    checks["BitFit on the FFN inner bias: depends on x (d/dx != 0 at a point)"] = nonzero_witness(
        first_order.jacobian(x), point)
    dbs = sp.Symbol("\\Delta b")
    tex.add("BitFit on a bias written to the residual stream (attention/FFN output, norm $\\beta$): a constant, "
            "state-independent (open-loop) control.",
            eq("\\Delta h", dbs) + ",\\qquad \\partial\\Delta h/\\partial x = 0", "bitfit")
    tex.add("BitFit on the FFN inner bias: state-dependent, to first order in $\\Delta b_1$.",
            "\\Delta h = \\left(\\sigma'(x W_1^\\top + b_1) \\odot \\Delta b_1\\right) W_2^\\top"
            " + O(\\|\\Delta b_1\\|^2)",
            "bitfit_inner")
    return checks


def _sigma_prime_at(v: sp.Expr) -> sp.Expr:
    """``σ'(v)`` for a compound argument, as sympy's chain rule writes it."""
    u = sp.Dummy("u")
    return sp.Subs(sp.Derivative(sigma(u), u), u, v)


def prompt(blk: Block, tex: TexFragment) -> dict[str, bool]:
    P = mat("P", 1, D)
    t = 0
    Xp = P.col_join(blk.X)  # x_0 -> [P; x_0]
    q = linear(blk.X[t, :], blk.Wq, blk.bq)
    prompted = attention(q, linear(Xp, blk.Wk, blk.bk), linear(Xp, blk.Wv, blk.bv))
    as_prefix = attention(q, linear(P, blk.Wk, blk.bk).col_join(linear(blk.X, blk.Wk, blk.bk)),
                          linear(P, blk.Wv, blk.bv).col_join(linear(blk.X, blk.Wv, blk.bv)))
    checks = {"prompt tuning at the first layer = prefix with P_k = P W_k^T + b_k, P_v = P W_v^T + b_v":
              vanishes(prompted - as_prefix)}
    Pk, Pv = linear(P, blk.Wk, blk.bk), linear(P, blk.Wv, blk.bv)
    K, V = linear(blk.X, blk.Wk, blk.bk), linear(blk.X, blk.Wv, blk.bv)
    z_p, z_k = sum((c * q * Pk.T).applyfunc(sp.exp)), sum((c * q * K.T).applyfunc(sp.exp))
    lam = z_p / (z_p + z_k)
    checks["prompt tuning at the first layer = gated adapter (1 - lambda) h + lambda P_v"] = vanishes(
        prompted - (1 - lam) * attention(q, K, V) - lam * Pv)
    xs, Ps = sp.MatrixSymbol("x_0", T, D), sp.MatrixSymbol("P", 1, D)
    tex.add("Prompt tuning is an initial control: the blocks are unchanged, only the initial state moves.",
            "x_0 \\mapsto " + sp.latex(sp.BlockMatrix([[Ps], [xs]])), "prompt")
    tex.add("At the first attention layer a real token sees prefix tuning with the prompt's keys and values "
            "(one prompt row: the gated adapter with $\\mathrm{softmax}$ over one row $= 1$).",
            eq("\\mathrm{head}_t", "(1-\\lambda_t)\\,\\mathrm{Attn}(q_t, K, V) + \\lambda_t (P W_v^\\top + b_v)"),
            "prompt_prefix")
    return checks


def parallel_control(blk: Block, tex: TexFragment) -> dict[str, bool]:
    """State-based parallel control (Zhang et al., ICML 2025) beside the FFN sub-block of a block."""
    A, B = mat("A", RANK, D), mat("B", D, RANK)
    m = mat("m", 1, D)  # the residual state entering the FFN sub-block
    # Generic norms: each output coordinate an undefined function of the whole row.
    normed = sp.Matrix(1, D, lambda _, j: sp.Function(f"nu_{j}")(*m))
    dx = s * m * A.T * B.T
    frozen_pre = m + blk.ffn(normed)
    controlled_pre = m + blk.ffn(normed) + dx
    out_norm = sp.Matrix(1, D, lambda _, j: sp.Function(f"psi_{j}")(*(m + blk.ffn(m))))
    controlled_post = out_norm + dx
    checks = {
        "parallel control (pre-LN): dx = s m A^T B^T, m the state before the FFN norm":
            vanishes(controlled_pre - frozen_pre - s * m * A.T * B.T),
        "parallel control (pre-LN) = LoRA on the identity path: m (I + s A^T B^T) + FFN(N m)":
            vanishes(controlled_pre - (m * (sp.eye(D) + s * A.T * B.T) + blk.ffn(normed))),
        "parallel control (post-LN): dx = s m A^T B^T added after LN_2":
            vanishes(controlled_post - out_norm - s * m * A.T * B.T),
        "parallel control: d(dx)/dm = s B A (linear state feedback, independent of m)":
            vanishes(dx.jacobian(m) - s * B * A),
    }
    ms, As, Bs = sp.MatrixSymbol("m_l", 1, D), sp.MatrixSymbol("A_l", RANK, D), sp.MatrixSymbol("B_l", D, RANK)
    tex.add("State-based parallel control (Zhang et al., ICML 2025) beside the FFN sub-block: $W_{\\rm down} = "
            "A^\\top$, $f = \\mathrm{id}$, $W_{\\rm up} = B^\\top$ read at the state $m_l$ entering the sub-block "
            "(before its norm when pre-LN; added after $\\mathrm{LN}_2$ when post-LN).",
            "x_{l+1} = \\mathrm{ffn}_l(m_l) + " + sp.latex(s * ms * As.T * Bs.T), "parallel_control")
    tex.add("Pre-LN it is a LoRA of the residual stream's identity path.",
            "x_{l+1} = m_l\\left(I + " + sp.latex(s * As.T * Bs.T) + "\\right) + \\mathrm{FFN}(N_f m_l)",
            "parallel_control_identity")
    return checks


# --- numerical cross-check against controltune's controllers ------------------------------------

def numeric_crosscheck() -> dict[str, bool]:
    """controltune's deltas equal the closed forms to 1e-12 (float64, random:bert, one wrapped linear each)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import torch.nn.functional as F

    from controltune import load_model
    from controltune.attention import controltune_attention
    from controltune.controllers.adapter import Adapter
    from controltune.controllers.ia3 import IA3
    from controltune.controllers.lora import LoRA
    from controltune.system import ResidualSystem

    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    checks: dict[str, bool] = {}
    system = ResidualSystem(load_model("random:bert", dtype="float64", seed=0))
    lora = system.add(LoRA(rank=2, alpha=4.0, targets=("v",), layers=[0]))
    ia3 = system.add(IA3(targets=("k", "ffn_out"), layers=[1]))
    adapter = system.add(Adapter(bottleneck=4, layers=[2]))
    with torch.no_grad():
        for p in [*lora.parameters(), *ia3.parameters(), *adapter.parameters()]:
            p.copy_(randn(*p.shape))

    site = lora.sites[0]
    wrapped = system.base.get_submodule(site.path)
    base, delta = wrapped.base_layer, wrapped.delta
    x = randn(3, base.in_features)
    with torch.no_grad():
        merged = F.linear(x, base.weight + delta.scale * delta.B @ delta.A, base.bias)
        checks["[numeric] LoRA: wrapped(x) = x (W + sBA)^T + b"] = _close(wrapped(x), merged)
        closed = delta.scale * x @ delta.A.T @ delta.B.T
        checks["[numeric] LoRA: dh = s x A^T B^T"] = _close(wrapped(x) - base(x), closed)
        for site in ia3.sites:
            wrapped = system.base.get_submodule(site.path)
            base = wrapped.base_layer
            x = randn(3, base.in_features)
            ell = wrapped.delta.scale if site.role == "ffn_out" else wrapped.delta.vector()
            if site.role == "ffn_out":  # input scaling: W -> W diag(l)
                expect = F.linear(x, base.weight * ell, base.bias)
                closed = x @ torch.diag(ell - 1) @ base.weight.T
            else:  # output scaling: W -> diag(l) W, b -> l * b
                expect = F.linear(x, ell[:, None] * base.weight, ell * base.bias)
                closed = base(x) @ torch.diag(ell - 1)
            checks[f"[numeric] IA3 on {site.role}: wrapped = weight-space definition"] = _close(wrapped(x), expect)
            checks[f"[numeric] IA3 on {site.role}: dh = closed form"] = _close(wrapped(x) - base(x), closed)
        for site in adapter.sites:
            wrapped = system.base.get_submodule(site.path)
            bn = wrapped.delta.bottleneck
            x = randn(3, wrapped.base_layer.in_features)
            h = wrapped.base_layer(x)
            closed = bn.scale * (bn.f(h @ bn.W_down + bn.b_down) @ bn.W_up + bn.b_up)
            checks[f"[numeric] sequential adapter on {site.role}: dh = s(f(h W_down + b_down) W_up + b_up)"] = _close(
                wrapped(x) - h, closed)
        checks.update(_prefix_kernel_check(randn, controltune_attention))
    return checks


def _prefix_kernel_check(randn: Callable[..., torch.Tensor], kernel: Callable[..., tuple[torch.Tensor, object]]) \
        -> dict[str, bool]:
    """controltune's prefix attention kernel (both kernels) = the gated-adapter formula."""
    import torch
    from torch import nn

    S, H, Tq, P, Dh = 2, 2, 3, 2, 4
    q, k, v = randn(S, H, Tq, Dh), randn(S, H, Tq, Dh), randn(S, H, Tq, Dh)
    pk, pv = randn(S, H, P, Dh), randn(S, H, P, Dh)
    scale = Dh ** -0.5
    scores_k = torch.einsum("shtd,shjd->shtj", q, k) * scale
    scores_p = torch.einsum("shtd,shid->shti", q, pk) * scale
    # log-sum-exp form of λ = Σ_i e^{q·P_k,i} / (Σ_i e^{q·P_k,i} + Σ_j e^{q·k_j}).
    lam = torch.exp(torch.logsumexp(scores_p, -1) - torch.logsumexp(torch.cat([scores_p, scores_k], -1), -1))
    plain = torch.softmax(scores_k, -1) @ v
    adapter = torch.softmax(scores_p, -1) @ pv
    gated = ((1 - lam[..., None]) * plain + lam[..., None] * adapter).transpose(1, 2)
    out = {}
    for name in ("eager", "sdpa"):
        module = nn.Module()
        module.ct_kernel = name
        module.ct_prefix = lambda batch, pk=pk, pv=pv: (pk, pv)
        got, _ = kernel(module, q, k, v, None, scaling=scale)
        out[f"[numeric] prefix kernel ({name}) = gated parallel adapter"] = _close(got, gated)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


def main(out_dir: str | Path = OUT_DIR, numeric: bool = True) -> dict[str, bool]:
    tex = TexFragment(NAME, "Control forms of the delta-tuning controllers (unified view)")
    tex.add("Unified form of an additive control on a hidden state $h$ read from $x$ (He et al.).",
            eq("\\Delta h", "s\\, f(x W_{\\rm down})\\, W_{\\rm up}"), "unified")
    blk = Block()
    checks: dict[str, bool] = {}
    for method in (lora, adapters, prefix, ia3, bitfit, prompt, parallel_control):
        checks.update(method(blk, tex))
    if numeric:
        checks.update(numeric_crosscheck())
    require(checks, NAME)
    tex.write(out_dir)
    return checks


if __name__ == "__main__":
    report(main())
