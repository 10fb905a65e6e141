"""Delta methods as controllers.  Importing this package registers every method."""

from __future__ import annotations

from . import lora  # noqa: F401  (registers)
from .base import REGISTRY, Control, Controller, UnsupportedMethodError, build, register

__all__ = ["REGISTRY", "Control", "Controller", "UnsupportedMethodError", "build", "register"]
