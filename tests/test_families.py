"""The architecture facts each family declares (controltune/families/) and that the rest of the library uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import controltune as ct
from controltune.families import FAMILIES, QKV, find_family
from controltune.families.base import dense_weight, from_dense, linear_io, stores_transposed, to_dense

MODELS = {name: f"random:{name}" for name in FAMILIES}


@pytest.fixture(scope="module")
def loaded():
    return {name: ct.load_model(model, dtype="float64") for name, model in MODELS.items()}


def test_fused_qkv_targets_are_rewritten_only_for_fused_families() -> None:
    gpt2, bert, llama = FAMILIES["gpt2"], FAMILIES["bert"], FAMILIES["llama"]
    assert gpt2.fused_qkv and not bert.fused_qkv and not llama.fused_qkv
    assert gpt2.expand_targets(("q", "v", "o", "k")) == ("qkv", "o")
    assert bert.expand_targets(("q", "v", "o")) == ("q", "v", "o")
    assert gpt2.split_fused(("k", "ffn_out", "v", "k")) == (("ffn_out",), ("k", "v"))
    assert bert.split_fused(("k", "ffn_out")) == (("k", "ffn_out"), ())
    assert QKV == ("q", "k", "v")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_head_geometry_matches_the_attention_modules(loaded, name) -> None:
    model = loaded[name].model
    geometry = FAMILIES[name].head_geometry(model.config)
    assert geometry.n_heads * geometry.d_head == model.config.hidden_size
    assert geometry.n_kv_heads == (2 if name == "llama" else geometry.n_heads)  # LLaMA: grouped-query attention
    system = ct.ResidualSystem(loaded[name])
    block = system.blocks[0]
    roles = FAMILIES[name].roles
    k = block.get_submodule(roles["k"] if "k" in roles else roles["qkv"])
    d_out = linear_io(k)[1] // (3 if FAMILIES[name].fused_qkv else 1)
    assert d_out == geometry.n_kv_heads * geometry.d_head


def test_linear_maps_in_either_layout(loaded) -> None:
    gpt2 = ct.ResidualSystem(loaded["gpt2"]).blocks[0].get_submodule("attn.c_attn")  # Conv1D, W stored d_in×d_out
    linear = nn.Linear(5, 3, dtype=torch.float64)
    assert stores_transposed(gpt2) and not stores_transposed(linear)
    for module in (gpt2, linear):
        d_in, d_out = linear_io(module)
        w = dense_weight(module)
        assert w.shape == (d_out, d_in)
        x = torch.randn(2, d_in, dtype=torch.float64)
        assert torch.allclose(module(x), x @ w.T + module.bias)  # y = x Wᵀ + b
        g = torch.randn_like(module.weight)
        assert to_dense(module, g).shape == (d_out, d_in) and from_dense(module, to_dense(module, g)).equal(g)
    with pytest.raises(TypeError, match="not a linear map"):
        linear_io(nn.LayerNorm(4))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_block_anatomy_names_real_modules(loaded, name) -> None:
    family = FAMILIES[name]
    system = ct.ResidualSystem(loaded[name])
    if family.anatomy is None:  # LLaMA: rotary attention, gated FFN, RMSNorm are not covered
        assert name == "llama"
        return
    anatomy = family.anatomy(system.blocks[1], system.model.config)
    assert set(anatomy.linear_roles) <= set(family.linear_roles) and set(anatomy.qkv) <= set(anatomy.linear_roles)
    assert all(r in family.roles for r in (*anatomy.norms, "o", "ffn_in", "ffn_out"))
    assert (anatomy.out_norm is not None) == family.post_ln and (anatomy.attn_norm is None) == family.post_ln
    assert anatomy.fused_qkv == family.fused_qkv
    assert anatomy.heads == family.head_geometry(system.model.config)
    assert anatomy.scaling == pytest.approx(anatomy.heads.d_head ** -0.5)
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    assert torch.allclose(anatomy.activation(z), nn.functional.gelu(z), atol=1e-3)  # both use GELU variants
    if family.embedding_norm is not None:
        assert isinstance(system.base.get_submodule(family.embedding_norm), nn.LayerNorm)


def test_absolute_positions_and_their_first_row(loaded) -> None:
    for name, family in FAMILIES.items():
        if family.shiftable_embedding is not None:
            assert not family.causal
            ct.ResidualSystem(loaded[name]).base.get_submodule(family.shiftable_embedding)
        config = loaded[name].model.config
        assert find_family(config) is family
        assert family.first_position(config) == (config.pad_token_id + 1 if name == "roberta" else 0)
    assert find_family(object()) is None


def test_using_kernel_switches_and_restores(loaded) -> None:
    system = ct.ResidualSystem(loaded["bert"], kernel="sdpa")
    with system.using_kernel("eager"):
        assert system.kernel == "eager"
    assert system.kernel == "sdpa"
    with pytest.raises(RuntimeError), system.using_kernel("eager"):
        raise RuntimeError("the body failed")
    assert system.kernel == "sdpa"
