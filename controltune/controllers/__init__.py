"""Delta methods as controllers.  Importing this package registers every method.

One module per method family; each registers its controllers with ``@register``.
"""

from __future__ import annotations

import importlib

from .base import REGISTRY, Control, Controller, UnsupportedMethodError, build, register

_MODULES = (
    "lora", "adapter", "prefix", "prompt", "ia3", "unipelt",                     # addition / reparam.
    "specification", "diff_pruning", "masking", "subspace", "full",              # specification / reference
    "composition",                                                               # combination
    "closed_loop_prefix", "riccati_delta", "costate_lora",                       # control-designed deltas
)
for _m in _MODULES:
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["REGISTRY", "Control", "Controller", "UnsupportedMethodError", "build", "register"]
