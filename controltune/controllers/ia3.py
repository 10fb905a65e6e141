"""(IA)³ (Liu et al., 2022): learned vectors rescaling keys, values and the FFN activation.

``G``: in block l, ``k -> l_k ⊙ k``, ``v -> l_v ⊙ v`` (outputs of the key and value maps) and
``a -> l_ff ⊙ a`` with ``a`` the FFN intermediate activation (the *input* of ``ffn_out``).  For a
family with a fused ``qkv`` map (GPT-2), ``k`` and ``v`` are the second and third thirds of its
output and only those slices are rescaled.  All vectors start at ones, so (IA)³ is the identity at
initialisation.  In the He et al. view it is a diagonal reparameterisation ``W -> diag(l) W``
(outputs) or ``W -> W diag(l)`` (inputs).

Controls: one vector per target per layer (layer controls); per layer ``d_k + d_v + d_ff``
scalars with the default targets (``d_k = d_v = H_kv·D_head``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..families.base import QKV
from .adapter import linear_dims
from .base import Control, Controller, Site, UnsupportedMethodError, register, resolve_targets, target_names, wrap

if TYPE_CHECKING:
    from ..system import ResidualSystem


def ones_param(width: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.ones(width, dtype=like.dtype, device=like.device))


class ScaleOutput(nn.Module):
    """``y = base(x) ⊙ [s_1; s_2; ...]``: rescale consecutive output segments (None = left alone)."""

    def __init__(self, segments: Sequence[tuple[str | None, int]], like: torch.Tensor) -> None:
        super().__init__()
        self.segments = list(segments)
        self.scales = nn.ParameterDict({name: ones_param(w, like) for name, w in self.segments if name})

    def vector(self) -> torch.Tensor:
        """The full output scale (d_out)."""
        some = next(iter(self.scales.values()))
        parts = [self.scales[name] if name else some.new_ones(w) for name, w in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        return base(*args, **kwargs) * self.vector()


class ScaleInput(nn.Module):
    """``y = base(x ⊙ l)``: rescale the input of a linear map (d_in)."""

    def __init__(self, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.scale = ones_param(width, like)

    def forward(self, base: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return base(x * self.scale, *args, **kwargs)


@register
class IA3(Controller):
    """(IA)³ on the ``targets`` of ``layers``.

    Args:
        targets: roles / ``re:`` patterns / path suffixes; default ``("k", "v", "ffn_out")``.
        rescale_input: the targets whose *input* is rescaled (the FFN's down projection); the
            others have their output rescaled.  Default ``("ffn_out",)``.
        layers: blocks (all by default).
        seed: unused by the deterministic all-ones start; kept for a uniform interface.
        weight_decay: λ of ``R_l = (λ/2)‖l − 1‖²``: the penalty is on the delta from the identity
            (all-ones), not on the vectors themselves, so it pulls (IA)³ back to the pretrained model.
    """

    method = "ia3"
    group = "reparameterisation"
    form = "k -> l_k * k, v -> l_v * v, ffn: W_out a -> W_out (l_ff * a)"

    def __init__(self, targets: Sequence[str] | str = ("k", "v", "ffn_out"),
                 rescale_input: Sequence[str] | str = ("ffn_out",), layers: Sequence[int] | None = None,
                 seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.targets = tuple(dict.fromkeys(target_names(targets, self.method)))
        self.rescale_input = (rescale_input,) if isinstance(rescale_input, str) else tuple(rescale_input)
        self.layers = layers
        self.seed = int(seed)
        self.deltas = nn.ModuleDict()
        self._vectors: list[tuple[Site, str, nn.Parameter]] = []

    def attach(self, system: ResidualSystem) -> None:
        plain, fused = system.family.split_fused(self.targets)
        like = next(system.model.parameters())
        sites = resolve_targets(system, plain, self.layers) if plain else []
        for site in sites:
            d_in, d_out = linear_dims(site.module, self.method, site.role)
            if site.role in self.rescale_input:
                delta: nn.Module = ScaleInput(d_in, like)
                vectors = [("in", delta.scale)]
            else:
                delta = ScaleOutput([("out", d_out)], like)
                vectors = [("out", delta.scales["out"])]
            self._add(system, site, delta, [(site.role, p) for _, p in vectors])
        if fused:
            for site in resolve_targets(system, ("qkv",), self.layers):
                d_out = linear_dims(site.module, self.method, "qkv")[1]
                if d_out % 3:
                    raise UnsupportedMethodError(f"{self.method}: fused qkv output width {d_out} is not 3 equal parts")
                # The fused map's output is [q; k; v] in equal thirds (GPT-2's split order).
                segments = [(r if r in fused else None, d_out // 3) for r in QKV]
                delta = ScaleOutput(segments, like)
                self._add(system, site, delta, [(r, delta.scales[r]) for r in QKV if r in fused])

    def _add(self, system: ResidualSystem, site: Site, delta: nn.Module, vectors: list[tuple[str,
             nn.Parameter]]) -> None:
        self.deltas[site.key] = delta
        wrap(system.base, site.path, delta)
        self.sites.append(site)
        self._vectors += [(site, role, p) for role, p in vectors]

    def running_cost(self, where: int | str) -> torch.Tensor:
        """``R_where = (λ/2) Σ ‖l − 1‖²`` over the vectors acting at ``where`` (layer controls only)."""
        total = torch.zeros(())
        if self.weight_decay == 0.0 or not isinstance(where, int):
            return total
        for c in self.controls():
            if where in c.layers:
                total = total.to(c.param) + 0.5 * self.weight_decay * (c.param - 1).pow(2).sum()
        return total

    def controls(self) -> list[Control]:
        ordered = sorted(self._vectors, key=lambda v: v[0].layer)  # stable: target order within a layer
        return [Control(f"ia3.{site.layer}.{role}", p, "layer", (site.layer,)) for site, role, p in ordered]
