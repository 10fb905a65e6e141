"""Specification-based delta tuning: tune a chosen subset of the frozen parameters.

Every method here is an additive weight-space delta ``θ_eff = θ₀ + Δ`` on a
*selection* of existing parameters (Δ = 0 at initialisation, so the model is
unchanged); they differ only in the selection:

``bitfit``      every bias of the blocks' linear maps and norms (Ben Zaken et al., 2022);
``layernorm``   the gains and biases of the blocks' norms, and the final norm of
                pre-LN decoders as a terminal control;
``last_layer``  every parameter of the last ``n_layers`` blocks;
``selective``   a seeded random set of whole modules (linear maps, norms) under a budget;
``arbitrary``   a seeded random set of parameter groups (contiguous chunks of the
                flattened tensors) under an exact budget; Δ lives only there.

The helpers of this module (enumerating the parameters of a block with their
layer and role, budgets, :class:`AdditiveDelta`, :func:`wrap_owners`) are shared
by diff pruning, masking, subspace and full fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import (
    Control,
    Controller,
    ParamDelta,
    Site,
    UnsupportedMethodError,
    Wrapped,
    positive_int,
    register,
    resolve_targets,
    seeded_generator,
    wrap,
)

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


def layer_indices(system, layers: Sequence[int] | None) -> list[int]:
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


def _role_names(system) -> dict[str, str]:
    """Path inside a block -> family role (so controls read ``3.q.bias``, not a module path)."""
    return {path: role for role, path in system.family.roles.items()}


def block_parameters(system, layers: Sequence[int] | None = None) -> list[ParamSite]:
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


def target_parameters(system, targets: Sequence[str], layers: Sequence[int] | None = None,
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


def final_norm_parameters(system) -> list[ParamSite]:
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

    def select(self, system) -> tuple[list[ParamSite], dict[int, torch.Tensor]]:
        raise NotImplementedError

    def attach(self, system) -> None:
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


# --- the methods ----------------------------------------------------------------------------


@register
class BitFit(AdditiveController):
    """BitFit: ``b -> b + Δb`` for every bias of the blocks' linear maps and norms.

    Families without biases (LLaMA) are refused: tuning their norm gains instead
    would be another method, ``layernorm``.
    """

    method = "bitfit"
    form = "b -> b + Δb for every bias of the block's linear maps and norms"

    def __init__(self, layers: Sequence[int] | None = None, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.layers = layers

    def select(self, system):
        fam = system.family
        roles = [r for r in (*fam.linear_roles, "ln_attn", "ln_ffn") if r in fam.roles]
        sites = target_parameters(system, roles, self.layers, names=("bias",))
        if not sites:
            raise UnsupportedMethodError(
                f"bitfit tunes bias terms, but the blocks of family {fam.name!r} ({system.name}) have no biases "
                f"in {', '.join(roles)}; use 'layernorm' (norm gains) or 'ia3' (learned rescaling) instead"
            )
        return sites, {}


@register
class LayerNormTuning(AdditiveController):
    """LayerNorm/RMSNorm tuning: ``(γ+Δγ) ⊙ x̂ + (β+Δβ)`` in every block's norms (``ln_attn``, ``ln_ffn``).

    With ``final_norm`` (default) the final norm of pre-LN decoders, which the
    readout owns (``system.readout.norm``), is tuned too, as a terminal control.
    """

    method = "layernorm"
    form = "norm(x) = (γ + Δγ) ⊙ x̂ + (β + Δβ), in every block and the readout's final norm"

    def __init__(self, layers: Sequence[int] | None = None, final_norm: bool = True,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.layers, self.final_norm = layers, bool(final_norm)

    def select(self, system):
        sites = target_parameters(system, ("ln_attn", "ln_ffn"), self.layers)
        if self.final_norm:
            sites += final_norm_parameters(system)
        return sites, {}


@register
class LastLayerTuning(AdditiveController):
    """Tune every parameter of the last ``n_layers`` blocks: ``θ_l -> θ_l + Δθ_l`` for ``l ≥ L − n``."""

    method = "last_layer"
    form = "θ_l -> θ_l + Δθ_l for the last n_layers blocks (every parameter)"

    def __init__(self, n_layers: int = 1, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.n_layers = positive_int(n_layers, "n_layers", self.method)

    def select(self, system):
        n = system.n_layers
        if not 1 <= self.n_layers <= n:
            raise UnsupportedMethodError(f"last_layer n_layers={self.n_layers} must be between 1 and {n} "
                                         f"(the number of blocks of {system.name})")
        return block_parameters(system, range(n - self.n_layers, n)), {}


@register
class SelectiveTuning(AdditiveController):
    """Selective module tuning: a seeded random set of whole modules of the blocks under a budget.

    The modules owning parameters (linear maps, norms) of ``layers`` are visited
    in a random order (``seed``) and each is kept if it still fits the budget
    (first fit), so the selection never exceeds the budget and no module left
    out would fit in what remains.  ``budget``: an int count of parameters or a
    float fraction of the parameters of the blocks in ``layers``.
    """

    method = "selective"
    form = "θ_m -> θ_m + Δθ_m for a seeded random set of modules m, Σ|θ_m| <= budget"

    def __init__(self, budget: int | float = 0.1, layers: Sequence[int] | None = None, seed: int = 0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.budget, self.layers, self.seed = budget, layers, int(seed)

    def select(self, system):
        modules: dict[str, list[ParamSite]] = {}
        for s in block_parameters(system, self.layers):
            modules.setdefault(s.owner_key, []).append(s)
        units = list(modules.values())
        sizes = [sum(s.numel() for s in u) for u in units]
        room = budget_count(self.budget, sum(sizes))
        chosen: list[ParamSite] = []
        for i in torch.randperm(len(units), generator=seeded_generator(self.seed)).tolist():
            if sizes[i] <= room:
                chosen += units[i]
                room -= sizes[i]
        if not chosen:
            raise UnsupportedMethodError(f"selective budget {self.budget!r} is smaller than the smallest module "
                                         f"({min(sizes)} parameters)")
        return chosen, {}


@register
class ArbitraryTuning(AdditiveController):
    """Arbitrary-position tuning: Δ on a seeded random set of parameter groups, exactly ``budget`` scalars.

    Every parameter of the blocks in ``layers`` is cut into groups of
    ``group_size`` consecutive entries of its flattened storage (the last group
    of a tensor may be shorter; ``group_size`` = a row length gives rows of
    ``nn.Linear`` weights).  Groups are drawn in a random order (``seed``) until
    the budget is filled; the last one drawn is cut so that exactly ``budget``
    positions are tuned.
    """

    method = "arbitrary"
    form = "θ -> θ + S Δ, S scatters Δ onto a seeded random set of parameter groups (|Δ| = budget)"

    def __init__(self, budget: int | float = 0.01, group_size: int = 1, layers: Sequence[int] | None = None,
                 seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        group_size = positive_int(group_size, "group_size", self.method)
        self.budget, self.group_size, self.layers, self.seed = budget, group_size, layers, int(seed)

    def select(self, system):
        sites = block_parameters(system, self.layers)
        numel = torch.tensor([s.numel() for s in sites])
        count = budget_count(self.budget, int(numel.sum()))
        g = self.group_size
        n_groups = (numel + g - 1) // g
        group_end = torch.cumsum(n_groups, 0)
        # At most `count` groups are needed (each holds >= 1 entry): locate only those.
        order = torch.randperm(int(group_end[-1]), generator=seeded_generator(self.seed))[:count]
        owner = torch.searchsorted(group_end, order, right=True)
        start = (order - (group_end - n_groups)[owner]) * g
        size = torch.minimum(numel[owner] - start, torch.tensor(g))
        filled = torch.cumsum(size, 0)
        n_full = int((filled <= count).sum())
        take = slice(0, min(n_full + 1, len(order)))
        keep = size[take].clone()
        keep[n_full:] = count - (int(filled[n_full - 1]) if n_full else 0)  # cut the last group
        # Expand the (start, length) of each chosen group into flat positions, per tensor.
        owners = torch.repeat_interleave(owner[take], keep)
        offset = torch.arange(count) - torch.repeat_interleave(torch.cumsum(keep, 0) - keep, keep)
        flat = torch.repeat_interleave(start[take], keep) + offset
        chosen = [sites[i] for i in owners.unique().tolist()]
        positions = {id(sites[i]): flat[owners == i].sort().values for i in owners.unique().tolist()}
        return chosen, positions
