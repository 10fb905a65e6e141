"""Registry of supported architecture families (one module per structural kind).

A config is handled by the family listing its ``model_type``; a model type no family lists
is handled by a family that recognises it *by structure* (``Family.resolve``: the LLaMA
family recognises LLaMA-like decoders), or by the family it was registered for with
:func:`register_model_type`.  A model that a family cannot reproduce is refused with
:class:`UnsupportedArchitectureError` naming what differs.
"""

from __future__ import annotations

from .base import QKV, BlockAnatomy, Context, Family, HeadGeometry, UnsupportedArchitectureError
from .decoder import GPT2, LLAMA
from .encoder import BERT, ROBERTA

FAMILIES: dict[str, Family] = {f.name: f for f in (BERT, ROBERTA, GPT2, LLAMA)}

_REGISTERED: dict[str, str] = {}


def register_model_type(model_type: str, family: str) -> None:
    """Handle ``config.model_type == model_type`` with family ``family`` (one line per new model type).

    A family that checks structure (``Family.resolve``, e.g. ``llama``) still checks the
    registered type's modules and its forward before using it; the others take it as it is.
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    owner = next((f.name for f in FAMILIES.values() if model_type in f.model_types), None)
    if owner is not None and owner != family:
        raise ValueError(f"model_type {model_type!r} is already handled by family {owner!r}")
    _REGISTERED[model_type] = family


def _lookup(config: object) -> tuple[Family | None, str]:
    """``(family, "")`` for a handled config, else ``(None, why)`` (why may be empty: nothing matched)."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        listed = model_type in fam.model_types
        if listed or _REGISTERED.get(model_type) == fam.name:
            if fam.resolve is None:
                return fam, ""
            found = fam.resolve(config, listed)
            return (found, "") if isinstance(found, Family) else (None, f"family {fam.name!r}: {found}")
    if model_type is None:
        return None, ""
    reasons = []
    for fam in FAMILIES.values():
        if fam.resolve is not None:
            found = fam.resolve(config, False)
            if isinstance(found, Family):
                return found, ""
            reasons.append(f"not {fam.name}-like: {found}")
    return None, "; ".join(reasons)


def find_family(config: object) -> Family | None:
    """The family handling a HF config (by ``config.model_type``, registration or structure); None if none does."""
    return _lookup(config)[0]


def family_of(config: object) -> Family:
    """The family handling a HF config; an error naming what differs and the supported types otherwise."""
    fam, why = _lookup(config)
    if fam is not None:
        return fam
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(f"{t} ({f.name})" for f in FAMILIES.values() for t in f.model_types)
    because = f" ({why})" if why else ""
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported{because}; supported model types: {supported}, and "
        "decoders with the LLaMA module layout. A new family is a Family entry in controltune/families/; "
        "a model type of an existing family is one call, register_model_type(model_type, family)."
    )


__all__ = ["FAMILIES", "QKV", "BlockAnatomy", "Context", "Family", "HeadGeometry", "UnsupportedArchitectureError",
           "family_of", "find_family", "register_model_type"]
