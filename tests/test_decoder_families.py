"""Decoders supported by structure: LLaMA-like model types that no code names are recognised,
reproduced exactly and verified; the ones that differ are refused, naming what differs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

import controltune as ct
from controltune.controllers import build
from controltune.families import FAMILIES, LLAMA, UnsupportedArchitectureError, family_of, register_model_type
from controltune.families.decoder import PreciseRMSNorm, band, sliding_window
from controltune.families.structure import admission_probe
from controltune.verification import verify

torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine

VOCAB = 30522  # the MiniLM tokenizer every random model shares
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=101,
             eos_token_id=102)

DECODERS = {  # model type -> what it exercises beyond LLaMA
    "qwen3": {},                              # q/k RMSNorms on every head inside the attention
    "smollm3": {"num_hidden_layers": 4},      # block 3 has no rotary positions (NoPE)
    "gemma": {},                              # (1 + γ) RMSNorms, embeddings scaled by sqrt(d) in embed_tokens
    "mistral": {"sliding_window": 4},         # a listed type, with a window shorter than the batch
}


def _config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**SMALL, **overrides})


def _decoder(model_type: str, dtype: str = "float64", seed: int = 0) -> ct.zoo.LoadedModel:
    """A seeded random decoder of ``model_type`` (its DECODERS settings), loaded in-memory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(model_type, **DECODERS[model_type]), dtype=ct.zoo.DTYPES[dtype])
    return ct.load_model(model, dtype=dtype)


def test_no_family_names_these_model_types() -> None:
    named = {t for fam in FAMILIES.values() for t in fam.model_types}
    assert not {"qwen3", "smollm3", "gemma"} & named
    for model_type in ("qwen3", "smollm3", "gemma"):
        family = family_of(_config(model_type))
        assert family.name == "llama" and family.model_types == (model_type,)
        assert "recognised by structure" in family.notes


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_rollout_equals_hf_hidden_states(model_type: str, dtype: str, kernel: str) -> None:
    loaded = _decoder(model_type, dtype)
    system = ct.ResidualSystem(loaded, kernel=kernel)
    batch = make_batch(loaded.tokenizer, 3)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        traj = system.rollout(batch)
    errs = system.hf_agreement(batch)
    scale = max(x.abs().max().item() for x in traj.states)
    assert len(errs) == system.n_layers + 1
    assert max(errs) <= {"float32": 1e-5, "float64": 1e-12}[dtype] * scale, errs


@pytest.mark.parametrize("method,options", [("lora", {"rank": 2}), ("prefix", {"length": 2})])
@pytest.mark.parametrize("model_type", sorted(DECODERS))
def test_verify_passes(model_type: str, method: str, options: dict) -> None:
    loaded = _decoder(model_type)
    system = ct.ResidualSystem(loaded, readout="causal_lm")
    build(method, system, weight_decay=0.1, **options)
    system.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for c in system.controls():
            c.param.add_(0.05 * torch.randn(c.param.shape, generator=gen, dtype=torch.float64))
    report = verify(system, make_batch(loaded.tokenizer, 2), n_state_directions=1)
    assert report.passed, report.failures()
    assert report.max_rel_err_costate <= 1e-10 and report.max_rel_err_control_grad <= 1e-10


def test_gemma_norms_are_identified_bitwise_in_float32() -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(_config("gemma"), dtype=torch.float32)
    with torch.no_grad():  # Gemma initialises γ = 0: move it so (1 + γ) and γ differ everywhere
        for name, p in stock.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    loaded = ct.load_model(stock, dtype="float32")
    batch = make_batch(loaded.tokenizer)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = stock(**kwargs, output_hidden_states=True).hidden_states
        system = ct.ResidualSystem(loaded)
        traj = system.rollout(batch)
    norms = [m for m in system.model.modules() if isinstance(m, PreciseRMSNorm)]
    assert len(norms) == 2 * system.n_layers + 1 and all(m.offset == 1.0 for m in norms)
    real = batch["attention_mask"].bool()
    for layer in range(system.n_layers):
        assert torch.equal(traj.states[layer][real], before[layer][real])


def test_qwen3_head_norms_are_made_float64_exact() -> None:
    system = ct.ResidualSystem(_decoder("qwen3"))
    attn = system.blocks[0].get_submodule("self_attn")
    assert isinstance(attn.q_norm, PreciseRMSNorm) and isinstance(attn.k_norm, PreciseRMSNorm)
    assert attn.q_norm.offset == 0.0 and attn.q_norm.weight.shape == (16,)


def test_sliding_window_layers_get_their_band() -> None:
    loaded = _decoder("mistral")
    system = ct.ResidualSystem(loaded)
    assert sliding_window(system.blocks[0]) == 4
    batch = make_batch(loaded.tokenizer, 3)
    with torch.no_grad():
        ctx = system.rollout(batch).ctx
    length = batch["input_ids"].shape[1]
    assert length > 4
    banded = band(ctx.mask, 4, length)
    assert not torch.equal(banded, ctx.mask)  # the window matters for this batch
    q, k = 7, 2
    assert bool(ctx.mask[0, 0, q, k]) and not bool(banded[0, 0, q, k])
    float_mask = torch.zeros(1, 1, length, length, dtype=torch.float64)
    assert band(float_mask, 4, length)[0, 0, q, k] == torch.finfo(torch.float64).min
    assert torch.equal(band(None, 4, length)[0, 0], torch.ones(length, length, dtype=torch.bool).tril().triu(-3))


REFUSED = {  # model type, config overrides -> words the refusal must contain
    ("olmo2", ()): ("norms sit elsewhere", "input_layernorm", "post_feedforward_layernorm"),
    ("phi3", ()): ("self_attn.qkv_proj", "mlp.gate_up_proj"),
    ("arcee", ()): ("mlp.gate_proj", "ungated"),
    ("gemma2", ()): ("final_logit_softcapping", "attn_logit_softcapping"),
    ("granite", (("embedding_multiplier", 12.0),)): ("embedding_multiplier=12.0",),
    ("granite", (("logits_scaling", 8.0),)): ("logits_scaling=8.0",),
    ("t5", ()): ("no causal LM",),
}


@pytest.mark.parametrize("model_type,overrides", sorted(REFUSED))
def test_differing_decoders_are_refused_naming_what_differs(model_type: str, overrides: tuple) -> None:
    from transformers import AutoConfig

    base = {} if model_type == "t5" else SMALL
    config = AutoConfig.for_model(model_type, **{**base, **dict(overrides)})
    with pytest.raises(UnsupportedArchitectureError) as err:
        family_of(config)
    message = str(err.value)
    for words in REFUSED[model_type, overrides]:
        assert words in message, message
    assert isinstance(err.value, ValueError) and "llama (llama)" in message


@pytest.mark.parametrize("setting,where", [("embedding_multiplier", "the embedding x_0"),
                                           ("logits_scaling", "the readout")])
def test_the_admission_probe_sees_what_the_modules_do_not_show(setting: str, where: str) -> None:
    """Granite with a multiplier has the LLaMA module tree; only its forward differs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("granite", **{setting: 4.0}), dtype=torch.float64).eval()
    with pytest.raises(UnsupportedArchitectureError, match=where) as err:
        admission_probe(LLAMA, model)
    assert f"{setting}=4.0" in str(err.value)
    neutral = AutoModelForCausalLM.from_config(_config("granite"), dtype=torch.float64).eval()
    admission_probe(LLAMA, neutral)  # the same structure without the multiplier passes
    assert neutral._controltune_admitted


def test_register_model_type(monkeypatch) -> None:
    from transformers import BertConfig

    from controltune import families

    class RenamedBert(BertConfig):
        model_type = "renamed-bert"

    config = RenamedBert(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128)
    with pytest.raises(UnsupportedArchitectureError, match="register_model_type"):
        family_of(config)
    monkeypatch.setattr(families, "_REGISTERED", {})
    register_model_type("renamed-bert", "bert")
    assert family_of(config).name == "bert"
    with pytest.raises(ValueError, match="not one of"):
        register_model_type("x", "t5")
    with pytest.raises(ValueError, match="already handled by family 'llama'"):
        register_model_type("qwen2", "gpt2")
