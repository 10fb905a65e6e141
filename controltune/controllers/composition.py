"""Combinations of controllers: simultaneous (all at once) and sequential (stage-wise).

*Simultaneous* (``combination``): the parts act together, each inside the block
where it sits, so ``f_l(x, u_l) = f_l(x; u_l^(1), ..., u_l^(k))`` with every
part's G in place; the controls are the union of the parts' controls, the
running cost the sum ``R_l = Σ_i R_l^(i)``.  Two parts on the same linear map
add their deltas: LoRA and BitFit on ``q`` give ``W x + b + Δb + s B A x``.

*Sequential* (``sequential``): stage 1 is attached and trained; :meth:`Sequential.advance`
freezes it (its deltas stay in the model, now part of the plant: they leave
``controls()`` and the running cost) and attaches stage 2; and so on.  Stage-wise
training is then a sequence of optimal-control problems, each on the system the
previous stages left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import REGISTRY, Control, Controller, UnsupportedMethodError, canonical, construct, register

if TYPE_CHECKING:
    from ..system import ResidualSystem

PartSpec = Controller | str | Sequence[Any] | dict[str, Any]


def make_controller(spec: PartSpec) -> Controller:
    """A controller from an instance, a method name, ``(method, options)`` or ``{"method", "options"}``."""
    if isinstance(spec, Controller):
        return spec
    if isinstance(spec, str):
        method, options = spec, {}
    elif isinstance(spec, dict) and "method" in spec:
        method, options = spec["method"], dict(spec.get("options") or {})
    elif isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        method, options = spec[0], dict(spec[1])
    else:
        raise TypeError(f"a combination part must be a Controller, a method name, (method, options) or "
                        f"{{'method': ..., 'options': ...}}; got {spec!r}")
    if canonical(method) not in REGISTRY:
        raise KeyError(f"unknown method {method!r} in a combination; registered: {', '.join(sorted(REGISTRY))}")
    return construct(method, options)


def _renamed(controls: list[Control], prefix: str) -> list[Control]:
    return [Control(f"{prefix}{c.name}", c.param, c.kind, c.layers) for c in controls]


def _chain_initial(parts: Sequence[Controller], x0: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for p in parts:
        x0, attention_mask = p.initial_state(x0, attention_mask)
    return x0, attention_mask


@register
class Simultaneous(Controller):
    """Several controllers acting at once (the "combination" group of the delta-tuning literature).

    Args:
        parts: controllers, method names, ``(method, options)`` pairs or
            ``{"method", "options"}`` dicts, e.g. ``[("lora", {"rank": 4}), ("bitfit", {})]``.

    Control names are the parts' names; a part whose names would collide with an
    earlier part's (the same method twice) gets the prefix ``part<i>.``.
    """

    method = "combination"
    group = "combination"
    form = "G = G_1 + ... + G_k acting together (each part's G in place)"

    def __init__(self, parts: Sequence[PartSpec]) -> None:
        super().__init__(0.0)
        if isinstance(parts, (str, Controller)) or len(parts) < 2:
            raise ValueError(f"a combination needs at least two parts, got {parts!r}; e.g. "
                             "parts=[('lora', {'rank': 4}), ('bitfit', {})]")
        self.parts = nn.ModuleList(make_controller(p) for p in parts)
        self.form = " ; ".join(f"[{p.method}] {p.form}" for p in self.parts)

    def attach(self, system: ResidualSystem) -> None:
        for i, part in enumerate(self.parts):
            try:
                part.attach(system)
            except UnsupportedMethodError as err:
                raise UnsupportedMethodError(f"combination part {i} ({part.method}): {err}") from err
        self.sites = [s for p in self.parts for s in p.sites]

    def controls(self) -> list[Control]:
        out: list[Control] = []
        for i, part in enumerate(self.parts):
            mine = part.controls()
            taken = {c.name for c in out}
            if any(c.name in taken for c in mine):
                mine = _renamed(mine, f"part{i}.")
            out.extend(mine)
        return out

    def initial_state(self, x0: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts' initial controls applied in order (e.g. prompt tokens, then an embedding delta)."""
        return _chain_initial(self.parts, x0, attention_mask)

    def running_cost(self, where: int | str) -> torch.Tensor:
        """``R_where = Σ_i R_where^(i)``."""
        costs = [p.running_cost(where) for p in self.parts]
        return sum(costs[1:], costs[0])

    def finalize(self, budget: int | float | None = None) -> bool:
        """Each part's post-training step (e.g. diff pruning's projection); True if any part had one."""
        done = [part.finalize(budget) for part in self.parts]
        return any(done)

    def describe(self) -> dict:
        info = super().describe()
        info["parts"] = [p.describe() for p in self.parts]
        return info


@register
class Sequential(Controller):
    """Stage-wise combination: train a stage, :meth:`advance` (freeze it, attach the next), repeat.

    Args:
        stages: as the parts of :class:`Simultaneous`, in training order.

    Only the current stage's controls are controls; frozen stages keep their
    deltas in the model and are saved by checkpoints through
    :meth:`frozen_controls`.  Control names carry the prefix ``stage<i>.``.
    """

    method = "sequential"
    group = "combination"
    form = "stage-wise: G_1 trained, frozen into f_l; then G_2; ..."

    def __init__(self, stages: Sequence[PartSpec]) -> None:
        super().__init__(0.0)
        if isinstance(stages, (str, Controller)) or len(stages) < 2:
            raise ValueError(f"a sequential combination needs at least two stages, got {stages!r}")
        self.stages = nn.ModuleList(make_controller(s) for s in stages)
        self.stage = -1  # index of the stage being trained; -1 before attach
        self._frozen: list[Control] = []
        self.form = " -> ".join(f"[stage {i}: {s.method}] {s.form}" for i, s in enumerate(self.stages))

    @property
    def current(self) -> Controller:
        """The stage being trained."""
        if self.stage < 0:
            raise RuntimeError("the sequential controller is not attached to a system yet")
        return self.stages[self.stage]

    def _attach_stage(self, i: int) -> None:
        try:
            self.stages[i].attach(self._system)
        except UnsupportedMethodError as err:
            raise UnsupportedMethodError(f"sequential stage {i} ({self.stages[i].method}): {err}") from err
        self.stage = i
        self.sites = [s for st in self.stages[:i + 1] for s in st.sites]

    def attach(self, system: ResidualSystem) -> None:
        # A plain attribute, not a submodule: the system owns this controller.
        self.__dict__["_system"] = system
        self._attach_stage(0)

    def advance(self) -> Controller:
        """Freeze the current stage and attach the next one; returns the new stage.

        Raises:
            RuntimeError: the current stage is the last one.
        """
        if self.stage + 1 >= len(self.stages):
            raise RuntimeError(f"stage {self.stage} is the last of {len(self.stages)} stages")
        frozen = self.controls()
        for c in frozen:
            c.param.requires_grad_(False)
        self._frozen.extend(frozen)
        self._attach_stage(self.stage + 1)
        return self.current

    def controls(self) -> list[Control]:
        return _renamed(self.current.controls(), f"stage{self.stage}.")

    def frozen_controls(self) -> list[Control]:
        """Controls of the frozen stages (no longer trained, still in the model)."""
        return list(self._frozen)

    def initial_state(self, x0: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial controls of every attached stage, frozen ones included."""
        return _chain_initial(self.stages[:self.stage + 1], x0, attention_mask)

    def running_cost(self, where: int | str) -> torch.Tensor:
        """The current stage's R (frozen stages are part of the plant and cost nothing)."""
        return self.current.running_cost(where)

    def finalize(self, budget: int | float | None = None) -> bool:
        """The current stage's post-training step (frozen stages were finalised when frozen)."""
        return self.current.finalize(budget)

    def describe(self) -> dict:
        info = super().describe()
        info["stages"] = [s.describe() if i <= self.stage else {"method": s.method, "attached": False}
                          for i, s in enumerate(self.stages)]
        info["stage"] = self.stage
        return info
