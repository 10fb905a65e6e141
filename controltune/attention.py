"""The attention kernel controltune installs in a model: HF's own attention, plus
the one hook that prefix-style controllers need.

Prefix tuning prepends ``P`` learned key/value rows to every head of a layer:
``Attn(q, [P_k; K], [P_v; V])``.  HF attention modules compute ``q, K, V`` and then
call a kernel looked up by ``config._attn_implementation``; we register the kernel
``"controltune"``, which concatenates the prefix returned by ``module.ct_prefix``
(when a controller has set one) and widens the mask, then runs either PyTorch's
``sdpa`` (fast; first-order reverse mode only on CPU) or an explicit ``eager``
softmax attention (supports forward-mode JVPs and second-order products).
The kernel is chosen per attention module by ``module.ct_kernel``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

KERNEL_NAME = "controltune"
KERNELS = ("sdpa", "eager")


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``softmax(q Kᵀ·scaling + mask) V`` in the input dtype.

    Shapes: query ``S×H×T×D``, key/value ``S×H×T'×D`` (already repeated for GQA),
    mask boolean ``S×1×T×T'`` (True = attend) or ``None``.  Returns ``S×T×H×D``.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def _widen_mask(mask: torch.Tensor | None, n_prefix: int) -> torch.Tensor | None:
    """Prefix rows are visible to every query: prepend ``n_prefix`` attend-columns."""
    if mask is None:
        return None
    shape = (*mask.shape[:-1], n_prefix)
    fill = torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool \
        else torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([fill.expand(*mask.shape[:-1], n_prefix), mask], dim=-1)


def controltune_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None,
                          dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention-interface kernel: optional prefix, then sdpa or eager.

    Shapes: query ``S×H×T×D``, key/value ``S×H_kv×T×D``; returns ``(S×T×H×D, None)``.
    """
    if attention_mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
        # HF skips the mask for unpadded causal batches and relies on sdpa's
        # is_causal flag; a prefix or the eager kernel needs it explicit.
        t = query.shape[2]
        attention_mask = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()[None, None]
    prefix_fn = getattr(module, "ct_prefix", None)
    if prefix_fn is not None:
        p_key, p_value = prefix_fn(query.shape[0])
        key = torch.cat([p_key.to(key.dtype), key], dim=2)
        value = torch.cat([p_value.to(value.dtype), value], dim=2)
        attention_mask = _widen_mask(attention_mask, p_key.shape[2])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if getattr(module, "ct_kernel", "sdpa") == "eager":
        n_rep = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
        return eager_attention(query, key, value, attention_mask, scaling), None
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=attention_mask is None and getattr(module, "is_causal", False),
                                  **kwargs)


def register() -> None:
    """Make ``"controltune"`` a valid ``attn_implementation`` (kernel + boolean masks)."""
    ALL_ATTENTION_FUNCTIONS.register(KERNEL_NAME, controltune_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(KERNEL_NAME, sdpa_mask)


def install(model: nn.Module, kernel: str = "sdpa") -> None:
    """Switch ``model`` to the controltune kernel and pick ``kernel`` for every attention module."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {KERNELS}")
    register()
    model.set_attn_implementation(KERNEL_NAME)
    for mod in model.modules():
        if hasattr(mod, "is_causal") or mod.__class__.__name__.endswith(("Attention", "SelfAttention")):
            mod.ct_kernel = kernel
