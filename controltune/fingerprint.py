"""The base model's identity: its own parameters, their count, and a fingerprint of their values.

Delta checkpoints and unified-subspace projection files record the fingerprint of the base model
they were made on, and refuse to load onto another one.  Only the residual-stream system is
needed (no file format), so controllers can check it too.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .system import ResidualSystem

_SAMPLES_PER_TENSOR = 64


def _is_delta_path(path: str) -> bool:
    # Deltas live inside the base model as ``<module>.delta.*`` (see controllers.base.wrap)
    # or under attributes set by prefix-style controllers (``ct_*``).
    parts = path.split(".")
    return "delta" in parts or any(p.startswith("ct_") for p in parts)


def base_parameters(system: ResidualSystem) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the base model's own parameters, in a wrapping-independent naming.

    Parameters of deltas and of controllers are excluded; the ``.base_layer`` that
    :func:`~controltune.controllers.base.wrap` inserts is removed from the names,
    so the list is the same before and after controllers are attached.
    """
    delta_ids = {id(p) for p in system.controllers.parameters()}
    out = []
    for name, p in system.model.named_parameters():
        if id(p) in delta_ids or _is_delta_path(name):
            continue
        out.append((name.replace(".base_layer", ""), p))
    return out


def n_base_parameters(system: ResidualSystem) -> int:
    """Number of scalars of the pretrained model (the denominator of trainable fractions)."""
    return sum(p.numel() for _, p in base_parameters(system))


@torch.no_grad()
def fingerprint(system: ResidualSystem) -> str:
    """sha256 over names, shapes and a strided sample of the frozen base parameters.

    Values are hashed in float32 so a model loaded in float32 or float64 has one
    fingerprint; parameters that are themselves trained (full fine-tuning) enter
    by name and shape only, so training does not change the fingerprint.
    """
    controls = list(system.controls())
    for c in system.controllers:
        controls.extend(c.frozen_controls())
    trained = {id(c.param) for c in controls}
    h = hashlib.sha256()
    for name, p in sorted(base_parameters(system), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        if id(p) in trained or p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        h.update(flat[::stride].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


__all__ = ["base_parameters", "fingerprint", "n_base_parameters"]
