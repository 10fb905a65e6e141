"""Per-block Lipschitz estimators of the dynamics ``x_{l+1} = f_l(x_l, u_l)`` at the data.

Two estimators, each giving, per layer l, a constant in the state (``a_l``) and
in the control (``b_l``):

* **local** (trajectory-local): ``‖∂f_l/∂x‖_2`` and ``‖∂f_l/∂u_l‖_2`` at the data,
  by power iteration with JVPs (``torch.func.jvp``) and VJPs.  First-order: an
  *estimate*, not a certificate (it says nothing about finite displacements).
* **sampled** (a lower bound): ``max ‖f(x) − f(x')‖ / ‖x − x'‖`` over sampled
  pairs around the data and a few steps of adversarial ascent (same in u).

The certified upper bound composed operation by operation is
:mod:`controltune.bounds.composed`; the constants of the terminal cost are
:mod:`controltune.bounds.terminal`.

Conventions (DESIGN.md §1): the state is ``S×T×d``; norms are Frobenius norms
over the *real* (non-padding) positions only (:mod:`controltune.bounds.norms`).
For a pre-LN family (``f = x + G``) the state constant ``a_l`` is that of ``G``
(Grönwall uses ``1 + a_l``); for a post-LN family it is that of the whole block.
The control ``u_l`` is every *layer* control acting in block l, flattened and
concatenated (shared controls are not a per-layer quantity and are rejected).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..controllers.base import Control, UnsupportedMethodError
from ..families.base import Context
from .norms import real_mask

if TYPE_CHECKING:
    from ..system import ResidualSystem

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


def layer_controls(system: ResidualSystem, layer: int) -> list[Control]:
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


def _control_map(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context
                 ) -> tuple[tuple[torch.Tensor, ...], Callable[[Sequence[torch.Tensor]], torch.Tensor]]:
    """``(u_l, u ↦ m ⊙ f_l(x, u))``: block ``layer``'s layer controls (detached copies)
    and the block as a function of them at the fixed state ``x`` (padding masked)."""
    controls = layer_controls(system, layer)
    if not controls:
        raise ValueError(f"block {layer} has no layer controls")
    stepper = _Stepper(system, layer, ctx)
    names = _param_names(stepper, [c.param for c in controls])
    u = tuple(c.param.detach().clone() for c in controls)
    m = real_mask(x, ctx)
    x = x.detach()

    def f(us: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(stepper, dict(zip(names, us)), (x,), strict=False) * m

    return u, f


def _need_eager(system: ResidualSystem) -> None:
    if system.kernel != "eager":
        raise RuntimeError("forward-mode JVPs need the eager attention kernel: run inside "
                           "`with system.using_kernel('eager'):` (the system uses "
                           f"{system.kernel!r}; sdpa on CPU is first-order reverse only)")


def _residual(system: ResidualSystem) -> bool:
    """True for pre-LN families, where the state constant is that of G = f − x."""
    return not system.family.post_ln


# --- trajectory-local: Jacobian spectral norms --------------------------------------------


def local_state_lipschitz(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context, iters: int = 30,
                          tol: float = 1e-6,
                          seed: int = 0) -> PowerResult:
    """``‖∂f_l/∂x‖₂`` (post-LN) or ``‖∂G_l/∂x‖₂`` (pre-LN) at ``x`` (S×T×d), over real positions."""
    _need_eager(system)
    m = real_mask(x, ctx)
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


def local_control_lipschitz(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context, iters: int = 30,
                            tol: float = 1e-6,
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


# --- sampled lower bounds -----------------------------------------------------------------


def sampled_state_lipschitz(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context, radius: float = 1e-2,
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
    m = real_mask(x, ctx)
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


def sampled_control_lipschitz(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context, radius: float = 1e-2,
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


def _ascend_control(f: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], fu: torch.Tensor,
                    u: tuple[torch.Tensor, ...], r: float, starts: list, steps: int) -> float:
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


__all__ = [
    "PowerResult", "layer_controls", "local_control_lipschitz", "local_state_lipschitz", "power_iteration",
    "sampled_control_lipschitz", "sampled_state_lipschitz",
]
