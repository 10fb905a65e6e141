"""A trust-region step along a fixed direction: the largest step the held-out cost agrees with.

Along a direction ``D`` with first-order slope ``dJ/dη = −‖D‖²`` (``D = ∇_u H``, DESIGN.md §1:
moving the controls by ``η D`` lowers J by ``η ‖D‖²`` to first order), a step of norm ``Δ``
(``η = Δ / ‖D‖``) *predicts* the decrease ``pred(Δ) = Δ ‖D‖``.  Its agreement ratio on rows
not used to compute ``D`` is

    ρ(Δ) = (J(0) − J(η)) / pred(Δ).

:func:`trust_region_radius` tries ``Δ_k = Δ_0 · shrink^{−k}``, k = 0..K, and accepts the largest
``Δ_k`` with ``ρ ≥ accept`` (classic trust-region acceptance, here without the expansion step:
``Δ_0`` is the largest radius allowed).  A step that raises the held-out cost has ``ρ < 0`` and is
never taken; when no radius qualifies, the result is 0 (no step).  Unlike a line search that
minimises the held-out J over the grid, it cannot pick a step far beyond where the linear model
holds (a line search took a step of 25.6 against 0.15–0.38 on the other seeds in the design
study of ``costate_lora``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["TrustRegionStep", "trust_region_radius"]


@dataclass
class TrustRegionStep:
    """The accepted radius and every trial.

    Attributes:
        radius: accepted ``Δ`` (0.0 when none was accepted).
        eta: ``Δ / ‖D‖``, the step along D.
        j0: J(0) on the held-out rows.
        trials: ``[{radius, eta, j, predicted, ratio}]`` in the order tried.
    """

    radius: float
    eta: float
    j0: float
    trials: list[dict[str, float]] = field(default_factory=list)


def trust_region_radius(cost: Callable[[float], float], direction_norm: float, radius0: float,
                        shrink: float = 2.0, steps: int = 8, accept: float = 0.25) -> TrustRegionStep:
    """The largest ``Δ ∈ {Δ_0 shrink^{−k}}`` with ``ρ(Δ) ≥ accept`` (module docstring).

    Args:
        cost: ``η -> J(η)`` on held-out rows (``η = 0``: no step).
        direction_norm: ``‖D‖`` (> 0).
        radius0: the largest radius ``Δ_0`` (> 0).
        shrink: factor between successive radii (> 1).
        steps: radii tried after ``Δ_0``.
        accept: smallest agreement ratio accepted (0 < accept < 1).
    """
    if not direction_norm > 0:
        raise ValueError(f"the direction is zero (‖D‖ = {direction_norm}); there is no descent step to take")
    if not radius0 > 0 or not shrink > 1 or not 0 < accept < 1 or steps < 0:
        raise ValueError(f"need radius0 > 0, shrink > 1, 0 < accept < 1, steps >= 0; got {radius0}, {shrink}, "
                         f"{accept}, {steps}")
    j0 = float(cost(0.0))
    out = TrustRegionStep(0.0, 0.0, j0)
    for k in range(steps + 1):
        radius = radius0 * shrink ** -k
        eta = radius / direction_norm
        j = float(cost(eta))
        predicted = radius * direction_norm
        ratio = (j0 - j) / predicted
        out.trials.append({"radius": radius, "eta": eta, "j": j, "predicted": predicted, "ratio": ratio})
        if ratio >= accept:
            out.radius, out.eta = radius, eta
            break
    return out
