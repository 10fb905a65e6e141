"""Per-block Lipschitz constants of the dynamics ``x_{l+1} = f_l(x_l, u_l)``.

Three estimators, each giving, per layer l, a constant in the state (``a_l``) and
in the control (``b_l``):

* **local** (trajectory-local): ``‖∂f_l/∂x‖_2`` and ``‖∂f_l/∂u_l‖_2`` at the data,
  by power iteration with JVPs (``torch.func.jvp``) and VJPs.  First-order: an
  *estimate*, not a certificate (it says nothing about finite displacements).
* **sampled** (a lower bound): ``max ‖f(x) − f(x')‖ / ‖x − x'‖`` over sampled
  pairs around the data and a few steps of adversarial ascent (same in u).
* **composed** (an upper bound): per-operation bounds composed through the block
  (spectral norms of linear maps; LayerNorm and softmax attention bounded on an
  explicit input :class:`LayerDomain`).  It is *certified* for any pair of points
  whose internal activations lie in the domain: :func:`probe_block` measures a
  domain on evaluated points, :func:`global_domain` gives one valid everywhere
  (usually vacuous; the number is reported, not hidden).

Conventions (DESIGN.md §1): the state is ``S×T×d``; norms are Frobenius norms
over the *real* (non-padding) positions only, because padding positions never
reach the cost (keys at padding are masked, readouts pool real tokens).  For a
pre-LN family (``f = x + G``) the state constant ``a_l`` is that of ``G``
(Grönwall uses ``1 + a_l``); for a post-LN family it is that of the whole block.
The control ``u_l`` is every *layer* control acting in block l, flattened and
concatenated (shared controls are not a per-layer quantity and are rejected).

Composed bounds, per operation (``e`` the perturbation of an input, ``Δ`` of a weight):

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
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .controllers.base import Control, UnsupportedMethodError, Wrapped
from .families.base import Context, dense_weight

SUPPORTED_COMPOSED = ("bert", "roberta", "gpt2")


# --- power iteration -------------------------------------------------------------------------


@dataclass
class PowerResult:
    """Top singular value ``sigma`` of a linear map A, its right singular vector, and convergence."""

    sigma: float
    vector: torch.Tensor
    iterations: int
    converged: bool


def power_iteration(apply: Callable[[torch.Tensor], torch.Tensor],
                    apply_t: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
                    iters: int = 30, tol: float = 1e-6) -> PowerResult:
    """``‖A‖₂`` by power iteration on ``AᵀA``.

    Args:
        apply: ``v -> A v`` (any tensor shapes).
        apply_t: ``w -> Aᵀ w``.
        start: the initial vector (shape of A's input; need not be normalised).
        iters: maximum number of ``AᵀA`` products.
        tol: stop when ``σ`` changes by less than ``tol`` (relative).

    Returns:
        the estimate ``σ = ‖A v‖`` at the last unit vector v.  Every iterate is a
        Rayleigh-type lower estimate of ``‖A‖₂``; it increases to it.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    v = start / start.norm().clamp_min(torch.finfo(start.dtype).tiny)
    sigma, converged, it = 0.0, False, 0
    for it in range(1, iters + 1):
        av = apply(v)
        new_sigma = float(av.norm())
        w = apply_t(av)
        norm_w = w.norm()
        if float(norm_w) == 0.0:
            return PowerResult(0.0, v, it, True)
        v = w / norm_w
        if abs(new_sigma - sigma) <= tol * max(new_sigma, 1e-300):
            sigma, converged = new_sigma, True
            break
        sigma = new_sigma
    sigma = max(sigma, float(apply(v).norm()))
    return PowerResult(sigma, v.detach(), it, converged)


# --- block as a function of the state and of its controls ------------------------------------


class _Stepper(nn.Module):
    """``forward(x) = f_layer(x)`` of ``system`` with fixed ``ctx``: lets ``functional_call``
    substitute the block's control parameters by traced tensors.

    Only the block is a submodule: a controller also holds its deltas, and
    ``functional_call`` does not restore a parameter reachable by two paths correctly.
    """

    def __init__(self, system: nn.Module, layer: int, ctx: Context) -> None:
        super().__init__()
        self.block = system.blocks[layer]
        object.__setattr__(self, "_system", system)
        self.layer = layer
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._system.step(self.layer, x, self.ctx)


def layer_controls(system, layer: int) -> list[Control]:
    """The layer controls ``u_l`` of block ``layer`` (shared controls are rejected)."""
    out = []
    for c in system.controls():
        if layer in c.layers:
            if c.kind == "shared":
                raise UnsupportedMethodError(
                    f"control {c.name!r} is shared by layers {c.layers}: per-layer Lipschitz constants in the "
                    "control need layer controls (kind 'layer')")
            out.append(c)
    return out


def _param_names(module: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    ids = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in ids]
    if missing:
        raise ValueError("a control parameter is not a parameter of the block (only weight-space controls inside "
                         "the block can be substituted)")
    return [ids[id(p)] for p in params]


def _control_map(system, layer: int, x: torch.Tensor, ctx: Context):
    """``(u_l, u ↦ m ⊙ f_l(x, u))``: block ``layer``'s layer controls (detached copies)
    and the block as a function of them at the fixed state ``x`` (padding masked)."""
    controls = layer_controls(system, layer)
    if not controls:
        raise ValueError(f"block {layer} has no layer controls")
    stepper = _Stepper(system, layer, ctx)
    names = _param_names(stepper, [c.param for c in controls])
    u = tuple(c.param.detach().clone() for c in controls)
    m = _mask(x, ctx)
    x = x.detach()

    def f(us: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(stepper, dict(zip(names, us)), (x,), strict=False) * m

    return u, f


def _mask(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``S×T×1`` real-position mask of a state ``x`` (dtype of x)."""
    return ctx.attention_mask.to(x.dtype).unsqueeze(-1)


def _need_eager(system) -> None:
    if system.kernel != "eager":
        raise RuntimeError("forward-mode JVPs need the eager attention kernel: call system.set_kernel('eager') "
                           f"first (the system uses {system.kernel!r}; sdpa on CPU is first-order reverse only)")


def _residual(system) -> bool:
    """True for pre-LN families, where the state constant is that of G = f − x."""
    return not system.family.post_ln


# --- (b) trajectory-local: Jacobian spectral norms --------------------------------------------


def local_state_lipschitz(system, layer: int, x: torch.Tensor, ctx: Context, iters: int = 30, tol: float = 1e-6,
                          seed: int = 0) -> PowerResult:
    """``‖∂f_l/∂x‖₂`` (post-LN) or ``‖∂G_l/∂x‖₂`` (pre-LN) at ``x`` (S×T×d), over real positions."""
    _need_eager(system)
    m = _mask(x, ctx)
    resid = _residual(system)
    x = x.detach()

    def f(z: torch.Tensor) -> torch.Tensor:
        out = system.step(layer, z, ctx)
        return out - z if resid else out

    def apply(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(f, (x,), (v * m,))[1].detach() * m

    _, vjp_fn = torch.func.vjp(f, x)

    def apply_t(w: torch.Tensor) -> torch.Tensor:
        return vjp_fn(w * m)[0].detach() * m

    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x) * m
    return power_iteration(apply, apply_t, start, iters, tol)


def local_control_lipschitz(system, layer: int, x: torch.Tensor, ctx: Context, iters: int = 30, tol: float = 1e-6,
                            seed: int = 0) -> PowerResult:
    """``‖∂f_l/∂u_l‖₂`` at ``(x, u_l)``: u_l all layer controls of block l; the vector is a tuple of tensors."""
    _need_eager(system)
    primals, f_of = _control_map(system, layer, x, ctx)

    def f(*us: torch.Tensor) -> torch.Tensor:
        return f_of(us)

    def apply(v: _Flat) -> torch.Tensor:
        return torch.func.jvp(f, primals, v.parts)[1].detach()

    _, vjp_fn = torch.func.vjp(f, *primals)

    def apply_t(w: torch.Tensor) -> _Flat:
        return _Flat(tuple(g.detach() for g in vjp_fn(w)))

    gen = torch.Generator().manual_seed(seed)
    start = _Flat(tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in primals))
    return power_iteration(apply, apply_t, start, iters, tol)


class _Flat:
    """A tuple of tensors behaving as one flattened vector (for power iteration over u_l)."""

    def __init__(self, parts: tuple[torch.Tensor, ...]) -> None:
        self.parts = parts

    def norm(self) -> torch.Tensor:
        return torch.sqrt(sum(p.pow(2).sum() for p in self.parts))

    def __truediv__(self, s: torch.Tensor | float) -> _Flat:
        return _Flat(tuple(p / s for p in self.parts))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def detach(self) -> _Flat:
        return _Flat(tuple(p.detach() for p in self.parts))


# --- (c) sampled lower bounds -----------------------------------------------------------------


def sampled_state_lipschitz(system, layer: int, x: torch.Tensor, ctx: Context, radius: float = 1e-2,
                            samples: int = 2, steps: int = 5, others: Sequence[torch.Tensor] = (),
                            seed: int = 0) -> float:
    """A lower bound on the Lipschitz constant of f_l (pre-LN: of G_l) in x near ``x``.

    Each tried point ``x' = x + r·δ/‖δ‖`` (``r = radius·‖x‖``, real positions only)
    gives a ratio ``‖f(x) − f(x')‖ / ‖x − x'‖``; starting directions are ``samples``
    random ones and the directions to ``others`` (states of the same batch on other
    trajectories, i.e. data pairs), each improved by ``steps`` of normalised gradient
    ascent on the ratio.  The maximum over every tried point is returned (each one is
    a valid sample, so the result is a lower bound on the Lipschitz constant over
    any set containing them).  Reverse mode only: any attention kernel works.
    """
    m = _mask(x, ctx)
    resid = _residual(system)
    x = x.detach()
    with torch.no_grad():
        fx = system.step(layer, x, ctx)
        gx = fx - x if resid else fx
    r = radius * float((x * m).norm())
    gen = torch.Generator().manual_seed(seed)
    starts = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x) for _ in range(samples)]
    starts += [o.detach() - x for o in others]
    best = 0.0
    for d in starts:
        d = d * m
        for _ in range(steps + 1):
            d = (d / d.norm().clamp_min(1e-300)).detach().requires_grad_(True)
            xp = x + r * d
            out = system.step(layer, xp, ctx)
            g = out - xp if resid else out
            ratio = ((g - gx) * m).norm() / r
            best = max(best, float(ratio.detach()))
            (grad,) = torch.autograd.grad(ratio, d)
            d = d.detach() + grad * m / grad.norm().clamp_min(1e-300)
    return best


def sampled_control_lipschitz(system, layer: int, x: torch.Tensor, ctx: Context, radius: float = 1e-2,
                              samples: int = 2, steps: int = 5, others: Sequence[Sequence[torch.Tensor]] = (),
                              seed: int = 0) -> float:
    """A lower bound on the Lipschitz constant of f_l in u_l near the current controls.

    As :func:`sampled_state_lipschitz`, with ``u' = u + r·δ/‖δ‖``,
    ``r = radius·max(‖u‖, 1)``; ``others`` are other values of the layer's controls
    (e.g. a projected control), tried as data pairs.
    """
    u, f = _control_map(system, layer, x, ctx)

    r = radius * max(float(_Flat(u).norm()), 1.0)
    gen = torch.Generator().manual_seed(seed)
    starts = [tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in u)
              for _ in range(samples)]
    starts += [tuple(o.detach() - p for o, p in zip(other, u)) for other in others]
    with torch.no_grad():
        fu = f(u)
    return _ascend_control(f, fu, u, r, starts, steps)


def _ascend_control(f, fu: torch.Tensor, u: tuple[torch.Tensor, ...], r: float, starts: list, steps: int) -> float:
    best = 0.0
    for d in starts:
        for _ in range(steps + 1):
            n = _Flat(tuple(d)).norm().clamp_min(1e-300)
            d = tuple((p / n).detach().requires_grad_(True) for p in d)
            ratio = (f(tuple(p + r * q for p, q in zip(u, d))) - fu).norm() / r
            best = max(best, float(ratio.detach()))
            grads = torch.autograd.grad(ratio, d)
            gn = _Flat(tuple(grads)).norm().clamp_min(1e-300)
            d = tuple(p.detach() + g / gn for p, g in zip(d, grads))
    return best


# --- (a) composed upper bounds on a stated domain ---------------------------------------------


@dataclass
class LayerDomain:
    """The input domain of block l on which a composed bound holds.

    Attributes:
        sigma_min: per LayerNorm role (``ln_attn``, ``ln_ffn``; ``ln_f`` for the final
            norm), the least per-token ``sqrt(var + eps)`` of its input.
        radius: largest token norm ``R`` of the attention input.
        input_norm: per linear role, an upper bound on the spectral norm ``‖A‖₂`` of
            its input stacked over the real tokens of the batch (N×d_in).
        max_len: largest number of keys a query sees (real tokens of a sequence).
        n_tokens: real tokens in the batch.
        causal: causal attention (query i sees i keys) or bidirectional.
        source: how it was obtained (``probed`` on evaluated points, or ``global``).
    """

    sigma_min: dict[str, float]
    radius: float
    input_norm: dict[str, float]
    max_len: int
    n_tokens: int
    causal: bool
    source: str = "probed"

    def merge(self, other: LayerDomain) -> LayerDomain:
        """The smallest domain of this form containing both."""
        if self.n_tokens != other.n_tokens or self.causal != other.causal:
            raise ValueError("domains of different batches cannot be merged")
        return LayerDomain(
            sigma_min={k: min(self.sigma_min[k], other.sigma_min[k]) for k in self.sigma_min},
            radius=max(self.radius, other.radius),
            input_norm={k: max(self.input_norm[k], other.input_norm[k]) for k in self.input_norm},
            max_len=max(self.max_len, other.max_len), n_tokens=self.n_tokens, causal=self.causal,
            source=self.source if self.source == other.source else f"{self.source}+{other.source}")

    def contains(self, other: LayerDomain) -> bool:
        """Whether ``other`` (e.g. probed on a new trajectory) lies inside this domain."""
        return (all(other.sigma_min[k] >= self.sigma_min[k] for k in self.sigma_min)
                and other.radius <= self.radius and other.max_len <= self.max_len
                and all(other.input_norm[k] <= self.input_norm[k] for k in self.input_norm))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BlockWeights:
    """Effective weights of one block (base + weight-space deltas), dense ``d_out×d_in``."""

    family: str
    linear: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    norms: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    n_heads: int
    scaling: float
    act: Callable[[torch.Tensor], torch.Tensor]
    attn_input_role: str
    cache: dict = field(default_factory=dict)

    def head_norms(self) -> dict[str, list[float]]:
        """Per head: ``‖W̃_q‖``, ``‖W̃_k‖`` (bias appended), ``‖W_v‖`` and ``‖W̃_qᵀ W̃_k‖`` (computed once)."""
        if "heads" not in self.cache:
            (q, qb), (k, kb), (v, _) = _qkv(self)
            qh, kh, vh = _per_head(q, qb, self.n_heads), _per_head(k, kb, self.n_heads), _per_head(v, None,
                                                                                                 self.n_heads)
            self.cache["heads"] = {"q": [_spec(t) for t in qh], "k": [_spec(t) for t in kh],
                                   "v": [_spec(t[:, :-1]) for t in vh],
                                   "qk": [_spec_product(a, b) for a, b in zip(qh, kh)],
                                   "v_aug": [_spec(t) for t in _per_head(v, _qkv(self)[2][1], self.n_heads)]}
        return self.cache["heads"]


def _linear_roles(family: str) -> tuple[str, ...]:
    return ("qkv", "o", "ffn_in", "ffn_out") if family == "gpt2" else ("q", "k", "v", "o", "ffn_in", "ffn_out")


def _check_family(system) -> str:
    name = system.family.name
    if name not in SUPPORTED_COMPOSED:
        raise UnsupportedMethodError(
            f"composed Lipschitz bounds are derived for post-LN BERT/RoBERTa and pre-LN GPT-2 blocks "
            f"({', '.join(SUPPORTED_COMPOSED)}); family {name!r} (rotary attention, gated FFN, RMSNorm) is not "
            "covered: use the local and sampled estimators")
    return name


def effective_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of a (possibly wrapped) linear map, W dense ``d_out×d_in``, including a weight delta.

    A wrapped module's delta must expose ``delta_weight()`` (d_out×d_in), as LoRA and
    :class:`controltune.approximation.DeltaWeights` do.
    """
    if isinstance(module, Wrapped):
        base = module.base_layer
        fn = getattr(module.delta, "delta_weight", None)
        if fn is None:
            raise UnsupportedMethodError(
                f"{type(module.delta).__name__} is not a weight-space delta (no delta_weight()); composed bounds "
                "in the control cover deltas W -> W + ΔW only")
        return dense_weight(base) + fn(), base.bias
    return dense_weight(module), getattr(module, "bias", None)


def block_weights(system, layer: int) -> BlockWeights:
    """The effective weights of block ``layer`` (current values of its weight deltas)."""
    fam = _check_family(system)
    block = system.blocks[layer]
    roles = system.family.roles
    with torch.no_grad():
        linear = {r: tuple(t.detach() if t is not None else None
                           for t in effective_linear(block.get_submodule(roles[r])))
                  for r in _linear_roles(fam)}
        norms = {}
        for r in ("ln_attn", "ln_ffn"):
            ln = block.get_submodule(roles[r])
            norms[r] = (ln.weight.detach(), ln.bias.detach(), float(ln.eps))
    attn = block.get_submodule(roles["attn"])
    if fam == "gpt2":
        act = block.get_submodule(roles["ffn"]).act
        heads = attn.num_heads
    else:
        act = block.intermediate.intermediate_act_fn
        heads = attn.num_attention_heads
    return BlockWeights(fam, linear, norms, heads, float(attn.scaling), act,
                        "qkv" if fam == "gpt2" else "q")


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


def _per_head(w: torch.Tensor, b: torch.Tensor | None, heads: int) -> list[torch.Tensor]:
    """Rows of head h of a projection with its bias appended as a last column (D×(d+1))."""
    bias = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
    aug = torch.cat([w, bias[:, None]], dim=1)
    return list(aug.chunk(heads, dim=0))


def _qkv(weights: BlockWeights) -> tuple[tuple, tuple, tuple]:
    if weights.family == "gpt2":
        w, b = weights.linear["qkv"]
        ws, bs = w.chunk(3, dim=0), (b.chunk(3) if b is not None else (None,) * 3)
        return (ws[0], bs[0]), (ws[1], bs[1]), (ws[2], bs[2])
    return weights.linear["q"], weights.linear["k"], weights.linear["v"]


def _spec(m: torch.Tensor) -> float:
    """``‖m‖₂`` from the eigenvalues of the Gram matrix of its smaller side (cheap for thin matrices)."""
    m = m.to(torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def _spec_product(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖aᵀ b‖₂`` for thin ``a, b`` (k×n, k ≪ n) via ``aᵀ = Q_a R_a``: ``‖aᵀb‖ = ‖R_a R_bᵀ‖``."""
    ra = torch.linalg.qr(a.T.to(torch.float64), mode="r").R
    rb = torch.linalg.qr(b.T.to(torch.float64), mode="r").R
    return _spec(ra @ rb.T)


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
    scale = wu.scaling
    r = dom.radius
    ra = math.sqrt(r * r + 1.0)
    n, nt = dom.max_len, dom.n_tokens
    x2 = dom.input_norm[wu.attn_input_role]
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
    controls = {"q": cq, "k": ck, "v": cv}
    if wu.family == "gpt2":
        controls = {"qkv": math.sqrt(cq * cq + ck * ck + cv * cv)}
    return math.sqrt(l_sq), controls, {"attn_max_qk_norm": max(hu["qk"])}


def composed_block_bound(system, layer: int, domain: LayerDomain, weights: BlockWeights | None = None,
                         other: BlockWeights | None = None) -> ComposedBound:
    """Compose per-operation bounds through block ``layer`` on ``domain``.

    ``weights`` (default: current) are those of u; ``other`` those of u' (default: u).
    The state constant uses u's weights (Grönwall evaluates f(·, u) at two states); the
    control constants hold along the whole segment u–u' at a fixed block input.
    """
    wu = weights if weights is not None else block_weights(system, layer)
    wv = other if other is not None else wu
    if "act" not in wu.cache:
        wu.cache["act"] = activation_lipschitz(wu.act)
        wu.cache["linear"] = {r: _spec(w) for r, (w, _) in wu.linear.items()}
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

    x = _Affine(1.0)
    if wu.family == "gpt2":
        o = linear(attention(x.scale(ln["ln_attn"])), "o")
        r1 = x + o
        f = linear(linear(r1.scale(ln["ln_ffn"]), "ffn_in").scale(lact), "ffn_out")
        g = o + f  # G = f − x: its state constant; its control constants are those of f
        a, b = g.s, g.c
    else:
        h = (x + linear(attention(x), "o")).scale(ln["ln_attn"])
        out = (h + linear(linear(h, "ffn_in").scale(lact), "ffn_out")).scale(ln["ln_ffn"])
        a, b = out.s, out.c
    ops = {"attention": l_att, "activation": lact, **{f"linear_{k}": v for k, v in lin.items()},
           **{f"layernorm_{k}": v for k, v in ln.items()}, **extra}
    return ComposedBound(a, b, domain, ops)


# --- domains -------------------------------------------------------------------------------


def _real_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real-token rows (N×k) of an S×T×k activation."""
    return t[mask.bool()]


@contextmanager
def _recording(system, layer: int, mask: torch.Tensor, fam: str):
    block = system.blocks[layer]
    roles = system.family.roles
    rec: dict[str, torch.Tensor] = {}
    handles = []

    def saver(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            rec[name] = _real_rows(x.detach(), mask)
        return hook

    for r in (*_linear_roles(fam), "ln_attn", "ln_ffn"):
        handles.append(block.get_submodule(roles[r]).register_forward_pre_hook(saver(r), with_kwargs=True))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _sigma(rows: torch.Tensor, eps: float) -> float:
    return float(torch.sqrt(rows.var(dim=-1, unbiased=False) + eps).min())


def probe_block(system, layer: int, x: torch.Tensor, ctx: Context) -> LayerDomain:
    """Measure the domain of block ``layer`` evaluated at ``x`` (S×T×d) with the current controls."""
    fam = _check_family(system)
    mask = ctx.attention_mask
    w = block_weights(system, layer)
    with torch.no_grad(), _recording(system, layer, mask, fam) as rec:
        system.step(layer, x, ctx)
    attn_in = rec[w.attn_input_role]
    lengths = mask.sum(1)
    return LayerDomain(
        sigma_min={r: _sigma(rec[r], w.norms[r][2]) for r in ("ln_attn", "ln_ffn")},
        radius=float(attn_in.norm(dim=-1).max()),
        input_norm={r: _spec(rec[r]) for r in _linear_roles(fam)},
        max_len=int(lengths.max()), n_tokens=int(lengths.sum()), causal=system.family.causal, source="probed")


def _ln_output_radius(weight: torch.Tensor, bias: torch.Tensor) -> float:
    """``max ‖LN(x)‖ ≤ ‖γ‖_∞ sqrt(d) + ‖β‖`` (the normalised vector has norm ≤ sqrt(d))."""
    return float(weight.abs().max()) * math.sqrt(weight.numel()) + float(bias.norm())


def global_domain(system, layer: int, ctx: Context, weights: BlockWeights | None = None,
                  other: BlockWeights | None = None) -> LayerDomain:
    """A domain containing *every* input of block ``layer`` (for this batch's token counts).

    ``σ ≥ sqrt(eps)`` for each LayerNorm; attention inputs are LayerNorm outputs (the
    previous block's or the embedding's for post-LN, ``ln_1``'s for pre-LN), so their
    norm is at most ``‖γ‖_∞ sqrt(d) + ‖β‖``; linear-map inputs follow (rows of an
    attention output are convex combinations of values; ``|act(z)| ≤ |z|``).
    """
    fam = _check_family(system)
    wu = weights if weights is not None else block_weights(system, layer)
    wv = other if other is not None else wu
    if fam == "gpt2":
        g, b, _ = wu.norms["ln_attn"]
    elif layer == 0:
        emb_ln = system.base.embeddings.LayerNorm
        g, b = emb_ln.weight.detach(), emb_ln.bias.detach()
    else:
        g, b, _ = block_weights(system, layer - 1).norms["ln_ffn"]
    r = _ln_output_radius(g, b)
    ra = math.sqrt(r * r + 1.0)
    lengths = ctx.attention_mask.sum(1)
    nt = int(lengths.sum())
    sq = math.sqrt(nt)
    v_rows = math.sqrt(sum(max(a, c) ** 2 for a, c in zip(wu.head_norms()["v_aug"], wv.head_norms()["v_aug"])))
    ffn_ln = wu.norms["ln_ffn" if fam == "gpt2" else "ln_attn"]
    r_ffn = _ln_output_radius(ffn_ln[0], ffn_ln[1])
    w1 = max(_spec(torch.cat([wu.linear["ffn_in"][0], wu.linear["ffn_in"][1][:, None]], 1)),
             _spec(torch.cat([wv.linear["ffn_in"][0], wv.linear["ffn_in"][1][:, None]], 1)))
    inputs = {"o": sq * v_rows * ra, "ffn_in": sq * r_ffn, "ffn_out": sq * w1 * math.sqrt(r_ffn ** 2 + 1.0)}
    for role in (("qkv",) if fam == "gpt2" else ("q", "k", "v")):
        inputs[role] = sq * r
    return LayerDomain(sigma_min={k: math.sqrt(v[2]) for k, v in wu.norms.items()}, radius=r, input_norm=inputs,
                       max_len=int(lengths.max()), n_tokens=nt, causal=system.family.causal, source="global")


# --- the terminal cost --------------------------------------------------------------------------


def _pool_weights(system, ctx: Context) -> torch.Tensor:
    pooling = getattr(system.readout, "pooling", None)
    if pooling is None:
        raise UnsupportedMethodError("Lipschitz constants of Φ are derived for the classification readout only")
    n = ctx.attention_mask.sum(1).to(torch.float64)
    return n.rsqrt() if pooling == "mean" else torch.ones_like(n)


def final_norm_sigma(system, x_last: torch.Tensor, ctx: Context) -> float | None:
    """Least per-token σ of the final norm's input (pre-LN decoders), None without a final norm."""
    norm = system.readout.norm
    if isinstance(norm, nn.Identity):
        return None
    return _sigma(_real_rows(x_last.detach(), ctx.attention_mask), float(norm.eps))


def terminal_lipschitz(system, ctx: Context, sigma_min: float | None = None) -> float:
    """Certified Lipschitz constant of ``Φ̄ = (1/S) Σ_s CE(W pool(norm(x_{s,L})) + b, y_s)`` in x_L.

    ``‖∇_z CE‖₂ = ‖softmax(z) − e_y‖₂ ≤ sqrt(2)``; mean pooling over n_s tokens has
    norm ``1/sqrt(n_s)``; Cauchy–Schwarz over sequences gives
    ``sqrt(2)·‖W‖₂·L_norm·sqrt(Σ_s w_s²)/S``.  ``sigma_min`` is the final norm's
    domain (default ``sqrt(eps)``: global).
    """
    w = _pool_weights(system, ctx)
    head = system.readout.head.weight.detach()
    l_norm = 1.0
    norm = system.readout.norm
    if not isinstance(norm, nn.Identity):
        s = sigma_min if sigma_min is not None else math.sqrt(float(norm.eps))
        l_norm = float(norm.weight.detach().abs().max()) / s
    return math.sqrt(2.0) * _spec(head) * l_norm * float(w.pow(2).sum().sqrt()) / w.numel()


def local_terminal_lipschitz(system, x_last: torch.Tensor, ctx: Context, batch: dict) -> float:
    """``‖∂Φ̄/∂x_L‖`` at ``x_L`` (the trajectory-local constant of the scalar terminal cost)."""
    x = x_last.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(system.terminal_cost(x, ctx, batch), x)
    return float((g * _mask(g, ctx)).norm())


__all__ = [
    "BlockWeights", "ComposedBound", "LayerDomain", "PowerResult", "activation_lipschitz", "block_weights",
    "composed_block_bound", "effective_linear", "final_norm_sigma", "global_domain", "layer_controls",
    "local_control_lipschitz", "local_state_lipschitz", "local_terminal_lipschitz", "power_iteration",
    "probe_block", "sampled_control_lipschitz", "sampled_state_lipschitz", "terminal_lipschitz",
]
