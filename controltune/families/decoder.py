"""Decoders with pre-LN blocks: GPT-2 (learned positions, fused QKV as Conv1D) and
LLaMA-family models (rotary positions, RMSNorm, grouped-query attention, gated FFN).

Block l is ``x_{l+1} = x_l + G_l(x_l)``, G_l = attention and FFN sub-blocks behind
their own norms.  The norm after the last block (``ln_f``/``norm``) belongs to the
readout: HF's last hidden state is ``norm(x_L)``, not ``x_L``.
Cross-layer context: the causal+padding mask (all), position ids (all), and the
rotary ``(cos, sin)`` tables (LLaMA family).

LLaMA-like decoders are recognised *by structure*: a causal LM whose modules have the LLaMA layout
(``layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``norm``, ``rotary_emb``) is handled by the ``llama`` family whatever
its ``model_type`` (Qwen3, SmolLM3, Gemma, Helium, ... in transformers 5.x), after an admission
probe against its own forward (:func:`~controltune.families.structure.admission_probe`).  What the
family does not reproduce is refused with a sentence naming it: norms placed elsewhere (Olmo2:
after the sub-blocks), fused maps (Phi-3: ``qkv_proj``, ``gate_up_proj``), an ungated MLP, parameters
of the attention's own (sinks), multipliers outside the blocks (Granite), attention types other
than full and sliding-window.  q/k norms inside the attention (Qwen3) need nothing: the real block
runs them.  RMSNorms are identified numerically (``γ ⊙ x̂`` or Gemma's ``(1 + γ) ⊙ x̂``) and made
float64-exact; sliding-window layers get their band of the causal mask.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cache

import torch
from torch import nn

from .base import BlockAnatomy, Context, Family, config_head_geometry
from .structure import admission_probe, meta_model, neutral_settings


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
    """``y = (offset + γ) ⊙ x / sqrt(mean(x²) + ε)`` computed in ``max(float32, x.dtype)``.

    HF's LLaMA RMSNorm always computes in float32, which *downcasts* a float64
    model and caps every float64 cross-check at float32 resolution (finite
    differences then see a staircase).  This norm is bitwise identical to HF's
    in float32 and exact in float64.  It shares HF's ``weight`` parameter.
    ``offset`` is 0 for LLaMA's ``γ ⊙ x̂`` and 1 for Gemma's ``(1 + γ) ⊙ x̂``.
    """

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        h = x.to(work)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        gain = self.weight if self.offset == 0 else self.offset + self.weight
        return gain * h.to(x.dtype)


RMS_OFFSETS = (0.0, 1.0)
"""The RMSNorm gains :class:`PreciseRMSNorm` reproduces: ``(offset + γ)``."""


def rms_norm_offset(module: nn.Module) -> float | None:
    """The offset of an RMSNorm module (0: ``γ ⊙ x̂``, 1: ``(1 + γ) ⊙ x̂``), found numerically on a float32
    copy with a random gain; None if the module computes neither (it is then left as it is)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    probe = copy.deepcopy(module).float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
        x = (3 * torch.randn(4, weight.shape[0], generator=gen)).to(probe.weight.device)
        try:
            y = probe(x)
        except Exception:  # noqa: BLE001 - a norm with another calling convention
            return None
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        for offset in RMS_OFFSETS:
            if y.shape == x.shape and torch.allclose(y, (offset + probe.weight) * x_hat, rtol=1e-5, atol=1e-6):
                return offset
    return None


def _llama_prepare(model: nn.Module) -> None:
    """Swap every HF RMSNorm of the model whose formula is recognised for :class:`PreciseRMSNorm`."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm") and not isinstance(module, PreciseRMSNorm):
            offset = rms_norm_offset(module)
            if offset is None:
                continue
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PreciseRMSNorm(module.weight, eps, offset))


def _llama_embed(base: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                 position_ids: torch.Tensor) -> torch.Tensor:
    return base.embed_tokens(input_ids)


def sliding_window(block: nn.Module) -> int | None:
    """The attention window of a LLaMA-like block (keys at most ``window − 1`` positions back), or None.

    The attention's own ``sliding_window`` (Qwen2/Qwen3/SmolLM3/Ministral set it per layer, None on
    full-attention layers), else the config's (Mistral: one window for every layer).
    """
    while hasattr(block, "base_layer"):  # a controller may wrap the whole block (riccati_feedback)
        block = block.base_layer
    attn = block.get_submodule("self_attn")
    if "sliding_window" in vars(attn):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def band(mask: torch.Tensor | None, window: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """``mask`` (S×1×T×T, boolean True = attend or additive float; None = plain causal, built on
    ``device``) restricted to the sliding window ``q − k < window``, as transformers' ``sliding_window_overlay``."""
    device = mask.device if mask is not None else device
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    keep = (q - k < window)[None, None]
    if mask is None:
        return keep & (k <= q)[None, None]
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def _llama_block(block: nn.Module, x: torch.Tensor, ctx: Context) -> torch.Tensor:
    mask = ctx.mask
    window = sliding_window(block)
    if window is not None and window < x.shape[1]:
        mask = band(mask, window, x.shape[1], x.device)
    return block(x, attention_mask=mask, position_ids=ctx.position_ids, position_embeddings=ctx.rotary)


def _llama_config(vocab_size: int) -> object:
    from transformers import LlamaConfig

    # 4 query heads sharing 2 key/value heads: grouped-query attention is exercised.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=101, eos_token_id=102)


def _decoder_sequence_logits(model: nn.Module, h: torch.Tensor, ctx: Context) -> torch.Tensor:
    """HF decoders' ``*ForSequenceClassification``: ``score(h)`` at each row's last real token.

    HF finds that token as the last one that is not ``pad_token_id``; with right padding that
    is the last position of the attention mask, which is what is used here (a row whose real
    text ends in the pad token, e.g. pad = eos, is pooled at its true end).
    """
    last = ctx.attention_mask.sum(1).long() - 1
    return model.score(h[torch.arange(h.shape[0], device=h.device), last])


GPT2 = Family(
    name="gpt2", model_types=("gpt2",), post_ln=False, causal=True, blocks="h", final_norm="ln_f",
    roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "ffn_in": "mlp.c_fc", "ffn_out": "mlp.c_proj",
           "ln_attn": "ln_1", "ln_ffn": "ln_2", "attn": "attn", "ffn": "mlp"},
    ffn_input="mlp", embed=_gpt2_embed, call_block=_gpt2_block,
    context_inputs=("mask: causal+padding mask S×1×T×T", "position_ids: 1×T"),
    random_config=_gpt2_config, linear_roles=_GPT2_LINEAR_ROLES, anatomy=_gpt2_anatomy,
    sequence_logits=_decoder_sequence_logits, sequence_head=("score",),
    notes="pre-LN; linear maps are transformers Conv1D (weight stored in×out); final norm ln_f in the readout.",
)

_LLAMA_ROLES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_in": "mlp.up_proj", "ffn_out": "mlp.down_proj",
    "ln_attn": "input_layernorm", "ln_ffn": "post_attention_layernorm", "attn": "self_attn", "ffn": "mlp"}
_LLAMA_LINEAR_ROLES = ("q", "k", "v", "o", "ffn_gate", "ffn_in", "ffn_out")
_LLAMA_BASE = ("embed_tokens", "layers", "norm", "rotary_emb")
_LLAMA_BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")
ATTENTION_TYPES = ("full_attention", "sliding_attention")
"""The ``config.layer_types`` the LLaMA family reproduces (sliding windows by :func:`band`)."""


def llama_config_differences(config: object) -> list[str]:
    """What in a LLaMA-family config the family would not reproduce (empty: nothing)."""
    out = []
    settings = neutral_settings(config)
    if settings:
        out.append(f"its config scales computations outside the blocks ({', '.join(settings)})")
    if getattr(config, "attn_logit_softcapping", None):
        out.append(f"its attention soft-caps the logits (attn_logit_softcapping={config.attn_logit_softcapping}), "
                   "which the controltune attention kernel does not")
    other = sorted(set(getattr(config, "layer_types", None) or ()) - set(ATTENTION_TYPES))
    if other:
        out.append(f"it has attention layer types {other} (supported: {', '.join(ATTENTION_TYPES)})")
    return out


def llama_structure_differences(model: nn.Module) -> list[str]:
    """What in a causal LM's module tree differs from the LLaMA layout (empty: the same layout)."""
    base = model.base_model
    missing = [n for n in _LLAMA_BASE if base._modules.get(n) is None]
    if missing:
        have = ", ".join(n for n, m in base._modules.items() if m is not None)
        return [f"its base model has no {', '.join(missing)} (it has {have}; LLaMA: {', '.join(_LLAMA_BASE)})"]
    block = base.layers[0]
    have = {n: m for n, m in block.named_modules() if n}
    out = []
    paths = [_LLAMA_ROLES[r] for r in _LLAMA_LINEAR_ROLES]
    absent = [p for p in paths if not isinstance(have.get(p), nn.Linear)]
    if absent:
        others = sorted(n for n, m in have.items() if isinstance(m, nn.Linear) and n not in paths)
        fused = f"; its linear maps are {', '.join(others)}" if others else ""
        out.append(f"its blocks have no linear {', '.join(absent)}{fused} (fused, renamed or an ungated MLP)")
    norms_missing = [n for n in _LLAMA_BLOCK_NORMS if block._modules.get(n) is None]
    norms_extra = [n for n, m in block._modules.items()
                   if m is not None and "norm" in n.lower() and n not in _LLAMA_BLOCK_NORMS]
    if norms_missing or norms_extra:
        parts = ([f"no {', '.join(norms_missing)}"] if norms_missing else []) + \
                ([f"also {', '.join(norms_extra)}"] if norms_extra else [])
        out.append(f"its norms sit elsewhere: the blocks have {' and '.join(parts)} (LLaMA normalises the inputs "
                   "of attention and MLP only, input_layernorm and post_attention_layernorm)")
    attn = block._modules.get("self_attn")
    own = [n for n, _ in attn.named_parameters(recurse=False)] if attn is not None else []
    if own:
        out.append(f"its attention has parameters of its own ({', '.join(own)}), which the controltune attention "
                   "kernel would ignore")
    return out


@cache
def _recognised(model_type: str) -> Family:
    """The LLaMA record specialised to a model type recognised by structure (admission probe in prepare)."""

    def prepare(model: nn.Module) -> None:
        _llama_prepare(model)
        admission_probe(record, model)

    record = dataclasses.replace(
        LLAMA, model_types=(model_type,), prepare=prepare,
        notes=f"{model_type}: recognised by structure as LLaMA-like (admission probe against its HF forward). "
              + LLAMA.notes)
    return record


def _llama_resolve(config: object, listed: bool) -> Family | str:
    """The LLaMA record for ``config`` (listed types as they are; others by structure), or what differs."""
    differences = llama_config_differences(config)
    if not differences and not listed:
        model = meta_model(config)
        if isinstance(model, str):
            return model
        differences = llama_structure_differences(model)
    if differences:
        return "; ".join(differences)
    return LLAMA if listed else _recognised(str(config.model_type))


LLAMA = Family(
    name="llama", model_types=("llama", "mistral", "qwen2"), post_ln=False, causal=True, blocks="layers",
    final_norm="norm",
    roles=dict(_LLAMA_ROLES), ffn_input="mlp", embed=_llama_embed, call_block=_llama_block,
    context_inputs=("mask: causal+padding mask S×1×T×T", "position_ids: 1×T",
                    "rotary: (cos, sin) S×T×d_head from base.rotary_emb"),
    random_config=_llama_config, needs_rotary=True, prepare=_llama_prepare,
    linear_roles=_LLAMA_LINEAR_ROLES, resolve=_llama_resolve,
    sequence_logits=_decoder_sequence_logits, sequence_head=("score",),
    notes="pre-LN with RMSNorm, rotary positions, grouped-query attention; final norm in the readout. "
          "HF's RMSNorm is swapped for PreciseRMSNorm (identical in float32, float64-exact). "
          "Other decoders with the LLaMA module layout are recognised by structure.",
)
