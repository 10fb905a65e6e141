"""The result of a verification: errors per leg, tolerances and the pass/fail rule.

Scalar and tensor relative errors, the constants of the legs (steps, ceilings, tolerances)
and :class:`Verification`; see :mod:`controltune.verification` for what each leg checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

FD_STEPS = (1e-6, 1e-5)
"""Legacy mode: relative finite-difference steps tried (the smallest error counts)."""

FD_STEP = 1e-5
"""Relative step h of the directional finite differences (Richardson uses h and h/2)."""

FD_RAW_CEILING = 1e-2
"""A finite-difference error above this, without any resolution allowance, always fails."""

FD_ROUNDING_ULPS = 16.0
"""Rounding error of one cost evaluation, in units of ε·|J|, assumed by the FD resolution δ.

Measured need: at most 1.3 on MiniLM; on SmolLM2 (30 blocks, massive activations of ~2e4) the
fourth differences of J along smooth directions show 5–17 ulps per evaluation (``costate_lora``),
and central differences disagreeing by ~3× the 4-ulp model at every step from 1e-5 to 1e-8."""

FD_KINK_ULPS = 32.0
"""Rounding allowance of the FD kink test (the fourth difference), in units of ε·|J| per evaluation.

Larger than :data:`FD_ROUNDING_ULPS`: the value at the unperturbed point can be offset against its
neighbours by rounding that does not average out (SmolLM2 with ``costate_lora``: fourth differences
of 3e-14 to 5e-14 at |J| ≈ 0.7, i.e. up to ~17 ulps per evaluation, at every step from 1e-5 to 1e-8)."""

ZERO_SCALE = 1e-4
"""σ = ZERO_SCALE·|J|: the floor of the denominator of a scalar relative error (see the module docstring)."""

FD_MODES = ("directional", "legacy")

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"autograd": 1e-10, "forward": 1e-10, "fd": 1e-6},
    torch.float32: {"autograd": 1e-4, "forward": 1e-10, "fd": 1e-6},  # forward and FD run on the float64 copy
}

VMAP_CHUNK = 64
"""Tangents pushed through the blocks in one ``vmap`` call."""

_TINY = torch.finfo(torch.float64).tiny
_EPS = torch.finfo(torch.float64).eps


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / max(‖b‖, tiny)`` (Frobenius norms, computed in float64)."""
    a64, b64 = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    tiny = torch.finfo(torch.as_tensor(b).dtype if torch.as_tensor(b).is_floating_point() else torch.float64).tiny
    return float((a64 - b64).norm() / max(float(b64.norm()), tiny))


def scalar_error(a: float, b: float, scale: float) -> float:
    """``|a − b| / max(|b|, scale)``: relative error of a directional derivative, ``scale`` its zero floor σ."""
    return abs(a - b) / max(abs(b), scale, _TINY)


# --- the result ------------------------------------------------------------------------


@dataclass
class Verification:
    """Per-layer and per-control relative errors of the PMP solution, leg by leg.

    Attributes:
        dtype: the system's dtype (``float32``/``float64``).
        n_layers, n_controls: sizes of the system checked.
        costate_autograd: ``rel(p_l, −∂J/∂x_l)`` for l = 0..L.
        control_autograd: ``name -> rel(∇_u H, −∂J/∂u)``.
        costate_forward: per layer l, the largest ``rel(−⟨p_l, v⟩, JVP)`` over the state directions
            (empty when the leg did not run).
        control_forward: ``name -> rel(−⟨∇_u H, v⟩, dJ/dt(u + t v))`` (one direction per control).
        forward_joint: the same for one direction over all controls at once.
        costate_fd, costate_fd_raw: per layer, the largest FD error of ``−⟨p_l, v⟩`` with / without δ.
        fd_directions, fd_directions_raw: ``label -> FD error`` with / without δ, one per direction:
            ``all`` (joint), ``layer <l>``, ``shared <name>``, ``init``, ``term`` (legacy mode: a
            control name per direction).
        control_fd: ``name -> FD error of the direction that perturbs the control`` (its group's;
            a per-control view of ``fd_directions`` for figures that place controls by layer).
        tol_autograd, tol_forward, tol_fd: the tolerances used; fd_raw_ceiling: the raw ceiling.
        fd_mode, fd_step: ``directional`` (step h, Richardson) or ``legacy`` (ladder, step 0 here).
        fd_refined: FD directions whose step was refined because of a kink (``p_<l>`` for states).
        fd_kinks: ``direction -> slope jump`` of the FD directions with a kink at the point at
            every step tried; their errors are against the nearer one-sided slope.
        zero_scale: σ/|J| of :func:`scalar_error`.
        seconds: wall time per leg (``solve``, ``autograd``, ``forward``, ``fd``).
        fd_raw_max: the largest raw FD error.
    """

    dtype: str
    n_layers: int
    n_controls: int
    costate_autograd: list[float]
    control_autograd: dict[str, float]
    costate_forward: list[float] = field(default_factory=list)
    control_forward: dict[str, float] = field(default_factory=dict)
    forward_joint: float | None = None
    costate_fd: list[float] = field(default_factory=list)
    costate_fd_raw: list[float] = field(default_factory=list)
    fd_directions: dict[str, float] = field(default_factory=dict)
    fd_directions_raw: dict[str, float] = field(default_factory=dict)
    control_fd: dict[str, float] = field(default_factory=dict)
    tol_autograd: float = 1e-10
    tol_forward: float = 1e-10
    tol_fd: float = 1e-6
    fd_raw_ceiling: float = FD_RAW_CEILING
    fd_mode: str = "directional"
    fd_step: float = FD_STEP
    fd_refined: list[str] = field(default_factory=list)
    fd_kinks: dict[str, float] = field(default_factory=dict)
    zero_scale: float = ZERO_SCALE
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def max_rel_err_costate(self) -> float:
        return max(self.costate_autograd, default=0.0)

    @property
    def max_rel_err_control_grad(self) -> float:
        return max(self.control_autograd.values(), default=0.0)

    @property
    def max_rel_err_forward(self) -> float:
        joint = [] if self.forward_joint is None else [self.forward_joint]
        return max([*self.costate_forward, *self.control_forward.values(), *joint], default=0.0)

    @property
    def max_rel_err_fd(self) -> float:
        return max([*self.costate_fd, *self.fd_directions.values()], default=0.0)

    @property
    def fd_raw_max(self) -> float:
        return max([*self.costate_fd_raw, *self.fd_directions_raw.values()], default=0.0)

    @property
    def legs(self) -> dict[str, dict[str, Any]]:
        """``leg -> {tolerance, max_error, n_checks, seconds}`` (FD also ``raw_ceiling``, ``max_raw_error``)."""
        out = {"autograd": {"tolerance": self.tol_autograd,
                            "max_error": max(self.max_rel_err_costate, self.max_rel_err_control_grad),
                            "n_checks": len(self.costate_autograd) + len(self.control_autograd)}}
        if self.control_forward or self.costate_forward:
            out["forward"] = {"tolerance": self.tol_forward, "max_error": self.max_rel_err_forward,
                              "n_checks": len(self.costate_forward) + len(self.control_forward)
                              + (self.forward_joint is not None)}
        if self.fd_directions or self.costate_fd:
            out["fd"] = {"tolerance": self.tol_fd, "max_error": self.max_rel_err_fd,
                         "raw_ceiling": self.fd_raw_ceiling, "max_raw_error": self.fd_raw_max,
                         "n_checks": len(self.costate_fd) + len(self.fd_directions), "mode": self.fd_mode,
                         "step": self.fd_step, "refined": list(self.fd_refined),
                         "kinks": dict(self.fd_kinks)}
        for leg, info in out.items():
            info["seconds"] = self.seconds.get(leg)
        return out

    def failures(self) -> list[str]:
        """Readable list of every check above its tolerance (empty when all pass)."""
        out = _over(self.costate_autograd, self.tol_autograd, "p_{} vs autograd")
        out += _over(self.control_autograd, self.tol_autograd, "grad_u H[{}] vs autograd")
        out += _over(self.costate_forward, self.tol_forward, "p_{} vs forward mode")
        out += _over(self.control_forward, self.tol_forward, "grad_u H[{}] vs forward mode")
        if self.forward_joint is not None:
            out += _over({"all controls": self.forward_joint}, self.tol_forward, "grad_u H[{}] vs forward mode")
        out += _over(self.costate_fd, self.tol_fd, "p_{} vs finite differences")
        out += _over(self.fd_directions, self.tol_fd, "grad_u H[{}] vs finite differences")
        out += _over(self.costate_fd_raw, self.fd_raw_ceiling, "p_{} vs finite differences (raw)")
        out += _over(self.fd_directions_raw, self.fd_raw_ceiling, "grad_u H[{}] vs finite differences (raw)")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(max_rel_err_costate=self.max_rel_err_costate,
                   max_rel_err_control_grad=self.max_rel_err_control_grad,
                   max_rel_err_forward=self.max_rel_err_forward, max_rel_err_fd=self.max_rel_err_fd,
                   fd_raw_max=self.fd_raw_max, legs=self.legs, passed=self.passed, failures=self.failures())
        return out


def _over(errors: Sequence[float] | dict[str, float], tol: float, what: str) -> list[str]:
    """``"<what>: err > tol"`` for each error above ``tol`` (NaN fails); ``what`` has a ``{}`` for the key."""
    items = errors.items() if isinstance(errors, dict) else enumerate(errors)
    return [f"{what.format(k)}: {e:.2e} > {tol:g}" for k, e in items if not e <= tol]
