"""Prefix tuning (Li & Liang, 2021): learned key/value rows prepended in every attention module.

``G``: in block l, ``Attn(q, K, V) -> Attn(q, [P_k^l; K], [P_v^l; V])`` with ``P_k^l, P_v^l ∈
R^{H_kv×P×D_head}`` (one prefix per key/value head, so grouped-query attention keeps its
sharing), visible to every query.  In the He et al. unified view this is a gated parallel
adapter on the attention output: ``h -> (1-λ(x)) h + λ(x) softmax(x W_q P_kᵀ) P_v``.

The prefix reaches the attention kernel through ``module.ct_prefix`` (see
:mod:`controltune.attention`), a callable evaluated *inside* the layer's attention call, so the
graph of block l holds the prefix's dependence on its parameters.

Controls:

* direct (``reparam=False``): ``(P_k^l, P_v^l)`` of each layer l, layer controls;
  ``2·H_kv·P·D_head`` scalars per layer;
* reparameterised (``reparam=True``, Li & Liang's MLP): ``[P_k^l; P_v^l] = (tanh(E W_1 + b_1) W_2 + b_2)_l``
  with ``E ∈ R^{P×d}``, ``W_1 ∈ R^{d×h}``, ``W_2 ∈ R^{h×(L'·2·H_kv·D_head)}`` (``L'`` prefixed
  layers, column block l for layer l); every MLP parameter is a *shared* control acting in all L'
  layers, and each layer evaluates the MLP during its own attention call.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter import uniform_init
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
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..system import ResidualSystem

ATTENTION_ROLE = "attn"


def kv_geometry(system: ResidualSystem) -> tuple[int, int]:
    """``(H_kv, D_head)``: key/value heads and head width of the system's attention."""
    geometry = system.family.head_geometry(system.model.config)
    return geometry.n_kv_heads, geometry.d_head


def attention_modules(system: ResidualSystem, layers: Sequence[int] | None, who: str) -> list[tuple[Site, nn.Module]]:
    """``(site, attention module)`` pairs: the HF modules the kernel receives as ``module``.

    A wrapped attention module (another controller's delta) is looked through to its base layer,
    which is where the kernel reads ``ct_prefix``.
    """
    if ATTENTION_ROLE not in system.family.roles:
        raise UnsupportedMethodError(f"{who}: family {system.family.name!r} names no attention module "
                                     f"(role {ATTENTION_ROLE!r}); roles: {', '.join(sorted(system.family.roles))}")
    out = []
    for site in resolve_targets(system, (ATTENTION_ROLE,), layers):
        module = site.module
        while isinstance(module, Wrapped):
            module = module.base_layer
        out.append((site, module))
    return out


def install_prefix(module: nn.Module, fn: Callable[..., object], who: str, layer: int) -> None:
    """Set ``module.ct_prefix = fn``, refusing to silently replace another controller's prefix."""
    if getattr(module, "ct_prefix", None) is not None:
        raise UnsupportedMethodError(f"{who}: the attention module of block {layer} already carries a prefix "
                                     "from another controller; prefixes do not stack")
    # A plain callable (not an nn.Module) so the prefix parameters are not registered inside
    # the frozen model: they belong to the controller only.
    module.ct_prefix = fn


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter((torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(like))


class PrefixKV(nn.Module):
    """One layer's prefix ``(P_k, P_v)``, each ``H_kv×P×D_head``, drawn ``N(0, init_std²)``."""

    def __init__(self, kv_heads: int, length: int, head_dim: int, init_std: float, *, gen: torch.Generator,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.key = _normal((kv_heads, length, head_dim), init_std, gen, like)
        self.value = _normal((kv_heads, length, head_dim), init_std, gen, like)

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_k, P_v)`` broadcast to ``S×H_kv×P×D_head``."""
        return expand_kv(self.key, self.value, batch_size)


class PrefixMLP(nn.Module):
    """Li & Liang's reparameterisation ``[P_k^l; P_v^l] = (tanh(E W_1 + b_1) W_2 + b_2)_l`` for n_layers layers.

    ``E`` (P×d) is ``N(0, 1)``; ``W_1``, ``W_2`` uniform ``±1/√fan_in``; biases zero.
    """

    def __init__(self, n_layers: int, kv_heads: int, length: int, head_dim: int, d_model: int, hidden: int, *,
                 gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        self.kv_heads, self.length, self.head_dim = kv_heads, length, head_dim
        width = 2 * kv_heads * head_dim
        self.width = width
        self.E = _normal((length, d_model), 1.0, gen, like)
        self.W1 = uniform_init((d_model, hidden), d_model, gen, like)
        self.b1 = nn.Parameter(torch.zeros(hidden, dtype=like.dtype, device=like.device))
        self.W2 = uniform_init((hidden, n_layers * width), hidden, gen, like)
        self.b2 = nn.Parameter(torch.zeros(n_layers * width, dtype=like.dtype, device=like.device))

    def layer_kv(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix of the ``index``-th prefixed layer, ``S×H_kv×P×D_head`` each, computed now (graph kept)."""
        cols = slice(index * self.width, (index + 1) * self.width)
        flat = torch.tanh(self.E @ self.W1 + self.b1) @ self.W2[:, cols] + self.b2[cols]  # P × 2·H_kv·D
        kv = flat.view(self.length, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # 2×H_kv×P×D
        return expand_kv(kv[0], kv[1], batch_size)

    def named_controls(self) -> list[tuple[str, nn.Parameter]]:
        return [("E", self.E), ("W1", self.W1), ("b1", self.b1), ("W2", self.W2), ("b2", self.b2)]


def expand_kv(key: torch.Tensor, value: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``H_kv×P×D`` -> ``S×H_kv×P×D`` views (no copy)."""
    return key.expand(batch_size, *key.shape), value.expand(batch_size, *value.shape)


@register
class Prefix(Controller):
    """Prefix tuning in the attention modules of ``layers``.

    Args:
        length: P, prefix rows per key/value head.
        reparam: use Li & Liang's MLP reparameterisation (shared controls).
        hidden: h, the MLP's hidden width (``reparam=True`` only).
        init_std: std of the direct prefix initialisation ``N(0, init_std²)``.
        layers: blocks (all by default).
        seed: seed of the initialisation.
        weight_decay: λ of ``R = (λ/2)‖u‖²`` (shared controls: split evenly across their layers).
    """

    method = "prefix"
    group = "addition"
    form = "h -> (1-lambda(x)) h + lambda(x) softmax(x W_q P_k^T) P_v  (Attn(q, [P_k; K], [P_v; V]))"

    def __init__(self, length: int = 10, reparam: bool = False, hidden: int = 512, init_std: float = 0.02,
                 layers: Sequence[int] | None = None, seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.length = positive_int(length, "length", self.method)
        self.reparam = bool(reparam)
        self.hidden = positive_int(hidden, "hidden (width of the reparameterisation MLP)", self.method)
        self.init_std = float(init_std)
        self.layers = layers
        self.seed = int(seed)
        self.prefixes = nn.ModuleDict()
        self.mlp: PrefixMLP | None = None
        self.prefixed_layers: tuple[int, ...] = ()

    def attach(self, system: ResidualSystem) -> None:
        modules = attention_modules(system, self.layers, self.method)
        kv_heads, head_dim = kv_geometry(system)
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        self.sites = [site for site, _ in modules]
        self.prefixed_layers = tuple(site.layer for site in self.sites)
        if self.reparam:
            self.mlp = PrefixMLP(len(modules), kv_heads, self.length, head_dim, system.d_model, self.hidden,
                                 gen=gen, like=like)
        for index, (site, module) in enumerate(modules):
            layer = site.layer
            if self.reparam:
                fn = partial(self.mlp.layer_kv, index)
            else:
                self.prefixes[str(layer)] = PrefixKV(kv_heads, self.length, head_dim, self.init_std,
                                                     gen=gen, like=like)
                fn = self.prefixes[str(layer)].forward
            install_prefix(module, fn, self.method, layer)

    def controls(self) -> list[Control]:
        if self.mlp is not None:
            return [Control(f"prefix.mlp.{n}", p, "shared", self.prefixed_layers)
                    for n, p in self.mlp.named_controls()]
        out = []
        for layer in self.prefixed_layers:
            kv = self.prefixes[str(layer)]
            out += [Control(f"prefix.{layer}.key", kv.key, "layer", (layer,)),
                    Control(f"prefix.{layer}.value", kv.value, "layer", (layer,))]
        return out
