"""What every architecture family must say about itself.

A *family* is the one place that knows where a model keeps its blocks, how it
embeds tokens, which cross-layer inputs (masks, rotary tables) its blocks take,
and the common names of the modules inside a block.  Everything else in
controltune talks to :class:`controltune.system.ResidualSystem` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

EmbedFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]
BlockFn = Callable[[nn.Module, torch.Tensor, "Context"], torch.Tensor]


@dataclass
class Context:
    """The fixed, cross-layer inputs of the blocks for one batch.

    They are computed once in ``embed`` and shared by every block, so a block
    ``f_l`` is a function of the state ``x_l`` (and its controls) alone.

    Attributes:
        attention_mask: ``S×T`` (1 = real token, 0 = padding) over the state's
            positions, prompt tokens included.
        mask: the model's attention mask in the form its attention kernel
            takes (``S×1×T×T``: boolean for sdpa, additive float for eager).
        position_ids: ``1×T`` or ``S×T`` positions of the state's tokens.
        rotary: ``(cos, sin)``, each ``S×T×d_head``, for rotary families, else ``None``.
        n_prompt: number of prompt positions prepended to the tokens in ``x_0``.
    """

    attention_mask: torch.Tensor
    mask: torch.Tensor | None
    position_ids: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    n_prompt: int = 0


@dataclass(frozen=True)
class Family:
    """Static description of one architecture family.

    Attributes:
        name: family name (``bert``, ``gpt2``, ``llama``, ...).
        model_types: the ``config.model_type`` values it handles.
        post_ln: True if LayerNorm follows the residual sum (BERT); then
            ``f_l`` is the whole block rather than ``x + G_l``.
        causal: decoder (causal attention, next-token readout) or encoder.
        blocks: dotted path of the ``ModuleList`` of blocks in the base model.
        final_norm: dotted path of the norm after the last block, or ``None``
            (post-LN encoders end normalised).
        roles: common vocabulary ``role -> path inside a block`` (``q``, ``k``,
            ``v``, ``qkv``, ``o``, ``ffn_in``, ``ffn_gate``, ``ffn_out``,
            ``ln_attn``, ``ln_ffn``, ``attn``, ``ffn``).
        ffn_input: path inside a block of the module whose *first input* is the
            FFN sub-block's input (parallel adapters read it).
        embed: ``(base, input_ids, token_type_ids, position_ids) -> x_0`` (S×T×d).
        call_block: ``(block, x, ctx) -> x_next`` running the real HF block.
        context_inputs: names of the cross-layer inputs the blocks take (docs).
        needs_rotary: whether ``ctx.rotary`` must be filled from ``base.rotary_emb``.
        prepare: optional in-place fix-up of a model before it becomes a system
            (e.g. float64-faithful norms); must not change float32 results.
    """

    name: str
    model_types: tuple[str, ...]
    post_ln: bool
    causal: bool
    blocks: str
    final_norm: str | None
    roles: dict[str, str]
    ffn_input: str
    embed: EmbedFn
    call_block: BlockFn
    context_inputs: tuple[str, ...]
    random_config: Callable[[int], object]
    needs_rotary: bool = False
    prepare: Callable[[nn.Module], None] | None = None
    notes: str = ""
    linear_roles: tuple[str, ...] = field(default=())


def linear_io(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear map, whichever way the family stores it.

    ``nn.Linear`` keeps ``W`` as d_out×d_in; GPT-2's ``Conv1D`` keeps it d_in×d_out.
    A linear map already wrapped by a delta (``base_layer``) keeps its shape, so
    several deltas can sit on one map (simultaneous combinations).
    """
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        d_in, d_out = module.weight.shape
        return d_in, d_out
    raise TypeError(f"{type(module).__name__} is not a linear map (nn.Linear or Conv1D)")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear map as d_out×d_in (``y = x Wᵀ + b``), a view for Linear."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if type(module).__name__ == "Conv1D":
        return module.weight.T
    return module.weight
