"""Full fine-tuning: the unconstrained reference controller.

Every parameter the rollout uses is a control: the block parameters are layer
controls ``u_l = θ_l``, the embedding parameters initial controls, the
readout's frozen parameters (the final norm of pre-LN decoders, an untied LM
head) terminal controls.  For speed the controls *are* the model's own
parameters, made trainable (no functional-call indirection: the forward pass is
the plain model's); the pretrained values ``θ₀`` are kept so that the delta
``Δθ = θ − θ₀`` can be saved and weight decay pulls towards the pretrained point:
``R = (λ/2)‖θ − θ₀‖²`` (zero at the identity, like every other controller).
Parameters the rollout never touches (BERT's pooler) are left frozen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Control, Controller, block_of, register
from .param_delta import block_parameters, block_sites

if TYPE_CHECKING:
    from ..system import ResidualSystem


def _embedding_parameters(system: ResidualSystem, candidates: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The ``candidates`` that x_0 depends on, found by differentiating the embedding of a 2-token probe.

    Which parameters a family's embedding uses is its own business (word,
    position, token-type tables, an embedding norm); asking autograd keeps this
    file free of architecture names.
    """
    names = list(candidates)
    flags = [p.requires_grad for p in candidates.values()]
    ids = torch.tensor([[1, 2]], device=next(iter(candidates.values())).device)
    try:
        for p in candidates.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            x0 = system.family.embed(system.base, ids, None, torch.arange(2, device=ids.device)[None])
            grads = torch.autograd.grad(x0.sum(), list(candidates.values()), allow_unused=True)
    finally:
        for p, flag in zip(candidates.values(), flags):
            p.requires_grad_(flag)
    return {n: candidates[n] for n, g in zip(names, grads) if g is not None}


@register
class FullFineTuning(Controller):
    """Full fine-tuning: ``θ -> θ`` with every used parameter trainable.

    Options: ``weight_decay`` λ (``R = (λ/2)‖θ − θ₀‖²``, split per block / init / term).
    """

    method = "full"
    dense = True
    group = "reference"
    form = "θ -> θ0 + Δθ for every parameter (the model's own weights are the controls)"

    def __init__(self, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self._controls: list[Control] = []
        self._initial: dict[str, str] = {}  # control name -> buffer name holding θ₀

    def attach(self, system: ResidualSystem) -> None:
        if self._controls:
            raise RuntimeError("this full controller is already attached; create a new one")
        blocks = block_parameters(system)
        self.sites = block_sites(blocks)
        controls = [Control(f"full.{s.label}", s.param, "layer", (s.layer,)) for s in blocks]
        seen = {id(c.param) for c in controls}
        rest = {n: p for n, p in system.base.named_parameters() if block_of(system, n) is None}
        # Embeddings before the readout: a tied word table (GPT-2) is charged to u_init.
        for n, p in _embedding_parameters(system, rest).items():
            controls.append(Control(f"full.init.{n}", p, "init"))
            seen.add(id(p))
        for name, p in system.readout.named_parameters():
            if not p.requires_grad and id(p) not in seen:  # the head is already the readout's own control
                controls.append(Control(f"full.term.{name}", p, "term"))
                seen.add(id(p))
        for i, c in enumerate(controls):
            buf = f"theta0_{i}"
            self.register_buffer(buf, c.param.detach().clone(), persistent=False)
            self._initial[c.name] = buf
            c.param.requires_grad_(True)
        self._controls = controls

    def controls(self) -> list[Control]:
        return list(self._controls)

    def initial_value(self, control: Control) -> torch.Tensor:
        """``θ₀`` of a control."""
        return getattr(self, self._initial[control.name])

    def delta(self) -> dict[str, torch.Tensor]:
        """``{control name: θ − θ₀}`` (detached)."""
        return {c.name: (c.param.detach() - self.initial_value(c)) for c in self._controls}

    def running_cost(self, where: int | str) -> torch.Tensor:
        """``R_where = (λ/2) Σ ‖θ − θ₀‖²`` over the controls acting at ``where``."""
        total = torch.zeros(())
        if self.weight_decay == 0.0:
            return total
        for c in self._controls:
            if (c.kind == where) if c.kind in ("init", "term") else (where in c.layers):
                total = total + 0.5 * self.weight_decay * (c.param - self.initial_value(c)).pow(2).sum()
        return total
