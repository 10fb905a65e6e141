"""Registry of supported architecture families (one module per structural kind)."""

from __future__ import annotations

from .base import Context, Family
from .decoder import GPT2, LLAMA
from .encoder import BERT, ROBERTA

FAMILIES: dict[str, Family] = {f.name: f for f in (BERT, ROBERTA, GPT2, LLAMA)}


class UnsupportedArchitectureError(ValueError):
    """A model whose family controltune does not know."""


def family_of(config: object) -> Family:
    """The family handling a HF config, by ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(f"{t} ({f.name})" for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported model types: {supported}. "
        "A new family is a Family entry in controltune/families/."
    )


__all__ = ["FAMILIES", "Context", "Family", "UnsupportedArchitectureError", "family_of"]
