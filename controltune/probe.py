"""The linear probe: the terminal control ``u_term`` fitted before any layer control moves.

A classification head starts random (:class:`~controltune.readout.ClassificationReadout`'s seeded head, or the
freshly initialised classifier of an HF ``*ForSequenceClassification``), so the co-state ``p_L = −∂Φ/∂x_L`` of the
pretrained system, which every control design starts from, runs through a head that knows nothing of the task
and differs by seed.  Fitting the head's last linear map ``(W, b)`` first, with every layer control at zero, is the
*linear probe* of LP-FT (Kumar et al., ICLR 2022): with ``z_s`` the input of that map for row s in the pretrained
system (:func:`head_inputs`: ``pool(norm(x_{s,L}))`` for the classification readout, the pooler's output for BERT's
HF head, the last real token's normalised state for a decoder's ``score``), a convex problem

    min_{W, b}  (1/S) Σ_s CE(W z_s + b, y_s) + (λ/2) ‖W D‖_F²,      D = diag(σ),

where σ are the per-coordinate standard deviations of the z_s (the penalty is that of logistic regression on
standardised features, so it does not depend on the scale of the residual stream; a map without bias, like a
decoder's ``score``, is fitted with ``b = 0`` and σ the root mean squares, its features scaled but not centred),
solved by L-BFGS in float64 to a gradient max-norm of :data:`GRAD_TOL` in the standardised coordinates.  With
held-out rows, λ is chosen among :data:`L2_GRID` by their cross-entropy.

:func:`fit_head` does it for a :class:`~controltune.system.ResidualSystem`; :func:`fit_linear_probe` is the convex
fit on given features and :func:`head_inputs` the features.  With a ``cache_dir`` (:func:`probe_cache_dir`) the
features are stored on disk under a digest of everything that decides them (:func:`features_key`), so the cells of a
sweep that differ only in seed, method or rate compute them once: on SST-2's 19,000 fitting rows they took 48 s of
a 57 s probe at one thread.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .batching import encode, examples_digest, length_order, tokenizer_fingerprint
from .evaluation import eval_mode, to_device, validation_split
from .readout import ClassificationReadout, SequenceClassifierReadout
from .results import atomic_file
from .smollm2 import cache_root

if TYPE_CHECKING:
    from .data import Example
    from .system import ResidualSystem

__all__ = ["DEFAULT_L2", "HEAD_INITS", "L2_GRID", "ProbeFit", "features_key", "fit_head", "fit_linear_probe",
           "head_inputs", "head_layer", "init_head", "probe_cache_dir"]

HEAD_INITS = ("random", "probe")
"""How a classification head starts: ``random`` (as the readout initialises it: seeded N(0, 0.02²) weights) or
``probe`` (:func:`fit_head`)."""
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""The penalties λ tried when held-out rows choose one (a report says when the choice is at an end of the grid)."""
DEFAULT_L2 = 1e-3
"""λ without held-out rows."""
GRAD_TOL = 1e-6
"""The fit is stationary when the objective's gradient in the standardised coordinates has at most this max-norm."""
FEATURES_FORMAT = 1
"""The layout of a stored ``{format, z, y}`` file of :func:`head_inputs`; a file of another format is computed again."""


@dataclass
class ProbeFit:
    """A fitted probe: ``weight`` (C×d) and ``bias`` (C, None for a map without bias) in the coordinates of z, the
    objective at the fit (its penalty included), the gradient's max-norm there, the L-BFGS iterations and the
    training rows' accuracy."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    l2: float
    objective: float
    grad_norm: float
    iterations: int
    train_accuracy: float

    @property
    def converged(self) -> bool:
        return self.grad_norm <= GRAD_TOL

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``W z + b`` (S×C) for features z (S×d)."""
        out = z.double() @ self.weight.T
        return out if self.bias is None else out + self.bias


def head_layer(readout: nn.Module) -> nn.Linear:
    """The head's last linear map, the one the probe fits: the classification readout's ``head``; of an HF
    sequence head (``sequence_classifier`` readout) its one ``nn.Linear`` with C outputs (BERT's ``classifier``,
    RoBERTa's ``classifier.out_proj``, a decoder's ``score``).

    Raises:
        ValueError: a readout without a classification head (a causal-LM readout), or an HF head whose last
            linear map cannot be told (none or several with C outputs).
    """
    if isinstance(readout, ClassificationReadout):
        return readout.head
    if isinstance(readout, SequenceClassifierReadout):
        c = readout.num_labels
        found = [m for m in readout.heads.modules() if isinstance(m, nn.Linear) and m.out_features == c]
        if len(found) != 1:
            raise ValueError(f"a linear probe fits the last linear map of the sequence head; this head has "
                             f"{len(found)} nn.Linear with {readout.num_labels} outputs, not one")
        return found[0]
    raise ValueError(f"a linear probe fits a classification head (ResidualSystem(..., readout='classification' or "
                     f"'sequence_classifier')); this system's readout is {type(readout).__name__}")


def probe_cache_dir() -> Path:
    """Where :func:`head_inputs` stores features on disk: ``<controltune cache>/probe``."""
    return cache_root() / "probe"


def features_key(system: ResidualSystem, examples: Sequence[Example], tokenizer: Any, max_length: int,
                 batch_size: int) -> str:
    """A sha256 of everything that decides :func:`head_inputs`' ``z``: every tensor of the system's state (names,
    dtypes, shapes, values; the pretrained weights, the readout's norm and pooler, attached controls) except the
    head map's own ``(W, b)``, which z does not pass through, so that heads of other seeds share it; the system's
    structure and pooling; the tokenizer, the rows (texts and labels, in order), ``max_length``, ``batch_size``
    (the batches' padding) and the device type."""
    layer = head_layer(system.readout)
    own = {t.data_ptr() for t in layer.parameters()}
    h = hashlib.sha256()
    h.update(f"probe-features {FEATURES_FORMAT}\x1e{system!r}\x1e{getattr(system.readout, 'pooling', None)}".encode())
    for name, tensor in system.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in own and tensor.numel():
            continue
        t = tensor.detach().contiguous().cpu()
        h.update(f"\x1e{name}\x1f{t.dtype}\x1f{tuple(t.shape)}\x1f".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    device = next(system.model.parameters()).device.type
    h.update(f"\x1e{tokenizer_fingerprint(tokenizer)}\x1f{examples_digest(examples)}\x1f{max_length}\x1f"
             f"{batch_size}\x1f{device}".encode())
    return h.hexdigest()[:24]


def _read_features(path: Path, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(z, y)`` stored at ``path``; None if absent, unreadable or not of ``rows`` rows (then computed again)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # a damaged or foreign file is not an error: compute the features again
        return None
    if not isinstance(state, dict) or state.get("format") != FEATURES_FORMAT:
        return None
    z, y = state.get("z"), state.get("y")
    if not (isinstance(z, torch.Tensor) and isinstance(y, torch.Tensor) and z.ndim == 2 and z.shape[0] == rows
            and y.shape == (rows,) and z.dtype == torch.float64):
        return None
    return z, y


@torch.no_grad()
def head_inputs(system: ResidualSystem, examples: Sequence[Example], tokenizer: Any, max_length: int = 128,
                batch_size: int = 128, cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` (S×d_in, float64, on the CPU): for each row the input of the head's last linear map (:func:`head_layer`)
    at the system's current controls, in eval mode (no dropout), and the labels ``y`` (S, long).  For the
    classification readout ``z_s = pool(norm(x_{s,L}))``.

    With ``cache_dir`` (e.g. :func:`probe_cache_dir`) they are read from ``<features_key>.pt`` there when present
    and stored there when computed; the key (:func:`features_key`) digests the state they depend on, so a stored
    file is only ever that of the same forward."""
    if not examples:
        raise ValueError("a linear probe needs at least one training row")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{features_key(system, examples, tokenizer, max_length, batch_size)}.pt"
        if (stored := _read_features(path, len(examples))) is not None:
            return stored
    z, y = _forward_features(system, examples, tokenizer, max_length, batch_size)
    if path is not None:
        with atomic_file(path) as fh:
            torch.save({"format": FEATURES_FORMAT, "z": z, "y": y}, fh)
    return z, y


def _forward_features(system: ResidualSystem, examples: Sequence[Example], tokenizer: Any, max_length: int,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`head_inputs` computed: one eval-mode rollout per batch, the head map's input caught by a hook."""
    readout = system.readout
    layer = head_layer(readout)
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    encoded = encode(examples, tokenizer, max_length)
    device = next(system.model.parameters()).device
    z = torch.empty(len(examples), layer.in_features, dtype=torch.float64)
    order = length_order(encoded.lengths)
    try:
        with eval_mode(system):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = to_device(encoded.batch(idx), device)
                traj = system.rollout(batch)
                seen.clear()
                readout.logits(traj.final, traj.ctx)
                z[idx] = seen[-1].double().cpu()
    finally:
        hook.remove()
    return z, torch.tensor([ex.label for ex in examples], dtype=torch.long)


def _check_labels(y: torch.Tensor, num_labels: int, what: str) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_labels):
        raise ValueError(f"{what} have labels outside 0..{num_labels - 1} (the head's classes): "
                         f"{sorted(set(y.tolist()))[:10]}")


def fit_linear_probe(z: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float = DEFAULT_L2,
                     bias: bool = True, max_iter: int = 500) -> ProbeFit:
    """``argmin_{W,b} (1/S) Σ_s CE(W z_s + b, y_s) + (λ/2)‖W D‖_F²`` (module docstring) by L-BFGS from zero
    (with ``bias=False``, ``b = 0``).

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
    # the fit runs on standardised features (L-BFGS is then well conditioned); without a bias, centring would
    # add one, so the features are only scaled
    mu = z.mean(0) if bias else torch.zeros(z.shape[1], dtype=torch.float64)
    sigma = z.std(0, unbiased=False).clamp_min(1e-12) if bias else z.pow(2).mean(0).sqrt().clamp_min(1e-12)
    zs = (z - mu) / sigma
    w = torch.zeros(num_labels, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=bias)
    opt = torch.optim.LBFGS([w, b] if bias else [w], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=GRAD_TOL * 1e-2, tolerance_change=1e-15, line_search_fn="strong_wolfe")

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
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()) if bias else 0.0)
    iterations = int(opt.state[w].get("n_iter", 0))
    with torch.no_grad():
        weight = w / sigma  # back to the coordinates of z: W z + b' = W_s (z − μ)/σ + b
        fit = ProbeFit(weight.detach(), (b - weight @ mu).detach() if bias else None, float(l2), float(value), grad,
                       iterations, 0.0)
        fit.train_accuracy = float((fit.logits(z).argmax(-1) == y).double().mean())
    return fit


def _cross_entropy(fit: ProbeFit, z: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a fitted probe on rows ``(z, y)``."""
    logits = fit.logits(z)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).double().mean())


def fit_head(system: ResidualSystem, examples: Sequence[Example], tokenizer: Any, *,
             held_out: Sequence[Example] = (), l2: float | Sequence[float] | None = None, max_length: int = 128,
             batch_size: int = 128, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Set the system's classification head to the linear probe on ``examples`` (module docstring); its report.

    ``l2``: one λ, or several to choose among by the cross-entropy of ``held_out`` (default: :data:`L2_GRID` with
    held-out rows, :data:`DEFAULT_L2` without).  Fit it before the controllers attach (they then design and
    train from the fitted head); attached controllers are not moved, and the probe is that of their current
    controls.  Returns ``{l2, l2_at_edge, l2_scores, rows, held_out, objective, grad_norm, converged, iterations,
    train_accuracy, held_out_loss, held_out_accuracy}`` (``l2_scores``: per λ tried, the held-out loss and
    accuracy; ``l2_at_edge``: the chosen λ is the smallest or largest tried).  ``cache_dir``: where
    :func:`head_inputs` keeps the features on disk (None: computed every time).

    Raises:
        ValueError: the system's readout has no classification head this fits (:func:`head_layer`), several λ
            without held-out rows, or a failed fit (non-finite states or objective).
    """
    readout = system.readout
    layer = head_layer(readout)
    if l2 is None:
        grid = L2_GRID if held_out else (DEFAULT_L2,)
    else:
        grid = (float(l2),) if isinstance(l2, (int, float)) else tuple(float(v) for v in l2)
    if not grid:
        raise ValueError("give at least one probe penalty λ")
    if len(grid) > 1 and not held_out:
        raise ValueError(f"choosing the probe's λ among {list(grid)} needs held-out rows (held_out=...)")
    z, y = head_inputs(system, examples, tokenizer, max_length, batch_size, cache_dir)
    zv, yv = head_inputs(system, held_out, tokenizer, max_length, batch_size, cache_dir) if held_out else (None, None)
    if yv is not None:
        _check_labels(yv, readout.num_labels, "the held-out rows")
    fits = [fit_linear_probe(z, y, readout.num_labels, lam, bias=layer.bias is not None) for lam in grid]
    scores = [_cross_entropy(f, zv, yv) if zv is not None else (None, None) for f in fits]
    best = min(range(len(fits)), key=lambda i: (scores[i][0] if scores[i][0] is not None else 0.0, i))
    fit = fits[best]
    with torch.no_grad():
        layer.weight.copy_(fit.weight.to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(fit.bias.to(layer.bias))
    return {"l2": fit.l2, "l2_at_edge": len(fits) > 1 and best in (0, len(fits) - 1),
            "l2_scores": [{"l2": f.l2, "held_out_loss": s[0], "held_out_accuracy": s[1]} for f, s in zip(fits, scores)],
            "rows": len(examples), "held_out": len(held_out), "objective": fit.objective,
            "grad_norm": fit.grad_norm, "converged": fit.converged, "iterations": fit.iterations,
            "train_accuracy": fit.train_accuracy, "held_out_loss": scores[best][0],
            "held_out_accuracy": scores[best][1]}


def init_head(system: ResidualSystem, how: str, train_rows: Sequence[Example], tokenizer: Any, *,
              val_size: float | None = None, val_seed: int = 0, max_length: int = 128,
              batch_size: int = 128, cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Start a run's head as ``how`` says (:data:`HEAD_INITS`): ``random`` leaves the readout's seeded head (None);
    ``probe`` fits it (:func:`fit_head`) on the rows the run trains on, its ``val_size`` validation rows (the
    same hold-out :func:`~controltune.train.train` makes) choosing λ, and returns the fit's report (``cache_dir``:
    :func:`head_inputs`').

    Call it before the controllers attach, so that a designed controller designs from the fitted head.

    Raises:
        ValueError: an unknown ``how``, or what :func:`fit_head` refuses.
    """
    if how not in HEAD_INITS:
        raise ValueError(f"head initialisation {how!r} is not one of {', '.join(HEAD_INITS)}")
    if how == "random":
        return None
    fit_rows, held = validation_split(train_rows, val_size, val_seed) if val_size is not None else (train_rows, [])
    return fit_head(system, fit_rows, tokenizer, held_out=held, max_length=max_length, batch_size=batch_size,
                    cache_dir=cache_dir)
