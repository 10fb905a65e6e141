"""Registry of supported architecture families (one module per structural kind)."""

from __future__ import annotations

from .base import QKV, BlockAnatomy, Context, Family, HeadGeometry
from .decoder import GPT2, LLAMA
from .encoder import BERT, ROBERTA

FAMILIES: dict[str, Family] = {f.name: f for f in (BERT, ROBERTA, GPT2, LLAMA)}


class UnsupportedArchitectureError(ValueError):
    """A model whose family controltune does not know."""


def find_family(config: object) -> Family | None:
    """The family handling a HF config, by ``config.model_type``; None if no family does."""
    model_type = getattr(config, "model_type", None)
    return next((fam for fam in FAMILIES.values() if model_type in fam.model_types), None)


def family_of(config: object) -> Family:
    """The family handling a HF config, by ``config.model_type``; an error naming the supported types."""
    fam = find_family(config)
    if fam is not None:
        return fam
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(f"{t} ({f.name})" for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported model types: {supported}. "
        "A new family is a Family entry in controltune/families/."
    )


__all__ = ["FAMILIES", "QKV", "BlockAnatomy", "Context", "Family", "HeadGeometry", "UnsupportedArchitectureError",
           "family_of", "find_family"]
