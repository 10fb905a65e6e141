"""A control written as weight deltas ``u_l = {ΔW_{l,m}}``: ``W -> W + ΔW`` on linear maps m of block l.

This is the common coordinate system in which a trained reference ``u*`` (a LoRA's
``s·BA``, or full fine-tuning's ``θ − θ₀`` on chosen maps) and its projections
``Πu*`` (:mod:`controltune.bounds.projections`) are compared.  Values are dicts
``{"<layer>.<role>": ΔW}`` with ``ΔW`` dense ``d_out×d_in`` whatever layout the
family stores its weights in (:func:`~controltune.families.base.to_dense`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..controllers.base import Control, Controller, ParamDelta, module_key, resolve_targets, unwrap, wrap
from ..families.base import linear_io, stores_transposed, to_dense

if TYPE_CHECKING:
    from ..system import ResidualSystem


class WeightDelta(ParamDelta):
    """``W -> W + ΔW`` on one linear map; ``delta`` is stored in the layout of ``base.weight``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.transposed = stores_transposed(base)  # e.g. GPT-2 keeps W as d_in×d_out
        self.delta = nn.Parameter(torch.zeros_like(base.weight))

    def effective(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": base.weight + self.delta}

    def as_dense(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the layout of the stored weight (e.g. a gradient) as ``d_out×d_in``; and back."""
        return t.T if self.transposed else t

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` as ``d_out×d_in``."""
        return self.as_dense(self.delta)

    def set_dense(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.delta.copy_(self.as_dense(value))


class DeltaWeights(Controller):
    """Weight deltas ``W -> W + ΔW`` on the ``targets`` linear maps of ``layers`` (one layer control each).

    Not a tuning method of its own (it is not registered): it is the common
    coordinate system in which references and their projections are compared.
    Controls are named ``delta.<layer>.<role>``; :meth:`values` / :meth:`assign`
    read and write ``{"<layer>.<role>": ΔW (d_out×d_in)}``.
    """

    method = "weight_delta"
    group = "reference"
    form = "W x -> (W + ΔW) x"

    def __init__(self, targets: Sequence[str], layers: Sequence[int] | None = None,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.targets = tuple(targets)
        self.layers = layers
        self.deltas = nn.ModuleDict()

    def attach(self, system: ResidualSystem) -> None:
        self.sites = resolve_targets(system, self.targets, self.layers)
        for site in self.sites:
            linear_io(site.module)  # rejects a non-linear target with a clear error
            delta = WeightDelta(site.module)
            self.deltas[site.key] = delta
            wrap(system.base, site.path, delta)

    def delta(self, key: str) -> WeightDelta:
        """The :class:`WeightDelta` of ``"<layer>.<role>"``."""
        return self.deltas[module_key(key_layer(key), key_role(key))]

    def controls(self) -> list[Control]:
        return [Control(f"delta.{s.layer}.{s.role}", self.deltas[s.key].delta, "layer", (s.layer,))
                for s in self.sites]

    def values(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.<role>": ΔW}`` (detached copies, d_out×d_in)."""
        return {f"{s.layer}.{s.role}": self.deltas[s.key].delta_weight().detach().clone()
                for s in self.sites}

    def assign(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set every ΔW from ``values`` (keys exactly those of :meth:`values`)."""
        expected = {f"{s.layer}.{s.role}" for s in self.sites}
        if set(values) != expected:
            raise KeyError(f"delta keys differ: missing {sorted(expected - set(values))}, "
                           f"unknown {sorted(set(values) - expected)}")
        for s in self.sites:
            self.deltas[s.key].set_dense(values[f"{s.layer}.{s.role}"])

    def by_control(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense ``{"<layer>.<role>": ΔW}`` -> ``{control name: tensor in the parameter's layout}``."""
        return {f"delta.{s.layer}.{s.role}": self.deltas[s.key].as_dense(values[f"{s.layer}.{s.role}"])
                for s in self.sites}



def key_layer(key: str) -> int:
    """Block of a delta key ``"<layer>.<role>"``."""
    return int(key.split(".", 1)[0])


def key_role(key: str) -> str:
    """Role of a delta key ``"<layer>.<role>"``."""
    return key.split(".", 1)[1]


def per_layer_distance(u: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor], n_layers: int) -> list[float]:
    """``‖u_l − v_l‖`` for l = 0..L-1 (Frobenius over the block's deltas)."""
    out = [0.0] * n_layers
    for k in u:
        out[key_layer(k)] += float((u[k] - v[k]).pow(2).sum())
    return [math.sqrt(x) for x in out]


def delta_controller(system: ResidualSystem) -> DeltaWeights:
    """The one :class:`DeltaWeights` attached to ``system``."""
    found = [c for c in system.controllers if isinstance(c, DeltaWeights)]
    if len(found) != 1:
        raise ValueError(f"the system needs exactly one DeltaWeights controller, has {len(found)}")
    return found[0]


# --- turning a trained controller into weight deltas -------------------------------------------


def lora_to_deltas(system: ResidualSystem) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Remove every LoRA controller from ``system``; return its targets and ``{"<layer>.<role>": s·BA}``."""
    from ..controllers.lora import LoRA

    loras = [c for c in system.controllers if isinstance(c, LoRA)]
    if not loras:
        raise ValueError("the system has no LoRA controller")
    values: dict[str, torch.Tensor] = {}
    roles: list[str] = []
    for lora in loras:
        for site in lora.sites:
            delta = lora.deltas[site.key]
            values[f"{site.layer}.{site.role}"] = delta.delta_weight().detach().clone()
            roles.append(site.role)
            unwrap(system.base, site.path)
    system.controllers = nn.ModuleList([c for c in system.controllers if not isinstance(c, LoRA)])
    return list(dict.fromkeys(roles)), values


def full_to_deltas(system: ResidualSystem, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """Turn a trained ``full`` controller into weight deltas on the ``targets`` linear maps.

    Those maps' weights go back to θ₀ and their ``θ − θ₀`` is returned; every other
    fine-tuned parameter (biases, norms, embeddings, other maps) keeps its trained
    value and becomes part of the frozen system both u* and Πu* share.
    """
    full = [c for c in system.controllers if getattr(c, "method", "") == "full"]
    if not full:
        raise ValueError("the system has no full fine-tuning controller")
    ctrl = full[0]
    by_param = {id(c.param): c for c in ctrl.controls()}
    values = {}
    for site in resolve_targets(system, targets):
        w = site.module.weight
        c = by_param.get(id(w))
        if c is None:
            raise ValueError(f"{site.path}.weight is not a control of the full controller")
        theta0 = ctrl.initial_value(c)
        with torch.no_grad():
            delta = w.detach() - theta0
            w.copy_(theta0)
        values[f"{site.layer}.{site.role}"] = to_dense(site.module, delta).clone()
    for c in ctrl.controls():
        c.param.requires_grad_(False)
    system.controllers = nn.ModuleList([c for c in system.controllers if c is not ctrl])
    return values


__all__ = ["DeltaWeights", "WeightDelta", "delta_controller", "full_to_deltas", "key_layer", "key_role",
           "lora_to_deltas", "per_layer_distance"]
