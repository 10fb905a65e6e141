"""The linear probe: the terminal control ``u_term = (W, b)`` fitted before any layer control moves.

A classification readout's head starts random (:class:`~controltune.readout.ClassificationReadout`), so the
co-state ``p_L = −∂Φ/∂x_L`` of the pretrained system, which every control design starts from, runs through a head
that knows nothing of the task and differs by seed.  Fitting the head first, with every layer control at zero,
is the *linear probe* of LP-FT (Kumar et al., ICLR 2022): with ``z_s = pool(norm(x_{s,L}))`` the pooled terminal
states of the pretrained system, a convex problem

    min_{W, b}  (1/S) Σ_s CE(W z_s + b, y_s) + (λ/2) ‖W D‖_F²,      D = diag(σ),

where σ are the per-coordinate standard deviations of the z_s (the penalty is that of logistic regression on
standardised features, so it does not depend on the scale of the residual stream), solved to stationarity by
L-BFGS in float64.  With held-out rows, λ is chosen among :data:`L2_GRID` by their cross-entropy.

:func:`fit_head` does it for a :class:`~controltune.system.ResidualSystem`; :func:`fit_linear_probe` is the convex
fit on given features and :func:`pooled_states` the features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .batching import encode, length_order
from .evaluation import validation_split
from .readout import ClassificationReadout, pool

if TYPE_CHECKING:
    from .data import Example
    from .system import ResidualSystem

__all__ = ["DEFAULT_L2", "HEAD_INITS", "L2_GRID", "ProbeFit", "fit_head", "fit_linear_probe", "init_head",
           "pooled_states"]

HEAD_INITS = ("random", "probe")
"""How a classification head starts: ``random`` (the readout's seeded N(0, 0.02²) weights, zero bias) or
``probe`` (:func:`fit_head`)."""
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""The penalties λ tried when held-out rows choose one (a report says when the choice is at an end of the grid)."""
DEFAULT_L2 = 1e-3
"""λ without held-out rows."""
GRAD_TOL = 1e-6
"""The fit is stationary when the objective's gradient has at most this max-norm."""


@dataclass
class ProbeFit:
    """A fitted probe: ``weight`` (C×d) and ``bias`` (C) in the coordinates of z, the objective at the fit (its
    penalty included), the gradient's max-norm there, the L-BFGS iterations and the training rows' accuracy."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    objective: float
    grad_norm: float
    iterations: int
    train_accuracy: float

    @property
    def converged(self) -> bool:
        return self.grad_norm <= GRAD_TOL


@torch.no_grad()
def pooled_states(system: ResidualSystem, examples: Sequence[Example], tokenizer: Any, max_length: int = 128,
                  batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` (S×d, float64, on the CPU): ``z_s = pool(norm(x_{s,L}))`` at the system's current controls, in eval
    mode (no dropout), and the labels ``y`` (S, long)."""
    if not examples:
        raise ValueError("a linear probe needs at least one training row")
    readout = system.readout
    was_training = system.training
    system.eval()
    encoded = encode(examples, tokenizer, max_length)
    device = next(system.model.parameters()).device
    z = torch.empty(len(examples), system.d_model, dtype=torch.float64)
    order = length_order(encoded.lengths)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in encoded.batch(idx).items()}
            traj = system.rollout(batch)
            z[idx] = pool(readout.normalized(traj.final), traj.ctx, readout.pooling).double().cpu()
    finally:
        system.train(was_training)
    return z, torch.tensor([ex.label for ex in examples], dtype=torch.long)


def _check_labels(y: torch.Tensor, num_labels: int, what: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_labels):
        raise ValueError(f"{what} have labels outside 0..{num_labels - 1} (the head's classes): "
                         f"{sorted(set(y.tolist()))[:10]}")


def fit_linear_probe(z: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float = DEFAULT_L2,
                     max_iter: int = 500) -> ProbeFit:
    """``argmin_{W,b} (1/S) Σ_s CE(W z_s + b, y_s) + (λ/2)‖W D‖_F²`` (module docstring) by L-BFGS from zero.

    Args:
        z: S×d features (any float dtype; fitted in float64).
        y: S labels in ``0..num_labels-1``.
        num_labels: C, the head's classes.
        l2: λ ≥ 0 (with λ = 0 and separable rows there is no minimiser, and the fit reports no convergence).

    Raises:
        ValueError: non-finite features, labels outside the classes, a negative λ, or a non-finite objective.
    """
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"z must be S×d and y of length S; got z {tuple(z.shape)} and y {tuple(y.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("the pooled states z hold NaN or inf: the pretrained system's forward is not finite")
    if l2 < 0 or not math.isfinite(l2):
        raise ValueError(f"the probe's penalty λ must be finite and >= 0, got {l2}")
    _check_labels(y, num_labels, "the probe's rows")
    z = z.double()
    mu, sigma = z.mean(0), z.std(0, unbiased=False).clamp_min(1e-12)
    zs = (z - mu) / sigma  # the fit runs on standardised features: L-BFGS is then well conditioned
    w = torch.zeros(num_labels, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=GRAD_TOL * 1e-2,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return F.cross_entropy(zs @ w.T + b, y) + 0.5 * l2 * (w * w).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    value = closure().detach()
    if not torch.isfinite(value):
        raise ValueError(f"the linear probe's objective is not finite ({value.item()}) at λ = {l2}")
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    iterations = int(opt.state[w].get("n_iter", 0))
    with torch.no_grad():
        weight = w / sigma  # back to the coordinates of z: W z + b' = W_s (z − μ)/σ + b
        bias = b - weight @ mu
        accuracy = float(((z @ weight.T + bias).argmax(-1) == y).double().mean())
    return ProbeFit(weight.detach(), bias.detach(), float(l2), float(value), grad, iterations, accuracy)


def _cross_entropy(fit: ProbeFit, z: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a fitted probe on rows ``(z, y)``."""
    logits = z.double() @ fit.weight.T + fit.bias
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).double().mean())


def fit_head(system: ResidualSystem, examples: Sequence[Example], tokenizer: Any, *,
             held_out: Sequence[Example] = (), l2: float | Sequence[float] | None = None, max_length: int = 128,
             batch_size: int = 128) -> dict[str, Any]:
    """Set the system's classification head to the linear probe on ``examples`` (module docstring); its report.

    ``l2``: one λ, or several to choose among by the cross-entropy of ``held_out`` (default: :data:`L2_GRID` with
    held-out rows, :data:`DEFAULT_L2` without).  Fit it before the controllers attach (they then design and
    train from the fitted head); attached controllers are not moved, and the probe is that of their current
    controls.  Returns ``{l2, l2_at_edge, l2_scores, rows, held_out, objective, grad_norm, converged, iterations,
    train_accuracy, held_out_loss, held_out_accuracy}`` (``l2_scores``: per λ tried, the held-out loss and
    accuracy; ``l2_at_edge``: the chosen λ is the smallest or largest tried).

    Raises:
        ValueError: the system's readout is not a classification head this fits (``readout="classification"``),
            several λ without held-out rows, or a failed fit (non-finite states or objective).
    """
    readout = system.readout
    if not isinstance(readout, ClassificationReadout):
        raise ValueError(f"a linear probe fits the head of the classification readout (ResidualSystem(..., "
                         f"readout='classification')); this system's readout is {type(readout).__name__}")
    if l2 is None:
        grid = L2_GRID if held_out else (DEFAULT_L2,)
    else:
        grid = (float(l2),) if isinstance(l2, (int, float)) else tuple(float(v) for v in l2)
    if not grid:
        raise ValueError("give at least one probe penalty λ")
    if len(grid) > 1 and not held_out:
        raise ValueError(f"choosing the probe's λ among {list(grid)} needs held-out rows (held_out=...)")
    z, y = pooled_states(system, examples, tokenizer, max_length, batch_size)
    zv, yv = pooled_states(system, held_out, tokenizer, max_length, batch_size) if held_out else (None, None)
    if yv is not None:
        _check_labels(yv, readout.num_labels, "the held-out rows")
    fits = [fit_linear_probe(z, y, readout.num_labels, lam) for lam in grid]
    scores = [_cross_entropy(f, zv, yv) if zv is not None else (None, None) for f in fits]
    best = min(range(len(fits)), key=lambda i: (scores[i][0] if scores[i][0] is not None else 0.0, i))
    fit = fits[best]
    head = readout.head
    with torch.no_grad():
        head.weight.copy_(fit.weight.to(head.weight))
        head.bias.copy_(fit.bias.to(head.bias))
    return {"l2": fit.l2, "l2_at_edge": len(fits) > 1 and best in (0, len(fits) - 1),
            "l2_scores": [{"l2": f.l2, "held_out_loss": s[0], "held_out_accuracy": s[1]} for f, s in zip(fits, scores)],
            "rows": len(examples), "held_out": len(held_out), "objective": fit.objective,
            "grad_norm": fit.grad_norm, "converged": fit.converged, "iterations": fit.iterations,
            "train_accuracy": fit.train_accuracy, "held_out_loss": scores[best][0],
            "held_out_accuracy": scores[best][1]}


def init_head(system: ResidualSystem, how: str, train_rows: Sequence[Example], tokenizer: Any, *,
              val_size: float | None = None, val_seed: int = 0, max_length: int = 128,
              batch_size: int = 128) -> dict[str, Any] | None:
    """Start a run's head as ``how`` says (:data:`HEAD_INITS`): ``random`` leaves the readout's seeded head (None);
    ``probe`` fits it (:func:`fit_head`) on the rows the run trains on, its ``val_size`` validation rows (the
    same hold-out :func:`~controltune.train.train` makes) choosing λ, and returns the fit's report.

    Call it before the controllers attach, so that a designed controller designs from the fitted head.

    Raises:
        ValueError: an unknown ``how``, or what :func:`fit_head` refuses.
    """
    if how not in HEAD_INITS:
        raise ValueError(f"head initialisation {how!r} is not one of {', '.join(HEAD_INITS)}")
    if how == "random":
        return None
    fit_rows, held = validation_split(train_rows, val_size, val_seed) if val_size is not None else (train_rows, [])
    return fit_head(system, fit_rows, tokenizer, held_out=held, max_length=max_length, batch_size=batch_size)
