"""Decoders with pre-LN blocks: GPT-2 (learned positions, fused QKV as Conv1D) and
LLaMA-family models (rotary positions, RMSNorm, grouped-query attention, gated FFN).

Block l is ``x_{l+1} = x_l + G_l(x_l)``, G_l = attention and FFN sub-blocks behind
their own norms.  The norm after the last block (``ln_f``/``norm``) belongs to the
readout: HF's last hidden state is ``norm(x_L)``, not ``x_L``.
Cross-layer context: the causal+padding mask (all), position ids (all), and the
rotary ``(cos, sin)`` tables (LLaMA family).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BlockAnatomy, Context, Family, config_head_geometry


def _gpt2_embed(base: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor) -> torch.Tensor:
    x = base.wte(input_ids) + base.wpe(position_ids)
    if token_type_ids is not None:
        # GPT-2 embeds token types with the token table, as HF does.
        x = x + base.wte(token_type_ids)
    return base.drop(x)


def _gpt2_block(block: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
    return block(x, attention_mask=ctx.mask, position_ids=ctx.position_ids)


_GPT2_LINEAR_ROLES = ("qkv", "o", "ffn_in", "ffn_out")


def _gpt2_anatomy(block: nn.Module, config: object) -> BlockAnatomy:
    """Pre-LN: ``ln_1`` feeds the attention (fused ``c_attn``), ``ln_2`` the FFN; no output norm."""
    return BlockAnatomy(
        activation=block.mlp.act, heads=config_head_geometry(config), scaling=float(block.attn.scaling),
        qkv=("qkv",), linear_roles=_GPT2_LINEAR_ROLES, norms=("ln_attn", "ln_ffn"), attn_norm="ln_attn",
        ffn_norm="ln_ffn", out_norm=None)


def _gpt2_config(vocab_size: int) -> object:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=3, n_head=4, n_positions=512,
                      pad_token_id=0, bos_token_id=101, eos_token_id=102)


class PreciseRMSNorm(nn.Module):
    """``y = γ ⊙ x / sqrt(mean(x²) + ε)`` computed in ``max(float32, x.dtype)``.

    HF's LLaMA RMSNorm always computes in float32, which *downcasts* a float64
    model and caps every float64 cross-check at float32 resolution (finite
    differences then see a staircase).  This norm is bitwise identical to HF's
    in float32 and exact in float64.  It shares HF's ``weight`` parameter.
    """

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        h = x.to(work)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def _llama_prepare(model: nn.Module) -> None:
    """Swap every HF RMSNorm of the model for :class:`PreciseRMSNorm`."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm") and not isinstance(module, PreciseRMSNorm):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PreciseRMSNorm(module.weight, module.variance_epsilon))


def _llama_embed(base: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                 position_ids: torch.Tensor) -> torch.Tensor:
    return base.embed_tokens(input_ids)


def _llama_block(block: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
    return block(x, attention_mask=ctx.mask, position_ids=ctx.position_ids, position_embeddings=ctx.rotary)


def _llama_config(vocab_size: int) -> object:
    from transformers import LlamaConfig

    # 4 query heads sharing 2 key/value heads: grouped-query attention is exercised.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=101, eos_token_id=102)


GPT2 = Family(
    name="gpt2", model_types=("gpt2",), post_ln=False, causal=True, blocks="h", final_norm="ln_f",
    roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "ffn_in": "mlp.c_fc", "ffn_out": "mlp.c_proj",
           "ln_attn": "ln_1", "ln_ffn": "ln_2", "attn": "attn", "ffn": "mlp"},
    ffn_input="mlp", embed=_gpt2_embed, call_block=_gpt2_block,
    context_inputs=("mask: causal+padding mask S×1×T×T", "position_ids: 1×T"),
    random_config=_gpt2_config, linear_roles=_GPT2_LINEAR_ROLES, anatomy=_gpt2_anatomy,
    notes="pre-LN; linear maps are transformers Conv1D (weight stored in×out); final norm ln_f in the readout.",
)

LLAMA = Family(
    name="llama", model_types=("llama", "mistral", "qwen2"), post_ln=False, causal=True, blocks="layers",
    final_norm="norm",
    roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_in": "mlp.up_proj", "ffn_out": "mlp.down_proj",
           "ln_attn": "input_layernorm", "ln_ffn": "post_attention_layernorm", "attn": "self_attn", "ffn": "mlp"},
    ffn_input="mlp", embed=_llama_embed, call_block=_llama_block,
    context_inputs=("mask: causal+padding mask S×1×T×T", "position_ids: 1×T",
                    "rotary: (cos, sin) S×T×d_head from base.rotary_emb"),
    random_config=_llama_config, needs_rotary=True, prepare=_llama_prepare,
    linear_roles=("q", "k", "v", "o", "ffn_gate", "ffn_in", "ffn_out"),
    notes="pre-LN with RMSNorm, rotary positions, grouped-query attention; final norm in the readout. "
          "HF's RMSNorm is swapped for PreciseRMSNorm (identical in float32, float64-exact).",
)
