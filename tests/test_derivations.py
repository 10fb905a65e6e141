"""The symbolic derivations in derivations/ hold (exact rational arithmetic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_costate_identities_hold_symbolically():
    path = Path(__file__).resolve().parents[1] / "derivations" / "costate.py"
    spec = importlib.util.spec_from_file_location("costate_derivation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.derive()
    assert len(results) == 8 and all(results.values()), results
