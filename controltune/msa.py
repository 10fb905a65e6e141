"""Training by the method of successive approximations (Li, Chen, Tai & E, JMLR 2018).

Each MSA iteration on a batch

1. rolls the states ``x_0..x_L`` forward and the co-states ``p_L..p_0`` backward
   (:func:`~controltune.pmp.solve_costate`);
2. with those fixed, raises every layer's *augmented Hamiltonian* independently
   (a few Adam or SGD steps on u_l)::

       H̃_l(u) = H_l(x_l, p_{l+1}, u) − (ρ/2S) Σ_s ‖x_{l+1,s} − f_l(x_{l,s}, u)‖²
                                     − (ρS/2) Σ_s ‖p_{l,s} − ∇_x H_l(x_l, p_{l+1}, u)_s‖²

   (E-MSA; ``ρ = 0`` is the basic MSA).  The penalties are means over the S
   sequences of per-sequence residuals: J is a batch mean, so p carries a factor
   1/S and the per-sequence co-state is ``S·p_s``.  A shared control raises
   ``Σ_{l ∈ layers} H̃_l``; an initial control raises
   ``p_0·x_0(u) − R_init(u) − (ρ/2S)‖x_0 − x_0(u)‖²``;
3. moves the terminal control by gradient descent on ``Φ̄(x_L; u_term) + R_term``
   (x_L fixed).

With x_l and p fixed the per-layer problems are decoupled, so one optimiser
step on ``−Σ_l H̃_l + Φ̄ + R_term`` performs all of them at once; at the first
inner step the gradient is exactly ``∂J/∂u`` (the penalties vanish at the
current u), so MSA with one inner step and ρ = 0 is gradient descent on J.

The co-state penalty needs ``∇_u ∇_x H_l`` (double backward): on a
:class:`~controltune.system.ResidualSystem` the inner steps switch attention to
the ``eager`` kernel (PyTorch's CPU ``sdpa`` is first-order only) and switch it
back afterwards.  ``costate_penalty=False`` drops that term (the cheaper
"feasibility-only" E-MSA; measured on MiniLM + LoRA, batch 16 × ≤64 tokens, two
inner steps, one thread: 3.4 s vs 8.6 s per iteration, experiments/msa_minilm.py).

:class:`ToyResidualNet` is the paper's toy: a 20-layer residual tanh network of
width 5 fitting ``sin`` on ``[−π, π]``; it follows the same
:class:`~controltune.pmp.ControlSystem` protocol as a Transformer system, so the
same solver and trainer run on both.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .control import Control
from .pmp import ControlSystem, CoStateSolution, controls_by_layer, solve_costate

if TYPE_CHECKING:
    from .families.base import Context

OPTIMIZERS = ("adam", "sgd")


@dataclass
class MSAConfig:
    """Hyper-parameters of (E-)MSA.

    Attributes:
        rho: penalty ρ of the augmented Hamiltonian (0: basic MSA).
        inner_steps: optimiser steps on each ``H̃_l`` per iteration.
        lr: learning rate of the inner optimiser.
        optimizer: ``adam`` (state kept across iterations) or ``sgd``.
        costate_penalty: include the ``‖p_l − ∇_x H_l‖²`` term (double backward).
    """

    rho: float = 0.0
    inner_steps: int = 5
    lr: float = 1e-2
    optimizer: str = "adam"
    costate_penalty: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.rho < 0 or self.inner_steps < 1 or self.lr <= 0:
            raise ValueError(f"need rho >= 0, inner_steps >= 1 and lr > 0; got rho={self.rho}, "
                             f"inner_steps={self.inner_steps}, lr={self.lr}")


@contextlib.contextmanager
def attention_kernel(system: ControlSystem, kernel: str) -> Iterator[None]:
    """``system.using_kernel(kernel)`` when the system has attention kernels (a Transformer);
    nothing for systems without (the toy network)."""
    using = getattr(system, "using_kernel", None)
    if using is None or not kernel:
        yield
        return
    with using(kernel):
        yield


class MSA:
    """(E-)MSA trainer of every control of ``system`` (any :class:`ControlSystem`).

    Usage: ``trainer = MSA(system, MSAConfig(rho=1.0)); for batch in loader: trainer.step(batch)``.
    """

    def __init__(self, system: ControlSystem, config: MSAConfig | None = None) -> None:
        self.system = system
        self.config = config or MSAConfig()
        self.controls: list[Control] = list(system.controls())
        if not self.controls:
            raise ValueError("the system has no controls to train; attach a controller first")
        params = [c.param for c in self.controls]
        self.optimizer = (torch.optim.Adam(params, lr=self.config.lr) if self.config.optimizer == "adam"
                          else torch.optim.SGD(params, lr=self.config.lr))

    def step(self, batch: dict) -> dict[str, float]:
        """One MSA iteration on ``batch``; returns ``J`` before it and the augmented-Hamiltonian gain."""
        cfg, system = self.config, self.system
        sol = solve_costate(system, batch)
        double = cfg.rho > 0 and cfg.costate_penalty
        per_layer = controls_by_layer(self.controls, system.n_layers)
        first = last = None
        with attention_kernel(system, "eager" if double else getattr(system, "kernel", "")):
            for _ in range(cfg.inner_steps):
                self.optimizer.zero_grad(set_to_none=True)
                objective = self._objective(batch, sol, per_layer, double)
                (-objective).backward()
                self.optimizer.step()
                value = float(objective.detach())
                first = value if first is None else first
                last = value
        self.optimizer.zero_grad(set_to_none=True)
        return {"cost": sol.cost, "terminal_cost": sol.terminal_cost, "objective_first": first,
                "objective_last": last}

    def _objective(self, batch: dict, sol: CoStateSolution, per_layer: list[list[Control]],
                   double: bool) -> torch.Tensor:
        """``Σ_l H̃_l + H̃_init − (Φ̄ + R_term)`` at the current controls, x and p fixed from ``sol``."""
        system, rho = self.system, self.config.rho
        x, p, ctx = sol.states, sol.costates, sol.ctx
        n_seq = x[0].shape[0]
        total = torch.zeros((), dtype=x[0].dtype, device=x[0].device)
        for layer in range(system.n_layers):
            if not per_layer[layer]:
                continue  # no control acts in this block: H̃_l is a constant
            total = total + self.augmented_hamiltonian(layer, x[layer], x[layer + 1], p[layer], p[layer + 1], ctx,
                                                       n_seq, double)
        if any(c.kind == "init" for c in self.controls):
            x0, _ = system.embed(batch)
            h_init = (p[0] * x0).sum() - system.running_cost("init")
            if rho > 0:
                h_init = h_init - rho / (2 * n_seq) * (x[0] - x0).pow(2).sum()
            total = total + h_init
        if any(c.kind == "term" for c in self.controls):
            total = total - system.terminal_cost(x[-1], ctx, batch) - system.running_cost("term")
        return total

    def augmented_hamiltonian(self, layer: int, x: torch.Tensor, x_next: torch.Tensor, p: torch.Tensor,
                              p_next: torch.Tensor, ctx: Context, n_seq: int, double: bool) -> torch.Tensor:
        """``H̃_l(u)`` at the current controls (scalar; differentiable in u)."""
        rho = self.config.rho
        x_in = x.detach().requires_grad_(double)
        f = self.system.step(layer, x_in, ctx)
        h = (p_next * f).sum() - self.system.running_cost(layer)
        if rho == 0:
            return h
        h = h - rho / (2 * n_seq) * (x_next - f).pow(2).sum()
        if double:
            (grad_x,) = torch.autograd.grad((p_next * f).sum(), x_in, create_graph=True)
            h = h - rho * n_seq / 2 * (p - grad_x).pow(2).sum()
        return h


def train_msa(system: ControlSystem, batches: Iterable[dict], n_iterations: int, config: MSAConfig | None = None,
              on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run ``n_iterations`` MSA iterations, cycling over ``batches``; returns the per-iteration stats.

    ``on_iteration(i, stats)`` is called after each iteration (i from 1), e.g. to score a dev set.
    """
    trainer = MSA(system, config)
    history: list[dict[str, float]] = []
    iterator = iter(batches)
    for i in range(1, n_iterations + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            batch = next(iterator)
        stats = trainer.step(batch)
        history.append(stats)
        if on_iteration is not None:
            on_iteration(i, stats)
    return history


# --- the toy problem of Li et al. -----------------------------------------------------------


class ToyResidualNet(nn.Module):
    """``x_{l+1} = x_l + δ·tanh(W_l x_l + b_l)``, width ``w``, fitting ``y = sin(t)`` on ``[−π, π]``.

    State ``x_l`` ∈ R^{S×w}.  ``x_0 = t·a + c`` with fixed (seeded, untrained) ``a, c`` ∈ R^w,
    which breaks the symmetry between the w coordinates of a zero-initialised network;
    ``Φ̄ = (1/S) Σ_s ½(wᵀx_{L,s} + β − y_s)²``.  Controls: ``W_l, b_l`` (layer) and
    ``w, β`` (terminal), all zero at initialisation; running cost ``(λ/2)‖u‖²`` per layer.
    A batch is ``{"x": S×1, "y": S×1}`` (see :func:`toy_batch`).
    """

    def __init__(self, n_layers: int = 20, width: int = 5, delta: float = 0.25, weight_decay: float = 0.0,
                 seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if n_layers < 1 or width < 1:
            raise ValueError(f"need n_layers >= 1 and width >= 1, got {n_layers}, {width}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("a", torch.randn(width, generator=gen, dtype=torch.float64).to(dtype))
        self.register_buffer("c", torch.randn(width, generator=gen, dtype=torch.float64).to(dtype))
        self.W = nn.ParameterList([nn.Parameter(torch.zeros(width, width, dtype=dtype)) for _ in range(n_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(width, dtype=dtype)) for _ in range(n_layers)])
        self.w = nn.Parameter(torch.zeros(width, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros((), dtype=dtype))
        self.delta, self.weight_decay = float(delta), float(weight_decay)

    @property
    def n_layers(self) -> int:
        return len(self.W)

    def embed(self, batch: dict) -> tuple[torch.Tensor, None]:
        return batch["x"].to(self.a) * self.a + self.c, None

    def step(self, layer: int, x: torch.Tensor, ctx: None = None) -> torch.Tensor:
        return x + self.delta * torch.tanh(x @ self.W[layer].T + self.b[layer])

    def readout(self, x_last: torch.Tensor) -> torch.Tensor:
        """Predictions ``wᵀx_L + β`` (S×1)."""
        return (x_last @ self.w + self.beta).unsqueeze(-1)

    def terminal_cost(self, x_last: torch.Tensor, ctx: None, batch: dict) -> torch.Tensor:
        return 0.5 * (self.readout(x_last) - batch["y"].to(x_last)).pow(2).mean()

    def running_cost(self, where: int | str) -> torch.Tensor:
        params = {"init": [], "term": [self.w, self.beta]}.get(where) if isinstance(where, str) \
            else [self.W[where], self.b[where]]
        if params is None:
            raise ValueError(f"where must be a layer 0..{self.n_layers - 1}, 'init' or 'term'; got {where!r}")
        return 0.5 * self.weight_decay * sum((q.pow(2).sum() for q in params), torch.zeros((), dtype=self.w.dtype))

    def controls(self) -> list[Control]:
        out = []
        for layer in range(self.n_layers):
            out += [Control(f"toy.{layer}.W", self.W[layer], "layer", (layer,)),
                    Control(f"toy.{layer}.b", self.b[layer], "layer", (layer,))]
        return out + [Control("toy.head.w", self.w, "term"), Control("toy.head.beta", self.beta, "term")]

    def cost(self, batch: dict) -> torch.Tensor:
        """``J = Φ̄ + Σ R``."""
        x, _ = self.embed(batch)
        for layer in range(self.n_layers):
            x = self.step(layer, x)
        return self.terminal_cost(x, None, batch) + sum(self.running_cost(w)
                                                        for w in (*range(self.n_layers), "init", "term"))

    def forward(self, batch: dict) -> torch.Tensor:
        x, _ = self.embed(batch)
        for layer in range(self.n_layers):
            x = self.step(layer, x)
        return self.readout(x)


def toy_batch(n: int, seed: int | None = None, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """``n`` points ``t`` uniform on ``[−π, π]`` (seeded) or, with ``seed=None``, an even grid; ``y = sin t``."""
    if seed is None:
        t = torch.linspace(-math.pi, math.pi, n, dtype=torch.float64)
    else:
        t = (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1) * math.pi
    t = t.to(dtype).unsqueeze(-1)
    return {"x": t, "y": torch.sin(t)}


__all__ = ["OPTIMIZERS", "MSA", "MSAConfig", "ToyResidualNet", "attention_kernel", "toy_batch", "train_msa"]
