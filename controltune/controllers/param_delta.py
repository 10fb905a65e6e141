"""Additive deltas on selected frozen parameters: ``θ_eff = θ₀ + Δ`` on a chosen set of parameters.

The shared toolkit of every parameter-space method (specification methods, diff pruning,
masking, subspace and full fine-tuning): enumerating the parameters of a block with their
layer and role (:class:`ParamSite`), parameter budgets, and placing a delta around the module
that owns them (:func:`wrap_owners`, :class:`SiteDelta`, :class:`AdditiveDelta`,
:class:`AdditiveController`).  Δ = 0 at initialisation, so the model is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import (
    Control,
    Controller,
    ParamDelta,
    Site,
    UnsupportedMethodError,
    Wrapped,
    resolve_targets,
    wrap,
)

if TYPE_CHECKING:
    from ..system import ResidualSystem

# --- enumerating parameters -------------------------------------------------------------


@dataclass(eq=False)
class ParamSite:
    """One frozen parameter a delta acts on.

    Attributes:
        kind: ``layer`` (inside block ``layer``), ``init`` or ``term``.
        layer: the block index, ``None`` for initial/terminal parameters.
        root: the module ``path`` is relative to (``system.base`` or ``system.readout``).
        path: dotted path of the module the delta is wrapped around: the original
            module, or the outermost wrapper other controllers put around it.
        inner: path from there to the module *owning* the parameter (``""``, or
            ``base_layer[.base_layer...]`` under other controllers' wrappers).
        role: the family role of the owner (``q``, ``ln_ffn``, ...) or its path in the block.
        name: the attribute name on the owner (``weight``, ``bias``).
        param: the parameter itself.
    """

    kind: str
    layer: int | None
    root: nn.Module
    path: str
    inner: str
    role: str
    name: str
    param: nn.Parameter

    @property
    def label(self) -> str:
        """Readable ``<layer>.<role>.<name>`` (``final_norm.weight`` for terminal ones)."""
        where = self.layer if self.layer is not None else self.kind
        return f"{where}.{self.role}.{self.name}"

    @property
    def owner_key(self) -> str:
        """Key of the owning module, usable in an ``nn.ModuleDict``."""
        return f"{self.kind}_{self.layer}_{self.path}".replace(".", "_")

    def numel(self) -> int:
        return self.param.numel()


def layer_indices(system: ResidualSystem, layers: Sequence[int] | None) -> list[int]:
    """Block indices of ``layers`` (negative ones count from the end; ``None`` = every block)."""
    n = system.n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = [int(x) + n if int(x) < 0 else int(x) for x in layers]
    bad = [x for x in layers if not -n <= int(x) < n]
    if bad:
        raise UnsupportedMethodError(f"layers {bad} out of range: the model has {n} blocks (0..{n - 1})")
    return sorted(dict.fromkeys(out))


def _unwrapped(module: nn.Module) -> tuple[str, nn.Module]:
    """Follow ``Wrapped.base_layer`` to the module owning the frozen parameters: ``(inner path, owner)``."""
    inner: list[str] = []
    while isinstance(module, Wrapped):
        inner.append("base_layer")
        module = module.base_layer
    return ".".join(inner), module


def _split_wrappers(owner_path: str) -> tuple[str, str]:
    """``a.b.base_layer.base_layer`` -> (``a.b``, ``base_layer.base_layer``): outermost module and inner path."""
    parts = owner_path.split(".")
    cut = parts.index("base_layer") if "base_layer" in parts else len(parts)
    return ".".join(parts[:cut]), ".".join(parts[cut:])


def owned_parameters(module: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """``(owner path, attribute, parameter)`` of every frozen parameter under ``module``.

    Parameters of deltas other controllers placed (``Wrapped.delta`` subtrees) are skipped.
    """
    out = []
    for owner_path, owner in module.named_modules():
        if "delta" in owner_path.split("."):
            continue
        for name, p in owner.named_parameters(recurse=False):
            out.append((owner_path, name, p))
    return out


def _role_names(system: ResidualSystem) -> dict[str, str]:
    """Path inside a block -> family role (so controls read ``3.q.bias``, not a module path)."""
    return {path: role for role, path in system.family.roles.items()}


def block_parameters(system: ResidualSystem, layers: Sequence[int] | None = None) -> list[ParamSite]:
    """Every frozen parameter of the blocks ``layers`` (all by default), in model order."""
    roles = _role_names(system)
    out = []
    for layer in layer_indices(system, layers):
        prefix = system.block_path(layer)
        for owner, name, p in owned_parameters(system.blocks[layer]):
            outer, inner = _split_wrappers(owner)
            out.append(ParamSite("layer", layer, system.base, f"{prefix}.{outer}", inner, roles.get(outer, outer),
                                 name, p))
    return out


def target_parameters(system: ResidualSystem, targets: Sequence[str], layers: Sequence[int] | None = None,
                      names: Sequence[str] = ("weight", "bias")) -> list[ParamSite]:
    """The parameters ``names`` of the modules ``targets`` (roles, ``re:`` or suffixes) in ``layers``.

    Placement and its error messages are those of :func:`resolve_targets`.
    """
    out = []
    for site in resolve_targets(system, targets, layer_indices(system, layers)):
        inner, owner = _unwrapped(site.module)
        for name in names:
            p = owner._parameters.get(name)
            if p is not None:
                out.append(ParamSite("layer", site.layer, system.base, site.path, inner, site.role, name, p))
    return out


def final_norm_parameters(system: ResidualSystem) -> list[ParamSite]:
    """The readout's norm (pre-LN decoders' final norm) as terminal parameters; ``[]`` if there is none."""
    if not system.family.final_norm:
        return []
    inner, norm = _unwrapped(system.readout.norm)
    return [ParamSite("term", None, system.readout, "norm", inner, "final_norm", name, p)
            for name, p in norm.named_parameters(recurse=False)]


def budget_count(budget: int | float, total: int, what: str = "parameters") -> int:
    """A budget as a number of scalars: an ``int`` ≥ 1 is a count, a ``float`` in (0, 1] a fraction of ``total``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int count or a float fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a fractional budget must lie in (0, 1], got {budget} (use an int for a count)")
        count = round(budget * total)
    else:
        count = int(budget)
    if not 1 <= count <= total:
        raise ValueError(f"budget {budget!r} gives {count} of {total} {what}; it must be between 1 and {total}")
    return count


# --- placing deltas ---------------------------------------------------------------------


def wrap_owners(sites: Sequence[ParamSite], make: Callable[[nn.Module, list[ParamSite]], nn.Module]
                ) -> dict[str, nn.Module]:
    """Wrap each module owning some of ``sites`` with ``make(owner, its sites)``; returns ``{owner_key: delta}``."""
    groups: dict[str, list[ParamSite]] = {}
    for s in sites:
        groups.setdefault(s.owner_key, []).append(s)
    deltas = {}
    for key, group in groups.items():
        root, path = group[0].root, group[0].path
        delta = make(root.get_submodule(path), group)
        wrap(root, path, delta)
        deltas[key] = delta
    return deltas


def block_sites(sites: Sequence[ParamSite]) -> list[Site]:
    """One :class:`~controltune.controllers.base.Site` per owning module inside a block (for ``describe``)."""
    seen: dict[str, Site] = {}
    for s in sites:
        if s.layer is not None and s.owner_key not in seen:
            seen[s.owner_key] = Site(s.layer, s.role, s.path, s.root.get_submodule(s.path))
    return list(seen.values())


def control_of(method: str, site: ParamSite, param: nn.Parameter, suffix: str = "") -> Control:
    """The :class:`Control` of a delta ``param`` on ``site`` (kind and layers from the site)."""
    layers = (site.layer,) if site.layer is not None else ()
    return Control(f"{method}.{site.label}{suffix}", param, site.kind, layers)


class SiteDelta(ParamDelta):
    """A weight-space delta on some parameters of one module, possibly under other controllers' wrappers.

    It is wrapped around the outermost wrapper; subclasses implement
    :meth:`apply` (``{name: θ} -> {name: θ_eff}`` on the owner's parameters) and
    the delta addresses them through the ``inner`` path, so the wrappers inside
    run on the modified parameters (deltas compose).
    """

    def __init__(self, sites: Sequence[ParamSite]) -> None:
        super().__init__()
        self.inner = sites[0].inner
        self.param_names = [s.name for s in sites]

    def apply(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def effective(self, base: nn.Module) -> dict[str, torch.Tensor]:
        owner = base.get_submodule(self.inner)
        prefix = f"{self.inner}." if self.inner else ""
        new = self.apply({n: getattr(owner, n) for n in self.param_names})
        return {prefix + n: t for n, t in new.items()}


class AdditiveDelta(SiteDelta):
    """``θ_eff = θ₀ + Δ`` for some parameters of one module.

    For a parameter with ``positions`` (a 1-D index into its flattened storage),
    ``Δ`` has one entry per position and is scattered there; otherwise Δ has
    the parameter's shape.  Δ = 0 at construction (the identity).
    """

    def __init__(self, sites: Sequence[ParamSite], positions: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(sites)
        positions = positions or {}
        self.u = nn.ParameterDict()
        for s in sites:
            pos = positions.get(s.name)
            shape = s.param.shape if pos is None else (pos.numel(),)
            self.u[s.name] = nn.Parameter(torch.zeros(shape, dtype=s.param.dtype, device=s.param.device))
            if pos is not None:
                self.register_buffer(f"positions_{s.name}", pos.to(s.param.device))

    def positions(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"positions_{name}", None)

    def apply(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, du in self.u.items():
            t, pos = theta[name], self.positions(name)
            out[name] = t + du if pos is None else t.reshape(-1).index_add(0, pos, du).view_as(t)
        return out


class AdditiveController(Controller):
    """Base of the selection methods: an :class:`AdditiveDelta` on the parameters :meth:`select` returns.

    Subclasses implement ``select(system) -> (sites, positions)`` where
    ``positions`` maps ``id(site)`` to a flat index (or is empty for whole tensors).
    Running cost: ``R = (λ/2)‖Δ‖²`` (weight decay on the delta, zero at the identity).
    """

    group = "specification"

    def __init__(self, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.deltas = nn.ModuleDict()
        self._controls: list[Control] = []

    def select(self, system: ResidualSystem) -> tuple[list[ParamSite], dict[int, torch.Tensor]]:
        raise NotImplementedError

    def attach(self, system: ResidualSystem) -> None:
        if self._controls:
            raise RuntimeError(f"this {self.method} controller is already attached; create a new one")
        sites, positions = self.select(system)

        def make(owner: nn.Module, group: list[ParamSite]) -> AdditiveDelta:
            return AdditiveDelta(group, {s.name: positions[id(s)] for s in group if id(s) in positions})

        self.deltas.update(wrap_owners(sites, make))
        self.sites = block_sites(sites)
        self._controls = [control_of(self.method, s, self.deltas[s.owner_key].u[s.name]) for s in sites]

    def controls(self) -> list[Control]:
        return list(self._controls)
