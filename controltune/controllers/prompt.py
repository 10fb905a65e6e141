"""Prompt tuning (Lester et al., 2021): n soft prompt vectors prepended to the initial state.

``G`` acts on x_0 only (an *initial control*): ``x_0 -> [P; x_0]`` with ``P ∈ R^{n×d}`` shared by
the S sequences, and the attention mask ``m -> [1_n; m]`` (prompt positions are real, attended
positions).  The blocks are unchanged; the state grows from T to n + T positions.

``P`` starts as the initial state of ``n`` random vocabulary tokens (seeded): ``P = x_0(ids)``, the
family's embedding of those tokens (for BERT/RoBERTa: word + position + type embeddings and the
embedding LayerNorm; GPT-2: word + position embeddings; LLaMA: word embeddings), so the prompt
starts on the scale of real initial states.  Control: ``P``, kind ``init``; ``n·d`` scalars.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Control, Controller, positive_int, register, seeded_generator

if TYPE_CHECKING:
    from ..system import ResidualSystem


@register
class PromptTuning(Controller):
    """Soft prompt of ``n_tokens`` vectors in front of x_0.

    Args:
        n_tokens: n, prompt length.
        seed: seed of the random vocabulary tokens the prompt starts from.
        weight_decay: λ of ``R_init = (λ/2)‖P‖²``.
    """

    method = "prompt"
    group = "addition"
    form = "x_0 -> [P; x_0],  mask -> [1; mask]  (P in R^{n x d})"

    def __init__(self, n_tokens: int = 20, seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.n_tokens = positive_int(n_tokens, "n_tokens", self.method)
        self.seed = int(seed)
        self.prompt: nn.Parameter | None = None
        self.init_token_ids: torch.Tensor | None = None

    def attach(self, system: ResidualSystem) -> None:
        vocab = system.model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab - 1, (self.n_tokens,), generator=seeded_generator(self.seed))
        pad = getattr(system.model.config, "pad_token_id", None)
        if pad is not None:
            # Skip the padding token: its embedding is not a word (and RoBERTa reads it as padding).
            ids = ids + (ids >= pad).long()
        like = next(system.model.parameters())
        ids_dev = ids.to(like.device)[None]
        with torch.no_grad():
            x0 = system.family.embed(system.base, ids_dev, None, torch.arange(self.n_tokens, device=like.device)[None])
        self.init_token_ids = ids
        self.prompt = nn.Parameter(x0[0].detach().clone().to(like))

    def initial_state(self, x0: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_0`` (S×T×d) -> ``[P; x_0]`` (S×(n+T)×d); mask (S×T) -> ``[1; mask]`` (S×(n+T))."""
        if self.prompt is None:
            raise RuntimeError("prompt: attach the controller to a system before running it")
        s = x0.shape[0]
        prompt = self.prompt.to(x0.dtype).expand(s, -1, -1)
        ones = torch.ones(s, self.n_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([prompt, x0], dim=1), torch.cat([ones, attention_mask], dim=1)

    def controls(self) -> list[Control]:
        return [] if self.prompt is None else [Control("prompt.P", self.prompt, "init", ())]
