"""Tests for the addition-family controllers (adapters, prefix, prompt), (IA)^3 and UniPELT."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import copy
import functools

import pytest
import torch
from torch import nn

import controltune as ct
from controltune.controllers import REGISTRY, UnsupportedMethodError, build
from controltune.controllers.adapter import Bottleneck, InputTap, SequentialAdapterDelta
from controltune.controllers.base import Wrapped, seeded_generator
from controltune.zoo import LoadedModel

FAMILIES = ["random:bert", "random:roberta", "random:gpt2", "random:llama"]
M, P, R, N_PROMPT, H_MLP = 4, 3, 2, 3, 8  # bottleneck, prefix length, LoRA rank, prompt tokens, MLP width

# case -> (registry name, options).  Smooth nonlinearities: with ReLU a random perturbation can leave
# a tiny model's bottleneck units all inactive (dead), and then no gradient reaches W_down.
CASES = {
    "adapter": ("adapter", {"bottleneck": M, "nonlinearity": "gelu"}),
    "pfeiffer": ("pfeiffer", {"bottleneck": M, "nonlinearity": "tanh"}),
    "parallel_adapter": ("parallel_adapter", {"bottleneck": M, "nonlinearity": "gelu"}),
    "prefix": ("prefix", {"length": P}),
    "prefix_reparam": ("prefix", {"length": P, "reparam": True, "hidden": H_MLP}),
    "prompt": ("prompt", {"n_tokens": N_PROMPT}),
    "ia3": ("ia3", {}),
    "unipelt": ("unipelt", {"lora_rank": R, "prefix_length": P, "bottleneck": M, "nonlinearity": "gelu"}),
    "unipelt_no_prefix": ("unipelt", {"lora_rank": R, "bottleneck": M, "parts": ("lora", "adapter"),
                                      "nonlinearity": "gelu"}),
    "unipelt_reparam": ("unipelt", {"lora_rank": R, "prefix_length": P, "bottleneck": M, "nonlinearity": "gelu",
                                    "prefix_reparam": True, "prefix_hidden": H_MLP}),
}
IDENTITY = ["adapter", "pfeiffer", "parallel_adapter", "ia3", "unipelt_no_prefix"]
NOT_IDENTITY = ["prefix", "prefix_reparam", "prompt", "unipelt", "unipelt_reparam"]
PREFIXED = ["prefix", "prefix_reparam", "unipelt", "unipelt_reparam"]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _pristine(name: str, dtype: str) -> LoadedModel:
    return ct.load_model(name, dtype=dtype, seed=0)


def fresh(name: str, dtype: str = "float64") -> LoadedModel:
    """A private copy of a zoo model (controllers rewire the model they attach to)."""
    base = _pristine(name, dtype)
    return LoadedModel(base.name, copy.deepcopy(base.model), base.tokenizer, base.family)


def make_batch(lengths: list[int], seed: int = 0) -> dict:
    """Right-padded random-token batch with the given real lengths."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1000, 2000, (len(lengths), t), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(len(lengths)) % 2}


def system_with(name: str, case: str | None, dtype: str = "float64", **system_kwargs):
    system = ct.ResidualSystem(fresh(name, dtype), **system_kwargs)
    controller = None
    if case is not None:
        method, options = CASES[case]
        controller = build(method, system, **options)
    return system, controller


@torch.no_grad()
def perturb(controller, scale: float = 0.1, seed: int = 1) -> None:
    """Move every control off its initial value (zero-initialised factors block gradients)."""
    gen = torch.Generator().manual_seed(seed)
    for c in controller.controls():
        c.param.add_(scale * torch.randn(c.param.shape, generator=gen, dtype=torch.float64).to(c.param))


# --- (1) identity at initialisation -------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", IDENTITY)
def test_identity_at_init(name, case):
    batch = make_batch([6, 4, 5])
    bare, _ = system_with(name, None)
    system, controller = system_with(name, case)
    with torch.no_grad():
        y0, y1 = bare(batch), system(batch)
    assert (y1 - y0).abs().max().item() <= 1e-12
    perturb(controller)  # the delta is wired in: moving the controls moves the output
    with torch.no_grad():
        assert (system(batch) - y0).abs().max().item() > 1e-6


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", NOT_IDENTITY)
def test_prefix_and_prompt_change_the_output(name, case):
    batch = make_batch([6, 4, 5])
    bare, _ = system_with(name, None)
    system, _ = system_with(name, case)
    with torch.no_grad():
        y0, y1 = bare(batch), system(batch)
    assert y1.shape == y0.shape
    assert torch.isfinite(y1).all()
    assert (y1 - y0).abs().max().item() > 1e-6


# --- (2) gradients reach every control -----------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_every_control(name, case):
    system, controller = system_with(name, case)
    perturb(controller)
    system.cost(make_batch([6, 4, 5])).backward()
    controls = controller.controls()
    assert controls
    for c in controls:
        assert c.param.grad is not None, c.name
        assert torch.isfinite(c.param.grad).all(), c.name
        assert c.param.grad.abs().max().item() > 0, c.name
    assert all(p.grad is None for n, p in system.model.named_parameters() if "delta" not in n)


# --- (3) trainable counts --------------------------------------------------------------------
def dims(config) -> dict[str, int]:
    d, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    return {"d": d, "H": heads, "H_kv": kv, "D": d // heads, "d_ff": d_ff, "L": config.num_hidden_layers}


def expected_count(case: str, name: str, config) -> int:
    g = dims(config)
    d, L, D, kv, d_ff = g["d"], g["L"], g["D"], g["H_kv"], g["d_ff"]
    adapter = 2 * d * M + M + d                   # W_down, b_down, W_up, b_up
    gate = d + 1                                    # w, b
    prefix_layer = 2 * kv * P * D                   # P_k, P_v
    mlp = P * d + d * H_MLP + H_MLP + H_MLP * L * 2 * kv * D + L * 2 * kv * D
    if name == "random:gpt2":                       # LoRA on the fused qkv map
        lora = R * d + 3 * d * R + gate
    else:                                           # LoRA on q (d -> d) and v (d -> H_kv·D)
        lora = (R * d + d * R + gate) + (R * d + kv * D * R + gate)
    unipelt_no_prefix = L * (lora + adapter + gate)
    return {
        "adapter": L * 2 * adapter,
        "pfeiffer": L * adapter,
        "parallel_adapter": L * adapter,
        "prefix": L * prefix_layer,
        "prefix_reparam": mlp,
        "prompt": N_PROMPT * d,
        "ia3": L * (2 * kv * D + d_ff),
        "unipelt": unipelt_no_prefix + L * (prefix_layer + gate),
        "unipelt_no_prefix": unipelt_no_prefix,
        "unipelt_reparam": unipelt_no_prefix + mlp + L * gate,
    }[case]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_trainable_count_and_kinds(name, case):
    system, controller = system_with(name, case)
    assert controller.n_trainable() == expected_count(case, name, system.model.config)
    controls = controller.controls()
    assert len({c.name for c in controls}) == len(controls)
    n = system.n_layers
    for c in controls:
        assert c.param.requires_grad
        if c.kind == "layer":
            assert len(c.layers) == 1 and 0 <= c.layers[0] < n, c.name
        elif c.kind == "shared":
            assert c.layers == tuple(range(n)), c.name
        else:
            assert c.kind == "init" and case == "prompt" and c.layers == (), c.name
    reparam = case.endswith("reparam")
    assert any(c.kind == "shared" for c in controls) == reparam


# --- (4) prefix with padding -------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", [*PREFIXED, "prompt"])
def test_padding_does_not_change_a_sequence(name, case):
    system, controller = system_with(name, case)
    perturb(controller, 0.05)
    padded = make_batch([4, 7, 5], seed=3)
    alone = {k: v[:1, :4] for k, v in padded.items() if k != "labels"}
    with torch.no_grad():
        y_padded, y_alone = system(padded)[0], system(alone)[0]
    assert (y_padded - y_alone).abs().max().item() <= 1e-10


# --- (5) eager and sdpa kernels agree with a prefix ---------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", PREFIXED)
def test_eager_and_sdpa_agree_with_a_prefix(name, case):
    system, controller = system_with(name, case)
    perturb(controller, 0.05)
    batch = make_batch([6, 3, 5], seed=4)
    with torch.no_grad():
        y_sdpa = system(batch)
        system.set_kernel("eager")
        y_eager = system(batch)
    assert (y_sdpa - y_eager).abs().max().item() <= 1e-10


# --- prefix locality: layer l's prefix depends on layer l's controls only (unless reparam) --------
def _attention(system, layer: int) -> nn.Module:
    module = system.blocks[layer].get_submodule(system.family.roles["attn"])
    while isinstance(module, Wrapped):
        module = module.base_layer
    return module


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("reparam", [False, True])
def test_prefix_depends_on_own_layer_unless_reparameterised(name, reparam):
    system, controller = system_with(name, "prefix_reparam" if reparam else "prefix")
    controls = controller.controls()
    kv_heads, head_dim = dims(system.model.config)["H_kv"], dims(system.model.config)["D"]
    for layer in range(system.n_layers):
        key, value = _attention(system, layer).ct_prefix(2)
        assert key.shape == value.shape == (2, kv_heads, P, head_dim)
        grads = torch.autograd.grad(key.sum() + value.sum(), [c.param for c in controls], allow_unused=True)
        reached = {c.name for c, g in zip(controls, grads) if g is not None and g.abs().max().item() > 0}
        if reparam:
            assert reached == {c.name for c in controls}
        else:
            assert reached == {f"prefix.{layer}.key", f"prefix.{layer}.value"}


def test_reparam_prefix_running_cost_is_split_over_layers():
    system, controller = system_with("random:llama", "prefix_reparam")
    controller.weight_decay = 0.3
    full = 0.5 * 0.3 * sum(c.param.pow(2).sum() for c in controller.controls())
    per_layer = [controller.running_cost(layer) for layer in range(system.n_layers)]
    assert torch.allclose(torch.stack(per_layer), full / system.n_layers)
    assert torch.allclose(sum(per_layer), full)


def test_ia3_running_cost_penalises_the_delta_from_identity():
    system, controller = system_with("random:bert", "ia3")
    controller.weight_decay = 0.5
    assert all(controller.running_cost(layer).item() == 0.0 for layer in range(system.n_layers))
    perturb(controller)
    expected = [0.25 * sum((c.param - 1).pow(2).sum() for c in controller.controls() if c.layers == (layer,))
                for layer in range(system.n_layers)]
    for layer in range(system.n_layers):
        assert torch.allclose(controller.running_cost(layer), expected[layer], atol=0, rtol=1e-14)
    assert controller.running_cost("init").item() == 0.0


# --- pieces and placement ----------------------------------------------------------------------
@pytest.mark.parametrize("nonlinearity", ["relu", "gelu", "tanh"])
def test_sequential_adapter_formula(nonlinearity):
    like = torch.zeros((), dtype=torch.float64)
    g = Bottleneck(5, 3, 5, nonlinearity, 0.7, gen=seeded_generator(0), like=like)
    with torch.no_grad():
        g.W_up.normal_()
        g.b_up.normal_()
    base = nn.Linear(4, 5).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    h = base(x)
    f = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[nonlinearity]
    expected = h + 0.7 * (f(h @ g.W_down + g.b_down) @ g.W_up + g.b_up)
    assert torch.allclose(SequentialAdapterDelta(g)(base, x), expected, atol=1e-14, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_parallel_adapter_reads_the_ffn_input(name):
    """The tap on ``ffn_in`` sees exactly the FFN sub-block input named by the family's ``ffn_input``.

    (BERT: the second argument of ``BertOutput``; GPT-2/LLaMA: the first argument of the MLP.)
    """
    system, controller = system_with(name, "parallel_adapter")
    seen = {}
    module = system.blocks[1].get_submodule(system.family.ffn_input)
    arg = 1 if system.family.post_ln else 0
    taps = [m for m in system.blocks[1].modules() if isinstance(m, InputTap)]
    assert len(taps) == 1
    handles = [module.register_forward_pre_hook(lambda mod, args: seen.__setitem__("ffn", args[arg])),
               # the tap is called as tap(base_layer, x)
               taps[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("tap", args[1]))]
    try:
        with torch.no_grad():
            system(make_batch([5, 3]))
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen["tap"], seen["ffn"])
    assert taps[0].value is None  # released by its one reader, the delta at ffn_out


def test_ia3_on_fused_qkv_leaves_queries_alone():
    system, controller = system_with("random:gpt2", "ia3")
    d = system.d_model
    c_attn = system.blocks[0].attn.c_attn
    assert isinstance(c_attn, Wrapped)
    with torch.no_grad():
        for c in controller.controls():
            c.param.fill_(2.0)
        x = torch.randn(1, 3, d, dtype=torch.float64)
        y0, y1 = c_attn.base_layer(x), c_attn(x)
    assert torch.equal(y1[..., :d], y0[..., :d])
    assert torch.allclose(y1[..., d:], 2 * y0[..., d:], atol=1e-14, rtol=0)


def test_prompt_extends_state_and_mask():
    system, controller = system_with("random:bert", "prompt")
    batch = make_batch([5, 3])
    x0, ctx = system.embed(batch)
    assert x0.shape == (2, 5 + N_PROMPT, system.d_model)
    assert ctx.n_prompt == N_PROMPT
    assert ctx.attention_mask[:, :N_PROMPT].eq(1).all()
    assert torch.equal(ctx.attention_mask[:, N_PROMPT:], batch["attention_mask"])
    assert torch.equal(x0[0, :N_PROMPT], controller.prompt)


@pytest.mark.parametrize("case", ["parallel_adapter", "unipelt"])
def test_system_can_be_deep_copied_after_a_forward(case):
    system, controller = system_with("random:bert", case)
    perturb(controller)
    batch = make_batch([5, 3])
    system.cost(batch)  # graph built, not freed
    twin = copy.deepcopy(system)
    with torch.no_grad():
        assert torch.equal(twin(batch), system(batch))


def test_layers_and_seed_options():
    system_a, _ = system_with("random:llama", None)
    a = build("adapter", system_a, bottleneck=M, layers=[0, 2], seed=5)
    system_b, _ = system_with("random:llama", None)
    b = build("adapter", system_b, bottleneck=M, layers=[0, 2], seed=5)
    system_c, _ = system_with("random:llama", None)
    c = build("adapter", system_c, bottleneck=M, layers=[0, 2], seed=6)
    assert {x.layers[0] for x in a.controls()} == {0, 2}
    assert all(torch.equal(x.param, y.param) for x, y in zip(a.controls(), b.controls()))
    assert not torch.equal(a.controls()[0].param, c.controls()[0].param)


@pytest.mark.parametrize("case", list(CASES))
def test_params_follow_model_dtype(case):
    _, controller = system_with("random:gpt2", case, dtype="float32")
    assert all(c.param.dtype == torch.float32 for c in controller.controls())


def test_registry_and_forms():
    for method in ("adapter", "pfeiffer", "parallel_adapter", "prefix", "prompt", "ia3", "unipelt"):
        cls = REGISTRY[method]
        assert cls.form and "\n" not in cls.form
        assert cls.group in ("addition", "reparameterisation", "combination")


# --- bad input -----------------------------------------------------------------------------------
def test_unknown_role_and_non_linear_targets_are_refused():
    system, _ = system_with("random:bert", None)
    with pytest.raises(UnsupportedMethodError, match="roles"):
        build("adapter", system, targets=("nonexistent_role",))
    system, _ = system_with("random:bert", None)
    with pytest.raises(UnsupportedMethodError, match="not a linear map"):
        build("adapter", system, targets=("attn",))
    system, _ = system_with("random:llama", None)
    with pytest.raises(UnsupportedMethodError, match="roles"):
        build("ia3", system, targets=("qkv",))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="nonlinearity"):
        REGISTRY["adapter"](nonlinearity="swish")
    with pytest.raises(ValueError, match="bottleneck"):
        REGISTRY["parallel_adapter"](bottleneck=0)
    with pytest.raises(ValueError, match="length"):
        REGISTRY["prefix"](length=0)
    with pytest.raises(ValueError, match="n_tokens"):
        REGISTRY["prompt"](n_tokens=0)
    with pytest.raises(ValueError, match="parts"):
        REGISTRY["unipelt"](parts=("lora", "bitfit"))


def test_two_prefixes_do_not_stack_silently():
    system, _ = system_with("random:gpt2", "prefix")
    with pytest.raises(UnsupportedMethodError, match="already carries a prefix"):
        build("prefix", system, length=2)


# --- (6) the real MiniLM ------------------------------------------------------------------------
def test_minilm_adapter_and_prefix_shapes():
    loaded = ct.load_model("minilm", dtype="float32")
    system = ct.ResidualSystem(loaded)
    adapter = build("adapter", system, bottleneck=16)
    prefix = build("prefix", system, length=4)
    d, n = 384, 6
    shapes = {c.name: tuple(c.param.shape) for c in adapter.controls()}
    assert len(shapes) == n * 2 * 4
    assert shapes["adapter.0.o.W_down"] == (d, 16) and shapes["adapter.5.ffn_out.W_up"] == (16, d)
    assert adapter.n_trainable() == n * 2 * (2 * d * 16 + 16 + d)
    pshapes = {c.name: tuple(c.param.shape) for c in prefix.controls()}
    assert pshapes["prefix.3.key"] == (12, 4, 32) and len(pshapes) == 2 * n
    batch = loaded.tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = system({k: v for k, v in batch.items()})
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
