"""The projections of a unified optimisation subspace (Yi et al., 2022, "Different Tunes Played with Equal Skill").

Each delta method m (adapter, prefix, LoRA, ...) has a solution space R^{D_m}: the
flattened controls of the method and the classification head, in the order of a
:class:`Layout`.  A solution θ_m is stored relative to a fixed reference point θ_m⁰ (the
method's initial controls under seed 0), ``Δθ_m = θ_m − θ_m⁰``.  One shared space R^d is tied
to every method by two maps (as in the paper's public code):

* the down-projection (encoder) ``I_m = E_m(Δθ_m) = A₂ tanh(A₁ Δθ_m / s_m + a₁) + a₂``
  (A₁: d×D_m, A₂: d×d; A₁ stays the random map it starts as, see
  :meth:`MethodProjection.trained_parameters`): the *intrinsic vector* of a solution;
* the up-projection (decoder) ``θ_m(z) = θ_m⁰ + s_m W_m z`` (W_m: D_m×d, no bias).

``s_m`` is a fixed scale per method, the RMS entry of its source solutions' Δθ: the methods' solutions
differ in size by orders of magnitude (prefix vectors against LoRA factors), and in units of ``s_m`` one
learning rate trains every method's maps.

The up-projection is linear, so the part of ``W_m z`` that belongs to one parameter is a
row block of ``W_m`` times ``z``: the controller :class:`controltune.controllers.unified.UnifiedSubspace`
computes it where that parameter is used (inside its block), which keeps the co-state split
``−∂J/∂z = Σ_l ∇_z H_l`` exact.

A projections file (safetensors) holds every method's maps, reference point, layout and
build specification, the intrinsic vectors of the source solutions, the base model's
fingerprint and how the maps were trained.  This module is plain torch (no controllers, no
training): the controller layer loads it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from .results import atomic_write_bytes

FORMAT = "controltune-unified-subspace/1"
INIT_STD = 0.02
"""Standard deviation of the projections' initial weights (the paper's code: normal(0, 0.02)), except A₁'s,
1/√D, since its input is measured in units of the method's scale."""


class ProjectionFileError(ValueError):
    """A projections file that is malformed or does not fit the model or method it is used with."""


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the tensors a method's solution vector is cut into (in this order)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        """D_m, the length of the solution vector."""
        return sum(self.sizes)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, end)`` of its entries in the vector."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = (start, start + size)
            start += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (D,) vector of ``tensors`` (every name of the layout, in order)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ProjectionFileError(f"tensors {missing[:6]} of the layout are missing")
        bad = [n for n, s in zip(self.names, self.shapes) if tuple(tensors[n].shape) != s]
        if bad:
            n = bad[0]
            raise ProjectionFileError(f"tensor {n!r} has shape {tuple(tensors[n].shape)}, the layout "
                                      f"{self.shapes[self.names.index(n)]}")
        return torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    def to_json(self) -> list[list[Any]]:
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]

    @classmethod
    def from_json(cls, items: Sequence[Sequence[Any]]) -> Layout:
        return cls(tuple(str(n) for n, _ in items), tuple(tuple(int(x) for x in s) for _, s in items))


class MethodProjection(nn.Module):
    """The two maps of one method: ``E(Δθ) = A₂ tanh(A₁ Δθ / s + a₁) + a₂`` and ``θ(z) = θ⁰ + s W z``
    (A₁ a fixed random map, :meth:`trained_parameters`).

    Attributes:
        encoder_in: A₁, a₁ (``Linear(D, d)``); ``encoder_out``: A₂, a₂ (``Linear(d, d)``).
        decoder: W (``Linear(d, D, bias=False)``; its ``weight`` is D×d).
        reference: θ⁰ (D,), a buffer.
        scale: s (a 0-dim buffer, 1 until :meth:`set_scale`).
    """

    def __init__(self, reference: torch.Tensor, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if reference.dim() != 1:
            raise ValueError(f"the reference point must be a vector (D,), got shape {tuple(reference.shape)}")
        n, dtype = reference.numel(), reference.dtype
        self.encoder_in = nn.Linear(n, dim, dtype=dtype)
        self.encoder_out = nn.Linear(dim, dim, dtype=dtype)
        self.decoder = nn.Linear(dim, n, bias=False, dtype=dtype)
        self.register_buffer("reference", reference.detach().clone())
        self.register_buffer("scale", torch.ones((), dtype=dtype))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) * INIT_STD)
            # A₁ sees Δθ / s, entries of size 1: at std 1/√D its outputs start at size 1, inside tanh's range
            self.encoder_in.weight.mul_(1.0 / (INIT_STD * n ** 0.5))

    @property
    def dim(self) -> int:
        return self.decoder.in_features

    def trained_parameters(self) -> list[nn.Parameter]:
        """What stage 1 trains: a₁, A₂, a₂ and W, not A₁ (d×D), which stays the fixed random map it starts as.

        A₁ multiplies a D-entry input (D up to ~10⁶), so one Adam step of size lr on each of its entries moves
        ``A₁ Δθ/s`` by up to ``lr·‖Δθ/s‖₁ ≈ lr·D``: tanh saturates at the same signs for every solution and the
        encoder maps all of them to one point (the pilot's MRPC and CoLA solutions got identical intrinsic
        vectors, reconstructed at their average: squared relative error 0.5).  A step that keeps the
        pre-activations' change O(lr) is lr/D per entry, which over a few hundred steps leaves A₁ where it
        started anyway.
        """
        return [p for name, p in self.named_parameters() if name != "encoder_in.weight"]

    @torch.no_grad()
    def set_scale(self, deltas: torch.Tensor) -> None:
        """``s`` = the RMS entry of ``deltas`` (n×D source solutions Δθ); 1 when they are all zero."""
        rms = float(deltas.pow(2).mean().sqrt())
        self.scale.fill_(rms if rms > 0 else 1.0)

    @torch.no_grad()
    def align(self, deltas: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Start at a reconstruction of the sources: ``s W t_i = Δθ_i`` and ``E(Δθ_i) = t_i``.

        deltas: (n, D) source solutions Δθ_i; targets: (n, d) their intrinsic vectors t_i, the same for
        every method's solution of a task, so the methods' intrinsic vectors of a task coincide and any
        interpolation of them decodes each method's own solution.  With ``T`` the n×d targets,

            W = W_r + (Δᵀ/s − W_r Tᵀ) (Tᵀ)⁺,

        exact (``W Tᵀ = Δᵀ/s``) when the targets are independent (n ≤ d distinct tasks; seeds of one task
        share a target and get their mean), a least-squares fit otherwise; ``W_r`` (entries N(0, 1), so its
        columns are the size of a solution in units of s) stays on the complement of the targets' span.
        The encoder's last layer solves ``[h_i, 1] [A₂ a₂]ᵀ = t_i`` with ``h_i = tanh(A₁ Δθ_i/s + a₁)``
        (least squares, exact for n ≤ d + 1 solutions in general position); A₁, a₁ stay random.
        """
        if deltas.dim() != 2 or targets.shape != (deltas.shape[0], self.dim):
            raise ValueError(f"align needs deltas (n, D) and targets (n, {self.dim}); got {tuple(deltas.shape)} "
                             f"and {tuple(targets.shape)}")
        work = torch.float64
        units = (deltas / self.scale).to(work)                                   # n×D, in units of s
        tt = targets.to(work).T                                                  # d×n
        w_r = torch.randn(self.decoder.weight.shape, generator=generator, dtype=work)
        w = w_r + (units.T - w_r @ tt) @ torch.linalg.pinv(tt)
        self.decoder.weight.copy_(w.to(self.decoder.weight))
        h = torch.tanh(self.encoder_in(deltas / self.scale)).to(work)           # n×d
        h1 = torch.cat([h, torch.ones(h.shape[0], 1, dtype=work)], dim=1)       # n×(d+1)
        x = torch.linalg.pinv(h1) @ targets.to(work)                             # (d+1)×d
        self.encoder_out.weight.copy_(x[:-1].T.to(self.encoder_out.weight))
        self.encoder_out.bias.copy_(x[-1].to(self.encoder_out.bias))

    def encode(self, delta: torch.Tensor) -> torch.Tensor:
        """``I = A₂ tanh(A₁ Δθ / s + a₁) + a₂``: (..., D) -> (..., d)."""
        return self.encoder_out(torch.tanh(self.encoder_in(delta / self.scale)))

    def offset(self, z: torch.Tensor) -> torch.Tensor:
        """``Δθ(z) = s W z``: (..., d) -> (..., D)."""
        return self.scale * self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``θ(z) = θ⁰ + s W z``: (..., d) -> (..., D)."""
        return self.reference + self.offset(z)

    def decode_rows(self, z: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Entries ``start:end`` of ``θ(z)`` (one parameter's block), without forming the whole vector."""
        return self.reference[start:end] + self.scale * (self.decoder.weight[start:end] @ z)


class UnifiedProjections(nn.Module):
    """Every method's :class:`MethodProjection` over one shared d-dimensional space, with its metadata.

    Attributes:
        specs: ``method -> {"method": registry name, "options": {...}}`` (how to build the controller).
        layouts: ``method -> Layout`` of its solution vector.
        intrinsic: ``method -> (n_sources, d)`` intrinsic vectors of the source solutions (after training).
        info: model name, fingerprint, sources, training settings and log.
    """

    def __init__(self, dim: int, specs: dict[str, dict[str, Any]], layouts: dict[str, Layout],
                 references: dict[str, torch.Tensor], info: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"the subspace dimension must be >= 1, got {dim}")
        if set(specs) != set(layouts) or set(specs) != set(references) or len(specs) < 1:
            raise ValueError("specs, layouts and references must name the same methods")
        self.dim = int(dim)
        self.specs = {m: dict(s) for m, s in specs.items()}
        self.layouts = dict(layouts)
        gen = torch.Generator().manual_seed(int(seed))
        self.maps = nn.ModuleDict()
        for m in specs:
            if references[m].numel() != layouts[m].numel:
                raise ValueError(f"{m}: reference has {references[m].numel()} entries, layout {layouts[m].numel}")
            self.maps[m] = MethodProjection(references[m], self.dim, gen)
        self.intrinsic: dict[str, torch.Tensor] = {}
        self.info: dict[str, Any] = dict(info or {})

    @property
    def methods(self) -> list[str]:
        return list(self.maps)

    def projection(self, method: str) -> MethodProjection:
        if method not in self.maps:
            raise ProjectionFileError(f"the projections hold methods {self.methods}, not {method!r}")
        return self.maps[method]

    # --- file ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the projections to ``path`` (safetensors, atomically)."""
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        for m, vecs in self.intrinsic.items():
            tensors[f"intrinsic.{m}"] = vecs.detach().to("cpu", torch.float32).contiguous()
        header = {"format": FORMAT, "dim": self.dim, "methods": self.methods, "specs": self.specs,
                  "layouts": {m: self.layouts[m].to_json() for m in self.methods}, "info": self.info}
        return atomic_write_bytes(path, save_bytes(tensors, metadata={"controltune": json.dumps(header)}))

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> UnifiedProjections:
        """Read a file written by :meth:`save` (a clear error for anything else)."""
        path = Path(path)
        if not path.is_file():
            raise ProjectionFileError(f"no projections file at {path} (make one with `controltune subspace "
                                      "approximate`)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            header = json.loads(meta["controltune"])
        except Exception as err:  # noqa: BLE001  (any parse failure is the same user error)
            raise ProjectionFileError(f"{path} is not a projections file: {type(err).__name__}: {err}") from err
        if header.get("format") != FORMAT:
            raise ProjectionFileError(f"{path} has format {header.get('format')!r}, expected {FORMAT!r}")
        try:
            layouts = {m: Layout.from_json(header["layouts"][m]) for m in header["methods"]}
            refs = {m: tensors[f"maps.{m}.reference"].to(dtype) for m in header["methods"]}
            out = cls(header["dim"], header["specs"], layouts, refs, header.get("info"))
        except (KeyError, TypeError, ValueError) as err:
            raise ProjectionFileError(f"{path}: the header or tensors are incomplete: "
                                      f"{type(err).__name__}: {err}") from err
        state = {k: v.to(dtype) for k, v in tensors.items() if not k.startswith("intrinsic.")}
        try:
            out.load_state_dict(state)
        except RuntimeError as err:
            raise ProjectionFileError(f"{path}: the tensors do not fit the header: {err}") from err
        out.intrinsic = {k.split(".", 1)[1]: v.to(dtype) for k, v in tensors.items() if k.startswith("intrinsic.")}
        return out


__all__ = ["FORMAT", "Layout", "MethodProjection", "ProjectionFileError", "UnifiedProjections"]
