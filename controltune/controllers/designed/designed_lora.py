"""LoRA deltas whose placement or initial value comes from a design step: the shared plumbing.

``costate_lora`` (initial value: one MSA step) and ``gramian_lora`` (placement: controllability
scores) both attach standard LoRA deltas (:class:`~controltune.controllers.lora.LoRADelta`) on
chosen sites and draw their design batch the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...design.linearize import design_batch as load_design_batch
from ...families.base import linear_io
from ..base import (
    Control,
    Controller,
    Site,
    positive_float,
    positive_int,
    seeded_generator,
    wrap,
)
from ..lora import LoRADelta, lora_controls

if TYPE_CHECKING:
    from ...system import ResidualSystem


def _design_batch(ctrl: _DesignedLoRA, system: ResidualSystem) -> dict:
    if ctrl.design_batch is not None:
        return ctrl.design_batch
    return load_design_batch(system, ctrl.task, ctrl.n_design, ctrl.design_seed, ctrl.max_length)


def _half(batch: dict, first: bool) -> dict:
    s = batch["input_ids"].shape[0]
    cut = s // 2
    sl = slice(0, cut) if first else slice(cut, s)
    return {k: v[sl] for k, v in batch.items()}


def truncated_svd(G: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``(U_r d_out×r, σ_r r, V_rᵀ r×d_in)`` of ``G`` (computed in float64)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


class _DesignedLoRA(Controller):
    """Shared plumbing: LoRA deltas on resolved sites, controls named like LoRA's."""

    group = "reparameterisation"

    def _init_common(self, rank: int, alpha: float, layers: Sequence[int] | None, task: str, n_design: int,
                     design_seed: int, max_length: int, design_batch: dict | None, seed: int) -> None:
        self.rank = positive_int(rank, "rank", self.method)
        self.alpha = positive_float(alpha, "alpha", self.method)
        self.layers, self.seed = layers, int(seed)
        self.task, self.design_seed = task, int(design_seed)
        self.n_design = positive_int(n_design, "n_design", self.method)
        self.max_length = positive_int(max_length, "max_length", self.method)
        self.design_batch = design_batch
        self.deltas = nn.ModuleDict()
        self.ranks: dict[str, int] = {}
        self.report: dict = {}

    def _attach_lora(self, system: ResidualSystem, sites: list[Site], ranks: dict[str, int]) -> None:
        gen = seeded_generator(self.seed)
        like = next(system.model.parameters())
        for site in sites:
            r = ranks[site.key]
            if r < 1:
                continue
            d_in, d_out = linear_io(site.module)
            delta = LoRADelta(d_in, d_out, r, self.alpha / r, gen, like)
            self.deltas[site.key] = delta
            self.ranks[site.key] = r
            self.sites.append(site)
            wrap(system.base, site.path, delta)

    def controls(self) -> list[Control]:
        return lora_controls(self.method, self.sites, self.deltas)




class _bypassed:
    """Context: the controller's LoRA deltas contribute nothing (scale 0), restored on exit."""

    def __init__(self, ctrl: _DesignedLoRA) -> None:
        self.ctrl = ctrl
        self.saved: dict[str, float] = {}

    def __enter__(self) -> None:
        for k, d in self.ctrl.deltas.items():
            self.saved[k] = d.scale
            d.scale = 0.0

    def __exit__(self, *exc) -> None:
        for k, d in self.ctrl.deltas.items():
            d.scale = self.saved[k]
