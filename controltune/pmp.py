"""The Pontryagin co-state process of a residual-stream control system.

For the system ``x_{l+1} = f_l(x_l, u_l)`` (l = 0..L-1) with cost
``J(u) = (1/S) Σ_s Φ(x_{s,L}; u_term) + R_init(u_init) + Σ_l R_l(u_l) + R_term(u_term)``
(DESIGN.md §1), :func:`solve_costate` returns, from one forward sweep and one
backward sweep of layer-local vector-Jacobian products,

* the states ``x_0 .. x_L`` and co-states ``p_0 .. p_L`` with
  ``p_L = −∂Φ̄/∂x_L`` (Φ̄ the batch mean) and ``p_l = ∇_x H_l(x_l, p_{l+1}, u_l) = (∂f_l/∂x)ᵀ p_{l+1}``;
* the Hamiltonians ``H_l = Σ_s p_{l+1,s} · f_l(x_{l,s}, u_l) − R_l(u_l)`` for l = 0..L-1
  (the dot product runs over sequences, tokens and features: H_l pairs block l with
  the co-state of its *output*, p_{l+1});
* ``∇_u H`` of every control, which equals ``−∂J/∂u``:

  - layer control of block l: ``∇_u H_l = (∂f_l/∂u)ᵀ p_{l+1} − ∂R_l/∂u``;
  - shared control: ``Σ_{l ∈ layers} ∇_u H_l`` (its running cost is split over its layers);
  - initial control: ``(∂x_0/∂u)ᵀ p_0 − ∂R_init/∂u`` (the VJP of ``embed``);
  - terminal control: ``−∂(Φ̄ + R_term)/∂u``.

The two modes are the discrete analogues of torchdiffeq's ``odeint`` and
``odeint_adjoint``: ``graph`` keeps every block's autograd graph from the one
forward sweep; ``recompute`` keeps only the L+1 detached states and re-runs one
block at a time during the backward sweep (peak memory ≈ one block's activations
plus the states, at the price of a second forward pass).

Any object following :class:`ControlSystem` can be solved: the
:class:`~controltune.system.ResidualSystem` of a Transformer, or a toy network
(:class:`controltune.msa.ToyResidualNet`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .control import Control, ControlSystem

MODES = ("graph", "recompute")


class CoStateError(FloatingPointError):
    """A co-state became NaN or infinite (names the layer where it first appeared)."""


@dataclass
class CoStateSolution:
    """Result of :func:`solve_costate` (all tensors detached).

    Attributes:
        states: ``x_0 .. x_L`` (L+1 tensors, each the system's state shape, S×T×d for a Transformer).
        costates: ``p_0 .. p_L`` (same shapes), ``p_l = −∂J/∂x_l`` (``p_0`` is ``None`` when
            solved with ``initial_costate=False`` and no initial control).
        hamiltonian: ``H_0 .. H_{L-1}`` (shape ``(L,)``), ``H_l = Σ_s p_{l+1}·f_l(x_l, u_l) − R_l(u_l)``.
        control_grads: ``name -> ∇_u H`` (= ``−∂J/∂u``, the control's shape) for every control.
        layer_grads: per layer l, ``name -> ∇_u H_l`` for the layer and shared controls acting
            in block l (a shared control appears in each of its layers with that layer's part).
        terminal_cost: ``Φ̄`` (batch-mean task loss) at the current controls.
        running_cost: ``R_init + Σ_l R_l + R_term``.
        controls: the controls solved for, in ``system.controls()`` order.
        ctx: the context returned by ``embed`` (for re-evaluating blocks at ``x_l``).
        mode: ``graph`` or ``recompute``.
    """

    states: list[torch.Tensor]
    costates: list[torch.Tensor | None]
    hamiltonian: torch.Tensor
    control_grads: dict[str, torch.Tensor]
    layer_grads: list[dict[str, torch.Tensor]]
    terminal_cost: float
    running_cost: float
    controls: list[Control]
    ctx: Any = None
    mode: str = "graph"
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.states) - 1

    @property
    def cost(self) -> float:
        """``J = Φ̄ + R_init + Σ_l R_l + R_term``."""
        return self.terminal_cost + self.running_cost


# --- control bookkeeping ------------------------------------------------------------------


def check_controls(controls: Sequence[Control], n_layers: int) -> None:
    """Reject duplicate names, a parameter listed twice, and layers outside ``0..n_layers-1``."""
    names: set[str] = set()
    params: dict[int, str] = {}
    for c in controls:
        if c.name in names:
            raise ValueError(f"two controls are named {c.name!r}; control names must be unique")
        names.add(c.name)
        if id(c.param) in params:
            raise ValueError(f"controls {params[id(c.param)]!r} and {c.name!r} hold the same parameter")
        params[id(c.param)] = c.name
        if c.kind in ("layer", "shared"):
            bad = [layer for layer in c.layers if not 0 <= layer < n_layers]
            if not c.layers or bad:
                raise ValueError(f"control {c.name!r} ({c.kind}) has layers {c.layers}; "
                                 f"expected a non-empty subset of 0..{n_layers - 1}")
            if c.kind == "layer" and len(c.layers) != 1:
                raise ValueError(f"layer control {c.name!r} acts in {len(c.layers)} blocks {c.layers}; "
                                 "a control used by several blocks must have kind 'shared'")


def controls_by_layer(controls: Sequence[Control], n_layers: int) -> list[list[Control]]:
    """The layer and shared controls acting in each block (``n_layers`` lists)."""
    out: list[list[Control]] = [[] for _ in range(n_layers)]
    for c in controls:
        if c.kind in ("layer", "shared"):
            for layer in c.layers:
                out[layer].append(c)
    return out


def _vjp(outputs: list[torch.Tensor], cotangents: list[torch.Tensor],
         inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``Σ_k (∂outputs_k/∂inputs)ᵀ cotangents_k`` in one autograd call (zeros for unused inputs).

    Outputs that do not require grad (e.g. a zero running cost) are dropped.
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(i) for i in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]


def _check_finite(p: torch.Tensor, layer: int, states: Sequence[torch.Tensor | None]) -> None:
    if bool(torch.isfinite(p).all()):
        return
    bad = int((~torch.isfinite(p)).sum())
    where = "p_L = −∂Φ̄/∂x_L (the readout)" if layer == len(states) - 1 else f"the VJP of block {layer}"
    diverged = [i for i, x in enumerate(states) if x is not None and not bool(torch.isfinite(x).all())]
    hint = (f"; the forward pass already diverged: state x_{diverged[0]} is non-finite" if diverged
            else "; all states are finite, so the backward pass overflowed")
    raise CoStateError(f"co-state p_{layer} (layer {layer}) has {bad} non-finite entries, first appearing "
                       f"in {where} (co-states are computed from L down to 0){hint}")


# --- the solver ---------------------------------------------------------------------------


def solve_costate(system: ControlSystem, batch: dict, mode: str = "graph", check_finite: bool = True,
                  initial_costate: bool = True) -> CoStateSolution:
    """States, co-states, Hamiltonians and ``∇_u H`` of every control for one batch.

    Args:
        system: a :class:`ControlSystem` (e.g. a ResidualSystem with controllers attached).
        batch: the batch dict its ``embed`` and ``terminal_cost`` take.
        mode: ``graph`` (keep each block's graph from the forward sweep; as fast as one
            ``J.backward()``) or ``recompute`` (keep only the states, re-run block l during
            the backward sweep; less memory, one more forward pass).
        check_finite: raise :class:`CoStateError` naming the layer where a co-state first
            turns NaN/inf (scanning l = L, L-1, .., 0).
        initial_costate: compute ``p_0`` even when no initial control needs it.  ``False``
            skips the VJP of block 0 with respect to its input (backprop skips it too, since
            the embedding is frozen; on MiniLM it is ~15% of the solve) and leaves
            ``costates[0]`` as ``None``; with initial controls p_0 is always computed.

    Returns:
        a :class:`CoStateSolution`; ``control_grads[name] = ∇_u H = −∂J/∂u`` for every control.

    Only first-order reverse mode is used, so any attention kernel works.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    controls = list(system.controls())
    n = system.n_layers
    check_controls(controls, n)
    per_layer = controls_by_layer(controls, n)
    grads: dict[str, torch.Tensor] = {}
    layer_grads: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    with torch.enable_grad():
        x0_graph, ctx = system.embed(batch)
        init = [c for c in controls if c.kind == "init"]
        need_p0 = initial_costate or bool(init)
        # Each block gets its own leaf input, so block l's graph ends at x_l and its VJP stops there.
        states: list[torch.Tensor] = [x0_graph.detach().requires_grad_(need_p0)]
        outputs: list[torch.Tensor | None] = []
        with contextlib.nullcontext() if mode == "graph" else torch.no_grad():
            for layer in range(n):
                out = system.step(layer, states[layer], ctx)
                outputs.append(out if mode == "graph" else None)
                states.append(out.detach().requires_grad_(True))

        # p_L and the terminal controls: −∂(Φ̄ + R_term)/∂(x_L, u_term).
        term = [c for c in controls if c.kind == "term"]
        phi = system.terminal_cost(states[n], ctx, batch)
        r_term = system.running_cost("term")
        g = _vjp([phi, r_term], [torch.ones_like(phi), torch.ones_like(r_term)], [states[n], *[c.param for c in term]])
        costates: list[torch.Tensor | None] = [None] * (n + 1)
        costates[n] = -g[0]
        for c, gc in zip(term, g[1:]):
            grads[c.name] = -gc
        if check_finite:
            _check_finite(costates[n], n, states)
        phi_value = float(phi.detach())
        r_total = float(r_term.detach())
        del phi, r_term, g

        # Backward sweep: one autograd call per block gives p_l and ∇_u H_l of all its controls.
        ham = torch.empty(n, dtype=torch.float64)
        for layer in reversed(range(n)):
            out = outputs[layer]
            if out is None:
                out = system.step(layer, states[layer], ctx)
            outputs[layer] = None  # drop the graph reference as soon as it has been used
            r_l = system.running_cost(layer)
            p_next = costates[layer + 1]
            ctrl = per_layer[layer]
            wrt_x = [states[layer]] if states[layer].requires_grad else []
            g = _vjp([out, r_l], [p_next, -torch.ones_like(r_l)], [*wrt_x, *[c.param for c in ctrl]])
            costates[layer] = g[0] if wrt_x else None
            for c, gc in zip(ctrl, g[len(wrt_x):]):
                layer_grads[layer][c.name] = gc
                grads[c.name] = gc if c.name not in grads else grads[c.name] + gc
            # Σ_s p_{l+1}·x_{l+1} as one dot product (no S×T×d temporary).
            ham[layer] = float(torch.dot(p_next.reshape(-1), states[layer + 1].detach().reshape(-1)) - r_l.detach())
            r_total += float(r_l.detach())
            del out, g
            if check_finite and costates[layer] is not None:
                _check_finite(costates[layer], layer, states)

        # Initial controls: VJP of embed with p_0, minus ∂R_init/∂u.
        r_init = system.running_cost("init")
        r_total += float(r_init.detach())
        if init:
            g = _vjp([x0_graph, r_init], [costates[0], -torch.ones_like(r_init)], [c.param for c in init])
            for c, gc in zip(init, g):
                grads[c.name] = gc
    for c in controls:  # a control no block, embed or readout uses has ∇_u H = −∂R/∂u = 0 here
        grads.setdefault(c.name, torch.zeros_like(c.param))
    return CoStateSolution(
        states=[x.detach() for x in states], costates=[None if p is None else p.detach() for p in costates],
        hamiltonian=ham,
        control_grads={c.name: grads[c.name].detach() for c in controls}, layer_grads=layer_grads,
        terminal_cost=phi_value, running_cost=r_total, controls=controls, ctx=ctx, mode=mode,
    )


# --- evaluating H_l at other controls (diagnostics, MSA) ---------------------------------


def hamiltonian(system: ControlSystem, layer: int, x: torch.Tensor, p_next: torch.Tensor, ctx: Any,
                reference: torch.Tensor | None = None) -> torch.Tensor:
    """``H_l(x, p_{l+1}, u) = Σ_s p_{l+1}·f_l(x, u) − R_l(u)`` at the system's current controls.

    With ``reference`` (= ``f_l(x, u*)``), returns ``Σ_s p_{l+1}·(f_l(x, u) − f_l(x, u*)) − R_l(u)``,
    the same function up to a constant but without the cancellation of two large sums
    (use it for differences ``H_l(u) − H_l(u*)``).
    """
    f = system.step(layer, x, ctx)
    if reference is not None:
        f = f - reference
    return (p_next * f).sum() - system.running_cost(layer)


@contextlib.contextmanager
def displaced(controls: Sequence[Control], deltas: Sequence[torch.Tensor], scale: float = 1.0) -> Iterator[None]:
    """Temporarily set ``u ← u + scale·δ`` for each control (restored exactly on exit)."""
    saved = [c.param.detach().clone() for c in controls]
    try:
        with torch.no_grad():
            for c, d in zip(controls, deltas):
                c.param.add_(d.to(c.param), alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for c, s in zip(controls, saved):
                c.param.copy_(s)


__all__ = ["MODES", "CoStateError", "CoStateSolution", "ControlSystem", "check_controls", "controls_by_layer",
           "displaced", "hamiltonian", "solve_costate"]
