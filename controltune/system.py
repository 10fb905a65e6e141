"""The residual-stream system ``x_{l+1} = f_l(x_l, u_l)`` of a frozen Transformer.

``embed`` gives the initial state x_0 (after initial controls such as prompt
tokens) and the fixed cross-layer :class:`~controltune.families.Context`;
``step(l, x, ctx)`` runs the model's real block l (with whatever controllers are
attached inside it); the readout gives the terminal cost Φ.  ``rollout`` returns
all L+1 states.  Controllers are attached with :meth:`ResidualSystem.add`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from . import attention
from .control import total_running_cost
from .families import Context, Family, family_of
from .hf_compat import causal_mask
from .readout import CausalLMReadout, ClassificationReadout, SequenceClassifierReadout
from .zoo import LoadedModel

READOUTS = ("classification", "sequence_classifier", "causal_lm")


@dataclass
class Trajectory:
    """States ``x_0 .. x_L`` (each S×T×d) of one batch and its context."""

    states: list[torch.Tensor]
    ctx: Context

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


class ResidualSystem(nn.Module):
    """A pretrained model as a discrete-time control system over its residual stream.

    Args:
        loaded: a :class:`~controltune.zoo.LoadedModel` (or a HF model, family inferred).
        readout: ``classification`` (pooling + a new linear head), ``sequence_classifier`` (the head
            of a HF ``*ForSequenceClassification`` model, e.g. for peft export) or ``causal_lm``.
        num_labels: classes of the classification head.
        pooling: ``mean``, ``cls`` or ``last``.
        kernel: attention kernel, ``sdpa`` (fast) or ``eager`` (supports JVPs and
            second-order products).
    """

    def __init__(self, loaded: LoadedModel | nn.Module, readout: str = "classification", num_labels: int = 2,
                 pooling: str = "mean", kernel: str = "sdpa", seed: int = 0) -> None:
        super().__init__()
        model = loaded.model if isinstance(loaded, LoadedModel) else loaded
        self.model = model
        self.family: Family = family_of(model.config)
        self.name = loaded.name if isinstance(loaded, LoadedModel) else "<in-memory>"
        self.tokenizer = loaded.tokenizer if isinstance(loaded, LoadedModel) else None
        if self.family.prepare is not None:
            self.family.prepare(model)
        attention.install(model, kernel)
        self.kernel = kernel
        base = model.base_model
        norm = base.get_submodule(self.family.final_norm) if self.family.final_norm else None
        if readout == "classification":
            self.readout: nn.Module = ClassificationReadout(self.d_model, num_labels, pooling, norm, seed)
        elif readout == "sequence_classifier":
            self.readout = SequenceClassifierReadout(model, self.family, norm)
        elif readout == "causal_lm":
            head = model.get_output_embeddings()
            if head is None:
                raise ValueError(f"the causal_lm readout needs a model with an LM head; "
                                 f"{type(model).__name__} has none")
            self.readout = CausalLMReadout(norm, head)
        else:
            raise ValueError(f"readout {readout!r} is not one of {READOUTS}")
        p = next(model.parameters())
        self.readout.to(device=p.device, dtype=p.dtype)
        self.controllers = nn.ModuleList()

    # --- structure -----------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.get_submodule(self.family.blocks)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def block_path(self, layer: int) -> str:
        """Dotted path of block ``layer`` inside ``self.base``."""
        return f"{self.family.blocks}.{layer}"

    def set_kernel(self, kernel: str) -> None:
        """Switch every attention module to ``sdpa`` or ``eager``."""
        attention.install(self.model, kernel)
        self.kernel = kernel

    @contextlib.contextmanager
    def using_kernel(self, kernel: str) -> Iterator[ResidualSystem]:
        """``with system.using_kernel("eager"):`` run the body with ``kernel``, then restore the previous one.

        Forward-mode JVPs and second-order products need ``eager`` (sdpa on CPU is
        first-order reverse mode only); the switch is skipped when already on ``kernel``.
        """
        previous = self.kernel
        if previous != kernel:
            self.set_kernel(kernel)
        try:
            yield self
        finally:
            if previous != kernel:
                self.set_kernel(previous)

    # --- dynamics ------------------------------------------------------------------
    def embed(self, batch: dict) -> tuple[torch.Tensor, Context]:
        """Initial state x_0 (S×T×d, T including prompt tokens) and the fixed context."""
        ids = batch["input_ids"]
        am = batch.get("attention_mask")
        if am is None:
            am = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        x0 = self.family.embed(self.base, ids, batch.get("token_type_ids"), pos)
        n_tokens = x0.shape[1]
        for c in self.controllers:
            x0, am = c.initial_state(x0, am)
        return x0, self.context(x0, am, x0.shape[1] - n_tokens)

    def context(self, x0: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int = 0) -> Context:
        """Masks, positions and rotary tables for a state of shape ``x0.shape``."""
        pos = torch.arange(x0.shape[1], device=x0.device)[None]
        cfg = self.model.config
        if self.family.causal:
            mask = causal_mask(cfg, x0, attention_mask, pos)
        else:
            mask = create_bidirectional_mask(config=cfg, inputs_embeds=x0, attention_mask=attention_mask,
                                             allow_is_bidirectional_skip=False)
        rotary = self.base.get_submodule(self.family.rotary_module)(x0, pos) if self.family.needs_rotary else None
        return Context(attention_mask=attention_mask, mask=mask, position_ids=pos, rotary=rotary, n_prompt=n_prompt)

    def step(self, layer: int, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """``x_{l+1} = f_l(x_l, u_l)``: the real block ``layer`` (S×T×d -> S×T×d)."""
        return self.family.call_block(self.blocks[layer], x, ctx)

    def rollout(self, batch: dict) -> Trajectory:
        """All states x_0..x_L of a batch (graph kept when grad is enabled)."""
        x, ctx = self.embed(batch)
        states = [x]
        for layer in range(self.n_layers):
            x = self.step(layer, x, ctx)
            states.append(x)
        return Trajectory(states, ctx)

    # --- cost ----------------------------------------------------------------------
    def terminal_cost(self, x_last: torch.Tensor, ctx: Context, batch: dict) -> torch.Tensor:
        """``(1/S) Σ_s Φ(x_{s,L}, y_s; u_term)`` (scalar)."""
        return self.readout.cost(x_last, ctx, batch)

    def running_cost(self, where: int | str) -> torch.Tensor:
        """``R_where(u)`` summed over controllers; ``where`` is a layer, ``"init"`` or ``"term"``."""
        total = torch.zeros((), dtype=next(self.model.parameters()).dtype, device=next(self.model.parameters()).device)
        for c in self.controllers:
            total = total + c.running_cost(where).to(total)
        return total

    def total_running_cost(self) -> torch.Tensor:
        """``Σ_l R_l + R_init + R_term``."""
        return total_running_cost(self)

    def cost(self, batch: dict) -> torch.Tensor:
        """The objective ``J(u) = (1/S) Σ_s Φ + Σ_l R_l`` on a batch (scalar)."""
        traj = self.rollout(batch)
        return self.terminal_cost(traj.final, traj.ctx, batch) + self.total_running_cost()

    def forward(self, batch: dict) -> torch.Tensor:
        """Readout logits of a batch (S×C for classification, S×T×V for causal LM)."""
        traj = self.rollout(batch)
        return self.readout.logits(traj.final, traj.ctx)

    # --- controllers ---------------------------------------------------------------
    def add(self, controller: nn.Module) -> nn.Module:
        """Attach a controller (it inserts its deltas into the blocks); returns it."""
        controller.attach(self)
        self.controllers.append(controller)
        return controller

    def controls(self) -> list:
        """Every control variable of the attached controllers and the readout head."""
        out = list(self.readout.controls())
        for c in self.controllers:
            out.extend(c.controls())
        return out

    # --- agreement with HF ---------------------------------------------------------
    @torch.no_grad()
    def hf_agreement(self, batch: dict, reference_kernel: str = "sdpa") -> list[float]:
        """Max |x_l − HF hidden_states[l]| for l = 0..L (no controllers attached).

        For pre-LN decoders HF's last hidden state already has the final norm, so
        it is compared with the readout's ``norm(x_L)``.
        """
        traj = self.rollout(batch)
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        # The reference is HF's stock kernel, not ours.
        self.model.set_attn_implementation(reference_kernel)
        try:
            hf = self.model(**kwargs, output_hidden_states=True).hidden_states
        finally:
            self.set_kernel(self.kernel)
        if len(hf) != len(traj.states):
            raise RuntimeError(f"HF returned {len(hf)} hidden states, the system {len(traj.states)}")
        errs = []
        for layer, (ours, theirs) in enumerate(zip(traj.states, hf)):
            if layer == self.n_layers and self.family.final_norm:
                ours = self.readout.normalized(ours)
            m = traj.ctx.attention_mask.bool()
            errs.append((ours - theirs)[m].abs().max().item())
        return errs
