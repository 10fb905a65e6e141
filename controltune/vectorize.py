"""Map a function over a stack of tensors with ``torch.func.vmap``, falling back to a loop.

Used wherever many tangents or perturbed states go through the same block: the verifier's
propagation (:mod:`controltune.verification`) and the design linearisation
(:func:`controltune.design.linearize.reduce`).  Under ``vmap`` everything that does not depend
on the mapped tensor (a controller's effective weights, a projection of its shared vector) is
computed once per chunk instead of once per item.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import vmap


def batched(fn: Callable[[torch.Tensor], torch.Tensor], stacked: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """``torch.stack([fn(s) for s in stacked])`` (stacked: K×…), by ``vmap`` in chunks of ``chunk_size``.

    A function ``vmap`` cannot batch (an operation without a batching rule) runs in the loop:
    the same numbers, slower.
    """
    try:
        return vmap(fn, chunk_size=chunk_size)(stacked)
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([fn(s) for s in stacked])
