"""Helpers the figure scripts of this folder share: reading results, rebuilding commands, formatting numbers.

The house style, :class:`~controltune.figures.FigureSpec` and ``new_figure`` come from the library
(:mod:`controltune.figures`); what a result file holds is known only here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


def load_json(results_dir: Path, name: str) -> dict[str, Any]:
    """The JSON result ``results_dir / name`` (a clear error if it is missing)."""
    path = Path(results_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} does not exist")
    return json.loads(path.read_text())


def argv_from_config(prefix: Iterable[str], config: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """``prefix --key value ...`` for ``keys`` of a result's ``config`` (the flags its script takes).

    ``snake_case`` keys become ``--kebab-case`` flags; ``True`` is a bare flag, ``False`` and
    ``None`` are left out, a list gives one value per item.
    """
    argv = list(prefix)
    for key in keys:
        value = config.get(key)
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def sci(x: float | None, digits: int = 1) -> str:
    """``x`` in short scientific notation (``3.3e-10``); ``0`` and ``-`` for zero and missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}e}".replace("e-0", "e-").replace("e+0", "e+")


def versions_line(payload: Mapping[str, Any]) -> str:
    """``torch 2.13.0+cpu, transformers 5.23.0`` from a result's ``versions`` stamp."""
    v = payload.get("versions", {})
    return ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "controltune") if k in v)


def two_se_sign(a: tuple[float, float | None, int], b: tuple[float, float | None, int]) -> int | None:
    """The sign of ``b − a`` by the two-standard-error rule on ``(mean, std, n)`` over seeds: 1 when
    ``b − a > 2·se``, −1 when below ``−2·se``, 0 within, ``se = (s_a²/n_a + s_b²/n_b)^{1/2}``; None when either
    has fewer than two seeds or no spread recorded."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if sa is None or sb is None or na < 2 or nb < 2:
        return None
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    diff = mb - ma
    return 1 if diff > 2 * se else -1 if diff < -2 * se else 0


def seed_listing(cells: Iterable[Mapping[str, Any]], key: str, label: Callable[[Mapping[str, Any]], str]
                 ) -> list[str]:
    """``["<label> seed 2", "<label> seeds 0, 1", ...]`` for the cells whose ``key`` lists seeds."""
    return [f"{label(c)} seed{'s' if len(c[key]) > 1 else ''} {', '.join(map(str, c[key]))}"
            for c in cells if c.get(key)]


def flagged_runs_note(cells: Iterable[Mapping[str, Any]], label: Callable[[Mapping[str, Any]], str]) -> str:
    """The cells' runs a mean does not show plainly: seeds whose reported deltas predict one class for every dev
    row (``one_class_seeds``: a constant prediction's score, counted in the mean) or to at least 95 % of them
    (``near_one_class_seeds``, :data:`verdicts.NEAR_ONE_CLASS`), seeds that diverged
    (``diverged_seeds``: no score, left out of it), and cells that diverged at every rate tried
    (``diverged_every_rate``: no seed run, no comparison), and cells whose chosen rate is the edge of the rates
    tried (:func:`edge_rate_note`); ``""`` when there are none."""
    cells = list(cells)
    one, diverged, near = (seed_listing(cells, k, label)
                           for k in ("one_class_seeds", "diverged_seeds", "near_one_class_seeds"))
    everywhere = [label(c) for c in cells if c.get("diverged_every_rate")]
    return ((" Runs whose reported deltas predict one class for every dev row (a constant prediction's score, "
             "counted in the means shown): " + "; ".join(one) + "." if one else "")
            + (" Runs whose reported deltas give one class to at least 95 % of dev rows (nearly a constant "
               "prediction, counted in the means shown): " + "; ".join(near) + "." if near else "")
            + (" Runs that diverged (no score; the means are over the other seeds): " + "; ".join(diverged) + "."
               if diverged else "")
            + (" Diverged at every rate tried (no seed run at a chosen rate, left out of every comparison): "
               + "; ".join(everywhere) + "." if everywhere else "")
            + edge_rate_note(cells, label))


def edge_rate_note(cells: Iterable[Mapping[str, Any]], label: Callable[[Mapping[str, Any]], str]) -> str:
    """The cells whose chosen rate is the highest or the lowest rate tried (``rate_at_edge``, set by the study's
    summary; the studies' ``rate_selection.next_edge_rate`` continues a grid past its edge a few steps): the rates
    tried do not bracket their optimum, so their score may be the grid's rather than the method's; ``""`` when
    there are none."""
    edge = [f"{label(c)} (rate {c['lr']:.3g})" for c in cells if c.get("rate_at_edge")]
    return (" Rate chosen at the highest or lowest rate tried, the grid's edge rates included (the optimum is not "
            "bracketed; the score may be the grid's, not the method's): " + "; ".join(edge) + "." if edge else "")


def regret_note(found: dict[str, dict[str, Any]]) -> str:
    """Per task, how often the validation rows chose the rate that scored best on dev among the rates tried
    (seed 0), and what the choice cost on dev (``selection_regret`` of the summary)."""
    if not found:
        return ""
    parts = [f"{t}: {e['pairs']} pairs, {e['same_rate']} chose it, mean cost {e['mean_regret']:.3f}, largest "
             f"{' '.join(map(str, e['largest']['pair'][1:]))} ({e['largest']['regret']:.3f}: rate "
             f"{e['largest']['lr']:g} chosen, {e['largest']['best_dev_lr']:g} best on dev)"
             for t, e in sorted(found.items())]
    return (" Rates chosen on validation rows against the rate best on dev among those tried (seed-0 runs; a dev "
            "maximum is one noisy draw per rate, so the cost overstates what a perfect choice would gain on "
            "average): " + "; ".join(parts) + ".")


def chance_text(chance: Mapping[str, Any] | None, subject: str = "every design equal to LoRA") -> str:
    """`` Were every design equal to LoRA, the rule would call 2.1 wins in these 36 comparisons by chance (…);
    1 was called.`` from a study's ``chance`` (``verdicts.chance_wins``); empty without comparisons."""
    if not chance or not chance.get("comparisons"):
        return ""
    n, wins = chance["comparisons"], chance["wins"]
    return (f" Were {subject}, the rule would call {chance['expected_wins']:.1f} wins in these {n} "
            f"comparison{'' if n == 1 else 's'} by chance (P(t > 2), t with each comparison's pooled degrees of "
            f"freedom: 0.058 at 3 seeds a side, 0.040 at 5); {wins} {'was' if wins == 1 else 'were'} called.")
