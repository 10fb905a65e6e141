"""Recognising a model by its structure, and checking that controltune reproduces it.

A family that recognises unknown model types (``Family.resolve``) needs two tools:

* :func:`meta_model`: the HF causal LM of a config built on the ``meta`` device (no memory, no
  weights), so its module tree can be compared with the family's layout before anything is loaded;
* :func:`admission_probe`: once the real model is there, the family's own reconstruction (its
  embedding, each block called the family's way with its masks and rotary tables, the final norm
  and the LM head) is compared with HF's forward on a short padded batch, block by block.  What the
  module tree cannot show (a multiplier in the model's ``forward``, a scaled readout, another mask)
  shows up here, and the model is refused naming where it differs instead of computed wrongly.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..hf_compat import causal_mask
from .base import Context, UnsupportedArchitectureError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Family

_META_CACHE: dict[str, nn.Module | str] = {}

PROBE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
"""Largest per-token relative difference :func:`admission_probe` accepts, by dtype (others: 1e-2)."""

OUTSIDE_THE_BLOCKS = ("embedding_multiplier", "embedding_scale", "scale_emb", "logits_scaling",
                      "logit_scale", "final_logit_softcapping", "output_multiplier")
"""Config attributes that, when not neutral, name a computation outside the blocks (hints in refusals)."""


def meta_model(config: object) -> nn.Module | str:
    """The HF causal LM of ``config`` built on the meta device, or a sentence saying why it cannot be.

    Cached by the config's JSON, so repeated look-ups of one model cost nothing.
    """
    try:
        key = config.to_json_string()
    except Exception:  # noqa: BLE001 - an object that is not a HF config
        return "it is not a transformers configuration"
    if key not in _META_CACHE:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                _META_CACHE[key] = AutoModelForCausalLM.from_config(config)
        except Exception as err:  # noqa: BLE001 - any failure means: not a causal LM we can build
            _META_CACHE[key] = f"transformers builds no causal LM for it ({type(err).__name__}: {str(err)[:120]})"
        finally:
            hf_logging.set_verbosity(verbosity)
    return _META_CACHE[key]


def neutral_settings(config: object) -> list[str]:
    """``name=value`` of the :data:`OUTSIDE_THE_BLOCKS` attributes of ``config`` that are set and not neutral."""
    out = []
    for name in OUTSIDE_THE_BLOCKS:
        value = getattr(config, name, None)
        if value is not None and value is not False and value != 1 and value != 1.0:
            out.append(f"{name}={value}")
    return out


def _token_error(ours: torch.Tensor, theirs: torch.Tensor, real: torch.Tensor) -> float:
    """Largest per-token relative difference over the real tokens (``real``: S×T booleans)."""
    diff = (ours - theirs).norm(dim=-1)[real]
    scale = theirs.norm(dim=-1)[real].clamp_min(torch.finfo(theirs.dtype).tiny)
    return float((diff / scale).max())


@torch.no_grad()
def admission_probe(family: Family, model: nn.Module, length: int = 6) -> None:
    """Refuse a model whose HF forward the family does not reproduce (UnsupportedArchitectureError).

    On two sequences of ``length`` tokens (the second padded by two), checks in the model's dtype
    and device: ``x_0`` = HF's first hidden state; every block ``l < L−1`` maps HF's ``x_l`` to
    HF's ``x_{l+1}`` when called the family's way; ``norm(f_{L−1}(x_{L−1}))`` = HF's last hidden
    state; the LM head of it = HF's logits.  Runs once per model object (marked when passed).
    """
    if getattr(model, "_controltune_admitted", False):
        return
    config = model.config
    param = next(model.parameters())
    tol = PROBE_TOLERANCE.get(param.dtype, 1e-2)
    vocab = int(config.vocab_size)
    ids = (torch.arange(2 * length, device=param.device).reshape(2, length) * 7919 + 11) % vocab
    am = torch.ones_like(ids)
    am[1, -2:] = 0
    real = am.bool()
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
        hs = out.hidden_states
        base = model.base_model
        pos = torch.arange(length, device=ids.device)[None]
        blocks = base.get_submodule(family.blocks)
        n = len(blocks)

        def check(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
            err = _token_error(ours, theirs, real)
            if not err <= tol:
                hints = neutral_settings(config)
                hint = f" (its config sets {', '.join(hints)})" if hints else ""
                raise UnsupportedArchitectureError(
                    f"model_type {config.model_type!r} has the structure of family {family.name!r}, but {what} "
                    f"differs from its own forward (per-token relative error {err:.1e} > {tol:.0e}){hint}; "
                    f"controltune would compute a different model, so it is refused")

        x0 = family.embed(base, ids, None, pos)
        check("the embedding x_0", x0, hs[0])
        rotary = base.get_submodule(family.rotary_module)(x0, pos) if family.needs_rotary else None
        ctx = Context(attention_mask=am, mask=causal_mask(config, x0, am, pos), position_ids=pos, rotary=rotary)
        for layer in range(n - 1):
            check(f"block {layer}", family.call_block(blocks[layer], hs[layer], ctx), hs[layer + 1])
        last = family.call_block(blocks[n - 1], hs[n - 1], ctx)
        if family.final_norm:
            last = base.get_submodule(family.final_norm)(last)
        check(f"block {n - 1} with the final norm", last, hs[n])
        head = model.get_output_embeddings()
        if head is not None and getattr(out, "logits", None) is not None:
            check("the readout (LM head of the final state)", head(hs[n]), out.logits)
    finally:
        model.train(was_training)
    model._controltune_admitted = True
