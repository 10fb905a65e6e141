"""Input domains of a block: where a composed Lipschitz bound holds.

A composed bound (:mod:`controltune.bounds.composed`) bounds LayerNorm and softmax
attention on an explicit domain :class:`LayerDomain` — the least per-token scale
``σ = sqrt(var + ε)`` entering each norm, the largest token norm ``R`` of the
attention input, the spectral norm of each linear map's input (stacked over the
real tokens) and the sequence lengths.  It is *certified* for any pair of points
whose internal activations lie in the domain.  :func:`probe_block` measures a
domain on evaluated points; :func:`global_domain` gives one valid for every input
(usually vacuous; the number is reported, not hidden):

* ``σ ≥ sqrt(ε)`` for every LayerNorm;
* the attention input is a LayerNorm output (the block's own attention norm for
  pre-LN, the previous block's output norm or the embedding norm for post-LN), so
  ``R ≤ ‖γ‖_∞ sqrt(d) + ‖β‖``;
* linear-map inputs follow: rows of an attention output are convex combinations
  of values, and the FFN activation satisfies ``|act(z)| ≤ |z|``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from ..controllers.base import UnsupportedMethodError
from ..families.base import Context
from .norms import least_norm_scale, real_rows, spectral_norm
from .weights import BlockWeights, block_weights

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from torch import nn

    from ..system import ResidualSystem


@dataclass
class LayerDomain:
    """The input domain of block l on which a composed bound holds.

    Attributes:
        sigma_min: per LayerNorm role (``ln_attn``, ``ln_ffn``; ``ln_f`` for the final
            norm), the least per-token ``sqrt(var + eps)`` of its input.
        radius: largest token norm ``R`` of the attention input.
        input_norm: per linear role, an upper bound on the spectral norm ``‖A‖₂`` of
            its input stacked over the real tokens of the batch (N×d_in).
        max_len: largest number of keys a query sees (real tokens of a sequence).
        n_tokens: real tokens in the batch.
        causal: causal attention (query i sees i keys) or bidirectional.
        source: how it was obtained (``probed`` on evaluated points, or ``global``).
    """

    sigma_min: dict[str, float]
    radius: float
    input_norm: dict[str, float]
    max_len: int
    n_tokens: int
    causal: bool
    source: str = "probed"

    def merge(self, other: LayerDomain) -> LayerDomain:
        """The smallest domain of this form containing both."""
        if self.n_tokens != other.n_tokens or self.causal != other.causal:
            raise ValueError("domains of different batches cannot be merged")
        return LayerDomain(
            sigma_min={k: min(self.sigma_min[k], other.sigma_min[k]) for k in self.sigma_min},
            radius=max(self.radius, other.radius),
            input_norm={k: max(self.input_norm[k], other.input_norm[k]) for k in self.input_norm},
            max_len=max(self.max_len, other.max_len), n_tokens=self.n_tokens, causal=self.causal,
            source=self.source if self.source == other.source else f"{self.source}+{other.source}")

    def contains(self, other: LayerDomain) -> bool:
        """Whether ``other`` (e.g. probed on a new trajectory) lies inside this domain."""
        return (all(other.sigma_min[k] >= self.sigma_min[k] for k in self.sigma_min)
                and other.radius <= self.radius and other.max_len <= self.max_len
                and all(other.input_norm[k] <= self.input_norm[k] for k in self.input_norm))

    def to_dict(self) -> dict:
        return asdict(self)


# --- measured on evaluated points -------------------------------------------------------------


@contextmanager
def _recording(system: ResidualSystem, layer: int, mask: torch.Tensor, roles: tuple[str, ...]) -> Iterator[dict[str,
               torch.Tensor]]:
    """Record the real-token rows of the first input of each role's module while the body runs block ``layer``."""
    block = system.blocks[layer]
    paths = system.family.roles
    rec: dict[str, torch.Tensor] = {}
    handles = []

    def saver(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            rec[name] = real_rows(x.detach(), mask)
        return hook

    for r in roles:
        handles.append(block.get_submodule(paths[r]).register_forward_pre_hook(saver(r), with_kwargs=True))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def probe_block(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context) -> LayerDomain:
    """Measure the domain of block ``layer`` evaluated at ``x`` (S×T×d) with the current controls."""
    mask = ctx.attention_mask
    w = block_weights(system, layer)
    anatomy = w.anatomy
    with torch.no_grad(), _recording(system, layer, mask, (*anatomy.linear_roles, *anatomy.norms)) as rec:
        system.step(layer, x, ctx)
    attn_in = rec[anatomy.attn_input_role]
    lengths = mask.sum(1)
    return LayerDomain(
        sigma_min={r: least_norm_scale(rec[r], w.norms[r][2]) for r in anatomy.norms},
        radius=float(attn_in.norm(dim=-1).max()),
        input_norm={r: spectral_norm(rec[r]) for r in anatomy.linear_roles},
        max_len=int(lengths.max()), n_tokens=int(lengths.sum()), causal=system.family.causal, source="probed")


# --- valid for every input --------------------------------------------------------------------


def _ln_output_radius(weight: torch.Tensor, bias: torch.Tensor) -> float:
    """``max ‖LN(x)‖ ≤ ‖γ‖_∞ sqrt(d) + ‖β‖`` (the normalised vector has norm ≤ sqrt(d))."""
    return float(weight.abs().max()) * math.sqrt(weight.numel()) + float(bias.norm())


def _attention_input_norm(system: ResidualSystem, layer: int, w: BlockWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ, β)`` of the LayerNorm whose output block ``layer``'s attention reads."""
    anatomy = w.anatomy
    if anatomy.attn_norm is not None:
        g, b, _ = w.norms[anatomy.attn_norm]
        return g, b
    if layer > 0:
        previous = block_weights(system, layer - 1)
        g, b, _ = previous.norms[previous.anatomy.out_norm]
        return g, b
    if system.family.embedding_norm is None:
        raise UnsupportedMethodError(f"family {system.family.name!r}: block 0 reads x_0 unnormalised, so no global "
                                     "bound on its attention input exists")
    norm = system.base.get_submodule(system.family.embedding_norm)
    return norm.weight.detach(), norm.bias.detach()


def global_domain(system: ResidualSystem, layer: int, ctx: Context, weights: BlockWeights | None = None,
                  other: BlockWeights | None = None) -> LayerDomain:
    """A domain containing *every* input of block ``layer`` (for this batch's token counts).

    ``weights``/``other`` are the effective weights at the two compared controls u, u'
    (default: the current ones); the linear-map input bounds hold along the segment u–u'.
    """
    wu = weights if weights is not None else block_weights(system, layer)
    wv = other if other is not None else wu
    anatomy = wu.anatomy
    r = _ln_output_radius(*_attention_input_norm(system, layer, wu))
    ra = math.sqrt(r * r + 1.0)
    lengths = ctx.attention_mask.sum(1)
    nt = int(lengths.sum())
    sq = math.sqrt(nt)
    v_rows = math.sqrt(sum(max(a, c) ** 2 for a, c in zip(wu.head_norms()["v_aug"], wv.head_norms()["v_aug"])))
    ffn_ln = wu.norms[anatomy.ffn_norm]
    r_ffn = _ln_output_radius(ffn_ln[0], ffn_ln[1])
    w1 = max(spectral_norm(torch.cat([wu.linear["ffn_in"][0], wu.linear["ffn_in"][1][:, None]], 1)),
             spectral_norm(torch.cat([wv.linear["ffn_in"][0], wv.linear["ffn_in"][1][:, None]], 1)))
    inputs = {"o": sq * v_rows * ra, "ffn_in": sq * r_ffn, "ffn_out": sq * w1 * math.sqrt(r_ffn ** 2 + 1.0)}
    for role in anatomy.qkv:
        inputs[role] = sq * r
    return LayerDomain(sigma_min={k: math.sqrt(v[2]) for k, v in wu.norms.items()}, radius=r, input_norm=inputs,
                       max_len=int(lengths.max()), n_tokens=nt, causal=system.family.causal, source="global")


__all__ = ["LayerDomain", "global_domain", "probe_block"]
