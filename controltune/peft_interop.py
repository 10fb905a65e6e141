"""Read models prepared with the ``peft`` library as controltune systems and controllers.

``from_peft(peft_model) -> (system, controllers)`` copies the frozen base model
out of a ``PeftModel`` and rebuilds its adapter as the equivalent controltune
controllers, with the trained values copied, so that the residual-stream
states (and everything downstream) agree with peft's forward pass:

=============== ======================================================================
peft            controltune
=============== ======================================================================
LoRA            ``lora`` per (rank, scaling, layer set): ``A``, ``B`` copied; α = scaling·r
(IA)³           ``ia3``: ``ia3_l`` of feed-forward modules rescales their input, others their output
prefix tuning   ``prefix`` (``reparam`` if peft uses ``prefix_projection``): per layer l the
                past key/value rows ``W[p, (2l+j)·H·D + h·D + d]`` become ``P_k`` (j=0), ``P_v`` (j=1)
prompt tuning   ``prompt``: P = the family's embedding of peft's virtual-token vectors at positions 0..n-1
=============== ======================================================================

peft runs prefix and prompt tuning through the model's cache / ``inputs_embeds``
paths, which put the real tokens at positions ``n..n+T-1``.  Rotary models see
this through the system's own positions (prompt tokens are part of x_0); BERT-like
encoders with absolute position embeddings get a :class:`PositionShift` (no
controls) that embeds the tokens at the same shifted positions.  Combinations
peft supports but controltune has no equivalent for (DoRA, LoRA on embeddings,
per-module rank patterns in one controller, prefix/prompt on GPT-2's learned
positions, prefix on rotary models) are refused with the reason.

Two peft behaviours to know when comparing outputs: for prefix and prompt tuning
peft drops ``token_type_ids`` (so sentence pairs differ unless the system is fed
type 0 too), and it keeps the prompt encoder in float32 whatever the model's dtype.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .controllers import UnsupportedMethodError, build
from .controllers.base import Controller, wrap
from .hf_compat import embedding_offset_keyword
from .system import ResidualSystem
from .zoo import load_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


class PositionShift(Controller):
    """Embed the real tokens at positions ``n..n+T-1`` (absolute-position encoders).

    peft's prompt and prefix tuning on BERT-like models place the virtual tokens
    at positions 0..n-1 (prompt) or count them as past length (prefix); this
    plant modification (no controls) reproduces that.
    """

    method = "position_shift"
    group = "reference"
    form = "x_0 = embed(tokens at positions n..n+T-1)"

    def __init__(self, offset: int) -> None:
        super().__init__(0.0)
        self.offset = int(offset)

    def attach(self, system: ResidualSystem) -> None:
        path = system.family.shiftable_embedding
        if system.family.causal or path is None:
            raise UnsupportedMethodError(f"position_shift: only for encoders with absolute positions, not "
                                         f"{system.family.name!r}")
        wrap(system.base, path, _ShiftedEmbedding(self.offset))

    def controls(self) -> list:
        return []


class _ShiftedEmbedding(nn.Module):
    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, base: nn.Module, *args, **kwargs) -> torch.Tensor:
        return base(*args, **{embedding_offset_keyword(base): self.offset}, **kwargs)


# --- helpers ---------------------------------------------------------------------------
def _peft_config(peft_model: PeftModel) -> Any:
    return peft_model.peft_config[peft_model.active_adapter]


def _hf_model(peft_model: PeftModel) -> nn.Module:
    """The transformers model inside a PeftModel (with peft's layers injected, for LoRA/IA³)."""
    from peft.tuners.tuners_utils import BaseTuner

    inner = peft_model.base_model
    return inner.model if isinstance(inner, BaseTuner) else inner


def _system(hf_model: nn.Module, tokenizer: PreTrainedTokenizerBase, readout: str | None, **kw) -> ResidualSystem:
    dtype = next(hf_model.parameters()).dtype
    loaded = load_model(hf_model, dtype=dtype, tokenizer=tokenizer, device=next(hf_model.parameters()).device)
    if readout is None:
        readout = "causal_lm" if loaded.family.causal else "classification"
    return ResidualSystem(loaded, readout=readout, **kw)


def _tuner_sites(peft_model: PeftModel, system: ResidualSystem,
                 layer_type: type) -> list[tuple[int, str, str, nn.Module]]:
    """``(layer, role, path, peft module)`` of every peft tuner layer, paths relative to ``system.base``."""
    fam = system.family
    inverse = {path: role for role, path in fam.roles.items()}
    prefix = fam.blocks + "."
    out = []
    for path, module in _hf_model(peft_model).base_model.named_modules():
        if not isinstance(module, layer_type):
            continue
        if not path.startswith(prefix):
            raise UnsupportedMethodError(f"peft adapts {path!r}, outside the blocks ({fam.blocks}); controltune "
                                         "has no equivalent controller for it")
        layer_str, _, inner = path[len(prefix):].partition(".")
        out.append((int(layer_str), inverse.get(inner, inner), path, module))
    if not out:
        raise UnsupportedMethodError("the peft model has no adapted modules of the active adapter")
    return out


def _grouped(items: dict[tuple, set[int]]) -> dict[tuple, list[str]]:
    """Roles sharing a (hyper-parameters, layer set) go into one controller."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for (role, *hyper), layers in items.items():
        groups[(*hyper, tuple(sorted(layers)))].append(role)
    return groups


def _delta_at(system: ResidualSystem, path: str, kind: type) -> nn.Module:
    """The delta of type ``kind`` wrapped around the module at ``path`` (innermost first)."""
    module = system.base.get_submodule(path)
    while hasattr(module, "delta"):
        if isinstance(module.delta, kind):
            return module.delta
        module = module.base_layer
    raise RuntimeError(f"no {kind.__name__} at {path}")


# --- converters --------------------------------------------------------------------------
@torch.no_grad()
def _lora(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, readout: str | None,
          **kw) -> tuple[ResidualSystem, list[Controller]]:
    from peft.tuners.lora import LoraLayer

    from .controllers.lora import LoRADelta

    cfg = _peft_config(peft_model)
    name = peft_model.active_adapter
    if getattr(cfg, "use_dora", False):
        raise UnsupportedMethodError("peft LoRA with use_dora=True (weight-decomposed LoRA) has no controltune "
                                     "equivalent")
    base = copy.deepcopy(peft_model).base_model.unload()
    system = _system(base, tokenizer, readout, **kw)
    sites = _tuner_sites(peft_model, system, LoraLayer)
    items: dict[tuple, set[int]] = defaultdict(set)
    values = {}
    for layer, role, path, module in sites:
        if name not in module.lora_A:
            raise UnsupportedMethodError(f"{path}: peft LoRA layer without a linear lora_A (embedding LoRA?)")
        r, scaling = int(module.r[name]), float(module.scaling[name])
        items[(role, r, scaling)].add(layer)
        values[path] = (module.lora_A[name].weight, module.lora_B[name].weight)
    controllers = []
    for (r, scaling, layers), roles in _grouped(items).items():
        # alpha = scaling·r makes the controller's scale alpha/r equal to peft's scaling.
        ctrl = build("lora", system, rank=r, alpha=scaling * r, targets=roles, layers=list(layers))
        for site in ctrl.sites:
            delta = _delta_at(system, site.path, LoRADelta)
            a, b = values[site.path]
            delta.A.copy_(a)
            delta.B.copy_(b)
        controllers.append(ctrl)
    return system, controllers


@torch.no_grad()
def _ia3(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, readout: str | None,
         **kw) -> tuple[ResidualSystem, list[Controller]]:
    from peft.tuners.ia3 import IA3Layer

    from .controllers.ia3 import ScaleInput, ScaleOutput

    name = peft_model.active_adapter
    base = copy.deepcopy(peft_model).base_model.unload()
    system = _system(base, tokenizer, readout, **kw)
    items: dict[tuple, set[int]] = defaultdict(set)
    values = {}
    for layer, role, path, module in _tuner_sites(peft_model, system, IA3Layer):
        items[(role, bool(module.is_feedforward))].add(layer)
        values[path] = module.ia3_l[name].reshape(-1)
    controllers = []
    for (feedforward, layers), roles in _grouped(items).items():
        ctrl = build("ia3", system, targets=roles, rescale_input=roles if feedforward else [], layers=list(layers))
        for site in ctrl.sites:
            delta = _delta_at(system, site.path, ScaleInput if feedforward else ScaleOutput)
            target = delta.scale if feedforward else delta.scales["out"]
            target.copy_(values[site.path])
        controllers.append(ctrl)
    return system, controllers


def _prompt_learning_system(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, readout: str | None,
                            kind: str, **kw) -> ResidualSystem:
    system = _system(copy.deepcopy(_hf_model(peft_model)), tokenizer, readout, **kw)
    fam = system.family
    if fam.causal and not fam.needs_rotary:
        raise UnsupportedMethodError(f"peft {kind} on {fam.name!r}: peft shifts the tokens' learned absolute "
                                     "positions by the number of virtual tokens, which controltune's x_0 "
                                     "cannot reproduce for this family")
    return system


@torch.no_grad()
def _prefix(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, readout: str | None,
            **kw) -> tuple[ResidualSystem, list[Controller]]:
    cfg = _peft_config(peft_model)
    system = _prompt_learning_system(peft_model, tokenizer, readout, "prefix tuning", **kw)
    if system.family.needs_rotary:
        raise UnsupportedMethodError("peft prefix tuning on a rotary model rotates the queries to positions "
                                     "n..n+T-1 but leaves the prefix keys unrotated; controltune's prefix keeps "
                                     "the tokens at 0..T-1, so the two differ")
    n, n_layers = int(cfg.num_virtual_tokens), system.n_layers
    if cfg.num_layers != n_layers:
        raise UnsupportedMethodError(f"peft prefix covers {cfg.num_layers} layers, the model has {n_layers}")
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    shift = system.add(PositionShift(n))
    if cfg.prefix_projection:
        hidden = encoder.transform[0].out_features
        ctrl = build("prefix", system, length=n, reparam=True, hidden=hidden)
        mlp = ctrl.mlp
        mlp.E.copy_(encoder.embedding.weight)
        mlp.W1.copy_(encoder.transform[0].weight.T)
        mlp.b1.copy_(encoder.transform[0].bias)
        mlp.W2.copy_(encoder.transform[2].weight.T)
        mlp.b2.copy_(encoder.transform[2].bias)
    else:
        ctrl = build("prefix", system, length=n)
        heads = cfg.num_attention_heads  # peft's prefix config: heads of its key/value rows
        rows = encoder.embedding.weight.view(n, n_layers, 2, heads, -1)  # P × L × (key, value) × H × D
        for layer in range(n_layers):
            kv = ctrl.prefixes[str(layer)]
            if kv.key.shape != rows[:, layer, 0].transpose(0, 1).shape:
                raise UnsupportedMethodError(f"peft prefix rows {tuple(rows.shape)} do not match the key/value "
                                             f"geometry {tuple(kv.key.shape)} of layer {layer}")
            kv.key.copy_(rows[:, layer, 0].transpose(0, 1))
            kv.value.copy_(rows[:, layer, 1].transpose(0, 1))
    return system, [shift, ctrl]


@torch.no_grad()
def _prompt(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, readout: str | None,
            **kw) -> tuple[ResidualSystem, list[Controller]]:
    cfg = _peft_config(peft_model)
    system = _prompt_learning_system(peft_model, tokenizer, readout, "prompt tuning", **kw)
    n = int(cfg.num_virtual_tokens)
    vectors = peft_model.get_prompt(batch_size=1)[0]  # n × d, in word-embedding space
    controllers: list[Controller] = []
    if system.family.needs_rotary:
        prompt = vectors  # the embedding is the word table alone; rotary positions come from the system
    else:
        # The model embeds the virtual tokens at positions 0..n-1 with token type 0.
        types = torch.zeros(1, n, dtype=torch.long, device=vectors.device)
        prompt = system.base.embeddings(inputs_embeds=vectors[None], token_type_ids=types)[0]
    ctrl = build("prompt", system, n_tokens=n)
    ctrl.prompt.copy_(prompt)
    if not system.family.needs_rotary:
        # After the prompt: its attach reads the (then unwrapped) input embedding table.
        controllers.append(system.add(PositionShift(n)))
    return system, [ctrl, *controllers]


CONVERTERS = {"LORA": _lora, "IA3": _ia3, "PREFIX_TUNING": _prefix, "PROMPT_TUNING": _prompt}


def from_peft(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase | None = None, readout: str | None = None,
              **system_options) -> tuple[ResidualSystem, list[Controller]]:
    """A ResidualSystem and the controllers equivalent to a ``peft.PeftModel``.

    Args:
        peft_model: a ``PeftModel`` with one active adapter (LoRA, IA³, prefix or prompt tuning).
        tokenizer: the model's tokenizer (default: the offline MiniLM tokenizer).
        readout: ``classification`` or ``causal_lm`` (default by family); peft's own task
            head, if any, is not converted.
        system_options: passed to :class:`ResidualSystem` (``num_labels``, ``pooling``, ``kernel``).

    Returns:
        ``(system, controllers)``; the peft model is left untouched (its base weights are copied).
    """
    cfg = _peft_config(peft_model)
    kind = getattr(cfg.peft_type, "value", str(cfg.peft_type))
    if kind not in CONVERTERS:
        raise UnsupportedMethodError(f"peft type {kind!r} has no converter; supported: {', '.join(CONVERTERS)}")
    return CONVERTERS[kind](peft_model, tokenizer, readout, **system_options)
