"""Check the Pontryagin co-states and Hamiltonian gradients three independent ways.

For a system with controllers attached, :func:`verify` compares the output of
:func:`~controltune.pmp.solve_costate` (``p_l`` and ``∇_u H``; DESIGN.md §1:
``p_l = −∂J/∂x_l`` and ``∇_u H = −∂J/∂u`` exactly) with three references, the *legs*:

1. **autograd** (reverse mode, whole tensors): one global reverse pass through a plain
   rollout gives ``−∂J/∂x_l`` for every state and ``−∂J/∂u`` for every control;
   ``rel(a, b) = ‖a − b‖ / max(‖b‖, tiny)`` (Frobenius norms).
2. **forward** (forward-mode AD; no reverse pass anywhere): the directional derivative of
   the cost, exact to rounding, along

   * one random direction ``v`` per control: ``dJ/dt (u + t v)`` vs ``−⟨∇_u H, v⟩``;
   * ``n_state_directions`` random directions per state x_l: ``dΦ̄/dt`` of blocks
     ``l..L−1`` re-run from ``x_l + t v`` vs ``−⟨p_l, v⟩``;
   * one joint direction over all controls at once, from the embedding (no assumption
     on where a control acts).

   A layer control of block l (an initial control) gets one JVP of block l (of the
   embedding) with its parameter made a dual tensor in place (``torch.autograd.forward_ad``),
   giving its tangent ``w = ∂f_l/∂u · v`` of ``x_{l+1}`` (of ``x_0``) and ``dR``; all these
   tangents and the state directions are then carried through the remaining blocks in
   one batch (``torch.func.jvp`` under ``vmap``: one primal pass per block for all of
   them).  Shared controls get one JVP of the cost from their first block, terminal ones
   of the readout.  Forward mode through attention needs the ``eager`` kernel (``sdpa``
   on CPU has no forward-mode rule): the forward and FD legs switch to it and back.
3. **finite differences** (no AD at all): Richardson-extrapolated central differences
   ``D = (4 D(h/2) − D(h)) / 3``, ``D(h) = (J(+h) − J(−h)) / 2h``, along

   * one joint direction over all controls, from the embedding, with the whole running cost;
   * one direction per *group* of controls: the layer controls of block l (block l re-run
     from the cached state x_l with the controls moved, running cost ``R_l``), each shared
     control alone (from its first block), the initial controls, the terminal controls;
   * ``fd_state_directions`` directions per state x_l (blocks ``l..L−1`` re-run).

   The perturbed states of the state and layer/initial-group checks are carried through
   the blocks in one batch (``vmap``); these few directions replace one per control, the
   cost of the former check.  A difference is *smooth* when ``D(h)`` and ``D(h/2)`` agree
   and the second differences scale as ``h²`` (``4 S(h/2) = S(h)``, ``S(s) = J(s) − 2J(0) + J(−s)``)
   beyond rounding; the first test misses a kink at the point (both quotients take half the
   jump: SmolLM2's UniPELT passed it with an error of 1.5e-5 at ``p_7``), the second a kink at a
   third of the step, together none.  A difference that is not smooth (a kink such as a ReLU
   within the step) is redone at ``h / 10``, then ``h / 100`` and ``h / 1000``: on SmolLM2 an
   adapter's ReLU kinks downstream of the massive-activation block need ``h / 100`` (one
   refinement left a raw error of 2e-2).  A kink still there at ``h / 1000`` sits at the
   point itself: J has two one-sided slopes and, unless the kink is exactly at 0, a
   derivative equal to one of them, so the PMP slope is compared with the nearer one-sided
   Richardson slope (``fd_kinks`` lists these directions and their slope jumps).

Directions are *relative*: a control direction has the norm of its control,
``v = ‖u‖ ξ/‖ξ‖`` (``ξ`` standard normal; norm 1 for a zero control), and a state
direction has, token by token, the norm of that token's state,
``v_{s,t} = ‖x_{s,t}‖ ξ_{s,t}/‖ξ_{s,t}‖`` — real LLMs have "massive activations" (token
norms jumping from ~150 to ~2,400 at one layer), and a step scaled by the norm of the
whole batch would move the small tokens across ReLU kinks.  A step ``h`` thus moves
every control (or token) by ``h`` relative to its size; ``FD_STEP`` is ``1e-5`` (on
MiniLM, ``1e-4`` crosses the ReLU kinks of adapters, ``1e-6`` is rounding-limited).

Scalar relative error, for ``a`` from the PMP solution and ``b`` the reference:
``rel(a, b) = |a − b| / max(|b|, σ)`` with ``σ = ZERO_SCALE · |J| = 10⁻⁴ |J|``.  A directional
derivative along a relative direction below ``σ`` (moving the control by 100 % would change
the cost by less than 0.01 %) is compared in absolute terms, so two exact zeros (a key
bias under softmax, whose derivative vanishes: PMP ``~1e-21``, JVP ``~1e-19``) agree
instead of being a ratio of rounding noises.  Calibration on MiniLM (all methods,
float64): forward mode and PMP differ by at most ``4.3e-16 |J|`` in absolute terms, so
the floor contributes at most ``4e-12`` to a relative error (tolerance ``1e-10``), while a
1 % error in any derivative larger than ``1e-12 |J|`` still fails.

The finite-difference leg subtracts the resolution of the quotient,
``δ = 3 · FD_ROUNDING_ULPS · ε · max|J(±h)| / h`` (ε the float64 machine epsilon; 3 bounds
the noise gain of the Richardson combination; ``FD_ROUNDING_ULPS = 16``, measured need on
MiniLM ``≤ 1.3``, on SmolLM2 up to ~17): ``err = max(|a − D| − δ, 0) / max(|D|, σ)``.  Whatever δ allows, the
*raw* error ``|a − D| / max(|D|, σ)`` above ``FD_RAW_CEILING`` (``1e-2``) always fails.

Default tolerances: float64 ``1e-10`` for autograd and forward mode, ``1e-6`` for
finite differences.  A float32 system is checked against float32 autograd (``1e-4``),
while the forward and FD legs run on a float64 copy of it, with that copy's own co-state
solve, at the float64 tolerances (a float32 number compared with a float64 derivative
would only measure float32 rounding).

Straight-through controls (masking: ``m = 1[s > τ]`` forward, ``∂m/∂s := 1`` backward)
make J piecewise constant in s, so its finite differences are 0 while the estimator's
gradient is not: the forward and FD legs run under the estimator's linearisation at the
current control (``straight_through_linearisation()`` of the controllers that have one),
whose value equals J there and whose true derivative is, by construction, the
straight-through gradient.

The per-group FD directions and the factored per-control JVPs rely on each control's
declared ``kind`` and ``layers`` (a layer control of block l acts in block l only, its
running cost is charged at l); the joint directions of both legs and the autograd leg
do not, so a control that acts where it does not say fails those.

``fd_mode="legacy"`` runs the former check (one central difference per control on the
step ladder ``FD_STEPS``, smallest error counts; :func:`finite_differences`), kept for
comparison and benchmarks.

Use a running cost with nonzero weight decay so the ``R`` terms are exercised.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..control import ControlSystem
from ..pmp import CoStateSolution, solve_costate
from .differences import directional_differences, finite_differences, refined_difference, richardson
from .forward import forward_mode_check
from .reference import (
    ControlGroup,
    _batch_to,
    autograd_reference,
    control_direction,
    control_groups,
    eager_kernel,
    float64_twin,
    rollout,
    straight_through_linearised,
    token_direction,
    total_cost,
)
from .report import (
    FD_MODES,
    FD_RAW_CEILING,
    FD_STEP,
    FD_STEPS,
    TOLERANCES,
    Verification,
    relative_error,
    scalar_error,
)

# --- the check --------------------------------------------------------------------------


def verify(system: ControlSystem, batch: dict, solution: CoStateSolution | None = None, mode: str = "graph",
           fd: bool = True, n_state_directions: int = 2, fd_steps: Sequence[float] = FD_STEPS, seed: int = 0,
           tolerances: dict[str, float] | None = None, forward: bool = True, fd_mode: str = "directional",
           fd_step: float = FD_STEP, fd_state_directions: int = 1) -> Verification:
    """Compare the PMP solution with autograd, forward-mode AD and (optionally) finite differences.

    Args:
        system: a system with controllers attached (put it in eval mode: dropout off, deterministic gates).
        batch: the batch to check on (keep it small).
        solution: a precomputed :func:`solve_costate` result, else one is solved in ``mode``.
        fd: run the finite-difference leg.
        n_state_directions: random directions per state x_l of the forward leg (and of legacy FD).
        fd_steps: the legacy ladder of relative steps.
        tolerances: ``{"autograd": .., "forward": .., "fd": ..}``; defaults by dtype from :data:`TOLERANCES`.
        forward: run the forward-mode leg.
        fd_mode: ``directional`` (the default) or ``legacy`` (one central difference per control).
        fd_step: relative step h of the directional differences.
        fd_state_directions: random directions per state x_l of the directional FD leg.
    """
    if fd_mode not in FD_MODES:
        raise ValueError(f"fd_mode {fd_mode!r} is not one of {FD_MODES}")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    # The float64 copy is made before any forward pass: controllers may cache graph tensors, which deepcopy refuses.
    twin = float64_twin(system) if fd or forward else None
    if solution is None:
        solution = solve_costate(system, batch, mode=mode)
    seconds["solve"], clock = time.perf_counter() - clock, time.perf_counter()
    dtype = solution.states[0].dtype
    tol = dict(TOLERANCES.get(dtype, TOLERANCES[torch.float32]))
    tol.update(tolerances or {})
    neg_dx, neg_du = autograd_reference(system, batch)
    report = Verification(
        dtype=str(dtype).removeprefix("torch."), n_layers=solution.n_layers, n_controls=len(solution.controls),
        costate_autograd=[0.0 if p is None else relative_error(p, r) for p, r in zip(solution.costates, neg_dx)],
        control_autograd={name: relative_error(solution.control_grads[name], ref) for name, ref in neg_du.items()},
        tol_autograd=tol["autograd"], tol_forward=tol["forward"], tol_fd=tol["fd"], fd_mode=fd_mode,
        fd_step=fd_step if fd_mode == "directional" else 0.0, seconds=seconds)
    seconds["autograd"], clock = time.perf_counter() - clock, time.perf_counter()
    if twin is None:
        return report
    batch64 = _batch_to(batch, torch.float64)
    twin_solution = solution if twin is system else _solve_twin(twin, batch64, mode)
    seconds["solve"] += time.perf_counter() - clock
    gen = torch.Generator().manual_seed(seed + 1)
    directions = {c.name: control_direction(c.param, gen) for c in twin.controls()}  # shared by both legs
    with straight_through_linearised(twin), eager_kernel(twin):
        if forward:
            clock = time.perf_counter()
            found = forward_mode_check(twin, batch64, twin_solution, n_state_directions, seed, directions)
            report.costate_forward, report.control_forward, report.forward_joint = (found.costate, found.controls,
                                                                                    found.joint)
            seconds["forward"] = time.perf_counter() - clock
        if fd:
            clock = time.perf_counter()
            _fd_leg(report, twin, batch64, twin_solution, fd_mode, fd_step, fd_state_directions, n_state_directions,
                    fd_steps, seed, directions)
            seconds["fd"] = time.perf_counter() - clock
    return report


def _solve_twin(twin: ControlSystem, batch64: dict, mode: str) -> CoStateSolution:
    try:
        return solve_costate(twin, batch64, mode=mode)
    except RuntimeError as err:
        raise RuntimeError(f"the float64 copy for the forward and FD legs does not run ({err}); a controller "
                           "probably keeps tensors that Module.to(float64) does not convert (plain attributes "
                           "instead of parameters or buffers)") from err


def _fd_leg(report: Verification, twin: ControlSystem, batch64: dict, solution: CoStateSolution, fd_mode: str,
            fd_step: float, fd_state_directions: int, n_state_directions: int, fd_steps: Sequence[float],
            seed: int, directions: dict[str, torch.Tensor]) -> None:
    """Fill the FD fields of ``report`` (directional or legacy)."""
    if fd_mode == "legacy":
        report.costate_fd, report.fd_directions, raw = finite_differences(twin, batch64, solution,
                                                                          n_state_directions, fd_steps, seed)
        report.control_fd = dict(report.fd_directions)
        report.fd_directions_raw = {"legacy ladder (max)": raw}
        return
    found = directional_differences(twin, batch64, solution, fd_state_directions, fd_step, seed, report.tol_fd,
                                    directions)
    report.costate_fd, report.costate_fd_raw = found.costate, found.costate_raw
    report.fd_directions, report.fd_directions_raw = found.directions, found.directions_raw
    report.fd_refined, report.fd_kinks = found.refined, found.kinks
    groups = control_groups(twin, list(twin.controls()))
    for group in groups[1:] if len(groups) > 1 else groups:
        for c in group.controls:
            report.control_fd[c.name] = report.fd_directions[group.label]


__all__ = ["FD_RAW_CEILING", "FD_STEP", "TOLERANCES", "ControlGroup", "Verification", "autograd_reference",
           "control_direction", "control_groups", "directional_differences", "finite_differences",
           "float64_twin", "forward_mode_check", "refined_difference", "relative_error", "richardson",
           "rollout", "scalar_error", "token_direction", "total_cost", "verify"]
