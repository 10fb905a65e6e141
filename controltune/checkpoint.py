"""Delta checkpoints: only the controls, never the frozen base model.

A checkpoint is one safetensors file holding every control variable of a system
(the controllers' ``u_l``, ``u_init``, ``u_term`` and the classification head,
keyed by :attr:`Control.name`) and, in its metadata, a JSON header with the
methods and options that built them, the base model's name and its
*fingerprint*: a sha256 over the names, shapes and a strided sample of the
values of the frozen base parameters.  Loading onto a different base model, or
into a system whose controls differ in name or shape, is refused with a message
naming what differs.  The header also holds a sha256 of the tensor payload: a
truncated or damaged file is refused (:class:`CorruptCheckpointError`) rather
than loaded as wrong numbers; files from before the checksum still load.

Frozen stages of a sequential combination are saved too (they are part of the
trained deltas although they are no longer controls); a controller exposes them
through :meth:`Controller.frozen_controls`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_bytes

from .control import Control
from .fingerprint import fingerprint
from .results import atomic_write_bytes

if TYPE_CHECKING:
    from .system import ResidualSystem

FORMAT = "controltune-delta/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the system it is loaded into."""


class CorruptCheckpointError(CheckpointMismatchError):
    """A checkpoint file that is damaged: truncated, padded, or failing its payload checksum."""


# --- what is saved -------------------------------------------------------------------
def saved_controls(system: ResidualSystem) -> list[Control]:
    """Every delta tensor of ``system``: its controls plus frozen stages' controls."""
    out = list(system.controls())
    for c in system.controllers:
        out.extend(c.frozen_controls())
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CheckpointMismatchError(f"control names must be unique to be saved; repeated: {dupes}")
    return out


# --- file format -------------------------------------------------------------------
def _payload_bounds(blob: bytes, source: str) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``blob`` and where its tensor payload starts; refuses a torn or padded file.

    Layout: 8-byte little-endian header length n, n bytes of JSON, then the payload,
    whose size is the largest ``data_offsets`` end in the header.
    """
    if len(blob) < 8:
        raise CorruptCheckpointError(f"{source} is truncated: {len(blob)} bytes, shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if 8 + n > len(blob):
        raise CorruptCheckpointError(f"{source} is truncated: its header claims {n} bytes but the file has "
                                     f"{len(blob)} in all")
    try:
        meta = json.loads(blob[8:8 + n])
    except ValueError as err:
        raise CorruptCheckpointError(f"{source} is corrupt: its safetensors header is not valid JSON ({err})") from err
    try:
        expected = max((int(t["data_offsets"][1]) for k, t in meta.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as err:
        raise CorruptCheckpointError(f"{source} is corrupt: malformed tensor table in its header ({err!r})") from err
    actual = len(blob) - 8 - n
    if actual < expected:
        raise CorruptCheckpointError(f"{source} is truncated: {actual} of {expected} payload bytes present "
                                     "(an interrupted copy or write?)")
    if actual > expected:
        raise CorruptCheckpointError(f"{source} is corrupt: {actual - expected} bytes after the tensor payload")
    return meta, 8 + n


def _checked_header(blob: bytes, source: str, verify: bool = True) -> dict[str, Any]:
    """The controltune header of a delta file held in ``blob``, after checking its size and checksum."""
    meta, start = _payload_bounds(blob, source)
    text = (meta.get("__metadata__") or {}).get("controltune")
    if text is None:
        raise CheckpointMismatchError(f"{source} is a safetensors file without a controltune header (format {FORMAT})")
    header = json.loads(text)
    expected = header.get("payload_sha256")
    if verify and expected is not None:  # files written before checksums were added have none: still loadable
        actual = hashlib.sha256(memoryview(blob)[start:]).hexdigest()
        if actual != expected:
            raise CorruptCheckpointError(f"{source} is corrupt: checksum mismatch of its tensor payload (sha256 "
                                         f"{actual[:16]}…, header says {expected[:16]}…)")
    return header


def to_bytes(system: ResidualSystem, spec: dict[str, Any] | None = None) -> bytes:
    """The deltas of ``system`` as the bytes of a ``.safetensors`` delta file (see :func:`save`)."""
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
    # The payload bytes do not depend on the metadata, so it is serialised once to checksum it,
    # then again with the checksum in the header.  The draft is hashed through a view and dropped
    # before the second pass: with full fine-tuning each copy is the size of the model.
    draft = save_bytes(tensors, metadata={"controltune": json.dumps(header)})
    _, start = _payload_bounds(draft, "the serialised deltas")
    header["payload_sha256"] = hashlib.sha256(memoryview(draft)[start:]).hexdigest()
    del draft
    return save_bytes(tensors, metadata={"controltune": json.dumps(header)})


# --- save / load ---------------------------------------------------------------------
def save(system: ResidualSystem, path: str | Path, spec: dict[str, Any] | None = None) -> Path:
    """Write the deltas of ``system`` to ``path`` (a ``.safetensors`` file), atomically.

    The header carries a sha256 of the tensor payload, so a damaged or truncated
    copy is refused at load instead of loading wrong numbers.  The file is written
    to a temporary name and renamed: a kill leaves the previous file or the new one.

    Args:
        spec: how the controllers were built, e.g. ``{"method": "lora", "options": {"rank": 8}}``;
            stored verbatim in the header (must be JSON-serialisable).
    """
    return atomic_write_bytes(path, to_bytes(system, spec))


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"no delta checkpoint at {path}")
    return path.read_bytes()


def read_header(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The JSON header of a delta checkpoint.

    Raises:
        CorruptCheckpointError: the file is truncated, padded, or (``verify``) fails its checksum.
    """
    path = Path(path)
    return _checked_header(_read(path), str(path), verify)


@torch.no_grad()
def load(system: ResidualSystem, path: str | Path, check_base: bool = True) -> dict[str, Any]:
    """Copy the deltas saved at ``path`` into ``system`` (same methods, same shapes); returns the header.

    Raises:
        CorruptCheckpointError: the file is truncated or its payload fails the checksum.
        CheckpointMismatchError: the base model's fingerprint differs (both models and
            fingerprints are named), a tensor is missing or unexpected, or a shape differs.
    """
    path = Path(path)
    return load_bytes(system, _read(path), str(path), check_base)


@torch.no_grad()
def load_bytes(system: ResidualSystem, blob: bytes, source: str, check_base: bool = True) -> dict[str, Any]:
    """:func:`load` for a delta file held in memory (``source`` names it in errors)."""
    header = _checked_header(blob, source)
    if check_base:
        ours = fingerprint(system)
        if header["fingerprint"] != ours:
            raise CheckpointMismatchError(
                f"{source} was trained on base model {header['model']!r} (fingerprint {header['fingerprint'][:16]}…), "
                f"but this system's base model is {system.name!r} (fingerprint {ours[:16]}…): refusing to load "
                "deltas onto a different base model"
            )
    controls = {c.name: c for c in saved_controls(system)}
    saved = load_tensors(blob)
    missing, unexpected = sorted(set(controls) - set(saved)), sorted(set(saved) - set(controls))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source} (methods {header['methods']}) does not match this system (methods "
            f"{[c.method for c in system.controllers]}): missing tensors {missing[:8]}, "
            f"unexpected tensors {unexpected[:8]}"
        )
    for name, control in controls.items():
        value = saved[name]
        if value.shape != control.param.shape:
            raise CheckpointMismatchError(
                f"tensor {name!r} has shape {tuple(value.shape)} in {source} but "
                f"{tuple(control.param.shape)} in this system (different method options?)"
            )
        control.param.copy_(value.to(control.param))
    return header
