"""Greedy allocation of a trainable-parameter budget over candidate delta sites.

Each candidate ``i`` offers units (a whole module at a fixed rank, or one more rank of a
LoRA) with non-increasing marginal gains ``g_i(1) ≥ g_i(2) ≥ …`` at ``cost_i`` parameters per
unit.  :func:`greedy_allocate` repeatedly takes the affordable unit of largest gain per
parameter until no unit fits: the total cost never exceeds the budget and, when it stops,
no remaining unit fits in what is left.  (With equal costs this is the exact optimum of the
separable concave allocation; with unequal costs it is the standard density greedy.)
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

__all__ = ["allocation_cost", "greedy_allocate"]


def greedy_allocate(gains: Mapping[str, Sequence[float]], costs: Mapping[str, int], budget: int) -> dict[str, int]:
    """Units per candidate under ``Σ_i units_i·cost_i ≤ budget``.

    Args:
        gains: ``name -> marginal gains`` of its successive units (finite, non-increasing).
        costs: ``name -> parameters per unit`` (positive ints), same keys as ``gains``.
        budget: total parameters allowed (>= 0).

    Returns:
        ``name -> number of units`` (0 for candidates not chosen); ties are broken by name.
    """
    if set(gains) != set(costs):
        raise ValueError(f"gains and costs must have the same candidates; only in gains: "
                         f"{sorted(set(gains) - set(costs))}, only in costs: {sorted(set(costs) - set(gains))}")
    if int(budget) < 0:
        raise ValueError(f"budget must be >= 0 parameters, got {budget}")
    for name, g in gains.items():
        if int(costs[name]) < 1:
            raise ValueError(f"candidate {name!r}: cost per unit must be a positive int, got {costs[name]}")
        if any(b > a for a, b in zip(g, g[1:])):
            raise ValueError(f"candidate {name!r}: marginal gains must be non-increasing, got {list(g)}")
    units = dict.fromkeys(gains, 0)
    left = int(budget)
    heap = [(-g[0] / costs[n], n) for n, g in gains.items() if len(g)]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if costs[name] > left:
            continue  # never fits again: the budget only shrinks
        units[name] += 1
        left -= int(costs[name])
        nxt = units[name]
        if nxt < len(gains[name]):
            heapq.heappush(heap, (-gains[name][nxt] / costs[name], name))
    return units


def allocation_cost(units: Mapping[str, int], costs: Mapping[str, int]) -> int:
    """``Σ_i units_i·cost_i``."""
    return sum(int(u) * int(costs[n]) for n, u in units.items())
