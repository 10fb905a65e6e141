"""Specification-based delta tuning: tune a chosen subset of the frozen parameters.

Every method here is an additive weight-space delta ``θ_eff = θ₀ + Δ`` on a
*selection* of existing parameters (Δ = 0 at initialisation, so the model is
unchanged; :mod:`controltune.controllers.param_delta`); they differ only in the selection:

``bitfit``      every bias of the blocks' linear maps and norms (Ben Zaken et al., 2022);
``layernorm``   the gains and biases of the blocks' norms, and the final norm of
                pre-LN decoders as a terminal control;
``last_layer``  every parameter of the last ``n_layers`` blocks;
``selective``   a seeded random set of whole modules (linear maps, norms) under a budget;
``arbitrary``   a seeded random set of parameter groups (contiguous chunks of the
                flattened tensors) under an exact budget; Δ lives only there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .base import UnsupportedMethodError, positive_int, register, seeded_generator
from .param_delta import (
    AdditiveController,
    ParamSite,
    block_parameters,
    budget_count,
    final_norm_parameters,
    target_parameters,
)

if TYPE_CHECKING:
    from ..system import ResidualSystem

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

    def select(self, system: ResidualSystem) -> tuple[list[ParamSite], dict[int, torch.Tensor]]:
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

    def select(self, system: ResidualSystem) -> tuple[list[ParamSite], dict[int, torch.Tensor]]:
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

    def select(self, system: ResidualSystem) -> tuple[list[ParamSite], dict[int, torch.Tensor]]:
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

    def select(self, system: ResidualSystem) -> tuple[list[ParamSite], dict[int, torch.Tensor]]:
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

    def select(self, system: ResidualSystem) -> tuple[list[ParamSite], dict[int, torch.Tensor]]:
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
