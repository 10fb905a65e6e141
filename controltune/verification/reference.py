"""Shared references of the legs: the total cost, the reverse-mode autograd leg, the float64
copy, relative directions, control groups, the cached rollout and batched propagation.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import vectorize
from ..control import Control, ControlSystem
from ..pmp import CoStateSolution, controls_by_layer
from .report import VMAP_CHUNK

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
    """``torch.stack([fn(s) for s in stacked])`` by ``vmap`` in chunks of ``VMAP_CHUNK``
    (:func:`controltune.vectorize.batched`)."""
    return vectorize.batched(fn, stacked, VMAP_CHUNK)


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
