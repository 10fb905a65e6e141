"""What every architecture family must say about itself.

A *family* is the one place that knows where a model keeps its blocks, how it
embeds tokens, which cross-layer inputs (masks, rotary tables) its blocks take,
the common names of the modules inside a block, and the architecture facts the
rest of the library asks about (a fused q/k/v map, the head geometry, how a
linear map stores its weight, what a composed Lipschitz bound needs per block,
whether absolute positions can be shifted).  Everything else in controltune
talks to :class:`controltune.system.ResidualSystem` and to these hooks only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

EmbedFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]
BlockFn = Callable[[nn.Module, torch.Tensor, "Context"], torch.Tensor]
SequenceLogitsFn = Callable[[nn.Module, torch.Tensor, "Context"], torch.Tensor]


class UnsupportedArchitectureError(ValueError):
    """A model whose family controltune does not know, or that differs from its family in a way
    controltune would compute wrongly (the message names what differs)."""


QKV = ("q", "k", "v")
"""The roles a fused ``qkv`` map stands for, in the order of its output thirds ``[q; k; v]``."""


@dataclass
class Context:
    """The fixed, cross-layer inputs of the blocks for one batch.

    They are computed once in ``embed`` and shared by every block, so a block
    ``f_l`` is a function of the state ``x_l`` (and its controls) alone.

    Attributes:
        attention_mask: ``S×T`` (1 = real token, 0 = padding) over the state's
            positions, prompt tokens included.
        mask: the model's attention mask in the form its attention kernel
            takes (``S×1×T×T``: boolean for sdpa, additive float for eager).
        position_ids: ``1×T`` or ``S×T`` positions of the state's tokens.
        rotary: ``(cos, sin)``, each ``S×T×d_head``, for rotary families, else ``None``.
        n_prompt: number of prompt positions prepended to the tokens in ``x_0``.
    """

    attention_mask: torch.Tensor
    mask: torch.Tensor | None
    position_ids: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    n_prompt: int = 0


@dataclass(frozen=True)
class HeadGeometry:
    """Attention heads of a model: ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads
    (``n_heads / n_kv_heads`` queries per group), each of width ``d_head``."""

    n_heads: int
    n_kv_heads: int
    d_head: int


def config_head_geometry(config: object) -> HeadGeometry:
    """:class:`HeadGeometry` from a HF config: ``num_attention_heads``, ``num_key_value_heads``
    (default: one per query head) and ``head_dim`` (default ``hidden_size / n_heads``)."""
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadGeometry(heads, int(kv_heads), int(d_head))


@dataclass(frozen=True)
class BlockAnatomy:
    """What a composed (per-operation) Lipschitz bound needs to know about one block.

    In the common role vocabulary a block is one of two layouts, ``N_*`` its norms,
    ``A`` softmax attention with queries/keys/values from the ``qkv`` maps:

    * pre-LN (``Family.post_ln`` False, ``out_norm`` None): ``f(x) = x + G(x)``,
      ``G = o(A(N_a x)) + ffn_out(σ(ffn_in(N_f(x + o(A(N_a x))))))``;
    * post-LN (``Family.post_ln`` True): ``h = N_f(x + o(A(x)))``, ``f(x) = N_out(h + ffn_out(σ(ffn_in h)))``.

    Attributes:
        activation: the FFN activation σ (elementwise, ``R -> R`` applied to tensors).
        heads: the attention's head geometry.
        scaling: the logit scale of ``q·k`` (``1/sqrt(d_head)`` unless the model says otherwise).
        qkv: roles of the maps giving q, k and v: ``("q", "k", "v")``, or ``("qkv",)`` for one
            fused map whose output is ``[q; k; v]`` in equal thirds.
        linear_roles: every linear map the bound composes (the qkv roles, ``o``, ``ffn_in``, ``ffn_out``).
        norms: the block's own norm roles.
        attn_norm: the norm whose output is the attention input, or None when the attention
            reads the block input itself (post-LN: the previous block's ``out_norm`` output,
            or the embedding norm at layer 0).
        ffn_norm: the norm whose output is the FFN input.
        out_norm: the norm whose output is the block output (post-LN), or None (pre-LN).
    """

    activation: Callable[[torch.Tensor], torch.Tensor]
    heads: HeadGeometry
    scaling: float
    qkv: tuple[str, ...]
    linear_roles: tuple[str, ...]
    norms: tuple[str, ...]
    attn_norm: str | None
    ffn_norm: str
    out_norm: str | None

    @property
    def attn_input_role(self) -> str:
        """The linear role whose input is the attention input (``q`` or ``qkv``)."""
        return self.qkv[0]

    @property
    def fused_qkv(self) -> bool:
        return self.qkv != QKV


AnatomyFn = Callable[[nn.Module, object], BlockAnatomy]
ResolveFn = Callable[[object, bool], "Family | str"]


def first_row(config: object) -> int:
    """Row of the position table of a sequence's first token: 0 (positions numbered from 0)."""
    return 0


@dataclass(frozen=True)
class Family:
    """Static description of one architecture family.

    Attributes:
        name: family name (``bert``, ``gpt2``, ``llama``, ...).
        model_types: the ``config.model_type`` values it handles.
        post_ln: True if LayerNorm follows the residual sum (BERT); then
            ``f_l`` is the whole block rather than ``x + G_l``.
        causal: decoder (causal attention, next-token readout) or encoder.
        blocks: dotted path of the ``ModuleList`` of blocks in the base model.
        final_norm: dotted path of the norm after the last block, or ``None``
            (post-LN encoders end normalised).
        roles: common vocabulary ``role -> path inside a block`` (``q``, ``k``,
            ``v``, ``qkv``, ``o``, ``ffn_in``, ``ffn_gate``, ``ffn_out``,
            ``ln_attn``, ``ln_ffn``, ``attn``, ``ffn``).
        ffn_input: path inside a block of the module whose *first input* is the
            FFN sub-block's input (parallel adapters read it).
        embed: ``(base, input_ids, token_type_ids, position_ids) -> x_0`` (S×T×d).
        call_block: ``(block, x, ctx) -> x_next`` running the real HF block.
        context_inputs: names of the cross-layer inputs the blocks take (docs).
        needs_rotary: whether ``ctx.rotary`` must be filled from the base model's rotary module.
        rotary_module: path of that module in the base model (``rotary_emb``).
        prepare: optional in-place fix-up of a model before it becomes a system
            (e.g. float64-faithful norms); must not change float32 results.
        linear_roles: the roles that are linear maps.
        head_geometry: ``config -> HeadGeometry``.
        embedding_norm: dotted path in the base model of the norm ending the embedding
            (the last operation producing ``x_0``), or None.
        first_position: ``config -> row`` of the position table the first token uses (RoBERTa
            numbers positions from ``pad_token_id + 1``; rows before it are never used).
        shiftable_embedding: dotted path in the base model of the embedding module that
            adds *absolute* positions and takes a position offset (so the tokens can be
            placed at ``n..n+T-1``), or None when positions cannot be shifted this way.
        anatomy: ``(block, config) -> BlockAnatomy`` for the composed Lipschitz bound,
            or None when that bound is not derived for the family.
        sequence_logits: ``(model, h, ctx) -> S×C``: the head of the family's HF
            ``*ForSequenceClassification`` model on ``h = norm(x_L)`` (S×T×d), exactly as its
            forward computes it (pooling included), or None when the family has none.
        sequence_head: attribute names of that head's modules on the model (what peft's
            ``modules_to_save`` saves; trained with the deltas).
        resolve: ``(config, listed) -> Family | str``, or None.  Called with every config the
            family is asked to handle: ``listed`` True when ``config.model_type`` is one of
            :attr:`model_types`, False for a model type registered for the family
            (``register_model_type``) or when the family is asked whether it recognises an
            unknown model type *by structure*.  Returns the record to use
            (this one, or a copy specialised to that model type) or one sentence naming what
            differs from the family (the model is then refused, never computed wrongly).
            None: the family handles exactly its listed model types, as they are.
    """

    name: str
    model_types: tuple[str, ...]
    post_ln: bool
    causal: bool
    blocks: str
    final_norm: str | None
    roles: dict[str, str]
    ffn_input: str
    embed: EmbedFn
    call_block: BlockFn
    context_inputs: tuple[str, ...]
    random_config: Callable[[int], object]
    needs_rotary: bool = False
    rotary_module: str = "rotary_emb"
    prepare: Callable[[nn.Module], None] | None = None
    notes: str = ""
    linear_roles: tuple[str, ...] = field(default=())
    head_geometry: Callable[[object], HeadGeometry] = config_head_geometry
    embedding_norm: str | None = None
    first_position: Callable[[object], int] = first_row
    shiftable_embedding: str | None = None
    anatomy: AnatomyFn | None = None
    resolve: ResolveFn | None = None
    sequence_logits: SequenceLogitsFn | None = None
    sequence_head: tuple[str, ...] = ()

    @property
    def fused_qkv(self) -> bool:
        """True if q, k and v come from one fused ``qkv`` map (output ``[q; k; v]`` in thirds)."""
        return "qkv" in self.roles and not any(r in self.roles for r in QKV)

    def split_fused(self, targets: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(plain, fused)``: the targets that are roles of their own, and the q/k/v targets
        that live inside the fused ``qkv`` map (empty unless :attr:`fused_qkv`); order kept."""
        targets = tuple(dict.fromkeys(targets))
        if not self.fused_qkv:
            return targets, ()
        return tuple(t for t in targets if t not in QKV), tuple(t for t in targets if t in QKV)

    def expand_targets(self, targets: Sequence[str]) -> tuple[str, ...]:
        """``targets`` with q, k, v replaced by the fused ``qkv`` map on fused families (deduplicated,
        order kept): a weight delta on any of q, k, v acts on the whole fused map."""
        if not self.fused_qkv:
            return tuple(targets)
        return tuple(dict.fromkeys("qkv" if t in QKV else t for t in targets))


# --- linear maps, whichever way the family stores them ---------------------------------------


def base_linear(module: nn.Module) -> nn.Module:
    """The linear map under any delta wrappers (``base_layer`` chains)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def stores_transposed(module: nn.Module) -> bool:
    """True if the map keeps ``W`` as d_in×d_out (transformers' ``Conv1D``, GPT-2), False for
    ``nn.Linear`` (d_out×d_in); a :class:`TypeError` for anything that is not a linear map."""
    module = base_linear(module)
    if isinstance(module, nn.Linear):
        return False
    if type(module).__name__ == "Conv1D":
        return True
    raise TypeError(f"{type(module).__name__} is not a linear map (nn.Linear or Conv1D)")


def linear_io(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear map, whichever way the family stores it.

    ``nn.Linear`` keeps ``W`` as d_out×d_in; GPT-2's ``Conv1D`` keeps it d_in×d_out.
    A linear map already wrapped by a delta (``base_layer``) keeps its shape, so
    several deltas can sit on one map (simultaneous combinations).
    """
    d_out, d_in = dense_weight(module).shape
    return d_in, d_out


def to_dense(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor in the layout of ``module.weight`` as d_out×d_in (``y = x Wᵀ + b``); a view."""
    return t.T if stores_transposed(module) else t


def from_dense(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A d_out×d_in tensor in the layout of ``module.weight`` (inverse of :func:`to_dense`); a view."""
    return t.T if stores_transposed(module) else t


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear map as d_out×d_in (``y = x Wᵀ + b``), a view of the stored weight."""
    module = base_linear(module)
    return module.weight.T if stores_transposed(module) else module.weight
