"""Linear probing: the reference with no control at all.

``u = ∅``: the frozen model's trajectory ``x_{l+1} = x_l + f_l(x_l)`` is left as it is and only the readout
head trains on ``x_L`` (a linear probe of the frozen features).  Every delta method trains the same head
beside its controls, so this is the level a method's controls must rise above to have done anything: the
base of "share of the gain recovered" (unified subspace) and of "smallest budget that beats it" (APET).
There are no co-states to check: ``controltune verify`` skips it, naming why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Control, Controller, register

if TYPE_CHECKING:
    from ..system import ResidualSystem


@register
class LinearProbe(Controller):
    """No delta: only the readout head trains (``n_trainable`` is 0; the head is not a control)."""

    method = "linear_probe"
    group = "reference"
    form = "θ -> θ0 (no control; only the readout head trains)"

    def __init__(self) -> None:
        super().__init__(weight_decay=0.0)

    def attach(self, system: ResidualSystem) -> None:
        self.sites = []

    def controls(self) -> list[Control]:
        return []
