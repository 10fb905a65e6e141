"""``peft_lora`` — LoRA as peft builds it: peft's own layers and initialisations inside the system.

``W x -> W' x + (α/r) B A x`` with peft's ``LoraLayer`` injected into the system's HF model
(``peft.inject_adapter_in_model``), so the forward pass, the initial value and the base weight
``W'`` are peft's:

======================  =========================================================================
``init``                what peft does at injection
======================  =========================================================================
``default``             ``B = 0``, A Kaiming-uniform (``W' = W``)
``gaussian``            ``B = 0``, A Gaussian scaled by the rank
``pissa``               ``B A`` = the top-r singular part of W, ``W' = W − (α/r) B A`` (Meng et al., 2024)
``olora``               QR of W: ``B A`` its first r parts, ``W' = W − (α/r) B A`` (Büyükakyüz, 2024)
``lora_ga``             SVD of the gradient ``∂J/∂W`` on ``n_design`` training rows (peft's
                        ``preprocess_loraga``; the design batch's cost is the train step), ``W'``
                        compensated (Wang et al., 2024)
``eva``                 EVA (Paischer et al., 2024): A = the top right-singular vectors of each map's
                        inputs on ``n_design`` training rows, ranks redistributed across the maps by
                        explained variance (peft's ``get_eva_state_dict``), ``B = 0``
``adapter``             a saved peft LoRA folder (``adapter=<dir>``, e.g. ``controltune recommend``'s):
                        its config, A, B and, with the ``sequence_classifier`` readout, its head
======================  =========================================================================

Controls: peft's ``lora_A`` (r×d_in) and ``lora_B`` (d_out×r) of each target in each layer
(layer controls, named ``peft_lora.<l>.<role>.A|B`` like LoRA's).  Needs the ``peft`` extra.
This controller exists so that peft's initialisations train under the same trainer, budget and
schedule as every other method; it reproduces no peft mathematics itself.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from ..design.linearize import design_batch as load_design_batch
from ..families.base import stores_transposed
from .base import (
    Control,
    Controller,
    Site,
    UnsupportedMethodError,
    base_prefix,
    positive_float,
    positive_int,
    register,
    resolve_targets,
    target_names,
)

if TYPE_CHECKING:
    from peft import LoraConfig

    from ..system import ResidualSystem

INITS = ("default", "gaussian", "pissa", "olora", "lora_ga", "eva", "adapter")


def _peft() -> ModuleType:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - the extra is part of the test install
        raise UnsupportedMethodError("peft_lora needs peft: pip install 'controltune[peft]'") from err
    return peft


@register
class PeftLoRA(Controller):
    """peft's LoRA layers and initialisation (``init``) on the ``targets`` linear maps in ``layers``."""

    method = "peft_lora"
    group = "reparameterisation"
    form = ("W x -> W' x + (alpha/r) B A x with peft's LoraLayer; init and W' by peft (default, pissa, olora, lora_ga, "
            "eva)")

    def __init__(self, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | str = ("q", "v"),
                 layers: Sequence[int] | None = None, init: str = "default", adapter: str | None = None,
                 task: str = "sst2", n_design: int = 32, design_seed: int = 0, max_length: int = 64,
                 design_batch: dict | None = None, seed: int = 0, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.rank = positive_int(rank, "rank", self.method)
        self.alpha = positive_float(alpha, "alpha", self.method)
        self.targets = target_names(targets, self.method)
        self.layers = layers
        if init not in INITS:
            raise ValueError(f"peft_lora: init {init!r} is not one of {', '.join(INITS)}")
        if (init == "adapter") != (adapter is not None):
            raise ValueError("peft_lora: init='adapter' and adapter=<peft folder> go together")
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise ValueError(f"peft_lora: adapter folder {adapter} has no adapter_config.json (a peft LoRA folder "
                             "written by save_pretrained or controltune recommend)")
        self.init, self.adapter = init, adapter
        self.task, self.n_design, self.design_seed = task, positive_int(n_design, "n_design", self.method), design_seed
        self.max_length, self.design_batch, self.seed = max_length, design_batch, int(seed)
        self.layers_found: dict[str, tuple[Site, torch.nn.Module]] = {}

    # --- attach --------------------------------------------------------------------------
    def attach(self, system: ResidualSystem) -> None:
        peft = _peft()
        model = system.model
        prefix = base_prefix(model)
        if self.init == "adapter":
            config = peft.LoraConfig.from_pretrained(self.adapter)
            names = self._adapter_targets(model, config)
            sites = self._sites_of(system, prefix, names)
        else:
            sites = resolve_targets(system, system.family.expand_targets(self.targets), self.layers)
            names = [".".join(p for p in (prefix, s.path) if p) for s in sites]
            config = self._config(peft, names, {stores_transposed(s.module) for s in sites})
        trainable = {id(p): p.requires_grad for p in system.readout.parameters()}
        if self.init in ("lora_ga", "eva"):
            batch = self.design_batch or load_design_batch(system, self.task, self.n_design, self.design_seed,
                                                           self.max_length)
        if self.init == "lora_ga":
            with warnings.catch_warnings():
                # peft counts the backward passes with full backward hooks on the target maps, whose inputs need
                # no gradient (only their weights do); torch's warning about that is harmless: the estimate is
                # the weights' .grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                peft.tuners.lora.loraga.preprocess_loraga(model, config, lambda: system.cost(batch).backward())
        eva_state = self._eva_state(peft, system, config, batch) if self.init == "eva" else None
        torch.manual_seed(self.seed)
        try:
            peft.inject_adapter_in_model(config, model)
        except TypeError as err:  # PiSSA refuses float64 weights
            raise UnsupportedMethodError(f"peft_lora init={self.init!r} on a "
                                         f"{str(next(model.parameters()).dtype).removeprefix('torch.')} model: "
                                         f"{err}") from err
        for p in system.readout.parameters():  # peft freezes everything but the adapters: keep the head as it was
            p.requires_grad_(trainable.get(id(p), p.requires_grad))
        if self.init == "adapter":
            self._load_adapter(system, model)
        if eva_state is not None:
            with torch.no_grad():
                # peft's public initialize_lora_eva_weights needs a PeftModel (it reads active_adapters as a
                # property); the adapters were injected into the HF model itself, so its loader is called directly.
                peft.tuners.lora.eva._load_eva_state_dict(model, eva_state, "default")
        self.sites = sites
        for site, name in zip(sites, names):
            layer = model.get_submodule(name)
            self.layers_found[site.key] = (site, layer)

    @staticmethod
    def _eva_state(peft: ModuleType, system: ResidualSystem, config: LoraConfig, batch: dict) -> dict:
        """EVA's per-map SVD components of the maps' inputs on ``batch`` (minibatches of 16 rows, no padding)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        n = inputs["input_ids"].shape[0]
        loader = [{k: v[i:i + 16] for k, v in inputs.items()} for i in range(0, n, 16)]
        return peft.tuners.lora.eva.get_eva_state_dict(
            system.model, loader, peft_config=config, forward_fn=lambda model, x: system(x),
            prepare_model_inputs_fn=lambda x, cfg: x["attention_mask"].bool().nonzero(), show_progress_bar=False)

    def _config(self, peft: ModuleType, names: list[str], transposed: set[bool]) -> LoraConfig:
        if len(transposed) > 1:
            raise UnsupportedMethodError("peft_lora: the targets mix Linear and Conv1D maps; peft takes one "
                                         "fan_in_fan_out per adapter")
        init = {"default": True}.get(self.init, self.init)
        extra = {"lora_ga_config": peft.LoraGAConfig()} if self.init == "lora_ga" else {}
        if self.init == "eva":
            extra = {"eva_config": peft.EvaConfig()}
        return peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                               target_modules=names, init_lora_weights=init, fan_in_fan_out=transposed.pop(),
                               **extra)

    @staticmethod
    def _adapter_targets(model: torch.nn.Module, config: LoraConfig) -> list[str]:
        targets = config.target_modules
        names = [n for n, _ in model.named_modules()
                 if (isinstance(targets, str) and re.fullmatch(targets, n))
                 or (not isinstance(targets, str) and any(n == t or n.endswith("." + t) for t in targets))]
        if not names:
            raise ValueError(f"peft_lora: the adapter's target_modules {targets} match no module of the model")
        return names

    @staticmethod
    def _sites_of(system: ResidualSystem, prefix: str, names: list[str]) -> list[Site]:
        """The sites of full module names (``<prefix>.<blocks>.<l>.<path in block>``), role from the family."""
        by_path = {path: role for role, path in system.family.roles.items()}
        blocks = ".".join(p for p in (prefix, system.family.blocks) if p) + "."
        sites = []
        for name in names:
            if not name.startswith(blocks):
                raise UnsupportedMethodError(f"peft_lora: adapter target {name} is outside the model's blocks")
            layer, _, path = name[len(blocks):].partition(".")
            if path not in by_path:
                raise UnsupportedMethodError(f"peft_lora: adapter target {name} is not one of the family's roles "
                                             f"({', '.join(sorted(system.family.roles))})")
            sites.append(Site(int(layer), by_path[path], path, system.model.get_submodule(name)))
        return sites

    @torch.no_grad()
    def _load_adapter(self, system: ResidualSystem, model: torch.nn.Module) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(self.adapter) / "adapter_model.safetensors"))
        saved_head = json.loads((Path(self.adapter) / "adapter_config.json").read_text()).get("modules_to_save") or []
        heads = getattr(system.readout, "heads", {})
        for key, value in state.items():
            name = key.removeprefix("base_model.model.")
            if ".lora_A." in name or ".lora_B." in name:
                module, _, rest = name.partition(".lora_")
                getattr(model.get_submodule(module), "lora_" + rest.split(".")[0])["default"].weight.copy_(value)
            elif name.split(".")[0] in saved_head:
                head, _, param = name.partition(".")
                if head not in heads:
                    raise UnsupportedMethodError(f"peft_lora: the adapter saves head {head!r}; build the system "
                                                 "with readout='sequence_classifier' to load it")
                heads[head].get_parameter(param).copy_(value)

    def controls(self) -> list[Control]:
        out = []
        for site, layer in self.layers_found.values():
            out += [Control(f"{self.method}.{site.layer}.{site.role}.A", layer.lora_A["default"].weight, "layer",
                            (site.layer,)),
                    Control(f"{self.method}.{site.layer}.{site.role}.B", layer.lora_B["default"].weight, "layer",
                            (site.layer,))]
        return out
