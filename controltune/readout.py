"""Readouts: the terminal cost Φ(x_L, y; u_term) of the residual-stream system.

The readout owns the model's final norm (pre-LN decoders) and, for
classification, a linear head: both are *terminal controls* u_term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .control import Control
from .families import Context, Family

POOLINGS = ("mean", "cls", "last")


def pool(x: torch.Tensor, ctx: Context, how: str) -> torch.Tensor:
    """Pool the state ``x`` (S×T×d) to S×d.

    ``mean``: Σ_t m_t x_t / Σ_t m_t over real positions (prompt tokens included);
    ``cls``: the first real token (position ``ctx.n_prompt``);
    ``last``: the last real token of each row (right padding).
    """
    if how == "mean":
        m = ctx.attention_mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "cls":
        return x[:, ctx.n_prompt]
    if how == "last":
        idx = ctx.attention_mask.sum(1).long() - 1
        return x[torch.arange(x.shape[0], device=x.device), idx]
    raise ValueError(f"pooling {how!r} is not one of {POOLINGS}")


class ClassificationReadout(nn.Module):
    """``Φ(x_L, y) = CE(W·pool(norm(x_L)) + b, y)``, averaged over the S sequences.

    ``norm`` is the model's final norm (pre-LN decoders) or the identity (post-LN
    encoders); ``W`` (C×d) and ``b`` (C) are the head, a terminal control.
    """

    kind = "classification"

    def __init__(self, d_model: int, num_labels: int, pooling: str = "mean", norm: nn.Module | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
        self.pooling = pooling
        self.norm = norm if norm is not None else nn.Identity()
        self.head = nn.Linear(d_model, num_labels)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_labels, d_model, generator=gen) * 0.02)
            self.head.bias.zero_()

    def normalized(self, x_last: torch.Tensor) -> torch.Tensor:
        """``norm(x_L)``: what HF reports as the last hidden state."""
        return self.norm(x_last)

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def controls(self) -> list[Control]:
        """The classification head as terminal controls ``u_term`` (when it is trainable)."""
        return [Control(f"head.{n}", p, "term") for n, p in self.head.named_parameters() if p.requires_grad]

    def logits(self, x_last: torch.Tensor, ctx: Context) -> torch.Tensor:
        """S×C class scores."""
        return self.head(pool(self.norm(x_last), ctx, self.pooling))

    def cost(self, x_last: torch.Tensor, ctx: Context, batch: dict) -> torch.Tensor:
        """Scalar ``(1/S) Σ_s Φ(x_{s,L}, y_s)``."""
        return F.cross_entropy(self.logits(x_last, ctx), batch["labels"])


class SequenceClassifierReadout(nn.Module):
    """``Φ(x_L, y) = CE(head(norm(x_L)), y)`` with the head of the model's own HF ``*ForSequenceClassification``.

    The head (BERT: pooler + classifier on the first token; decoders: ``score`` at the last
    real token; :attr:`Family.sequence_logits`) is the one peft trains as ``modules_to_save``,
    so co-states and designs computed here are those of the model a peft user loads.  The
    head's modules (:attr:`Family.sequence_head`) are the terminal controls; BERT's pooler
    stays frozen, as in peft.
    """

    kind = "classification"

    def __init__(self, model: nn.Module, family: Family, norm: nn.Module | None = None) -> None:
        super().__init__()
        missing = [n for n in family.sequence_head if not isinstance(getattr(model, n, None), nn.Module)]
        if family.sequence_logits is None or not family.sequence_head or missing:
            raise ValueError(f"the sequence_classifier readout needs a {family.name} *ForSequenceClassification "
                             f"model (load_model(..., head='sequence_classification')); {type(model).__name__} "
                             f"has no {', '.join(missing or ['sequence head'])}")
        self.norm = norm if norm is not None else nn.Identity()
        self.heads = nn.ModuleDict({n: getattr(model, n) for n in family.sequence_head})
        for p in self.heads.parameters():
            p.requires_grad_(True)
        self._logits = family.sequence_logits
        self._model = [model]  # a list: the model must not become a submodule of its own readout

    def normalized(self, x_last: torch.Tensor) -> torch.Tensor:
        return self.norm(x_last)

    @property
    def num_labels(self) -> int:
        return int(self._model[0].config.num_labels)

    def controls(self) -> list[Control]:
        """The head's trainable parameters as terminal controls ``u_term``."""
        return [Control(f"head.{n}", p, "term") for n, p in self.heads.named_parameters() if p.requires_grad]

    def logits(self, x_last: torch.Tensor, ctx: Context) -> torch.Tensor:
        """S×C class scores, as the HF model's forward computes them."""
        return self._logits(self._model[0], self.norm(x_last), ctx)

    def cost(self, x_last: torch.Tensor, ctx: Context, batch: dict) -> torch.Tensor:
        """Scalar ``(1/S) Σ_s Φ(x_{s,L}, y_s)``."""
        return F.cross_entropy(self.logits(x_last, ctx), batch["labels"])


class CausalLMReadout(nn.Module):
    """``Φ_s = mean_t CE(lm_head(norm(x_{s,t})), token_{s,t+1})`` over real next tokens.

    Each sequence's loss is its own average, then J averages over sequences, so
    ``J = (1/S) Σ_s Φ_s`` as in DESIGN.md §1.  Prompt positions carry no target.
    """

    kind = "causal_lm"

    def __init__(self, norm: nn.Module | None, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.lm_head = lm_head

    def normalized(self, x_last: torch.Tensor) -> torch.Tensor:
        return self.norm(x_last)

    def controls(self) -> list[Control]:
        """None: the LM head is the frozen pretrained one (tune the final norm with a controller)."""
        return []

    def logits(self, x_last: torch.Tensor, ctx: Context) -> torch.Tensor:
        """S×T×V next-token scores over the token positions (prompt dropped)."""
        return self.lm_head(self.norm(x_last[:, ctx.n_prompt:]))

    def cost(self, x_last: torch.Tensor, ctx: Context, batch: dict) -> torch.Tensor:
        logits = self.logits(x_last, ctx)[:, :-1]
        targets = batch["input_ids"][:, 1:]
        valid = ctx.attention_mask[:, ctx.n_prompt:][:, 1:].to(logits.dtype)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        per_seq = (ce * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        return per_seq.mean()
