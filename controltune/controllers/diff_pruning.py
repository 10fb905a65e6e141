"""Diff pruning (Guo, Rush & Kim, 2021): a sparse difference vector over the block parameters.

``θ_eff = θ₀ + z ⊙ w`` with ``w`` dense (zero at init: the identity) and ``z`` a
gate per entry drawn from the hard-concrete relaxation of a Bernoulli
(Louizos, Welling & Kingma, 2018): with ``u ~ U(0,1)``,

    s = σ((log u − log(1−u) + log α)/β),   z = min(1, max(0, s(ζ−γ) + γ)),

temperature ``β = 2/3`` and stretch ``(γ, ζ) = (−0.1, 1.1)``.  Running cost of
block l: ``R_l = λ_L0 Σ_{i∈l} P(z_i ≠ 0) + (λ/2)‖w_l‖²`` with the closed form
``P(z_i ≠ 0) = σ(log α_i − β log(−γ/ζ))`` (the expected L0 norm).
In eval mode the gates are deterministic, ``z = min(1, max(0, σ(log α)(ζ−γ) + γ))``.
:meth:`DiffPruning.project` ends training as in the paper: keep the ``budget``
largest ``|z ⊙ w|``, zero the rest and freeze that binary mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import Control, Controller, register
from .param_delta import ParamSite, SiteDelta, block_parameters, block_sites, budget_count, control_of, wrap_owners

if TYPE_CHECKING:
    from ..system import ResidualSystem

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA, gamma: float = GAMMA,
                  zeta: float = ZETA) -> torch.Tensor:
    """A hard-concrete gate ``z ∈ [0, 1]`` from uniform noise ``u ∈ (0, 1)`` (same shape as ``log_alpha``)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_mode(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """The deterministic test-time gate ``min(1, max(0, σ(log α)(ζ−γ) + γ))``."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA,
                 zeta: float = ZETA) -> torch.Tensor:
    """``P(z ≠ 0) = σ(log α − β log(−γ/ζ))`` elementwise; its sum is the expected L0 norm."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


class DiffPruningDelta(SiteDelta):
    """``θ_eff = θ₀ + z ⊙ w`` for the parameters of one module (training: sampled gates; eval: deterministic).

    After :meth:`freeze` the gate is a fixed binary ``mask`` buffer.
    """

    def __init__(self, sites: Sequence[ParamSite], init_log_alpha: float) -> None:
        super().__init__(sites)
        self.w = nn.ParameterDict()
        self.log_alpha = nn.ParameterDict()
        for s in sites:
            kw = {"dtype": s.param.dtype, "device": s.param.device}
            self.w[s.name] = nn.Parameter(torch.zeros(s.param.shape, **kw))
            self.log_alpha[s.name] = nn.Parameter(torch.full(s.param.shape, float(init_log_alpha), **kw))

    def gate(self, name: str) -> torch.Tensor:
        """``z`` for parameter ``name`` (shape of the parameter)."""
        mask = getattr(self, f"mask_{name}", None)
        if mask is not None:
            return mask
        log_alpha = self.log_alpha[name]
        if not self.training:
            return hard_concrete_mode(log_alpha)
        eps = torch.finfo(log_alpha.dtype).eps
        u = torch.rand_like(log_alpha).clamp(eps, 1.0 - eps)
        return hard_concrete(log_alpha, u)

    def diff(self, name: str) -> torch.Tensor:
        """``Δθ = z ⊙ w``."""
        return self.gate(name) * self.w[name]

    def freeze(self, name: str, mask: torch.Tensor, diff: torch.Tensor) -> None:
        """Fix the gate of ``name`` to the binary ``mask``; ``w`` takes the value ``diff`` on the kept entries."""
        with torch.no_grad():
            self.w[name].copy_(diff * mask)
        self.register_buffer(f"mask_{name}", mask.to(self.w[name].dtype))
        self.log_alpha[name].requires_grad_(False)

    def apply(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t + self.diff(name) for name, t in theta.items()}


@register
class DiffPruning(Controller):
    """Diff pruning over every parameter of the blocks in ``layers``.

    Options: ``l0_penalty`` λ_L0 (per expected non-zero entry; Guo et al. use
    1.25e-7 on BERT-large), ``init_log_alpha`` (5: gates open at init),
    ``weight_decay`` λ on ``w``, ``layers``.
    Controls per parameter: ``w`` and ``log_alpha`` (layer controls); after
    :meth:`project`, ``w`` only.  In training mode the gates are sampled with
    torch's global RNG (seed it with ``torch.manual_seed``); cross-checks run in
    eval mode, where the gates are deterministic.
    """

    method = "diff_pruning"
    dense = True
    group = "specification"
    form = "θ -> θ + z ⊙ w, z ~ HardConcrete(log α, β=2/3, γ=-0.1, ζ=1.1), R_l = λ_L0 E‖z_l‖₀ + (λ/2)‖w_l‖²"

    def __init__(self, l0_penalty: float = 1.25e-7, init_log_alpha: float = 5.0,
                 layers: Sequence[int] | None = None, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        if l0_penalty < 0:
            raise ValueError(f"l0_penalty must be >= 0, got {l0_penalty}")
        self.l0_penalty, self.init_log_alpha, self.layers = float(l0_penalty), float(init_log_alpha), layers
        self.deltas = nn.ModuleDict()
        self._sites: list[ParamSite] = []
        self.projected = False

    def attach(self, system: ResidualSystem) -> None:
        if self._sites:
            raise RuntimeError("this diff_pruning controller is already attached; create a new one")
        self._sites = block_parameters(system, self.layers)
        self.deltas.update(wrap_owners(self._sites, lambda owner, group: DiffPruningDelta(group,
                                                                                           self.init_log_alpha)))
        self.sites = block_sites(self._sites)

    def _delta(self, site: ParamSite) -> DiffPruningDelta:
        return self.deltas[site.owner_key]

    def controls(self) -> list[Control]:
        out = []
        for s in self._sites:
            d = self._delta(s)
            out.append(control_of(self.method, s, d.w[s.name], ".w"))
            if not self.projected:
                out.append(control_of(self.method, s, d.log_alpha[s.name], ".log_alpha"))
        return out

    def expected_l0(self, layer: int | None = None) -> torch.Tensor:
        """``E‖z‖₀ = Σ P(z_i ≠ 0)`` over block ``layer`` (all blocks when ``None``); the mask count once projected."""
        total = torch.zeros(())
        for s in self._sites:
            if layer is None or s.layer == layer:
                d = self._delta(s)
                p = getattr(d, f"mask_{s.name}") if self.projected else prob_nonzero(d.log_alpha[s.name])
                total = total.to(p) + p.sum()
        return total

    def running_cost(self, where: int | str) -> torch.Tensor:
        """``R_l = λ_L0 E‖z_l‖₀ + (λ/2)‖w_l‖²`` (the L0 term is dropped once the mask is frozen)."""
        total = torch.zeros(())
        if not isinstance(where, int):
            return total
        if self.l0_penalty and not self.projected:
            total = self.l0_penalty * self.expected_l0(where)
        if self.weight_decay:
            for s in self._sites:
                if s.layer == where:
                    total = total + 0.5 * self.weight_decay * self._delta(s).w[s.name].pow(2).sum()
        return total

    @torch.no_grad()
    def diff_vector(self) -> torch.Tensor:
        """The current ``Δθ = z ⊙ w`` of every tuned entry, concatenated (deterministic gates)."""
        parts = []
        for s in self._sites:
            d = self._delta(s)
            was = d.training
            d.eval()
            parts.append(d.diff(s.name).reshape(-1))
            d.train(was)
        return torch.cat(parts)

    def finalize(self, budget: int | float | None = None) -> bool:
        """After training: :meth:`project` onto ``budget`` entries when a budget is given."""
        if budget is None or self.projected:
            return False
        self.project(budget)
        return True

    @torch.no_grad()
    def project(self, budget: int | float) -> int:
        """Magnitude projection: keep the ``budget`` largest ``|Δθ|`` (int count or fraction), zero the rest.

        The deterministic ``Δθ`` is kept on the chosen entries, their gates are
        frozen to 1 (others to 0) and ``log α`` stops being a control; ``w`` on
        the kept entries can be trained further.  Returns the number kept.
        """
        if self.projected:
            raise RuntimeError("diff_pruning.project was already called; the mask is frozen")
        diff = self.diff_vector()
        k = budget_count(budget, diff.numel(), "diff-pruning entries")
        keep = torch.zeros(diff.numel(), dtype=torch.bool, device=diff.device)
        keep[torch.topk(diff.abs(), k, sorted=False).indices] = True
        start = 0
        for s in self._sites:
            n = s.numel()
            shape = s.param.shape
            self._delta(s).freeze(s.name, keep[start:start + n].view(shape), diff[start:start + n].view(shape))
            start += n
        self.projected = True
        return k
