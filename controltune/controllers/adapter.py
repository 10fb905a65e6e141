"""Adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022): bottleneck MLPs in the blocks.

In the He et al. unified view every adapter adds ``Δh = s·f(x W_down + b_down) W_up + b_up``
(:class:`Bottleneck`, ``W_down ∈ R^{d×m}``, ``W_up ∈ R^{m×d}``) to a hidden state ``h`` of block l;
they differ in which ``x`` they read and which ``h`` they modify:

* ``adapter`` (Houlsby, *sequential*, two per block): ``x = h`` is the output of the attention output
  projection (role ``o``) and of the FFN output projection (role ``ffn_out``): ``h -> h + s·f(h W_down) W_up``;
* ``pfeiffer`` (sequential, one per block): the same after ``ffn_out`` only;
* ``parallel_adapter`` (He et al., scaled parallel adapter on the FFN): ``x`` is the FFN sub-block's
  *input* and ``Δh`` is added to the FFN's output projection: ``h_ffn -> h_ffn + s·f(x W_down) W_up``.

``W_up`` and ``b_up`` start at zero, so every adapter is the identity at initialisation (the
pretrained trajectory is the nominal trajectory).  Controls: ``(W_down, b_down, W_up, b_up)`` of each
site, layer controls of the block the site is in; ``2·d·m + m + d`` scalars per site.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..families.base import linear_io
from .base import (
    Control,
    Controller,
    Site,
    UnsupportedMethodError,
    Wrapped,
    positive_int,
    register,
    resolve_targets,
    seeded_generator,
    target_names,
    wrap,
)

if TYPE_CHECKING:
    from typing import Any

    from ..system import ResidualSystem

NONLINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
}


def activation(name: str, who: str = "adapter") -> Callable[[torch.Tensor], torch.Tensor]:
    """The nonlinearity ``f`` called ``name`` (one of :data:`NONLINEARITIES`)."""
    if name not in NONLINEARITIES:
        raise ValueError(f"{who}: nonlinearity {name!r} is not one of {tuple(NONLINEARITIES)}")
    return NONLINEARITIES[name]


def check_bottleneck(size: int, who: str = "adapter") -> int:
    """``size`` as an int, or a clear error when it is not a positive width."""
    return positive_int(size, "bottleneck size", who)


def uniform_init(shape: tuple[int, ...], fan_in: int, gen: torch.Generator, like: torch.Tensor) -> nn.Parameter:
    """``U(-1/√fan_in, 1/√fan_in)`` drawn on CPU in float64 (seeded), then cast like ``like``."""
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return nn.Parameter(w.to(like))


def zeros_like_param(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    """A zero parameter with ``like``'s dtype and device."""
    return nn.Parameter(torch.zeros(*shape, dtype=like.dtype, device=like.device))


class Bottleneck(nn.Module):
    """``g(x) = s·f(x W_down + b_down) W_up + b_up``: x ``...×d_in`` -> ``...×d_out``.

    ``W_down`` (d_in×m) is uniform in ``±1/√d_in``; ``W_up`` (m×d_out) and both biases start at zero,
    so ``g ≡ 0`` at initialisation.  ``2·d·m + m + d`` scalars when ``d_in = d_out = d``.
    """

    def __init__(self, d_in: int, bottleneck: int, d_out: int | None = None, nonlinearity_name: str = "relu",
                 scale: float = 1.0, *, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        bottleneck = check_bottleneck(bottleneck)
        d_out = d_in if d_out is None else d_out
        self.f = activation(nonlinearity_name)
        self.nonlinearity = nonlinearity_name
        self.scale = float(scale)
        self.W_down = uniform_init((d_in, bottleneck), d_in, gen, like)
        self.b_down = zeros_like_param((bottleneck,), like)
        self.W_up = zeros_like_param((bottleneck, d_out), like)
        self.b_up = zeros_like_param((d_out,), like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.f(x @ self.W_down + self.b_down) @ self.W_up + self.b_up)

    def named_controls(self) -> list[tuple[str, nn.Parameter]]:
        """``(W_down, b_down, W_up, b_up)`` with their names."""
        return [("W_down", self.W_down), ("b_down", self.b_down), ("W_up", self.W_up), ("b_up", self.b_up)]


class SequentialAdapterDelta(nn.Module):
    """``h = base(*a)  ->  h + λ(h)·g(h)``: a bottleneck ``g`` after a frozen module.

    ``gate`` (optional, UniPELT) maps h (...×d) to ``λ(h)`` (...×1); without it λ ≡ 1.
    """

    def __init__(self, bottleneck: Bottleneck, gate: nn.Module | None = None) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.gate = gate

    def forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        h = base(*args, **kwargs)
        dh = self.bottleneck(h)
        if self.gate is not None:
            dh = self.gate(h) * dh
        return h + dh


class InputTap(nn.Module):
    """Passes a module's call through unchanged and keeps its first input in ``value``.

    Used where a delta elsewhere in the same block needs an input it does not receive (the parallel
    adapter's FFN input, UniPELT's attention input).  ``value`` is set at every call and released by
    :meth:`read` (its one reader), so it always belongs to the current forward pass and no graph is
    kept alive between passes (a system can then be deep-copied after a forward).
    """

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, base: nn.Module, x: torch.Tensor, *args, **kwargs) -> Any:
        self.value = x
        return base(x, *args, **kwargs)

    def read(self, who: str) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"{who}: the tapped module has not run yet in this forward pass")
        return value


class ParallelAdapterDelta(nn.Module):
    """``h_ffn = base(a)  ->  h_ffn + g(x)``, x the FFN input read by ``tap`` earlier in the block."""

    def __init__(self, bottleneck: Bottleneck, tap: InputTap) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.tap = tap

    def forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        return base(*args, **kwargs) + self.bottleneck(self.tap.read("parallel adapter"))


def linear_dims(module: nn.Module, who: str, role: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear map, looking through other controllers' wrappers."""
    while isinstance(module, Wrapped):
        module = module.base_layer
    try:
        return linear_io(module)
    except TypeError as err:
        raise UnsupportedMethodError(
            f"{who}: target {role!r}: {err}; this method acts on linear maps such as the roles 'o', 'ffn_in', "
            "'ffn_out'"
        ) from err


def output_dim(site: Site, method: str) -> int:
    """Width of the output of ``site`` (a linear map); a clear error for anything else."""
    return linear_dims(site.module, method, site.role)[1]


@register
class Adapter(Controller):
    """Sequential (Houlsby) adapters after the ``targets`` linear maps of ``layers``.

    Args:
        bottleneck: m, the bottleneck width.
        nonlinearity: f, one of ``relu``, ``gelu``, ``tanh``.
        scale: s.
        targets: roles / ``re:`` patterns / path suffixes of linear maps; default ``("o", "ffn_out")``.
        layers: blocks (all by default).
        seed: seed of the ``W_down`` initialisation.
        weight_decay: λ of ``R_l = (λ/2)‖u_l‖²``.
    """

    method = "adapter"
    group = "addition"
    form = "h -> h + s*f(h W_down + b_down) W_up + b_up  (h = output of o and ffn_out)"
    default_targets: tuple[str, ...] = ("o", "ffn_out")

    def __init__(self, bottleneck: int = 64, nonlinearity: str = "relu", scale: float = 1.0,
                 targets: Sequence[str] | str | None = None, layers: Sequence[int] | None = None,
                 seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        activation(nonlinearity, self.method)
        self.bottleneck = check_bottleneck(bottleneck, self.method)
        self.nonlinearity, self.scale = nonlinearity, float(scale)
        self.targets = self.default_targets if targets is None else target_names(targets, self.method)
        self.layers = layers
        self.seed = int(seed)
        self.deltas = nn.ModuleDict()

    def attach(self, system: ResidualSystem) -> None:
        self.sites = resolve_targets(system, self.targets, self.layers)
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        for site in self.sites:
            d = output_dim(site, self.method)
            delta = SequentialAdapterDelta(Bottleneck(d, self.bottleneck, d, self.nonlinearity, self.scale,
                                                      gen=gen, like=like))
            self.deltas[site.key] = delta
            wrap(system.base, site.path, delta)

    def controls(self) -> list[Control]:
        out = []
        for site in self.sites:
            g = self.deltas[site.key].bottleneck
            out += [Control(f"{self.method}.{site.layer}.{site.role}.{n}", p, "layer", (site.layer,))
                    for n, p in g.named_controls()]
        return out


@register
class PfeifferAdapter(Adapter):
    """One sequential adapter per block, after the FFN output projection (Pfeiffer et al., 2021)."""

    method = "pfeiffer"
    form = "h -> h + s*f(h W_down + b_down) W_up + b_up  (h = output of ffn_out)"
    default_targets = ("ffn_out",)


@register
class ParallelAdapter(Controller):
    """He et al.'s scaled parallel adapter on the FFN sub-block of ``layers``.

    ``x`` is read at the input of the ``ffn_in`` map, which in every family is the FFN sub-block's
    input (BERT: the attention sub-block's post-LN output; GPT-2/LLaMA: the pre-FFN norm's output),
    and ``Δh`` is added to the output of ``ffn_out``: for BERT that is before the residual sum and
    LayerNorm of ``BertOutput``; for the pre-LN decoders it is the FFN output (dropout aside, which is
    off in eval).  Two wrappers per block: an :class:`InputTap` on ``ffn_in`` and a
    :class:`ParallelAdapterDelta` on ``ffn_out``.

    Args:
        bottleneck: m.  nonlinearity: f.  scale: s (He et al. use 4).
        layers, seed, weight_decay: as for :class:`Adapter`.
    """

    method = "parallel_adapter"
    group = "addition"
    form = "h_ffn -> h_ffn + s*f(x W_down + b_down) W_up + b_up  (x = FFN input)"

    def __init__(self, bottleneck: int = 64, nonlinearity: str = "relu", scale: float = 4.0,
                 layers: Sequence[int] | None = None, seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        activation(nonlinearity, self.method)
        self.bottleneck = check_bottleneck(bottleneck, self.method)
        self.nonlinearity, self.scale = nonlinearity, float(scale)
        self.layers = layers
        self.seed = int(seed)
        self.deltas = nn.ModuleDict()

    def attach(self, system: ResidualSystem) -> None:
        missing = [r for r in ("ffn_in", "ffn_out") if r not in system.family.roles]
        if missing:
            raise UnsupportedMethodError(f"{self.method}: family {system.family.name!r} has no role(s) {missing}; "
                                         "the parallel adapter reads the FFN input at ffn_in and adds at ffn_out")
        inputs = resolve_targets(system, ("ffn_in",), self.layers)
        outputs = resolve_targets(system, ("ffn_out",), self.layers)
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        d = system.d_model
        for tap_site, out_site in zip(inputs, outputs):
            d_out = output_dim(out_site, self.method)
            tap = InputTap()
            delta = ParallelAdapterDelta(Bottleneck(d, self.bottleneck, d_out, self.nonlinearity, self.scale,
                                                    gen=gen, like=like), tap)
            self.deltas[out_site.key] = delta
            wrap(system.base, tap_site.path, tap)
            wrap(system.base, out_site.path, delta)
        self.sites = outputs

    def controls(self) -> list[Control]:
        out = []
        for site in self.sites:
            g = self.deltas[site.key].bottleneck
            out += [Control(f"{self.method}.{site.layer}.ffn.{n}", p, "layer", (site.layer,))
                    for n, p in g.named_controls()]
        return out
