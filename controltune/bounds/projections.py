"""Projections Π of a weight-delta control onto low-dimensional structures.

A control ``u = {ΔW_{l,m}}`` (:mod:`controltune.bounds.weight_deltas`) is projected onto:

* ``rank``      rank-r truncation of each ΔW (Eckart–Young, by SVD);
* ``subspace``  orthogonal projection of the flattened delta onto a seeded
                Gaussian subspace of dimension d (intrinsic-dimension tuning);
* ``sparse``    the k entries of largest magnitude (diff pruning);
* ``layers``    the delta kept only in the k blocks with the largest ‖u_l‖.

Each is the nearest point of its structure in the Frobenius norm (``layers``:
among unions of k blocks; ``subspace``: of the given subspace), so
``‖u − Πu‖ = dist(u, structure)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from .weight_deltas import key_layer

if TYPE_CHECKING:
    from collections.abc import Iterator

STRUCTURES = ("rank", "subspace", "sparse", "layers")


def project_rank(values: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Best rank-``rank`` approximation of each ΔW in Frobenius norm (truncated SVD, Eckart–Young)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    out = {}
    for k, w in values.items():
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = min(rank, s.numel())
        out[k] = (u[:, :r] * s[:r]) @ vh[:r]
    return out


def project_sparse(values: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Keep the ``k`` entries of largest magnitude over all deltas (ties: by position), zero the rest."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat.abs(), min(k, flat.numel())).indices] = True
    out, start = {}, 0
    for key, v in values.items():
        n = v.numel()
        out[key] = torch.where(keep[start:start + n].view_as(v), v, torch.zeros_like(v))
        start += n
    return out


def project_layers(values: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Keep the delta only in the ``k`` blocks with the largest ``‖u_l‖`` (others zeroed)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    norms: dict[int, float] = {}
    for key, v in values.items():
        norms[key_layer(key)] = norms.get(key_layer(key), 0.0) + float(v.pow(2).sum())
    kept = set(sorted(norms, key=lambda layer: (-norms[layer], layer))[:k])
    return {key: v if key_layer(key) in kept else torch.zeros_like(v) for key, v in values.items()}


def project_subspace(values: Mapping[str, torch.Tensor], dim: int, seed: int = 0,
                     chunk: int = 1 << 16) -> dict[str, torch.Tensor]:
    """Orthogonal projection of the flattened delta v (length D) onto ``span(G)``, G a seeded D×dim Gaussian.

    ``Πv = G (GᵀG)⁻¹ Gᵀ v``; G is generated in row chunks from ``seed`` (never stored
    whole), twice: once for ``GᵀG`` and ``Gᵀv``, once for ``G c``.  Cost ``O(D·dim²)``.
    """
    if dim < 0:
        raise ValueError(f"dim must be >= 0, got {dim}")
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in values.values()])
    d_total = flat.numel()
    if dim == 0:
        proj = torch.zeros_like(flat)
    elif dim >= d_total:
        proj = flat.clone()
    else:
        gram = torch.zeros(dim, dim, dtype=torch.float64)
        gtv = torch.zeros(dim, dtype=torch.float64)
        for i, g in _gaussian_chunks(d_total, dim, seed, chunk):
            gram += g.T @ g
            gtv += g.T @ flat[i:i + g.shape[0]]
        coef = torch.linalg.solve(gram, gtv)
        proj = torch.empty_like(flat)
        for i, g in _gaussian_chunks(d_total, dim, seed, chunk):
            proj[i:i + g.shape[0]] = g @ coef
    out, start = {}, 0
    for key, v in values.items():
        out[key] = proj[start:start + v.numel()].view_as(v).to(v)
        start += v.numel()
    return out


def _gaussian_chunks(n_rows: int, dim: int, seed: int, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(int(seed))
    for i in range(0, n_rows, chunk):
        yield i, torch.randn(min(chunk, n_rows - i), dim, generator=gen, dtype=torch.float64)


PROJECTIONS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "rank": project_rank, "subspace": project_subspace, "sparse": project_sparse, "layers": project_layers,
}


def project(values: Mapping[str, torch.Tensor], structure: str, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Project ``values`` onto ``structure`` (one of ``STRUCTURES``) of the given ``size``."""
    if structure not in PROJECTIONS:
        raise ValueError(f"structure {structure!r} is not one of {STRUCTURES}")
    if structure == "subspace":
        return project_subspace(values, int(size), seed)
    return PROJECTIONS[structure](values, int(size))


__all__ = ["PROJECTIONS", "STRUCTURES", "project", "project_layers", "project_rank", "project_sparse",
           "project_subspace"]
