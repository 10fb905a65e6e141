"""Linearisation of the residual-stream system along the pretrained trajectory, matrix-free.

Around a nominal trajectory ``x_0 .. x_L`` (no design control applied) block l has
the Jacobians ``A_l = ∂f_l/∂x`` and, for a control entering the state, ``B_l = ∂f_l/∂u``.
Neither is ever formed at full size (``N = S·T·d``): :func:`block_jvp` gives ``A_l v``
(forward mode) and :func:`block_vjp` gives ``A_lᵀ w`` (reverse mode).

The controller designs work in a *reduced, per-sequence, pooled* model
(:func:`reduce`): the deviation of sequence s at layer l is summarised by
``z_{l,s} = V_lᵀ mean_t δx_{l,s,t}`` (``V_l`` d×k orthonormal), and a control
``u_{l,s} ∈ R^m`` enters after block l as the same shift ``U_l u_{l,s}`` of every
token of sequence s:

    z_{l+1,s} = A_{l,s} z_{l,s} + B_l u_{l,s},
    A_{l,s} = V_{l+1}ᵀ ⟨∂f_l/∂x⟩_s V_l,     B_l = V_{l+1}ᵀ U_l,

where ``⟨∂f_l/∂x⟩_s v`` is the token-mean of the response of sequence s to the shift
``v`` of all its tokens (one JVP per basis vector gives every sequence at once,
since sequences do not interact).  This is a Galerkin (mean-field) reduction: it is
exact when every sequence has one token and ``V_l = I``, and otherwise keeps the
pooled response to pooled shifts.  The terminal cost is expanded to second order
with the Gauss–Newton curvature of the readout (``Q_{L,s} = G_sᵀ H_s G_s / S``,
``q_{L,s} = G_sᵀ (π_s − y_s) / S`` with ``G_s = ∂logits_s/∂z_{L,s}`` and
``H_s = diag(π_s) − π_s π_sᵀ``), so ``J ≈ Σ_s [q_{L,s}ᵀ z_{L,s} + ½ z_{L,s}ᵀ Q_{L,s} z_{L,s}]``
with the 1/S of ``J = (1/S) Σ_s Φ_s`` (DESIGN.md §1).

Forward-mode products need the eager attention kernel; :func:`eager_kernel`
switches to it for the duration of a design step.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..families import Context
from ..vectorize import batched

if TYPE_CHECKING:
    from ..system import ResidualSystem

__all__ = ["ReducedModel", "block_jvp", "block_jvps", "block_vjp", "design_batch", "eager_kernel", "orthonormal_basis",
           "pooled_costates", "pooled_states", "reduce", "seq_mean", "withheld_from_design"]


def eager_kernel(system: ResidualSystem) -> contextlib.AbstractContextManager:
    """Run the body with the eager attention kernel (JVPs), restoring the previous kernel:
    ``system.using_kernel("eager")`` (:meth:`controltune.system.ResidualSystem.using_kernel`)."""
    return system.using_kernel("eager")


JVP_CHUNK = 32
"""Directions per ``vmap`` call of :func:`block_jvps` (memory: K copies of the block's activations)."""

_NOT_FOR_DESIGN: ContextVar[frozenset | None] = ContextVar("controltune_not_for_design", default=None)


@contextlib.contextmanager
def withheld_from_design(examples: Sequence) -> Iterator[None]:
    """Within the block, :func:`design_batch` never draws ``examples`` (a run's validation rows: a controller
    designed while it is built must not see the rows its run is selected on).  Training code wraps the
    building of a method in it (``controltune train``, sweep cells)."""
    token = _NOT_FOR_DESIGN.set(frozenset((ex.text_a, ex.text_b, ex.label) for ex in examples))
    try:
        yield
    finally:
        _NOT_FOR_DESIGN.reset(token)


def design_batch(system: ResidualSystem, task: str = "sst2", n: int = 32, seed: int = 0, max_length: int = 64) -> dict:
    """A seeded batch of ``n`` *training* examples of ``task`` (the data of a design step).

    Controllers designed from data call this in ``attach`` when no explicit batch was
    given; the rows come from the train split only, never from dev, and never from rows
    withheld by :func:`withheld_from_design` (the seeded draw is then made among the others).
    """
    from ..batching import Collator
    from ..data import load_split, resolve_task
    from ..zoo import offline_tokenizer

    if int(n) < 1:
        raise ValueError(f"a design batch needs n >= 1 examples, got {n}")
    spec = resolve_task(task)
    n_labels = getattr(system.readout, "num_labels", None)
    if n_labels is not None and n_labels != spec.num_labels:
        raise ValueError(f"design task {task!r} has {spec.num_labels} labels but the system's head has "
                         f"{n_labels}; pass task=<the task you train on>")
    withheld = _NOT_FOR_DESIGN.get()
    if withheld is None:
        examples = load_split(spec, "train", n=int(n), seed=int(seed))
    else:
        # the same draw as load_split's subsample, over the rows that are not withheld
        rows = [ex for ex in load_split(spec, "train") if (ex.text_a, ex.text_b, ex.label) not in withheld]
        keep = sorted(random.Random(int(seed)).sample(range(len(rows)), min(int(n), len(rows))))
        examples = [rows[i] for i in keep]
    # The system's own tokenizer (a random model has none: it shares the offline MiniLM one).
    batch = Collator(getattr(system, "tokenizer", None) or offline_tokenizer(), max_length)(examples)
    device = next(system.model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


# --- matrix-free products -------------------------------------------------------------------------
def block_jvp(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_l(x), A_l v)`` with ``A_l = ∂f_l/∂x`` at ``x`` (x, v: S×T×d); needs the eager kernel."""
    return torch.func.jvp(lambda z: system.step(layer, z, ctx), (x,), (v,))


def block_jvps(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context, vs: torch.Tensor) -> torch.Tensor:
    """``A_l v`` for each stacked ``v`` (vs: K×S×T×d -> K×S×T×d), batched by ``vmap``: the primal
    block and the controllers' effective weights are computed once, not once per direction."""
    return batched(lambda v: block_jvp(system, layer, x, ctx, v)[1], vs, JVP_CHUNK)


def block_vjp(system: ResidualSystem, layer: int, x: torch.Tensor, ctx: Context, w: torch.Tensor) -> torch.Tensor:
    """``A_lᵀ w`` with ``A_l = ∂f_l/∂x`` at ``x`` (x, w: S×T×d); first-order reverse mode, any kernel."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(system.step(layer, xg, ctx), xg, w)
    return g


def seq_mean(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token mean over the real tokens of each sequence: S×T×d -> S×d."""
    m = attention_mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def _shift(v: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The same vector ``v`` (d, or S×d) on every real token: -> S×T×d (zero on padding)."""
    m = attention_mask.unsqueeze(-1)
    v = v if v.dim() == 2 else v.expand(m.shape[0], -1)
    return v[:, None, :] * m.to(v.dtype)


@torch.no_grad()
def pooled_states(system: ResidualSystem, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], Context]:
    """Nominal states ``x_0..x_L`` (S×T×d each), their token means (S×d each) and the context."""
    traj = system.rollout(batch)
    am = traj.ctx.attention_mask
    return traj.states, [seq_mean(x, am) for x in traj.states], traj.ctx


def pooled_costates(system: ResidualSystem, batch: dict) -> list[torch.Tensor]:
    """``Σ_t p_{l,s,t}`` for l = 0..L (S×d each): ``−∂J/∂(shift of every token of sequence s at x_l)``.

    Uses :func:`controltune.pmp.solve_costate` (``p_l = −∂J/∂x_l``).
    """
    from ..pmp import solve_costate

    sol = solve_costate(system, batch)
    m = sol.ctx.attention_mask.to(sol.costates[0].dtype).unsqueeze(-1)
    return [(p * m).sum(1) for p in sol.costates]


def orthonormal_basis(columns: torch.Tensor, k: int, rtol: float = 1e-8) -> torch.Tensor:
    """The first ``k`` left singular vectors of ``columns`` (d×n) with non-negligible singular value.

    Returns d×k' with ``k' ≤ k``; an error if no direction is left.
    """
    u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    keep = int((s > rtol * s.max().clamp_min(torch.finfo(s.dtype).tiny)).sum())
    if keep == 0:
        raise ValueError("the basis columns are all zero: the design batch gives no direction")
    return u[:, :min(k, keep)]


# --- the reduced model ------------------------------------------------------------------------------
@dataclass
class ReducedModel:
    """The pooled per-sequence linear-quadratic model of the system along a trajectory.

    Shapes (S sequences, L blocks, state dim k_l, control dim m; float64):
        A: L tensors S×k_{l+1}×k_l;  B: L tensors k_{l+1}×m;
        Q: S×k_L×k_L (Gauss–Newton terminal curvature, 1/S included);
        q: S×k_L (terminal gradient ∂J/∂z_{L,s});
        bases: ``V_0 .. V_L`` (d×k_l);  controls: ``U_0 .. U_{L-1}`` (d×m);
        features: ``V_lᵀ (mean_t x_{l,s,t} − μ_l)`` for l = 0..L (S×k_l), the pooled nominal states;
        means: ``μ_l`` (d), the batch mean of the pooled nominal states.
    """

    A: list[torch.Tensor]
    B: list[torch.Tensor]
    Q: torch.Tensor
    q: torch.Tensor
    bases: list[torch.Tensor]
    controls: list[torch.Tensor]
    features: list[torch.Tensor]
    means: list[torch.Tensor]

    @property
    def n_layers(self) -> int:
        return len(self.A)


def reduce(system: ResidualSystem, batch: dict, bases: list[torch.Tensor],
           controls: list[torch.Tensor]) -> ReducedModel:
    """Build the :class:`ReducedModel` for given state bases ``V_0..V_L`` and control bases ``U_0..U_{L-1}``.

    Cost: ``Σ_l k_l`` block JVPs plus ``k_L`` readout JVPs on the batch, all with the eager kernel;
    the ``k_l`` JVPs of a block share one ``vmap`` call (:func:`block_jvps`).
    """
    n = system.n_layers
    if len(bases) != n + 1 or len(controls) != n:
        raise ValueError(f"need {n + 1} state bases and {n} control bases for {n} blocks, "
                         f"got {len(bases)} and {len(controls)}")
    with eager_kernel(system), torch.no_grad():
        states, pooled, ctx = pooled_states(system, batch)
        am = ctx.attention_mask
        A = []
        for layer in range(n):
            shifts = torch.stack([_shift(v, am) for v in bases[layer].T.to(states[layer])])
            dx = block_jvps(system, layer, states[layer], ctx, shifts)          # k_l×S×T×d
            resp = torch.stack([seq_mean(d, am) for d in dx], dim=-1).double()  # S×d×k_l
            A.append(bases[layer + 1].double().T @ resp)            # S×k_{l+1}×k_l
        B = [bases[layer + 1].double().T @ controls[layer].double() for layer in range(n)]
        G, probs = _readout_jacobian(system, states[n], ctx, bases[n])
        y = torch.nn.functional.one_hot(batch["labels"], probs.shape[-1]).double()
        s = probs.shape[0]
        H = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        Q = G.transpose(1, 2) @ H @ G / s
        q = (G.transpose(1, 2) @ (probs - y)[:, :, None]).squeeze(-1) / s
        means = [p.double().mean(0) for p in pooled]
        feats = [(p.double() - mu) @ V.double() for p, mu, V in zip(pooled, means, bases)]
    return ReducedModel(A=A, B=B, Q=Q, q=q, bases=[V.double() for V in bases],
                        controls=[U.double() for U in controls], features=feats, means=means)


def _readout_jacobian(system: ResidualSystem, x_last: torch.Tensor, ctx: Context,
                      basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``G_s = ∂logits_s/∂z_{L,s}`` (S×C×k_L) for shifts ``V_L z`` of every token, and π_s (S×C)."""
    if getattr(system.readout, "kind", "") != "classification":
        raise ValueError("the reduced model needs a classification readout (its terminal cost is CE on "
                         f"pooled logits); got {getattr(system.readout, 'kind', type(system.readout).__name__)!r}")
    am = ctx.attention_mask
    cols = []
    logits = None
    for v in basis.T.to(x_last):
        logits, dl = torch.func.jvp(lambda z: system.readout.logits(z, ctx), (x_last,), (_shift(v, am),))
        cols.append(dl)
    return torch.stack(cols, -1).double(), torch.softmax(logits.double(), -1)
