"""The control contract: what a control variable is and what a control system offers.

This is the bottom of the house (DESIGN.md §1).  The co-state solver
(:mod:`controltune.pmp`), the checks (:mod:`controltune.verification`), MSA, the bounds
and the design tools talk to a :class:`ControlSystem` and its :class:`Control`
variables only; they never import a delta method.  Delta methods
(:mod:`controltune.controllers`) sit above and produce controls.

Kinds of control (``u`` acts on the system through ``f_l``, ``x_0`` or the readout):

* ``layer``: ``u_l`` acting in one block l;
* ``shared``: one tensor acting in several blocks (``−∂J/∂u = Σ_l ∇_u H_l``);
* ``init``: acting on ``x_0`` (prompt tokens, embedding deltas);
* ``term``: acting in the readout (classification head, final norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

KINDS = ("layer", "shared", "init", "term")


@dataclass
class Control:
    """One control variable.

    Attributes:
        name: unique, readable name (``lora.3.q.A``).
        param: the ``nn.Parameter`` holding it.
        kind: ``layer`` | ``shared`` | ``init`` | ``term``.
        layers: blocks it acts in: ``(l,)`` for a layer control, several for a
            shared one, ``()`` for initial and terminal controls.
    """

    name: str
    param: nn.Parameter
    kind: str
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"control kind {self.kind!r} is not one of {KINDS}")


@runtime_checkable
class ControlSystem(Protocol):
    """What the co-state solver needs from a discrete-time control system.

    ``embed(batch) -> (x_0, ctx)`` (x_0 carries the graph of the initial controls),
    ``step(l, x, ctx) -> x_{l+1}``, ``terminal_cost(x_L, ctx, batch) -> Φ̄`` (scalar,
    batch mean), ``running_cost(where)`` with ``where`` a layer, ``"init"`` or ``"term"``,
    and ``controls()`` (every trainable :class:`Control`).
    """

    @property
    def n_layers(self) -> int: ...

    def embed(self, batch: dict) -> tuple[torch.Tensor, Any]: ...

    def step(self, layer: int, x: torch.Tensor, ctx: Any) -> torch.Tensor: ...

    def terminal_cost(self, x_last: torch.Tensor, ctx: Any, batch: dict) -> torch.Tensor: ...

    def running_cost(self, where: int | str) -> torch.Tensor: ...

    def controls(self) -> list[Control]: ...


def cost_share(control: Control, where: int | str) -> float:
    """Fraction of ``control``'s running cost charged at ``where`` (a layer, ``"init"`` or ``"term"``).

    A shared control's cost is split evenly over its layers, so ``Σ_l R_l`` is its
    whole cost and ``−∂J/∂u = Σ_l ∇_u H_l`` holds.
    """
    if control.kind in ("init", "term"):
        return 1.0 if where == control.kind else 0.0
    if isinstance(where, int) and where in control.layers:
        return 1.0 / len(control.layers)
    return 0.0


def total_running_cost(system: ControlSystem) -> torch.Tensor:
    """``R_init + Σ_{l=0}^{L-1} R_l + R_term`` (scalar tensor, differentiable in the controls)."""
    parts = [system.running_cost(w) for w in (*range(system.n_layers), "init", "term")]
    return torch.stack([torch.as_tensor(p) for p in parts]).sum()


__all__ = ["KINDS", "Control", "ControlSystem", "cost_share", "total_running_cost"]
