"""Keyword names that differ between transformers 5.x releases, resolved once by signature.

transformers renamed ``past_key_values`` to ``cache`` in ``create_causal_mask`` (the old
name is removed in 5.40) and ``past_key_values_length`` to ``cache_length`` in the
BERT/RoBERTa embeddings (5.24).  Everything else in the package calls these helpers
instead of naming either spelling.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


@cache
def _mask_cache_keyword() -> str:
    from transformers.masking_utils import create_causal_mask

    return "cache" if _accepts(create_causal_mask, "cache") else "past_key_values"


def causal_mask(config: PretrainedConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' causal + padding mask for a state ``inputs_embeds`` (S×T×d), without a KV cache."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              position_ids=position_ids, allow_is_causal_skip=False,
                              **{_mask_cache_keyword(): None})


def embedding_offset_keyword(embeddings: nn.Module) -> str:
    """The keyword that shifts an absolute-position embedding's positions by a past length."""
    return _offset_keyword(type(embeddings))


@cache
def _offset_keyword(cls: type) -> str:
    # Called on every forward of a shifted embedding: the signature is read once per class.
    forward = cls.forward
    for name in ("cache_length", "past_key_values_length"):
        if _accepts(forward, name):
            return name
    raise TypeError(f"{cls.__name__}.forward takes neither cache_length nor past_key_values_length; "
                    "this transformers release is not supported (see constraints.txt for the tested one)")
