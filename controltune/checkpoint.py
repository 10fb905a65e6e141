"""Delta checkpoints: only the controls, never the frozen base model.

A checkpoint is one safetensors file holding every control variable of a system
(the controllers' ``u_l``, ``u_init``, ``u_term`` and the classification head,
keyed by :attr:`Control.name`) and, in its metadata, a JSON header with the
methods and options that built them, the base model's name and its
*fingerprint*: a sha256 over the names, shapes and a strided sample of the
values of the frozen base parameters.  Loading onto a different base model, or
into a system whose controls differ in name or shape, is refused with a message
naming what differs.

Frozen stages of a sequential combination are saved too (they are part of the
trained deltas although they are no longer controls); a controller exposes them
through an optional ``frozen_controls()`` method.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .controllers.base import Control

FORMAT = "controltune-delta/1"
_SAMPLES_PER_TENSOR = 64


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the system it is loaded into."""


# --- what is saved -------------------------------------------------------------------
def saved_controls(system) -> list[Control]:
    """Every delta tensor of ``system``: its controls plus frozen stages' controls."""
    out = list(system.controls())
    for c in system.controllers:
        frozen = getattr(c, "frozen_controls", None)
        if frozen is not None:
            out.extend(frozen())
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CheckpointMismatchError(f"control names must be unique to be saved; repeated: {dupes}")
    return out


def _is_delta_path(path: str) -> bool:
    # Deltas live inside the base model as ``<module>.delta.*`` (see controllers.base.wrap)
    # or under attributes set by prefix-style controllers (``ct_*``).
    parts = path.split(".")
    return "delta" in parts or any(p.startswith("ct_") for p in parts)


def base_parameters(system) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the base model's own parameters, in a wrapping-independent naming.

    Parameters of deltas and of controllers are excluded; the ``.base_layer`` that
    :func:`~controltune.controllers.base.wrap` inserts is removed from the names,
    so the list is the same before and after controllers are attached.
    """
    delta_ids = {id(p) for p in system.controllers.parameters()}
    out = []
    for name, p in system.model.named_parameters():
        if id(p) in delta_ids or _is_delta_path(name):
            continue
        out.append((name.replace(".base_layer", ""), p))
    return out


def n_base_parameters(system) -> int:
    """Number of scalars of the pretrained model (the denominator of trainable fractions)."""
    return sum(p.numel() for _, p in base_parameters(system))


@torch.no_grad()
def fingerprint(system) -> str:
    """sha256 over names, shapes and a strided sample of the frozen base parameters.

    Values are hashed in float32 so a model loaded in float32 or float64 has one
    fingerprint; parameters that are themselves trained (full fine-tuning) enter
    by name and shape only, so training does not change the fingerprint.
    """
    trained = {id(c.param) for c in saved_controls(system)}
    h = hashlib.sha256()
    for name, p in sorted(base_parameters(system), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        if id(p) in trained or p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        h.update(flat[::stride].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# --- save / load ---------------------------------------------------------------------
def save(system, path: str | Path, spec: dict[str, Any] | None = None) -> Path:
    """Write the deltas of ``system`` to ``path`` (a ``.safetensors`` file).

    Args:
        spec: how the controllers were built, e.g. ``{"method": "lora", "options": {"rank": 8}}``;
            stored verbatim in the header (must be JSON-serialisable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    controls = saved_controls(system)
    tensors = {c.name: c.param.detach().to("cpu").contiguous() for c in controls}
    header = {
        "format": FORMAT,
        "model": system.name,
        "fingerprint": fingerprint(system),
        "methods": [c.method for c in system.controllers],
        "spec": spec or {},
        "controls": {c.name: {"kind": c.kind, "layers": list(c.layers)} for c in controls},
    }
    save_file(tensors, str(path), metadata={"controltune": json.dumps(header)})
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a delta checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no delta checkpoint at {path}")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "controltune" not in meta:
        raise CheckpointMismatchError(f"{path} is a safetensors file without a controltune header (format {FORMAT})")
    return json.loads(meta["controltune"])


@torch.no_grad()
def load(system, path: str | Path, check_base: bool = True) -> dict[str, Any]:
    """Copy the deltas saved at ``path`` into ``system`` (same methods, same shapes); returns the header.

    Raises:
        CheckpointMismatchError: the base model's fingerprint differs (both models and
            fingerprints are named), a tensor is missing or unexpected, or a shape differs.
    """
    path = Path(path)
    header = read_header(path)
    if check_base:
        ours = fingerprint(system)
        if header["fingerprint"] != ours:
            raise CheckpointMismatchError(
                f"{path} was trained on base model {header['model']!r} (fingerprint {header['fingerprint'][:16]}…), "
                f"but this system's base model is {system.name!r} (fingerprint {ours[:16]}…): refusing to load "
                "deltas onto a different base model"
            )
    controls = {c.name: c for c in saved_controls(system)}
    with safe_open(str(path), framework="pt") as fh:
        saved = set(fh.keys())
        missing, unexpected = sorted(set(controls) - saved), sorted(saved - set(controls))
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{path} (methods {header['methods']}) does not match this system (methods "
                f"{[c.method for c in system.controllers]}): missing tensors {missing[:8]}, "
                f"unexpected tensors {unexpected[:8]}"
            )
        for name, control in controls.items():
            value = fh.get_tensor(name)
            if value.shape != control.param.shape:
                raise CheckpointMismatchError(
                    f"tensor {name!r} has shape {tuple(value.shape)} in {path} but "
                    f"{tuple(control.param.shape)} in this system (different method options?)"
                )
            control.param.copy_(value.to(control.param))
    return header
