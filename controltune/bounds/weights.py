"""The effective weights of a block ``θ + u``: what a composed bound is computed from.

A weight-space control ``W -> W + ΔW`` changes the linear maps of a block; the
composed bound (:mod:`controltune.bounds.composed`) needs those maps dense
(``d_out×d_in``), the norms' ``(γ, β, ε)`` and, per attention head ``h`` with
rows ``W̃_{q,h}``, ``W̃_{k,h}`` (bias appended as a last column), the norms
``‖W̃_{q,h}‖``, ``‖W̃_{k,h}‖``, ``‖W_{v,h}‖``, ``‖W̃_{v,h}‖`` and ``‖W̃_{q,h}ᵀ W̃_{k,h}‖``.
What the block looks like (which maps, which norms, the activation, the heads)
is its family's :class:`~controltune.families.base.BlockAnatomy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..controllers.base import UnsupportedMethodError, Wrapped
from ..families.base import BlockAnatomy, dense_weight
from .norms import spectral_norm, spectral_norm_of_product

if TYPE_CHECKING:
    from ..system import ResidualSystem

Linear = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class BlockWeights:
    """Effective weights of one block (base + weight-space deltas), dense ``d_out×d_in``.

    Attributes:
        anatomy: the family's description of the block.
        linear: per linear role, ``(W, b)`` (``b`` None without bias).
        norms: per norm role, ``(γ, β, ε)``.
        cache: values computed once from the weights (head norms, spectral norms).
    """

    anatomy: BlockAnatomy
    linear: dict[str, Linear]
    norms: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    cache: dict = field(default_factory=dict)

    @property
    def n_heads(self) -> int:
        return self.anatomy.heads.n_heads

    def qkv(self) -> tuple[Linear, Linear, Linear]:
        """``(W_q, b_q), (W_k, b_k), (W_v, b_v)``; a fused map's rows are ``[q; k; v]`` in thirds."""
        if self.anatomy.fused_qkv:
            (role,) = self.anatomy.qkv
            w, b = self.linear[role]
            ws, bs = w.chunk(3, dim=0), (b.chunk(3) if b is not None else (None,) * 3)
            return (ws[0], bs[0]), (ws[1], bs[1]), (ws[2], bs[2])
        q, k, v = self.anatomy.qkv
        return self.linear[q], self.linear[k], self.linear[v]

    def head_norms(self) -> dict[str, list[float]]:
        """Per head: ``‖W̃_q‖``, ``‖W̃_k‖`` (bias appended), ``‖W_v‖``, ``‖W̃_v‖`` (``v_aug``) and
        ``‖W̃_qᵀ W̃_k‖`` (``qk``), computed once."""
        if "heads" not in self.cache:
            (q, qb), (k, kb), (v, vb) = self.qkv()
            h = self.n_heads
            qh, kh, vh = _per_head(q, qb, h), _per_head(k, kb, h), _per_head(v, None, h)
            self.cache["heads"] = {"q": [spectral_norm(t) for t in qh], "k": [spectral_norm(t) for t in kh],
                                   "v": [spectral_norm(t[:, :-1]) for t in vh],
                                   "qk": [spectral_norm_of_product(a, b) for a, b in zip(qh, kh)],
                                   "v_aug": [spectral_norm(t) for t in _per_head(v, vb, h)]}
        return self.cache["heads"]


def _per_head(w: torch.Tensor, b: torch.Tensor | None, heads: int) -> list[torch.Tensor]:
    """Rows of head h of a projection with its bias appended as a last column (D×(d+1))."""
    bias = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
    aug = torch.cat([w, bias[:, None]], dim=1)
    return list(aug.chunk(heads, dim=0))


def block_anatomy(system: ResidualSystem, layer: int) -> BlockAnatomy:
    """The family's :class:`BlockAnatomy` of block ``layer``; a clear error when the composed bound is not
    derived for the family."""
    family = system.family
    if family.anatomy is None:
        raise UnsupportedMethodError(
            f"composed Lipschitz bounds are derived for post-LN (BERT/RoBERTa) and pre-LN (GPT-2) blocks with "
            f"LayerNorm, softmax attention and an elementwise FFN; family {family.name!r} declares no block "
            "anatomy for them (e.g. rotary attention, gated FFN, RMSNorm): use the local and sampled estimators")
    return family.anatomy(system.blocks[layer], system.model.config)


def effective_linear(module: nn.Module) -> Linear:
    """``(W, b)`` of a (possibly wrapped) linear map, W dense ``d_out×d_in``, including a weight delta.

    A wrapped module's delta must expose ``delta_weight()`` (d_out×d_in), as LoRA and
    :class:`controltune.bounds.weight_deltas.DeltaWeights` do.
    """
    if isinstance(module, Wrapped):
        base = module.base_layer
        fn = getattr(module.delta, "delta_weight", None)
        if fn is None:
            raise UnsupportedMethodError(
                f"{type(module.delta).__name__} is not a weight-space delta (no delta_weight()); composed bounds "
                "in the control cover deltas W -> W + ΔW only")
        return dense_weight(base) + fn(), base.bias
    return dense_weight(module), getattr(module, "bias", None)


def block_weights(system: ResidualSystem, layer: int) -> BlockWeights:
    """The effective weights of block ``layer`` (current values of its weight deltas)."""
    anatomy = block_anatomy(system, layer)
    block = system.blocks[layer]
    roles = system.family.roles
    with torch.no_grad():
        linear = {r: tuple(t.detach() if t is not None else None
                           for t in effective_linear(block.get_submodule(roles[r])))
                  for r in anatomy.linear_roles}
        norms = {}
        for r in anatomy.norms:
            ln = block.get_submodule(roles[r])
            norms[r] = (ln.weight.detach(), ln.bias.detach(), float(ln.eps))
    return BlockWeights(anatomy, linear, norms)


__all__ = ["BlockWeights", "block_anatomy", "block_weights", "effective_linear"]
