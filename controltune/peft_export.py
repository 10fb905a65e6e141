"""Write LoRA-type controllers as a standard peft adapter folder (the inverse of :mod:`.peft_interop`).

``to_peft(system, out_dir)`` saves every LoRA delta of the system's controllers (``lora`` and the
designed LoRAs: ``costate_lora``, ``gramian_lora``, ``recommended_lora``) with peft's own
``save_pretrained``: ``adapter_config.json`` (``target_modules``: the full module names,
``rank_pattern`` / ``alpha_pattern``: each map's rank r and ``α = scale·r`` so that peft's
scaling ``α/r`` equals the controller's, ``modules_to_save``: the sequence-classification head)
and ``adapter_model.safetensors`` (``lora_A = A``, ``lora_B = B``, the head).  Then

    base = AutoModelForSequenceClassification.from_pretrained(<model folder>, num_labels=C)
    model = PeftModel.from_pretrained(base, out_dir)

gives the system's logits (the system must use the ``sequence_classifier`` readout, the model's
own head, or ``causal_lm``).  Controllers that are not LoRA deltas on linear maps (prefix,
adapters, ...) are refused: peft has no faithful equivalent of them here.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .controllers import UnsupportedMethodError
from .controllers.base import Wrapped, base_prefix
from .controllers.lora import LoRADelta
from .families.base import stores_transposed
from .readout import CausalLMReadout, SequenceClassifierReadout

if TYPE_CHECKING:
    from .system import ResidualSystem

__all__ = ["lora_sites", "to_peft"]


def lora_sites(system: ResidualSystem) -> list[tuple[Any, LoRADelta]]:
    """``[(site, delta)]`` of every LoRA delta of the attached controllers; refuses any other controller."""
    out = []
    for ctrl in system.controllers:
        deltas = getattr(ctrl, "deltas", None)
        found = [(s, deltas[s.key]) for s in getattr(ctrl, "sites", [])
                 if deltas is not None and s.key in deltas and isinstance(deltas[s.key], LoRADelta)]
        if not found or len(found) != len(deltas):
            raise UnsupportedMethodError(f"to_peft exports LoRA deltas on linear maps; controller "
                                         f"{ctrl.method!r} is not one (accepted: lora, costate_lora, gramian_lora, "
                                         "recommended_lora)")
        out += found
    if not out:
        raise ValueError("to_peft: the system has no controller attached; nothing to export")
    return out


def _unwrapped(model: nn.Module) -> nn.Module:
    """A copy of the HF model with every controltune delta removed (the frozen modules put back)."""
    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        if isinstance(module, Wrapped):
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent) if parent else clone, child, module.base_layer)
    return clone


def _task_type(system: ResidualSystem) -> str:
    if isinstance(system.readout, SequenceClassifierReadout):
        return "SEQ_CLS"
    if isinstance(system.readout, CausalLMReadout):
        return "CAUSAL_LM"
    raise UnsupportedMethodError("to_peft needs the model's own head: build the system with "
                                 "readout='sequence_classifier' (load_model(..., head='sequence_classification')) "
                                 "or readout='causal_lm'; the mean-pooled head of readout='classification' has no "
                                 "peft equivalent")


@torch.no_grad()
def to_peft(system: ResidualSystem, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Save the system's LoRA deltas (and sequence head) as a peft LoRA adapter folder; returns it.

    ``base_model_name_or_path`` (default: the model's ``config._name_or_path``) is written to
    ``adapter_config.json`` for users who load the base by name.
    """
    from peft import LoraConfig, get_peft_model

    task_type = _task_type(system)
    sites = lora_sites(system)
    model = system.model
    prefix = base_prefix(model)
    names = {s.key: ".".join(p for p in (prefix, s.path) if p) for s, _ in sites}
    ranks = {names[s.key]: int(d.A.shape[0]) for s, d in sites}
    alphas = {names[s.key]: float(d.scale) * int(d.A.shape[0]) for s, d in sites}
    transposed = {stores_transposed(s.module) for s, _ in sites}
    if len(transposed) > 1:
        raise UnsupportedMethodError("to_peft: the LoRA targets mix Linear and Conv1D maps; peft takes one "
                                     "fan_in_fan_out per adapter")
    default_rank = max(ranks.values())
    config = LoraConfig(r=default_rank, lora_alpha=alphas[max(ranks, key=ranks.get)], lora_dropout=0.0, bias="none",
                        target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=alphas,
                        fan_in_fan_out=transposed.pop(), task_type=task_type,
                        modules_to_save=list(system.family.sequence_head) if task_type == "SEQ_CLS" else None)
    with warnings.catch_warnings():
        # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias: a FutureWarning on every
        # export that the user can do nothing about
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(_unwrapped(model), config)
    for site, delta in sites:
        layer = peft_model.base_model.model.get_submodule(names[site.key])
        scaling = float(layer.scaling["default"])
        if abs(scaling - float(delta.scale)) > 1e-12 * max(1.0, abs(scaling)):
            raise RuntimeError(f"to_peft: peft's scaling {scaling} at {names[site.key]} differs from the delta's "
                               f"{delta.scale}")
        layer.lora_A["default"].weight.copy_(delta.A)
        layer.lora_B["default"].weight.copy_(delta.B)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    path = out / "adapter_config.json"
    data = json.loads(path.read_text())
    if data.get("modules_to_save"):
        # peft's sequence-classification model appends its own head names ("classifier", "score") to the list it
        # is given, so the saved list repeats the head; each name once is what peft would read back
        data["modules_to_save"] = list(dict.fromkeys(data["modules_to_save"]))
    if base_model_name_or_path is not None or getattr(model.config, "_name_or_path", ""):
        data["base_model_name_or_path"] = base_model_name_or_path or model.config._name_or_path
    path.write_text(json.dumps(data, indent=2) + "\n")
    return out
