"""Delta methods as controllers.  Importing this package registers every method.

One module per method family; each registers its controllers with ``@register``.
"""

from __future__ import annotations

import importlib

from .base import ALIASES, REGISTRY, Control, Controller, UnsupportedMethodError, build, canonical, register

_MODULES = (
    "lora", "adapter", "prefix", "prompt", "ia3", "unipelt",                     # addition / reparam.
    "specification", "diff_pruning", "masking", "subspace", "unified", "full",   # specification / reference
    "linear_probe",
    "composition",                                                               # combination
    "designed",                                                                  # control-designed deltas
    "peft_lora",                                                                 # peft's own LoRA layers
)
for _m in _MODULES:
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["ALIASES", "REGISTRY", "canonical", "Control", "Controller", "UnsupportedMethodError", "build", "register"]
