"""Tuning in a unified optimisation subspace (Yi et al., 2022): one vector z drives a method's controls.

Given the projections of a unified subspace (:mod:`controltune.subspace_projections`, made by
``controltune subspace approximate``), the controls of method m are no longer free: every
control tensor is its block of ``θ_m(z) = θ_m⁰ + s_m W_m z``, so the only control is ``z ∈ R^d``
(plus the classification head, which stays a terminal control of its own: a source task's head
means nothing for a new task's labels).  Stage 2 of the paper ("subspace optimisation") is
training this controller on an unseen task; stage 3 ("solution transfer") is loading its z into
the same controller built with another method's up-projection.

The block of ``W_m z`` that belongs to one tensor is computed when the tensor is read
(``torch.nn.utils.parametrize``), i.e. inside the block that uses it: a vector–Jacobian product
through block l alone gives block l's term of ``∂J/∂z = Σ_l W_{m,l}ᵀ ∂J/∂θ_l``, so z is an
ordinary *shared* control and ``controltune verify`` checks it like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..fingerprint import fingerprint
from ..subspace_projections import Layout, MethodProjection, ProjectionFileError, UnifiedProjections
from .base import Control, Controller, UnsupportedMethodError, construct, register

if TYPE_CHECKING:
    from ..system import ResidualSystem

Z_INITS = ("zero", "mean")


class _Decoded(nn.Module):
    """Parametrisation of one tensor: entries ``start:end`` of ``θ⁰ + W z``, shaped like the tensor."""

    def __init__(self, owner: UnifiedSubspace, start: int, end: int, shape: torch.Size) -> None:
        super().__init__()
        self._owner = [owner]  # a plain list: the controller must not become a submodule of its own deltas
        self.start, self.end, self.shape = start, end, tuple(shape)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        return owner.projection.decode_rows(owner.point(), self.start, self.end).view(self.shape)


def _owner_of(root: nn.Module, param: nn.Parameter) -> tuple[nn.Module, str]:
    """The module of ``root`` that registers ``param`` and the attribute name it has there."""
    for module in root.modules():
        for name, p in module._parameters.items():
            if p is param:
                return module, name
    raise RuntimeError("a control of the inner controller is not a parameter of one of its modules")


def method_layout(controller: Controller) -> Layout:
    """The :class:`Layout` of a method's solution vector: its controls, in ``controls()`` order.

    Only controls acting inside blocks (``layer``, ``shared``) fit a unified subspace; initial
    and terminal controls (prompt tokens, a final norm) are refused, naming them.
    """
    controls = controller.controls()
    outside = [c.name for c in controls if c.kind not in ("layer", "shared")]
    if outside:
        raise UnsupportedMethodError(
            f"{controller.method}: controls {outside[:4]} act outside the blocks (kind init/term); a unified "
            "subspace ties together methods whose controls act inside blocks (adapter, lora, prefix, ...)")
    if not controls:
        raise UnsupportedMethodError(f"{controller.method} has no controls to put in a subspace")
    return Layout(tuple(c.name for c in controls), tuple(tuple(c.param.shape) for c in controls))


@register
class UnifiedSubspace(Controller):
    """Method ``method``'s controls as ``θ⁰ + W z`` for the up-projection of a unified subspace.

    Options: ``projections`` (a projections file, or a :class:`UnifiedProjections` from Python),
    ``delta`` (which of its methods drives the model; optional when it holds one), ``z_init`` ``zero`` (θ⁰: the
    method's own initialisation) or ``mean`` (the mean intrinsic vector of the source solutions),
    ``weight_decay`` λ on z, ``frozen_z`` (z stays at ``z_init`` and is no control: only the head trains — the
    control run of the subspace; at ``z_init=zero`` through LoRA, whose θ⁰ adds nothing, a linear probe of the
    frozen model).  Control: ``unified.z`` (d,), kind ``shared`` (none with ``frozen_z``).
    """

    method = "unified_subspace"
    group = "reparameterisation"
    form = "θ_m -> θ_m⁰ + W_m z: every control of method m is its block of a learned up-projection of z ∈ R^d"

    def __init__(self, projections: str | Path | UnifiedProjections | None = None, delta: str | None = None,
                 z_init: str = "zero", weight_decay: float = 0.0, frozen_z: bool = False) -> None:
        super().__init__(weight_decay)
        if z_init not in Z_INITS:
            raise ValueError(f"{self.method}: z_init={z_init!r}; accepted: {', '.join(Z_INITS)}")
        self.source, self.chosen, self.z_init, self.frozen_z = projections, delta, z_init, bool(frozen_z)
        self.z: nn.Parameter | None = None
        self.projection: MethodProjection | None = None
        self.inner: Controller | None = None
        self._driven: torch.Tensor | None = None

    # --- attach ------------------------------------------------------------------------------
    def _projections(self, like: torch.Tensor) -> UnifiedProjections:
        if self.source is None:
            raise UnsupportedMethodError(
                f"{self.method} needs projections=FILE: the projections of a unified subspace, made by "
                "`controltune subspace approximate`")
        if isinstance(self.source, UnifiedProjections):
            return self.source
        return UnifiedProjections.load(self.source, dtype=like.dtype)

    def attach(self, system: ResidualSystem) -> None:
        if self.z is not None:
            raise RuntimeError("this unified_subspace controller is already attached; create a new one")
        like = next(system.model.parameters())
        projections = self._projections(like)
        method = self.chosen or (projections.methods[0] if len(projections.methods) == 1 else None)
        if method is None:
            raise ValueError(f"{self.method}: the projections hold methods {projections.methods}; choose one "
                             "with delta=NAME")
        projection = projections.projection(method)
        expected = projections.info.get("fingerprint")
        if expected is not None and expected != fingerprint(system):
            raise ProjectionFileError(
                f"{self.method}: the projections were made on base model {projections.info.get('model')!r} "
                f"(fingerprint {expected[:16]}…), not on {system.name!r}: refusing to drive another model's deltas")
        spec = projections.specs[method]
        inner = construct(spec["method"], spec.get("options", {}))
        inner.attach(system)
        layout = method_layout(inner)
        if layout != projections.layouts[method]:
            raise ProjectionFileError(
                f"{self.method}: {method} built with options {spec.get('options')} on {system.name} has controls "
                f"{list(layout.names)[:4]}... of {layout.numel} entries, the projections "
                f"{list(projections.layouts[method].names)[:4]}... of {projections.layouts[method].numel}")
        self.inner, self.chosen = inner, method
        self.projection = projection.to(device=like.device, dtype=like.dtype)
        self.projection.requires_grad_(False)
        init = torch.zeros(projections.dim)
        if self.z_init == "mean":
            if not projections.intrinsic:
                raise ProjectionFileError(f"{self.method}: z_init=mean needs the source intrinsic vectors, and the "
                                          "projections hold none (untrained?)")
            init = torch.cat(list(projections.intrinsic.values())).mean(0)
        self.z = nn.Parameter(init.to(device=like.device, dtype=like.dtype), requires_grad=not self.frozen_z)
        offsets = layout.offsets()
        controls = {c.name: c for c in inner.controls()}
        self._targets: list[tuple[str, nn.Module, str]] = []
        for name in layout.names:
            param = controls[name].param
            module, attr = _owner_of(inner, param)
            start, end = offsets[name]
            param.requires_grad_(False)
            parametrize.register_parametrization(module, attr, _Decoded(self, start, end, param.shape), unsafe=True)
            self._targets.append((name, module, attr))
        self._layers = tuple(sorted({x for c in controls.values() for x in c.layers}))
        self.sites = list(inner.sites)

    # --- the point z ------------------------------------------------------------------------
    def point(self) -> torch.Tensor:
        """The z the controls are decoded from: the control ``z``, or a point set by :meth:`drive`."""
        return self._driven if self._driven is not None else self.z

    def drive(self, z: torch.Tensor | None) -> None:
        """Decode the controls from ``z`` (a tensor that may carry a graph, as when the projections are
        trained) instead of the control; ``None`` returns to the control."""
        if z is not None and (self.z is None or z.shape != self.z.shape):
            raise ValueError(f"drive: z must have shape {None if self.z is None else tuple(self.z.shape)}")
        self._driven = z

    @torch.no_grad()
    def decoded(self) -> torch.Tensor:
        """``θ⁰ + W z`` (D,) at the current point (the method's control vector in :func:`method_layout` order)."""
        return self.projection.decode(self.point())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The method's control tensors as the model reads them now (``name -> θ⁰ + W z`` block)."""
        return {name: getattr(module, attr) for name, module, attr in self._targets}

    def initial_state(self, x0: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.initial_state(x0, attention_mask)

    def controls(self) -> list[Control]:
        if self.z is None or self.frozen_z:
            return []
        return [Control("unified.z", self.z, "shared", self._layers)]

    def describe(self) -> dict:
        return {**super().describe(), "driven_method": self.chosen}


__all__ = ["UnifiedSubspace", "method_layout"]
