"""Models prepared with peft convert into controltune controllers with equal outputs."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("peft", reason="the peft extra is not installed (pip install -e '.[peft]')")
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

from controltune import load_model  # noqa: E402
from controltune.controllers import UnsupportedMethodError  # noqa: E402
from controltune.peft_interop import from_peft  # noqa: E402
from controltune.zoo import offline_tokenizer  # noqa: E402

CASES = {
    "lora-bert": ("bert", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "lora-bert-mixed-layers": ("bert", lambda: LoraConfig(r=2, lora_alpha=3, target_modules=["query", "dense"],
                                                          layers_to_transform=[0, 2])),
    "lora-gpt2": ("gpt2", lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "lora-llama": ("llama", lambda: LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    "ia3-bert": ("bert", lambda: IA3Config(target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"])),
    "prefix-bert": ("bert", lambda: PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)),
    "prefix-projection-bert": ("bert", lambda: PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3,
                                                                  prefix_projection=True, encoder_hidden_size=16)),
    "prompt-bert": ("bert", lambda: PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)),
    "prompt-llama": ("llama", lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
}


def _batch(family: str) -> dict:
    enc = offline_tokenizer()(["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if family == "bert" or k != "token_type_ids"}


def _peft(family: str, config, dtype: str = "float64", name: str | None = None):
    loaded = load_model(name or f"random:{family}", dtype=dtype)
    model = get_peft_model(loaded.model, config)
    if loaded.family.prepare is not None:
        # The system's float64-exact norms (bitwise equal to HF's in float32) on the peft side too,
        # so float64 states are compared with the same arithmetic.
        loaded.family.prepare(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move away from peft's init (LoRA B = 0, IA3 = 1) so the check means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    if hasattr(model, "prompt_encoder"):
        model.prompt_encoder.to(getattr(torch, dtype))  # peft keeps it float32; compare in one precision
    return model.eval()


@functools.cache
def _base_last_state(family: str) -> torch.Tensor:
    with torch.no_grad():
        loaded = load_model(f"random:{family}", dtype="float64")
        model = loaded.model
        return model(**_batch(family), output_hidden_states=True).hidden_states[-1]


def _max_errors(system, peft_model, batch) -> list[float]:
    """Max |x_l(controltune) − hidden_states[l](peft)| over the real tokens, l = 0..L."""
    with torch.no_grad():
        theirs = peft_model(**batch, output_hidden_states=True).hidden_states
        ours = system.rollout(batch).states
    mask = batch["attention_mask"].bool()
    t = mask.shape[1]
    errors = []
    for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if layer == system.n_layers and system.family.final_norm:
            a = system.readout.normalized(a)
        errors.append((a[:, -t:] - b[:, -t:])[mask].abs().max().item())
    return errors


@pytest.mark.parametrize("case", list(CASES))
def test_peft_model_converts_with_equal_states(case):
    family, make_config = CASES[case]
    peft_model = _peft(family, make_config())
    batch = _batch(family)
    system, controllers = from_peft(peft_model)
    assert max(_max_errors(system, peft_model, batch)) < 1e-10
    with torch.no_grad():  # the adapter really acts: the bare base model differs
        theirs = peft_model(**batch, output_hidden_states=True).hidden_states[-1]
        assert (_base_last_state(family) - theirs[:, -batch["input_ids"].shape[1]:]).abs().max() > 1e-4
    assert sum(c.n_trainable() for c in controllers) == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_lora_on_minilm_float32():
    peft_model = _peft("bert", LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]), "float32",
                       name="minilm")
    system, (lora,) = from_peft(peft_model)
    assert lora.rank == 8 and lora.alpha / lora.rank == 2.0 and len(lora.sites) == 12
    assert max(_max_errors(system, peft_model, _batch("bert"))) < 1e-6


def test_unsupported_peft_models_are_refused_with_the_reason():
    with pytest.raises(UnsupportedMethodError, match="rotary"):
        from_peft(_peft("llama", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)))
    with pytest.raises(UnsupportedMethodError, match="absolute"):
        from_peft(_peft("gpt2", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)))
    with pytest.raises(UnsupportedMethodError, match="use_dora"):
        from_peft(_peft("bert", LoraConfig(r=2, target_modules=["query"], use_dora=True)))
