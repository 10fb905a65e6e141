"""Check the Pontryagin co-states and Hamiltonian gradients three independent ways.

For a system with controllers attached, :func:`verify` compares the output of
:func:`~controltune.pmp.solve_costate` (``p_l`` and ``∇_u H``; DESIGN.md §1:
``p_l = −∂J/∂x_l`` and ``∇_u H = −∂J/∂u`` exactly) with three references, the *legs*:

1. **autograd** (reverse mode, whole tensors): one global reverse pass through a plain
   rollout gives ``−∂J/∂x_l`` for every state and ``−∂J/∂u`` for every control;
   ``rel(a, b) = ‖a − b‖ / max(‖b‖, tiny)`` (Frobenius norms).
2. **forward** (forward-mode AD; no reverse pass anywhere): the directional derivative of
   the cost, exact to rounding, along

   * one random direction ``v`` per control: ``dJ/dt (u + t v)`` vs ``−⟨∇_u H, v⟩``;
   * ``n_state_directions`` random directions per state x_l: ``dΦ̄/dt`` of blocks
     ``l..L−1`` re-run from ``x_l + t v`` vs ``−⟨p_l, v⟩``;
   * one joint direction over all controls at once, from the embedding (no assumption
     on where a control acts).

   A layer control of block l (an initial control) gets one JVP of block l (of the
   embedding) with its parameter made a dual tensor in place (``torch.autograd.forward_ad``),
   giving its tangent ``w = ∂f_l/∂u · v`` of ``x_{l+1}`` (of ``x_0``) and ``dR``; all these
   tangents and the state directions are then carried through the remaining blocks in
   one batch (``torch.func.jvp`` under ``vmap``: one primal pass per block for all of
   them).  Shared controls get one JVP of the cost from their first block, terminal ones
   of the readout.  Forward mode through attention needs the ``eager`` kernel (``sdpa``
   on CPU has no forward-mode rule): the forward and FD legs switch to it and back.
3. **finite differences** (no AD at all): Richardson-extrapolated central differences
   ``D = (4 D(h/2) − D(h)) / 3``, ``D(h) = (J(+h) − J(−h)) / 2h``, along

   * one joint direction over all controls, from the embedding, with the whole running cost;
   * one direction per *group* of controls: the layer controls of block l (block l re-run
     from the cached state x_l with the controls moved, running cost ``R_l``), each shared
     control alone (from its first block), the initial controls, the terminal controls;
   * ``fd_state_directions`` directions per state x_l (blocks ``l..L−1`` re-run).

   The perturbed states of the state and layer/initial-group checks are carried through
   the blocks in one batch (``vmap``); these few directions replace one per control, the
   cost of the former check.  If ``D(h)`` and ``D(h/2)`` disagree beyond rounding (a kink
   such as a ReLU within the step), the check is redone once at ``h / 10``.

Directions are *relative*: a control direction has the norm of its control,
``v = ‖u‖ ξ/‖ξ‖`` (``ξ`` standard normal; norm 1 for a zero control), and a state
direction has, token by token, the norm of that token's state,
``v_{s,t} = ‖x_{s,t}‖ ξ_{s,t}/‖ξ_{s,t}‖`` — real LLMs have "massive activations" (token
norms jumping from ~150 to ~2,400 at one layer), and a step scaled by the norm of the
whole batch would move the small tokens across ReLU kinks.  A step ``h`` thus moves
every control (or token) by ``h`` relative to its size; ``FD_STEP`` is ``1e-5`` (on
MiniLM, ``1e-4`` crosses the ReLU kinks of adapters, ``1e-6`` is rounding-limited).

Scalar relative error, for ``a`` from the PMP solution and ``b`` the reference:
``rel(a, b) = |a − b| / max(|b|, σ)`` with ``σ = ZERO_SCALE · |J| = 10⁻⁴ |J|``.  A directional
derivative along a relative direction below ``σ`` (moving the control by 100 % would change
the cost by less than 0.01 %) is compared in absolute terms, so two exact zeros (a key
bias under softmax, whose derivative vanishes: PMP ``~1e-21``, JVP ``~1e-19``) agree
instead of being a ratio of rounding noises.  Calibration on MiniLM (all methods,
float64): forward mode and PMP differ by at most ``4.3e-16 |J|`` in absolute terms, so
the floor contributes at most ``4e-12`` to a relative error (tolerance ``1e-10``), while a
1 % error in any derivative larger than ``1e-12 |J|`` still fails.

The finite-difference leg subtracts the resolution of the quotient,
``δ = 3 · FD_ROUNDING_ULPS · ε · max|J(±h)| / h`` (ε the float64 machine epsilon; 3 bounds
the noise gain of the Richardson combination; ``FD_ROUNDING_ULPS = 4``, measured need on
MiniLM ``≤ 1.3``): ``err = max(|a − D| − δ, 0) / max(|D|, σ)``.  Whatever δ allows, the
*raw* error ``|a − D| / max(|D|, σ)`` above ``FD_RAW_CEILING`` (``1e-2``) always fails.

Default tolerances: float64 ``1e-10`` for autograd and forward mode, ``1e-6`` for
finite differences.  A float32 system is checked against float32 autograd (``1e-4``),
while the forward and FD legs run on a float64 copy of it, with that copy's own co-state
solve, at the float64 tolerances (a float32 number compared with a float64 derivative
would only measure float32 rounding).

Straight-through controls (masking: ``m = 1[s > τ]`` forward, ``∂m/∂s := 1`` backward)
make J piecewise constant in s, so its finite differences are 0 while the estimator's
gradient is not: the forward and FD legs run under the estimator's linearisation at the
current control (``straight_through_linearisation()`` of the controllers that have one),
whose value equals J there and whose true derivative is, by construction, the
straight-through gradient.

The per-group FD directions and the factored per-control JVPs rely on each control's
declared ``kind`` and ``layers`` (a layer control of block l acts in block l only, its
running cost is charged at l); the joint directions of both legs and the autograd leg
do not, so a control that acts where it does not say fails those.

``fd_mode="legacy"`` runs the former check (one central difference per control on the
step ladder ``FD_STEPS``, smallest error counts; :func:`finite_differences`), kept for
comparison and benchmarks.

Use a running cost with nonzero weight decay so the ``R`` terms are exercised.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.func import jvp, vmap

from .control import Control, ControlSystem
from .pmp import CoStateSolution, controls_by_layer, solve_costate

FD_STEPS = (1e-6, 1e-5)
"""Legacy mode: relative finite-difference steps tried (the smallest error counts)."""

FD_STEP = 1e-5
"""Relative step h of the directional finite differences (Richardson uses h and h/2)."""

FD_RAW_CEILING = 1e-2
"""A finite-difference error above this, without any resolution allowance, always fails."""

FD_ROUNDING_ULPS = 4.0
"""Rounding error of one cost evaluation, in units of ε·|J|, assumed by the FD resolution δ."""

ZERO_SCALE = 1e-4
"""σ = ZERO_SCALE·|J|: the floor of the denominator of a scalar relative error (see the module docstring)."""

FD_MODES = ("directional", "legacy")

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"autograd": 1e-10, "forward": 1e-10, "fd": 1e-6},
    torch.float32: {"autograd": 1e-4, "forward": 1e-10, "fd": 1e-6},  # forward and FD run on the float64 copy
}

VMAP_CHUNK = 64
"""Tangents pushed through the blocks in one ``vmap`` call."""

_TINY = torch.finfo(torch.float64).tiny
_EPS = torch.finfo(torch.float64).eps


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / max(‖b‖, tiny)`` (Frobenius norms, computed in float64)."""
    a64, b64 = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    tiny = torch.finfo(torch.as_tensor(b).dtype if torch.as_tensor(b).is_floating_point() else torch.float64).tiny
    return float((a64 - b64).norm() / max(float(b64.norm()), tiny))


def scalar_error(a: float, b: float, scale: float) -> float:
    """``|a − b| / max(|b|, scale)``: relative error of a directional derivative, ``scale`` its zero floor σ."""
    return abs(a - b) / max(abs(b), scale, _TINY)


# --- the result ------------------------------------------------------------------------


@dataclass
class Verification:
    """Per-layer and per-control relative errors of the PMP solution, leg by leg.

    Attributes:
        dtype: the system's dtype (``float32``/``float64``).
        n_layers, n_controls: sizes of the system checked.
        costate_autograd: ``rel(p_l, −∂J/∂x_l)`` for l = 0..L.
        control_autograd: ``name -> rel(∇_u H, −∂J/∂u)``.
        costate_forward: per layer l, the largest ``rel(−⟨p_l, v⟩, JVP)`` over the state directions
            (empty when the leg did not run).
        control_forward: ``name -> rel(−⟨∇_u H, v⟩, dJ/dt(u + t v))`` (one direction per control).
        forward_joint: the same for one direction over all controls at once.
        costate_fd, costate_fd_raw: per layer, the largest FD error of ``−⟨p_l, v⟩`` with / without δ.
        fd_directions, fd_directions_raw: ``label -> FD error`` with / without δ, one per direction:
            ``all`` (joint), ``layer <l>``, ``shared <name>``, ``init``, ``term`` (legacy mode: a
            control name per direction).
        control_fd: ``name -> FD error of the direction that perturbs the control`` (its group's;
            a per-control view of ``fd_directions`` for figures that place controls by layer).
        tol_autograd, tol_forward, tol_fd: the tolerances used; fd_raw_ceiling: the raw ceiling.
        fd_mode, fd_step: ``directional`` (step h, Richardson) or ``legacy`` (ladder, step 0 here).
        fd_refined: FD directions whose step was refined because of a kink (``p_<l>`` for states).
        zero_scale: σ/|J| of :func:`scalar_error`.
        seconds: wall time per leg (``solve``, ``autograd``, ``forward``, ``fd``).
        fd_raw_max: the largest raw FD error.
    """

    dtype: str
    n_layers: int
    n_controls: int
    costate_autograd: list[float]
    control_autograd: dict[str, float]
    costate_forward: list[float] = field(default_factory=list)
    control_forward: dict[str, float] = field(default_factory=dict)
    forward_joint: float | None = None
    costate_fd: list[float] = field(default_factory=list)
    costate_fd_raw: list[float] = field(default_factory=list)
    fd_directions: dict[str, float] = field(default_factory=dict)
    fd_directions_raw: dict[str, float] = field(default_factory=dict)
    control_fd: dict[str, float] = field(default_factory=dict)
    tol_autograd: float = 1e-10
    tol_forward: float = 1e-10
    tol_fd: float = 1e-6
    fd_raw_ceiling: float = FD_RAW_CEILING
    fd_mode: str = "directional"
    fd_step: float = FD_STEP
    fd_refined: list[str] = field(default_factory=list)
    zero_scale: float = ZERO_SCALE
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def max_rel_err_costate(self) -> float:
        return max(self.costate_autograd, default=0.0)

    @property
    def max_rel_err_control_grad(self) -> float:
        return max(self.control_autograd.values(), default=0.0)

    @property
    def max_rel_err_forward(self) -> float:
        joint = [] if self.forward_joint is None else [self.forward_joint]
        return max([*self.costate_forward, *self.control_forward.values(), *joint], default=0.0)

    @property
    def max_rel_err_fd(self) -> float:
        return max([*self.costate_fd, *self.fd_directions.values()], default=0.0)

    @property
    def fd_raw_max(self) -> float:
        return max([*self.costate_fd_raw, *self.fd_directions_raw.values()], default=0.0)

    @property
    def legs(self) -> dict[str, dict[str, Any]]:
        """``leg -> {tolerance, max_error, n_checks, seconds}`` (FD also ``raw_ceiling``, ``max_raw_error``)."""
        out = {"autograd": {"tolerance": self.tol_autograd,
                            "max_error": max(self.max_rel_err_costate, self.max_rel_err_control_grad),
                            "n_checks": len(self.costate_autograd) + len(self.control_autograd)}}
        if self.control_forward or self.costate_forward:
            out["forward"] = {"tolerance": self.tol_forward, "max_error": self.max_rel_err_forward,
                              "n_checks": len(self.costate_forward) + len(self.control_forward)
                              + (self.forward_joint is not None)}
        if self.fd_directions or self.costate_fd:
            out["fd"] = {"tolerance": self.tol_fd, "max_error": self.max_rel_err_fd,
                         "raw_ceiling": self.fd_raw_ceiling, "max_raw_error": self.fd_raw_max,
                         "n_checks": len(self.costate_fd) + len(self.fd_directions), "mode": self.fd_mode,
                         "step": self.fd_step, "refined": list(self.fd_refined)}
        for leg, info in out.items():
            info["seconds"] = self.seconds.get(leg)
        return out

    def failures(self) -> list[str]:
        """Readable list of every check above its tolerance (empty when all pass)."""
        out = _over(self.costate_autograd, self.tol_autograd, "p_{} vs autograd")
        out += _over(self.control_autograd, self.tol_autograd, "grad_u H[{}] vs autograd")
        out += _over(self.costate_forward, self.tol_forward, "p_{} vs forward mode")
        out += _over(self.control_forward, self.tol_forward, "grad_u H[{}] vs forward mode")
        if self.forward_joint is not None:
            out += _over({"all controls": self.forward_joint}, self.tol_forward, "grad_u H[{}] vs forward mode")
        out += _over(self.costate_fd, self.tol_fd, "p_{} vs finite differences")
        out += _over(self.fd_directions, self.tol_fd, "grad_u H[{}] vs finite differences")
        out += _over(self.costate_fd_raw, self.fd_raw_ceiling, "p_{} vs finite differences (raw)")
        out += _over(self.fd_directions_raw, self.fd_raw_ceiling, "grad_u H[{}] vs finite differences (raw)")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(max_rel_err_costate=self.max_rel_err_costate,
                   max_rel_err_control_grad=self.max_rel_err_control_grad,
                   max_rel_err_forward=self.max_rel_err_forward, max_rel_err_fd=self.max_rel_err_fd,
                   fd_raw_max=self.fd_raw_max, legs=self.legs, passed=self.passed, failures=self.failures())
        return out


def _over(errors: Sequence[float] | dict[str, float], tol: float, what: str) -> list[str]:
    """``"<what>: err > tol"`` for each error above ``tol`` (NaN fails); ``what`` has a ``{}`` for the key."""
    items = errors.items() if isinstance(errors, dict) else enumerate(errors)
    return [f"{what.format(k)}: {e:.2e} > {tol:g}" for k, e in items if not e <= tol]


# --- references ----------------------------------------------------------------------------


def total_cost(system: ControlSystem, batch: dict) -> torch.Tensor:
    """``J = Φ̄(x_L) + R_init + Σ_l R_l + R_term`` by a plain rollout (scalar)."""
    x, ctx = system.embed(batch)
    for layer in range(system.n_layers):
        x = system.step(layer, x, ctx)
    return system.terminal_cost(x, ctx, batch) + _running_total(system)


def _all_wheres(system: ControlSystem) -> tuple[int | str, ...]:
    return (*range(system.n_layers), "init", "term")


def _running(system: ControlSystem, wheres: Sequence[int | str]) -> torch.Tensor:
    """``Σ_{w ∈ wheres} R_w`` (scalar)."""
    return sum((system.running_cost(w) for w in wheres), torch.zeros(()))


def _running_total(system: ControlSystem) -> torch.Tensor:
    return _running(system, _all_wheres(system))


def autograd_reference(system: ControlSystem, batch: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``(−∂J/∂x_l for l = 0..L, {name: −∂J/∂u})`` from one global reverse pass.

    The states of a plain chained rollout are differentiated as intermediate
    tensors of one graph (``autograd.grad`` with them as inputs, the functional
    form of ``retain_grad``), so nothing is layer-local as in the solver.
    """
    controls = system.controls()
    with torch.enable_grad():
        x, ctx = system.embed(batch)
        if not x.requires_grad:  # no initial control: make x_0 differentiable without changing the graph above
            x = x.detach().requires_grad_(True)
        states = [x]
        for layer in range(system.n_layers):
            x = system.step(layer, x, ctx)
            states.append(x)
        cost = system.terminal_cost(x, ctx, batch) + _running_total(system)
        grads = torch.autograd.grad(cost, [*states, *[c.param for c in controls]], allow_unused=True)
    n = len(states)
    neg = [torch.zeros_like(t) if g is None else -g for g, t in zip(grads, [*states, *[c.param for c in controls]])]
    return neg[:n], {c.name: g for c, g in zip(controls, neg[n:])}


def float64_twin(system: ControlSystem) -> ControlSystem:
    """The system itself if it is float64, else a float64 deep copy (for the forward and FD legs)."""
    param = next(iter(system.controls()), None)
    dtype = param.param.dtype if param is not None else next(system.parameters()).dtype  # type: ignore[attr-defined]
    if dtype == torch.float64:
        return system
    if not isinstance(system, torch.nn.Module):
        raise TypeError(f"cannot make a float64 copy of a {type(system).__name__}; pass a float64 system")
    try:
        return copy.deepcopy(system).to(torch.float64)
    except RuntimeError as err:
        raise RuntimeError(f"cannot deep-copy the system to float64 for finite differences ({err}); a controller "
                           "probably keeps a tensor of an earlier forward pass; build the copy before running it, "
                           "or verify a float64 system") from err


def _batch_to(batch: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


# --- directions, groups and the cached rollout ------------------------------------------------


def control_direction(param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``v = ‖u‖ ξ/‖ξ‖`` (ξ standard normal; ``‖v‖ = 1`` for a zero control), float64, u's shape."""
    xi = torch.randn(param.shape, generator=gen, dtype=torch.float64)
    size = float(param.detach().double().norm())
    return (xi * ((size if size > 0 else 1.0) / float(xi.norm()))).to(param.device)


def token_direction(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per token (last axis), ``v_{s,t} = ‖x_{s,t}‖ ξ_{s,t}/‖ξ_{s,t}‖`` (norm 1 where a token is zero).

    ``x``: the state, S×T×d (any ``…×d``); returns the same shape, float64.
    """
    xi = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
    size = x.detach().double().norm(dim=-1, keepdim=True)
    size = torch.where(size > 0, size, torch.ones_like(size))
    return xi * (size / xi.norm(dim=-1, keepdim=True))


@dataclass
class ControlGroup:
    """Controls perturbed together by one finite-difference direction.

    Attributes:
        label: ``all``, ``layer <l>``, ``shared <name>``, ``init`` or ``term``.
        controls: the controls of the group.
        start: where the re-run starts: ``"embed"``, or a layer l (``n_layers``: the readout only).
        wheres: the running costs ``R_w`` re-evaluated (``all``: every one).
        local: the controls act at ``start`` only (the layer controls of one block, the initial
            controls): the perturbed runs differ from ``start + 1`` on only by their state, so
            the rest of the re-runs is batched.
    """

    label: str
    controls: list[Control]
    start: int | str
    wheres: tuple[int | str, ...]
    local: bool = False


def control_groups(system: ControlSystem, controls: Sequence[Control]) -> list[ControlGroup]:
    """The FD directions: all controls jointly, then the layer, shared, initial and terminal groups."""
    n = system.n_layers
    groups = [ControlGroup("all", list(controls), "embed", _all_wheres(system))]
    for layer, members in enumerate(controls_by_layer(controls, n)):
        own = [c for c in members if c.kind == "layer"]
        if own:
            groups.append(ControlGroup(f"layer {layer}", own, layer, (layer,), local=True))
    groups += [ControlGroup(f"shared {c.name}", [c], min(c.layers), tuple(c.layers))
               for c in controls if c.kind == "shared"]
    for kind, start in (("init", "embed"), ("term", n)):
        members = [c for c in controls if c.kind == kind]
        if members:
            groups.append(ControlGroup(kind, members, start, (kind,), local=kind == "init"))
    return groups


@dataclass
class Rollout:
    """States ``x_0..x_L`` of one plain no-grad rollout, its context and the cost ``J`` there."""

    states: list[torch.Tensor]
    ctx: Any
    cost: float


@torch.no_grad()
def rollout(system: ControlSystem, batch: dict) -> Rollout:
    """One forward pass, cached so that a check from x_l re-runs blocks ``l..L−1`` only."""
    x, ctx = system.embed(batch)
    states = [x]
    for layer in range(system.n_layers):
        states.append(system.step(layer, states[-1], ctx))
    cost = float(system.terminal_cost(states[-1], ctx, batch) + _running_total(system))
    return Rollout(states, ctx, cost)


def cost_from(system: ControlSystem, cached: Rollout, batch: dict, start: int | str,
              wheres: Sequence[int | str]) -> torch.Tensor:
    """``Φ̄ + Σ_{w ∈ wheres} R_w`` with the blocks from ``start`` re-run (scalar).

    ``start = "embed"`` re-embeds (initial controls act there); a layer l starts from the
    cached ``x_l`` with the cached context (``l = L``: the readout only).
    """
    if start == "embed":
        x, ctx = system.embed(batch)
        first = 0
    else:
        ctx, first = cached.ctx, int(start)
        x = cached.states[first]
    for layer in range(first, system.n_layers):
        x = system.step(layer, x, ctx)
    return system.terminal_cost(x, ctx, batch) + _running(system, wheres)


def _pmp_slope(solution: CoStateSolution, directions: dict[str, torch.Tensor]) -> float:
    """``⟨∂J/∂u, v⟩ = −Σ_c ⟨∇_u H_c, v_c⟩`` predicted by the PMP solution."""
    return -sum(float((solution.control_grads[n].double() * v.double()).sum()) for n, v in directions.items())


def _check_solution(system: ControlSystem, solution: CoStateSolution) -> None:
    if solution.states[0].dtype != torch.float64:
        raise TypeError("the forward and FD legs need a float64 system and its float64 solution "
                        "(use float64_twin(system) and solve_costate on it)")
    missing = [c.name for c in system.controls() if c.name not in solution.control_grads]
    if missing:
        raise KeyError(f"controls {missing} of the checked system are missing from the solution")


@contextlib.contextmanager
def straight_through_linearised(system: ControlSystem) -> Iterator[None]:
    """Every module of ``system`` offering ``straight_through_linearisation()`` (a controller with a
    straight-through estimator; a no-op context for the others) inside that context."""
    with contextlib.ExitStack() as stack:
        for module in system.modules() if isinstance(system, nn.Module) else ():
            linearise = getattr(module, "straight_through_linearisation", None)
            if callable(linearise):
                stack.enter_context(linearise())
        yield


def eager_kernel(system: ControlSystem) -> contextlib.AbstractContextManager:
    """``system.using_kernel("eager")`` (forward mode needs it; the previous kernel is restored on exit),
    a no-op context for a system without attention kernels."""
    using = getattr(system, "using_kernel", None)
    return using("eager") if callable(using) else contextlib.nullcontext()


# --- batched propagation through the blocks ------------------------------------------------


def batched(fn: Callable[[torch.Tensor], torch.Tensor], stacked: torch.Tensor) -> torch.Tensor:
    """``torch.stack([fn(s) for s in stacked])``, computed with ``vmap`` in chunks of ``VMAP_CHUNK``.

    A system whose code ``vmap`` cannot batch falls back to the loop (same numbers, slower).
    """
    try:
        return vmap(fn, chunk_size=VMAP_CHUNK)(stacked)
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([fn(s) for s in stacked])


def propagate(system: ControlSystem, entering: Sequence[Sequence[torch.Tensor]],
              block: Callable[[int, torch.Tensor], torch.Tensor],
              readout: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
    """Carry tensors entering at each state ``x_l`` through blocks ``l..L−1`` and the readout, batched.

    ``entering[l]`` (l = 0..L) are the tensors (each S×T×d) that enter at ``x_l``; one batch is
    carried from ``x_0`` on, growing as tensors enter, so each block runs once for all of them:
    ``block(l, stacked) -> stacked`` (K×S×T×d), ``readout(stacked) -> K`` scalars.
    Returns one scalar per entering tensor, in the order ``entering[0], entering[1], ...``.
    """
    carried: torch.Tensor | None = None
    for layer, new in enumerate(entering):
        if new:
            stacked = torch.stack(list(new))
            carried = stacked if carried is None else torch.cat([carried, stacked])
        if carried is not None and layer < system.n_layers:
            carried = block(layer, carried)
    return [] if carried is None else [float(v) for v in readout(carried)]


# --- forward-mode leg --------------------------------------------------------------------


def control_jvp(controls: Sequence[Control], tangents: Sequence[torch.Tensor], fn: Callable[[], Any]) -> Any:
    """Tangent of ``fn()`` (a tensor or tuple of tensors) when each control ``u_c`` moves along ``tangents[c]``.

    One forward-mode pass (``torch.autograd.forward_ad``): each control's parameter is made a dual
    tensor *in place* (its value copied onto itself with the tangent attached), so a controller
    that reaches its parameter through any reference sees the tangent; leaving the dual level
    drops the tangents and leaves the values bit for bit unchanged.
    """
    with torch.no_grad(), fwAD.dual_level():
        for c, t in zip(controls, tangents):
            c.param.copy_(fwAD.make_dual(c.param.detach().clone(), t.to(c.param)))
        out = fn()
        if isinstance(out, tuple):
            return tuple(_tangent(o) for o in out)
        return _tangent(out)


def _tangent(value: torch.Tensor) -> torch.Tensor:
    """The tangent of a dual tensor (zeros when ``value`` does not depend on the perturbed controls)."""
    tangent = fwAD.unpack_dual(value).tangent
    return torch.zeros_like(value) if tangent is None else tangent


def _block_tangents(system: ControlSystem, cached: Rollout, layer: int, tangents: torch.Tensor) -> torch.Tensor:
    """``∂f_l/∂x · t`` at the cached ``x_l`` for each stacked tangent t (K×S×T×d), by ``jvp``."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return jvp(lambda x: system.step(layer, x, cached.ctx), (cached.states[layer],), (t,))[1]

    return batched(one, tangents)


def _readout_tangents(system: ControlSystem, cached: Rollout, batch: dict, tangents: torch.Tensor) -> torch.Tensor:
    """``∂Φ̄/∂x_L · t`` for each stacked tangent t (K scalars), by ``jvp``."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return jvp(lambda x: system.terminal_cost(x, cached.ctx, batch), (cached.states[-1],), (t,))[1]

    return batched(one, tangents)


@dataclass
class ForwardReport:
    """What :func:`forward_mode_check` measured.

    Attributes:
        costate: per layer l, the largest ``rel(−⟨p_l, v⟩, JVP)`` over the state directions.
        controls: ``name -> rel(−⟨∇_u H, v⟩, dJ/dt(u + t v))``.
        joint: the same along one direction over all controls, from the embedding.
    """

    costate: list[float]
    controls: dict[str, float]
    joint: float


@torch.no_grad()
def forward_mode_check(system: ControlSystem, batch: dict, solution: CoStateSolution, n_state_directions: int = 2,
                       seed: int = 0, directions: dict[str, torch.Tensor] | None = None) -> ForwardReport:
    """The forward-mode leg (see the module docstring) on a float64 system.

    ``directions``: ``name -> v`` per control (default: :func:`control_direction`, seeded).
    Each initial control (layer control of block l) gets one JVP of the embedding (of block l)
    giving its tangent of ``x_0`` (of ``x_{l+1}``) and ``dR``; these tangents and the state
    directions of every ``x_l`` are then carried together through the blocks (:func:`propagate`).
    Shared and terminal controls get one JVP of the cost from where they first act.
    """
    _check_solution(system, solution)
    n = system.n_layers
    cached = rollout(system, batch)
    scale = ZERO_SCALE * abs(cached.cost)
    gen = torch.Generator().manual_seed(seed)
    controls = list(system.controls())
    if directions is None:
        directions = {c.name: control_direction(c.param, gen) for c in controls}
    slope: dict[str, float] = {}  # dJ/dt along each control's direction
    pushed = _direct_tangents(system, batch, cached, controls, directions, slope)
    state_dirs = [[token_direction(x, gen) for _ in range(n_state_directions)] for x in cached.states]
    entering = [[*dirs, *(w for _, w in tangents)] for dirs, tangents in zip(state_dirs, pushed)]
    values = iter(propagate(system, entering, partial(_block_tangents, system, cached),
                            partial(_readout_tangents, system, cached, batch)))

    costate_err = []
    for layer, dirs in enumerate(state_dirs):
        found = [next(values) for _ in dirs]
        for name, _ in pushed[layer]:
            slope[name] += next(values)
        p = solution.costates[layer]
        costate_err.append(0.0 if p is None else max(
            (scalar_error(-float((p.double() * v).sum()), d, scale) for v, d in zip(dirs, found)), default=0.0))
    for c in controls:  # shared and terminal: one JVP of the cost from where they first act
        if c.kind in ("shared", "term"):
            start, wheres = (n, ("term",)) if c.kind == "term" else (min(c.layers), tuple(c.layers))
            slope[c.name] = float(control_jvp([c], [directions[c.name]],
                                              partial(cost_from, system, cached, batch, start, wheres)))
    control_err = {c.name: scalar_error(_pmp_slope(solution, {c.name: directions[c.name]}), slope[c.name], scale)
                   for c in controls}
    joint = float(control_jvp(controls, [directions[c.name] for c in controls],
                              partial(cost_from, system, cached, batch, "embed", _all_wheres(system))))
    return ForwardReport(costate_err, control_err, scalar_error(_pmp_slope(solution, directions), joint, scale))


def _direct_tangents(system: ControlSystem, batch: dict, cached: Rollout, controls: Sequence[Control],
                     directions: dict[str, torch.Tensor], slope: dict[str, float]
                     ) -> list[list[tuple[str, torch.Tensor]]]:
    """Per state x_l, the tangents ``(name, w)`` the initial (l = 0) and layer (block l−1) controls give it.

    ``w = ∂x_0/∂u·v`` (one JVP of the embedding) or ``∂f_{l−1}/∂u·v`` (one JVP of block l−1);
    ``slope[name]`` is set to the running-cost part ``dR/dt`` of the same JVP.
    """
    pushed: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(system.n_layers + 1)]
    for c in controls:
        if c.kind == "init":
            fn, target = partial(_embed_and_cost, system, batch), 0
        elif c.kind == "layer":
            layer = c.layers[0]
            fn, target = partial(_block_and_cost, system, layer, cached.states[layer], cached.ctx), layer + 1
        else:
            continue
        w, r = control_jvp([c], [directions[c.name]], fn)
        pushed[target].append((c.name, w))
        slope[c.name] = float(r)
    return pushed


def _embed_and_cost(system: ControlSystem, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_0(u), R_init(u))``: what an initial control changes directly."""
    return system.embed(batch)[0], system.running_cost("init")


def _block_and_cost(system: ControlSystem, layer: int, x: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, ...]:
    """``(f_l(x, u), R_l(u))``: what a layer control of block l changes directly."""
    return system.step(layer, x, ctx), system.running_cost(layer)


def _phi_from(system: ControlSystem, cached: Rollout, batch: dict, layer: int, x: torch.Tensor) -> torch.Tensor:
    """``Φ̄`` after running blocks ``layer..L−1`` from state ``x`` (running costs do not depend on x)."""
    for k in range(layer, system.n_layers):
        x = system.step(k, x, cached.ctx)
    return system.terminal_cost(x, cached.ctx, batch)


# --- finite-difference leg ------------------------------------------------------------------


@dataclass
class Difference:
    """A Richardson-extrapolated central difference and its float64 resolution.

    Attributes:
        value: ``D = (4 D(h/2) − D(h)) / 3``.
        coarse, fine: ``D(h)``, ``D(h/2)``.
        resolution: ``δ = 3·FD_ROUNDING_ULPS·ε·max|J| / h``, a bound on the rounding noise of
            ``D`` and of ``D(h) − D(h/2)``.
        step: h.
        refined: how many times the step was divided by ``FD_REFINE`` because ``D(h)`` and
            ``D(h/2)`` disagreed (a kink, e.g. of a ReLU, within the step).
    """

    value: float
    coarse: float
    fine: float
    resolution: float
    step: float
    refined: int = 0

    def smooth(self, tol: float, scale: float) -> bool:
        """``|D(h) − D(h/2)| ≤ δ + tol·max(|D|, σ)``: the two steps agree, so J is smooth at this scale.

        For a smooth J, ``D(h) − D(h/2) = J‴h²/8 + O(h⁴)`` (far below ``tol`` at the default step);
        a kink between ``−h`` and ``h`` changes the two quotients differently.
        """
        return abs(self.coarse - self.fine) <= self.resolution + tol * max(abs(self.value), scale)


FD_REFINE = 10.0
"""Factor the step is divided by when the Richardson pair disagrees (at most ``FD_REFINEMENTS`` times)."""

FD_REFINEMENTS = 1

RICHARDSON_POINTS = (1.0, -1.0, 0.5, -0.5)
"""Where J is evaluated, in units of the step h."""


def richardson(values: Sequence[float], h: float) -> Difference:
    """Richardson extrapolation of central differences at 0 from ``J(t)`` at ``t = h·RICHARDSON_POINTS``."""
    j_plus, j_minus, j_half_plus, j_half_minus = values
    coarse = (j_plus - j_minus) / (2 * h)
    fine = (j_half_plus - j_half_minus) / h
    top = max(abs(v) for v in values)
    return Difference((4 * fine - coarse) / 3, coarse, fine, 3 * FD_ROUNDING_ULPS * _EPS * top / h, h)


def refined_difference(evaluate: Callable[[Sequence[float]], Sequence[float]], h: float, tol: float,
                       scale: float, first: Sequence[float] | None = None) -> Difference:
    """:func:`richardson` at h, redone at ``h / FD_REFINE`` while it is not :meth:`~Difference.smooth`.

    ``evaluate(ts) -> [J(t) for t in ts]``; ``first``: the values at step h when already known.
    The step is chosen from the differences alone, never from the value they are compared with.
    """
    diff = richardson(first if first is not None else evaluate([h * p for p in RICHARDSON_POINTS]), h)
    for k in range(1, FD_REFINEMENTS + 1):
        if diff.smooth(tol, scale):
            break
        step = h / FD_REFINE ** k
        diff = richardson(evaluate([step * p for p in RICHARDSON_POINTS]), step)
        diff.refined = k
    return diff


def fd_errors(pmp: float, diff: Difference, scale: float) -> tuple[float, float]:
    """``(max(|a − D| − δ, 0) / max(|D|, σ), |a − D| / max(|D|, σ))``: with and without the allowance δ."""
    gap = abs(pmp - diff.value)
    denominator = max(abs(diff.value), scale, _TINY)
    return max(gap - diff.resolution, 0.0) / denominator, gap / denominator


@dataclass
class DifferenceReport:
    """What :func:`directional_differences` measured.

    Attributes:
        costate, costate_raw: per layer l, the largest FD error of ``−⟨p_l, v⟩`` with / without δ.
        directions, directions_raw: ``label -> FD error`` of each control group's direction.
        refined: labels (``p_<l>`` for states) whose step had to be refined (kinks).
    """

    costate: list[float]
    costate_raw: list[float]
    directions: dict[str, float]
    directions_raw: dict[str, float]
    refined: list[str]


@dataclass
class _Direction:
    """One FD check: its label, the PMP slope, the state it enters at (local checks) and its evaluator."""

    label: str
    pmp: float
    evaluate: Callable[[Sequence[float]], list[float]]
    entries: list[tuple[torch.Tensor, float]] | None = None  # local: (state entering at `level`, running cost)
    level: int = 0


@torch.no_grad()
def directional_differences(system: ControlSystem, batch: dict, solution: CoStateSolution,
                            n_state_directions: int = 1, step: float = FD_STEP, seed: int = 0,
                            tol: float = TOLERANCES[torch.float64]["fd"],
                            directions: dict[str, torch.Tensor] | None = None) -> DifferenceReport:
    """The finite-difference leg (see the module docstring) on a float64 system, no autograd.

    ``tol`` is the smoothness threshold of :func:`refined_difference` (the FD tolerance);
    ``directions``: ``name -> v`` per control (default: :func:`control_direction`, seeded), a
    group's direction being its controls' parts.  The perturbed states of the local checks
    (state directions, layer and initial groups) enter one batch carried through the blocks
    (:func:`propagate`); the joint, shared and terminal directions re-run the model per point.
    """
    _check_solution(system, solution)
    cached = rollout(system, batch)
    scale = ZERO_SCALE * abs(cached.cost)
    gen = torch.Generator().manual_seed(seed)
    controls = list(system.controls())
    if directions is None:
        directions = {c.name: control_direction(c.param, gen) for c in controls}
    points = [step * p for p in RICHARDSON_POINTS]
    checks = [_group_direction(system, cached, batch, solution, group, directions, points)
              for group in control_groups(system, controls)]
    for layer, x in enumerate(cached.states):
        p = solution.costates[layer]
        for _ in range(n_state_directions if p is not None else 0):
            v = token_direction(x, gen)
            checks.append(_Direction(f"p_{layer}", -float((p.double() * v).sum()),
                                     partial(_phis_displaced, system, cached, batch, layer, v),
                                     [(x + t * v.to(x), 0.0) for t in points], layer))
    values = _local_values(system, cached, batch, checks)
    report = DifferenceReport([0.0] * len(cached.states), [0.0] * len(cached.states), {}, {}, [])
    for check in checks:
        diff = refined_difference(check.evaluate, step, tol, scale, values.get(id(check)))
        err, raw = fd_errors(check.pmp, diff, scale)
        if diff.refined:
            report.refined.append(check.label)
        if check.label.startswith("p_"):
            layer = int(check.label[2:])
            report.costate[layer] = max(report.costate[layer], err)
            report.costate_raw[layer] = max(report.costate_raw[layer], raw)
        else:
            report.directions[check.label], report.directions_raw[check.label] = err, raw
    return report


def _group_direction(system: ControlSystem, cached: Rollout, batch: dict, solution: CoStateSolution,
                     group: ControlGroup, directions: dict[str, torch.Tensor], points: Sequence[float]) -> _Direction:
    """The FD check of one control group; a local group's perturbed entry states are computed now."""
    v = [directions[c.name] for c in group.controls]
    check = _Direction(group.label, _pmp_slope(solution, {c.name: directions[c.name] for c in group.controls}),
                       partial(_costs_displaced, system, cached, batch, group, v))
    if group.local:
        check.entries = _with_displaced(group, v, points, partial(_local_entry, system, cached, batch, group))
        check.level = 0 if group.start == "embed" else int(group.start) + 1
    return check


def _local_values(system: ControlSystem, cached: Rollout, batch: dict, checks: Sequence[_Direction]
                  ) -> dict[int, list[float]]:
    """``id(check) -> [J(t) for the Richardson points]`` of every local check, from one :func:`propagate`."""
    local = [c for c in checks if c.entries is not None]
    entering: list[list[torch.Tensor]] = [[] for _ in cached.states]
    for level in range(len(entering)):
        for check in (c for c in local if c.level == level):
            entering[level] += [x for x, _ in check.entries]
    phis = iter(propagate(system, entering, partial(_block_states, system, cached),
                          partial(_readout_states, system, cached, batch)))
    out = {}
    for level in range(len(entering)):
        for check in (c for c in local if c.level == level):
            out[id(check)] = [next(phis) + r for _, r in check.entries]
    return out


def _block_states(system: ControlSystem, cached: Rollout, layer: int, states: torch.Tensor) -> torch.Tensor:
    """Block l on each stacked state (K×S×T×d)."""
    return batched(lambda x: system.step(layer, x, cached.ctx), states)


def _readout_states(system: ControlSystem, cached: Rollout, batch: dict, states: torch.Tensor) -> torch.Tensor:
    """``Φ̄`` of each stacked final state (K scalars)."""
    return batched(lambda x: system.terminal_cost(x, cached.ctx, batch), states)


def _with_displaced(group: ControlGroup, directions: Sequence[torch.Tensor], ts: Sequence[float],
                    fn: Callable[[], Any]) -> list[Any]:
    """``[fn() with the group's controls at u + t v for t in ts]``.

    Each control is set to ``u + t v`` from a copy of u taken once, and restored bit for bit.
    """
    params = [c.param for c in group.controls]
    saved = [p.detach().clone() for p in params]
    out = []
    try:
        for t in ts:
            for p, u, v in zip(params, saved, directions):
                p.copy_(u).add_(v.to(u), alpha=t)
            out.append(fn())
    finally:
        for p, u in zip(params, saved):
            p.copy_(u)
    return out


def _costs_displaced(system: ControlSystem, cached: Rollout, batch: dict, group: ControlGroup,
                     directions: Sequence[torch.Tensor], ts: Sequence[float]) -> list[float]:
    """``[J(u + t v) for t in ts]`` moving the group's controls, re-run from the group's start."""
    if not group.local:
        return _with_displaced(group, directions, ts,
                               lambda: float(cost_from(system, cached, batch, group.start, group.wheres)))
    entries = _with_displaced(group, directions, ts, partial(_local_entry, system, cached, batch, group))
    first = 0 if group.start == "embed" else int(group.start) + 1
    phis = [float(v) for v in _readout_states(
        system, cached, batch, _carry(system, cached, first, torch.stack([x for x, _ in entries])))]
    return [phi + r for phi, (_, r) in zip(phis, entries)]


def _carry(system: ControlSystem, cached: Rollout, layer: int, states: torch.Tensor) -> torch.Tensor:
    """Blocks ``layer..L−1`` on each stacked state."""
    for k in range(layer, system.n_layers):
        states = _block_states(system, cached, k, states)
    return states


def _local_entry(system: ControlSystem, cached: Rollout, batch: dict, group: ControlGroup
                 ) -> tuple[torch.Tensor, float]:
    """``(x_0, R_init)`` or ``(x_{l+1} = f_l(x_l, u), R_l)`` at the system's current controls."""
    if group.start == "embed":
        x = system.embed(batch)[0]
    else:
        layer = int(group.start)
        x = system.step(layer, cached.states[layer], cached.ctx)
    return x, float(_running(system, group.wheres))


def _phis_displaced(system: ControlSystem, cached: Rollout, batch: dict, layer: int, v: torch.Tensor,
                    ts: Sequence[float]) -> list[float]:
    """``[Φ̄ from x_l + t v for t in ts]``."""
    x = cached.states[layer]
    xs = torch.stack([x + t * v.to(x) for t in ts])
    return [float(j) for j in _readout_states(system, cached, batch, _carry(system, cached, layer, xs))]


# --- legacy finite differences (one direction per control) ----------------------------------


def _unit(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randn(like.shape, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(like.device)


@torch.no_grad()
def finite_differences(system: ControlSystem, batch: dict, solution: CoStateSolution, n_state_directions: int = 2,
                       steps: Sequence[float] = FD_STEPS, seed: int = 0) -> tuple[list[float], dict[str, float], float]:
    """Legacy check: a central difference per control along a random unit direction, on a step ladder.

    The step is ``h = step · max(‖u‖, 1)`` (resp. ``‖x_l‖`` for the state directions, scaled by
    the whole batch), the error the smallest over the ladder, beyond ``δ = ε·max|J|/h``.
    Returns ``(per-layer max error of −⟨p_l, v⟩, {name: error of −⟨∇_u H, v⟩}, raw max)``;
    ``raw max`` leaves out the resolution allowance δ.  Kept for comparison (``fd_mode="legacy"``):
    it costs 2·len(steps) forward passes per control.
    """
    _check_solution(system, solution)
    gen = torch.Generator().manual_seed(seed)
    control_err: dict[str, float] = {}
    raw = 0.0
    for c in system.controls():
        v = _unit(c.param, gen)
        pmp = -float((solution.control_grads[c.name].double() * v).sum())  # ⟨∂J/∂u, v⟩ = −⟨∇_u H, v⟩
        err, err_raw = _ladder(partial(_cost_along, system, batch, c.param, v), pmp, steps,
                               max(float(c.param.norm()), 1.0))
        control_err[c.name] = err
        raw = max(raw, err_raw)
    cached = rollout(system, batch)
    costate_err = []
    for layer, x_l in enumerate(cached.states):
        worst = 0.0
        for _ in range(n_state_directions):
            v = _unit(x_l, gen)
            pmp = -float((solution.costates[layer].double() * v).sum())
            err, err_raw = _ladder(partial(_phi_along, system, cached, batch, layer, v), pmp, steps,
                                   max(float(x_l.norm()), 1.0))
            worst = max(worst, err)
            raw = max(raw, err_raw)
        costate_err.append(worst)
    return costate_err, control_err, raw


def _ladder(cost: Callable[[float], float], pmp: float, steps: Sequence[float], scale: float) -> tuple[float, float]:
    """Smallest FD error (with and without the allowance δ) over the relative steps of the ladder."""
    errs, raws = [], []
    for step in steps:
        h = step * scale
        j_plus, j_minus = cost(h), cost(-h)
        resolution = _EPS * max(abs(j_plus), abs(j_minus)) / h
        fd = (j_plus - j_minus) / (2 * h)
        errs.append(max(abs(pmp - fd) - resolution, 0.0) / max(abs(fd), _TINY))
        raws.append(abs(pmp - fd) / max(abs(fd), resolution, _TINY))
    return min(errs), min(raws)


def _cost_along(system: ControlSystem, batch: dict, param: torch.Tensor, v: torch.Tensor, t: float) -> float:
    """``J(u + t v)`` with u restored afterwards (exactly: the saved tensor is copied back)."""
    saved = param.detach().clone()
    param.add_(v, alpha=t)
    try:
        return float(total_cost(system, batch))
    finally:
        param.copy_(saved)


def _phi_along(system: ControlSystem, cached: Rollout, batch: dict, layer: int, v: torch.Tensor, t: float) -> float:
    return float(_phi_from(system, cached, batch, layer, cached.states[layer] + t * v))


# --- the check --------------------------------------------------------------------------


def verify(system: ControlSystem, batch: dict, solution: CoStateSolution | None = None, mode: str = "graph",
           fd: bool = True, n_state_directions: int = 2, fd_steps: Sequence[float] = FD_STEPS, seed: int = 0,
           tolerances: dict[str, float] | None = None, forward: bool = True, fd_mode: str = "directional",
           fd_step: float = FD_STEP, fd_state_directions: int = 1) -> Verification:
    """Compare the PMP solution with autograd, forward-mode AD and (optionally) finite differences.

    Args:
        system: a system with controllers attached (put it in eval mode: dropout off, deterministic gates).
        batch: the batch to check on (keep it small).
        solution: a precomputed :func:`solve_costate` result, else one is solved in ``mode``.
        fd: run the finite-difference leg.
        n_state_directions: random directions per state x_l of the forward leg (and of legacy FD).
        fd_steps: the legacy ladder of relative steps.
        tolerances: ``{"autograd": .., "forward": .., "fd": ..}``; defaults by dtype from :data:`TOLERANCES`.
        forward: run the forward-mode leg.
        fd_mode: ``directional`` (the default) or ``legacy`` (one central difference per control).
        fd_step: relative step h of the directional differences.
        fd_state_directions: random directions per state x_l of the directional FD leg.
    """
    if fd_mode not in FD_MODES:
        raise ValueError(f"fd_mode {fd_mode!r} is not one of {FD_MODES}")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    # The float64 copy is made before any forward pass: controllers may cache graph tensors, which deepcopy refuses.
    twin = float64_twin(system) if fd or forward else None
    if solution is None:
        solution = solve_costate(system, batch, mode=mode)
    seconds["solve"], clock = time.perf_counter() - clock, time.perf_counter()
    dtype = solution.states[0].dtype
    tol = dict(TOLERANCES.get(dtype, TOLERANCES[torch.float32]))
    tol.update(tolerances or {})
    neg_dx, neg_du = autograd_reference(system, batch)
    report = Verification(
        dtype=str(dtype).removeprefix("torch."), n_layers=solution.n_layers, n_controls=len(solution.controls),
        costate_autograd=[0.0 if p is None else relative_error(p, r) for p, r in zip(solution.costates, neg_dx)],
        control_autograd={name: relative_error(solution.control_grads[name], ref) for name, ref in neg_du.items()},
        tol_autograd=tol["autograd"], tol_forward=tol["forward"], tol_fd=tol["fd"], fd_mode=fd_mode,
        fd_step=fd_step if fd_mode == "directional" else 0.0, seconds=seconds)
    seconds["autograd"], clock = time.perf_counter() - clock, time.perf_counter()
    if twin is None:
        return report
    batch64 = _batch_to(batch, torch.float64)
    twin_solution = solution if twin is system else _solve_twin(twin, batch64, mode)
    seconds["solve"] += time.perf_counter() - clock
    gen = torch.Generator().manual_seed(seed + 1)
    directions = {c.name: control_direction(c.param, gen) for c in twin.controls()}  # shared by both legs
    with straight_through_linearised(twin), eager_kernel(twin):
        if forward:
            clock = time.perf_counter()
            found = forward_mode_check(twin, batch64, twin_solution, n_state_directions, seed, directions)
            report.costate_forward, report.control_forward, report.forward_joint = (found.costate, found.controls,
                                                                                    found.joint)
            seconds["forward"] = time.perf_counter() - clock
        if fd:
            clock = time.perf_counter()
            _fd_leg(report, twin, batch64, twin_solution, fd_mode, fd_step, fd_state_directions, n_state_directions,
                    fd_steps, seed, directions)
            seconds["fd"] = time.perf_counter() - clock
    return report


def _solve_twin(twin: ControlSystem, batch64: dict, mode: str) -> CoStateSolution:
    try:
        return solve_costate(twin, batch64, mode=mode)
    except RuntimeError as err:
        raise RuntimeError(f"the float64 copy for the forward and FD legs does not run ({err}); a controller "
                           "probably keeps tensors that Module.to(float64) does not convert (plain attributes "
                           "instead of parameters or buffers)") from err


def _fd_leg(report: Verification, twin: ControlSystem, batch64: dict, solution: CoStateSolution, fd_mode: str,
            fd_step: float, fd_state_directions: int, n_state_directions: int, fd_steps: Sequence[float],
            seed: int, directions: dict[str, torch.Tensor]) -> None:
    """Fill the FD fields of ``report`` (directional or legacy)."""
    if fd_mode == "legacy":
        report.costate_fd, report.fd_directions, raw = finite_differences(twin, batch64, solution,
                                                                          n_state_directions, fd_steps, seed)
        report.control_fd = dict(report.fd_directions)
        report.fd_directions_raw = {"legacy ladder (max)": raw}
        return
    found = directional_differences(twin, batch64, solution, fd_state_directions, fd_step, seed, report.tol_fd,
                                    directions)
    report.costate_fd, report.costate_fd_raw = found.costate, found.costate_raw
    report.fd_directions, report.fd_directions_raw, report.fd_refined = (found.directions, found.directions_raw,
                                                                         found.refined)
    groups = control_groups(twin, list(twin.controls()))
    for group in groups[1:] if len(groups) > 1 else groups:
        for c in group.controls:
            report.control_fd[c.name] = report.fd_directions[group.label]


__all__ = ["FD_RAW_CEILING", "FD_STEP", "TOLERANCES", "ControlGroup", "Verification", "autograd_reference",
           "control_direction", "control_groups", "directional_differences", "finite_differences",
           "float64_twin", "forward_mode_check", "relative_error", "richardson", "rollout", "scalar_error",
           "token_direction", "total_cost", "verify"]
