"""Encoders with post-LN blocks: BERT and RoBERTa (and their distillations, MiniLM).

Block l is ``x_{l+1} = LN_2(h + FFN(h))`` with ``h = LN_1(x_l + Attn(x_l))``: the
LayerNorm sits after the residual sum, so f_l is the whole block, not x + G_l.
Cross-layer context: the bidirectional padding mask only (positions and token
types are added once, in the embedding, and so are part of x_0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import QKV, BlockAnatomy, Context, Family, config_head_geometry, first_row

if TYPE_CHECKING:
    from collections.abc import Callable

    from .base import SequenceLogitsFn

_ROLES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ln_attn": "attention.output.LayerNorm",
    "ln_ffn": "output.LayerNorm",
    "attn": "attention.self",
    "ffn": "output",
}


def _embed(base: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
           position_ids: torch.Tensor) -> torch.Tensor:
    # Positions are left to the embedding module: RoBERTa derives them from the
    # padding, BERT from arange, and both must match the HF forward exactly.
    return base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


def _call_block(block: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
    return block(x, ctx.mask)


_LINEAR_ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")


def _anatomy(block: nn.Module, config: object) -> BlockAnatomy:
    """Post-LN: attention reads the block input; ``ln_attn`` normalises the attention residual
    and feeds the FFN; ``ln_ffn`` normalises the FFN residual, the block output."""
    return BlockAnatomy(
        activation=block.intermediate.intermediate_act_fn, heads=config_head_geometry(config),
        scaling=float(block.get_submodule(_ROLES["attn"]).scaling), qkv=QKV, linear_roles=_LINEAR_ROLES,
        norms=("ln_attn", "ln_ffn"), attn_norm=None, ffn_norm="ln_attn", out_norm="ln_ffn")


def _bert_sequence_logits(model: nn.Module, h: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``BertForSequenceClassification``: ``classifier(dropout(tanh(W_pool h_cls + b)))``, h_cls the first
    real token."""
    return model.classifier(model.dropout(model.base_model.pooler(h[:, ctx.n_prompt:])))


def _roberta_sequence_logits(model: nn.Module, h: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``RobertaForSequenceClassification``: its classification head (dense, tanh, out_proj) on the first real token."""
    return model.classifier(h[:, ctx.n_prompt:])


def _roberta_first_position(config: object) -> int:
    """RoBERTa numbers positions from ``pad_token_id + 1`` (position ids are built from the padding)."""
    return int(getattr(config, "pad_token_id", None) or 0) + 1


def _bert_config(vocab_size: int) -> object:
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, pad_token_id=0)


def _roberta_config(vocab_size: int) -> object:
    from transformers import RobertaConfig

    # pad id 0 matches the offline (MiniLM) tokenizer the random models share.
    return RobertaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=514, pad_token_id=0, type_vocab_size=1)


def _encoder(name: str, model_types: tuple[str, ...], random_config: Callable[[int], object],
             first_position: Callable[[object], int] = first_row,
             sequence_logits: SequenceLogitsFn = _bert_sequence_logits) -> Family:
    return Family(
        name=name, model_types=model_types, post_ln=True, causal=False, blocks="encoder.layer",
        final_norm=None, roles=dict(_ROLES), ffn_input="output", embed=_embed, call_block=_call_block,
        context_inputs=("mask: bidirectional padding mask S×1×T×T",), random_config=random_config,
        linear_roles=_LINEAR_ROLES, embedding_norm="embeddings.LayerNorm", shiftable_embedding="embeddings",
        anatomy=_anatomy, first_position=first_position, sequence_logits=sequence_logits,
        sequence_head=("classifier",),
        notes="post-LN: x_L is already normalised; HF hidden_states[l] == x_l for every l.",
    )


BERT = _encoder("bert", ("bert",), _bert_config)
ROBERTA = _encoder("roberta", ("roberta", "xlm-roberta"), _roberta_config, _roberta_first_position,
                   _roberta_sequence_logits)
