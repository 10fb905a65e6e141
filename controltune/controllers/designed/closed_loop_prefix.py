"""Closed-loop prefix tuning (``closed_loop_prefix``): prefix keys and values fed back from the state.

Open-loop prefix tuning prepends *constant* rows ``P_k, P_v`` (P×D per head) to the keys and
values of block l: in control terms an open-loop control, the same for every input.  Here they
are a low-rank affine function of the sequence's own pooled state entering the block (state
feedback):

    P_k(x_l) = P_k0 + U_k (V_lᵀ x̄_{l,s}),    P_v(x_l) = P_v0 + U_v (V_lᵀ x̄_{l,s}),
    x̄_{l,s} = mean over the real tokens of x_{l,s}  (d),   V_l ∈ R^{d×r},  U_k, U_v ∈ R^{(H·P·D)×r}.

``U`` starts at zero, so at initialisation the controller *is* open-loop prefix tuning with
``P_0 ~ N(0, 0.02²)``; ``rank=0`` keeps it open-loop.  Controls per layer: ``2·H·P·D`` (P_0)
``+ r·(2·H·P·D + d)`` (feedback).

Plumbing: the attention kernel calls ``module.ct_prefix(batch_size)`` (controltune/attention.py);
the state is captured by a forward pre-hook on block l (its input x_l) and the padding mask by
:meth:`ClosedLoopPrefix.initial_state`, which the system calls in ``embed`` on every rollout, so
the shared attention kernel is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base import Control, Controller, Site, UnsupportedMethodError, positive_int, register, seeded_generator

if TYPE_CHECKING:
    from ...system import ResidualSystem


class FeedbackPrefix(nn.Module):
    """Prefix rows of one layer: ``P0 + reshape(U (V x̄ᵀ))`` -> key, value each S×H×P×D."""

    def __init__(self, heads: int, n_prefix: int, head_dim: int, d_model: int, rank: int,
                 gen: torch.Generator, like: torch.Tensor) -> None:
        super().__init__()
        shape = (heads, n_prefix, head_dim)
        self.P0_key = nn.Parameter((0.02 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(like))
        self.P0_value = nn.Parameter((0.02 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(like))
        self.rank = rank
        if rank:
            width = heads * n_prefix * head_dim
            v = torch.randn(d_model, rank, generator=gen, dtype=torch.float64) / d_model ** 0.5
            self.V = nn.Parameter(v.to(like))
            self.U_key = nn.Parameter(torch.zeros(width, rank, dtype=like.dtype, device=like.device))
            self.U_value = nn.Parameter(torch.zeros(width, rank, dtype=like.dtype, device=like.device))

    def forward(self, pooled: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``pooled``: S×d (None only when rank == 0)."""
        key = self.P0_key.expand(batch_size, *self.P0_key.shape)
        value = self.P0_value.expand(batch_size, *self.P0_value.shape)
        if not self.rank:
            return key, value
        h = pooled @ self.V                                               # S×r
        key = key + (h @ self.U_key.T).view(batch_size, *self.P0_key.shape)
        value = value + (h @ self.U_value.T).view(batch_size, *self.P0_value.shape)
        return key, value


@register
class ClosedLoopPrefix(Controller):
    """Prefix tuning whose prefixes are low-rank affine state feedback of the pooled block input."""

    method = "closed_loop_prefix"
    group = "addition"
    form = "Attn(q, [P_k(x); K], [P_v(x); V]),  P(x) = P0 + U (V^T mean_t x_l)"

    def __init__(self, n_prefix: int = 8, rank: int = 1, layers: Sequence[int] | None = None, seed: int = 0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.n_prefix = positive_int(n_prefix, "n_prefix", self.method)
        self.rank = positive_int(rank, "rank", self.method, minimum=0)  # rank 0: an open-loop prefix
        self.layers, self.seed = layers, int(seed)
        self.prefixes = nn.ModuleDict()
        self._mask: torch.Tensor | None = None
        self._states: dict[int, torch.Tensor] = {}
        self._hooks: list = []

    def attach(self, system: ResidualSystem) -> None:
        cfg = system.model.config
        role = system.family.roles.get("attn")
        if role is None:
            raise UnsupportedMethodError(f"closed_loop_prefix: family {system.family.name!r} names no 'attn' module")
        geometry = system.family.head_geometry(cfg)
        kv_heads, head_dim = geometry.n_kv_heads, geometry.d_head
        n = system.n_layers
        layers = list(range(n)) if self.layers is None else sorted({int(x) % n for x in self.layers})
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        for layer in layers:
            block = system.blocks[layer]
            attn = block.get_submodule(role)
            prefix = FeedbackPrefix(kv_heads, self.n_prefix, head_dim, system.d_model, self.rank, gen, like)
            self.prefixes[str(layer)] = prefix
            # Bound methods in partials (not closures), so that deep copies of the
            # system (e.g. its float64 twin) call their own copy of this controller.
            attn.ct_prefix = partial(self._prefix_for, layer)
            self._hooks.append(block.register_forward_pre_hook(partial(self._capture, layer), with_kwargs=True))
            self.sites.append(Site(layer, "attn", f"{system.block_path(layer)}.{role}", attn))

    def initial_state(self, x0: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Not a control on x_0: the padding mask of this rollout is kept for pooling the block inputs.
        self._mask = attention_mask
        self._states = {}
        return x0, attention_mask

    def _capture(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of block ``layer``: keep its input state x_l."""
        self._states[layer] = args[0] if args else kwargs["hidden_states"]

    def _pooled(self, layer: int, batch_size: int) -> torch.Tensor | None:
        if not self.rank:
            return None
        x = self._states.get(layer)
        if x is None or self._mask is None:
            raise RuntimeError("closed_loop_prefix: no state captured for this block; run the model through "
                               "ResidualSystem (embed + step), not the bare HF model")
        if x.shape[0] != batch_size or self._mask.shape != x.shape[:2]:
            raise RuntimeError(f"closed_loop_prefix: captured state {tuple(x.shape)} and mask "
                               f"{tuple(self._mask.shape)} do not match the attention batch {batch_size}; "
                               "attach closed_loop_prefix after controllers that add prompt tokens")
        m = self._mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)

    def _prefix_for(self, layer: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``ct_prefix`` of block ``layer``: keys and values fed back from its pooled input state."""
        return self.prefixes[str(layer)](self._pooled(layer, batch_size), batch_size)

    def controls(self) -> list[Control]:
        out = []
        for site in self.sites:
            p = self.prefixes[str(site.layer)]
            out += [Control(f"clprefix.{site.layer}.{name}", param, "layer", (site.layer,))
                    for name, param in p.named_parameters()]
        return out
