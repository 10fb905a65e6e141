"""UniPELT (Mao et al., 2022): gated LoRA + gated prefix + gated sequential adapter in every block.

Each sub-module's contribution is multiplied by a learned gate ``λ(x) = σ(x w + b)`` computed from
*that sub-module's input* x (``w ∈ R^d``, ``b ∈ R``; ``w`` uniform ``±1/√d``, ``b = 0``, so
``λ ≈ 1/2`` at initialisation):

* LoRA on ``q, v`` (GPT-2: the fused ``qkv``): ``W x -> W x + λ_L(x)·(α/r) B A x``, x the map's
  input, one gate per token;
* prefix: ``Attn(q, [P_k; K], [λ_P ⊙ P_v; V])`` — the gate multiplies the prefix *values*, i.e. the
  prefix term ``λ(x) softmax(q P_kᵀ) P_v`` of the He et al. view is scaled by ``λ_P`` while the
  attention mass the prefix takes is unchanged.  ``P_v`` is shared by all queries, so ``λ_P`` is one
  gate per sequence, computed from the attention input x pooled over the sequence: the masked mean
  over real positions for bidirectional families; the first position for causal families (the one
  position every query may see, so the gate leaks no future token);
* sequential adapter after ``ffn_out``: ``h -> h + λ_A(h)·g(h)``, h the adapter input, per token.

LoRA (``B = 0``) and the adapter (``W_up = 0``) start as the identity; the prefix does not (its rows
take attention mass from the first step), so UniPELT with its prefix changes the output at
initialisation and without it (``parts=("lora", "adapter")``) does not.

Controls (all layer controls unless ``prefix_reparam``): LoRA ``(A, B)`` + gate ``(w, b)`` per
site; prefix ``(P_k, P_v)`` + gate per layer; adapter ``(W_down, b_down, W_up, b_up)`` + gate per site.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapter import (
    Bottleneck,
    InputTap,
    SequentialAdapterDelta,
    activation,
    check_bottleneck,
    linear_dims,
    output_dim,
    uniform_init,
    zeros_like_param,
)
from .base import (
    Control,
    Controller,
    Site,
    UnsupportedMethodError,
    positive_float,
    positive_int,
    register,
    resolve_targets,
    seeded_generator,
    target_names,
    wrap,
)
from .lora import LoRADelta
from .prefix import PrefixKV, PrefixMLP, attention_modules, install_prefix, kv_geometry

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..system import ResidualSystem

PARTS = ("lora", "prefix", "adapter")


class Gate(nn.Module):
    """``λ(x) = σ(x w + b)``: x ``...×d`` -> ``...×1`` in (0, 1)."""

    def __init__(self, d: int, *, gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        self.w = uniform_init((d, 1), d, gen, like)
        self.b = zeros_like_param((1,), like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x @ self.w + self.b)

    def named_controls(self) -> list[tuple[str, nn.Parameter]]:
        return [("gate.w", self.w), ("gate.b", self.b)]


class GatedLoRADelta(nn.Module):
    """``y = base(x) + λ(x)·s·(x Aᵀ) Bᵀ``: a :class:`~controltune.controllers.lora.LoRADelta` behind a gate."""

    def __init__(self, lora: LoRADelta, gate: Gate) -> None:
        super().__init__()
        self.lora = lora
        self.gate = gate

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        return base(x) + self.gate(x) * (lora.scale * (x @ lora.A.T) @ lora.B.T)


class GatedPrefix(nn.Module):
    """One layer's prefix with its values scaled by a per-sequence gate of the attention input.

    ``kv(batch_size)`` gives ``(P_k, λ_P ⊙ P_v)``, each ``S×H_kv×P×D_head``; ``λ_P`` (S×1×1×1) is
    ``σ(pool(x) w + b)`` with x read by ``tap`` at the attention input and ``pool`` the owner's
    padding-aware pooling.
    """

    def __init__(self, source: Callable[..., object], gate: Gate, tap: InputTap,
                 pool: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.source = source  # PrefixKV (registered) or a PrefixMLP layer function (owned elsewhere)
        self.gate = gate
        self.tap = tap
        self.pool = pool

    def kv(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = self.source(batch_size)
        lam = self.gate(self.pool(self.tap.read("UniPELT prefix gate")))  # S×1
        return key, value * lam.to(value.dtype)[:, :, None, None]


@register
class UniPELT(Controller):
    """Gated combination of LoRA, prefix tuning and a sequential adapter (Mao et al., 2022).

    Args:
        parts: sub-modules to use, a subset of ``("lora", "prefix", "adapter")`` (all by default).
        lora_rank, lora_alpha: r and α of the LoRA part.
        lora_targets: roles of the LoRA part; default ``("q", "v")`` (fused ``qkv`` for GPT-2).
        prefix_length: P.  prefix_reparam, prefix_hidden: Li & Liang's MLP (shared controls).
        prefix_init_std: std of the direct prefix initialisation.
        bottleneck, nonlinearity, adapter_scale: m, f and s of the adapter part.
        adapter_targets: roles the adapter follows; default ``("ffn_out",)``.
        layers: blocks (all by default).  seed: initialisation seed.  weight_decay: λ of ``(λ/2)‖u‖²``.
    """

    method = "unipelt"
    group = "combination"
    form = ("W x -> W x + lam_L(x)(alpha/r) B A x (q,v); Attn(q,[P_k;K],[lam_P P_v;V]); "
            "h -> h + lam_A(h) s f(h W_down) W_up (ffn_out); lam(x) = sigmoid(x w + b)")

    def __init__(self, parts: Sequence[str] | str = PARTS, lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_targets: Sequence[str] | str = ("q", "v"), prefix_length: int = 10,
                 prefix_reparam: bool = False, prefix_hidden: int = 512, prefix_init_std: float = 0.02,
                 bottleneck: int = 64, nonlinearity: str = "relu", adapter_scale: float = 1.0,
                 adapter_targets: Sequence[str] | str = ("ffn_out",), layers: Sequence[int] | None = None,
                 seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.parts = (parts,) if isinstance(parts, str) else tuple(dict.fromkeys(parts))
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise ValueError(f"unipelt: parts {list(self.parts)} must be a non-empty subset of {PARTS}")
        activation(nonlinearity, self.method)
        self.lora_rank = positive_int(lora_rank, "lora_rank", self.method)
        self.lora_alpha = positive_float(lora_alpha, "lora_alpha", self.method)
        self.lora_targets = target_names(lora_targets, self.method, "lora_targets")
        self.prefix_length = positive_int(prefix_length, "prefix_length", self.method)
        self.prefix_reparam = bool(prefix_reparam)
        self.prefix_hidden = positive_int(prefix_hidden, "prefix_hidden", self.method)
        self.prefix_init_std = float(prefix_init_std)
        self.bottleneck = check_bottleneck(bottleneck, self.method)
        self.nonlinearity, self.adapter_scale = nonlinearity, float(adapter_scale)
        self.adapter_targets = target_names(adapter_targets, self.method, "adapter_targets")
        self.layers = layers
        self.seed = int(seed)
        self.lora = nn.ModuleDict()
        self.prefix = nn.ModuleDict()
        self.prefix_mlp: PrefixMLP | None = None
        self.adapter = nn.ModuleDict()
        self._sites: dict[str, list[Site]] = {p: [] for p in PARTS}
        self._causal = False
        self._mask: torch.Tensor | None = None

    # --- attaching -----------------------------------------------------------------
    def attach(self, system: ResidualSystem) -> None:
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        self._causal = system.family.causal
        # LoRA first: the prefix part taps the attention input by wrapping the q/qkv map after it.
        if "lora" in self.parts:
            self._attach_lora(system, gen, like)
        if "prefix" in self.parts:
            self._attach_prefix(system, gen, like)
        if "adapter" in self.parts:
            self._attach_adapter(system, gen, like)
        self.sites = [s for p in PARTS for s in self._sites[p]]

    def _attach_lora(self, system: ResidualSystem, gen: torch.Generator, like: torch.Tensor) -> None:
        # A fused q/k/v map (GPT-2): LoRA acts on it, as the LoRA controller does.
        for site in resolve_targets(system, system.family.expand_targets(self.lora_targets), self.layers):
            d_in, d_out = linear_dims(site.module, self.method, site.role)
            delta = GatedLoRADelta(LoRADelta(d_in, d_out, self.lora_rank, self.lora_alpha / self.lora_rank, gen, like),
                                   Gate(d_in, gen=gen, like=like))
            self.lora[site.key] = delta
            wrap(system.base, site.path, delta)
            self._sites["lora"].append(site)

    def _attach_prefix(self, system: ResidualSystem, gen: torch.Generator, like: torch.Tensor) -> None:
        roles = system.family.roles
        input_role = "q" if "q" in roles else "qkv"
        if input_role not in roles:
            raise UnsupportedMethodError(f"unipelt: family {system.family.name!r} has neither a 'q' nor a 'qkv' "
                                         "role, so the prefix gate cannot read the attention input")
        modules = attention_modules(system, self.layers, self.method)
        taps = resolve_targets(system, (input_role,), self.layers)
        kv_heads, head_dim = kv_geometry(system)
        if self.prefix_reparam:
            self.prefix_mlp = PrefixMLP(len(modules), kv_heads, self.prefix_length, head_dim, system.d_model,
                                        self.prefix_hidden, gen=gen, like=like)
        for index, ((site, module), tap_site) in enumerate(zip(modules, taps)):
            if self.prefix_reparam:
                source = partial(self.prefix_mlp.layer_kv, index)
            else:
                source = PrefixKV(kv_heads, self.prefix_length, head_dim, self.prefix_init_std, gen=gen, like=like)
            tap = InputTap()
            wrap(system.base, tap_site.path, tap)
            gated = GatedPrefix(source, Gate(system.d_model, gen=gen, like=like), tap, self._pool)
            self.prefix[str(site.layer)] = gated
            install_prefix(module, gated.kv, self.method, site.layer)
            self._sites["prefix"].append(site)

    def _attach_adapter(self, system: ResidualSystem, gen: torch.Generator, like: torch.Tensor) -> None:
        for site in resolve_targets(system, self.adapter_targets, self.layers):
            d = output_dim(site, self.method)
            delta = SequentialAdapterDelta(
                Bottleneck(d, self.bottleneck, d, self.nonlinearity, self.adapter_scale, gen=gen, like=like),
                Gate(d, gen=gen, like=like))
            self.adapter[site.key] = delta
            wrap(system.base, site.path, delta)
            self._sites["adapter"].append(site)

    # --- the prefix gate's pooling ---------------------------------------------------
    def initial_state(self, x0: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity on x_0; keeps the padding mask (S×T) for the prefix gate's masked mean."""
        self._mask = attention_mask
        return x0, attention_mask

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """S×T×d -> S×d: first position (causal) or mean over real positions (bidirectional)."""
        if self._causal:
            return x[:, 0]
        mask = self._mask
        if mask is None or mask.shape[0] != x.shape[0] or mask.shape[1] > x.shape[1]:
            raise RuntimeError("unipelt: the prefix gate needs the padding mask of the current batch; run the "
                               "system through embed()/rollout() (not step() with another batch's context)")
        if mask.shape[1] < x.shape[1]:
            # Controllers attached after this one prepended prompt positions: those are real positions.
            ones = mask.new_ones(mask.shape[0], x.shape[1] - mask.shape[1])
            mask = torch.cat([ones, mask], dim=1)
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)

    # --- controls --------------------------------------------------------------------
    def controls(self) -> list[Control]:
        out: list[Control] = []
        for site in self._sites["lora"]:
            d = self.lora[site.key]
            pairs = [("A", d.lora.A), ("B", d.lora.B), *d.gate.named_controls()]
            out += [Control(f"unipelt.{site.layer}.lora.{site.role}.{n}", p, "layer", (site.layer,)) for n, p in pairs]
        for site in self._sites["prefix"]:
            g = self.prefix[str(site.layer)]
            pairs = list(g.gate.named_controls())
            if isinstance(g.source, PrefixKV):
                pairs = [("key", g.source.key), ("value", g.source.value), *pairs]
            out += [Control(f"unipelt.{site.layer}.prefix.{n}", p, "layer", (site.layer,)) for n, p in pairs]
        if self.prefix_mlp is not None:
            layers = tuple(s.layer for s in self._sites["prefix"])
            out += [Control(f"unipelt.prefix.mlp.{n}", p, "shared", layers)
                    for n, p in self.prefix_mlp.named_controls()]
        for site in self._sites["adapter"]:
            d = self.adapter[site.key]
            pairs = [*d.bottleneck.named_controls(), *d.gate.named_controls()]
            out += [Control(f"unipelt.{site.layer}.adapter.{site.role}.{n}", p, "layer", (site.layer,))
                    for n, p in pairs]
        return out
