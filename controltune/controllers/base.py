"""The controller interface: every delta method is a controller of the residual stream.

A controller declares

* its control variables (:class:`Control`): per layer (``u_l``, living in block l),
  shared by several layers (one tensor used by many blocks), initial (``u_init``,
  acting on x_0) and terminal (``u_term``, in the readout);
* how they enter the dynamics (``form``: the one-line formula of its G);
* its running cost ``R_where(u)`` (weight decay ``(λ/2)‖u‖²`` by default);
* where it sits (``sites``).

Deltas sit *around* the frozen modules: :func:`wrap` swaps a module for a
:class:`Wrapped` that keeps the original as ``base_layer`` and calls
``delta(base_layer, *args)``, so a delta can be removed (:func:`unwrap`) and the
original module's ``forward`` is never rewritten.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from ..control import Control, cost_share

if TYPE_CHECKING:
    from typing import Any

    from ..system import ResidualSystem

GROUPS = ("addition", "specification", "reparameterisation", "combination", "reference")


class UnsupportedMethodError(ValueError):
    """A delta method that does not fit a model (names the method, model and reason)."""


def module_key(layer: int, role: str) -> str:
    """The ``ModuleDict``-safe key of the module ``role`` of block ``layer`` (``3_q``, ``2_ffn_out``)."""
    return f"{layer}_{role}".replace(".", "_").replace(":", "_")


@dataclass
class Site:
    """A module inside block ``layer`` a delta acts on (``path`` relative to the base model)."""

    layer: int
    role: str
    path: str
    module: nn.Module

    @property
    def key(self) -> str:
        """:func:`module_key` of the site: where its delta is kept in a controller's ``ModuleDict``."""
        return module_key(self.layer, self.role)


class Wrapped(nn.Module):
    """``forward(*a) = delta(base_layer, *a)``: a frozen module with a delta around it."""

    def __init__(self, base_layer: nn.Module, delta: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta = delta

    def forward(self, *args, **kwargs) -> Any:
        return self.delta(self.base_layer, *args, **kwargs)


def wrap(root: nn.Module, path: str, delta: nn.Module) -> Wrapped:
    """Replace ``root.<path>`` by ``Wrapped(original, delta)``; returns the wrapper."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    wrapped = Wrapped(getattr(parent, child), delta)
    setattr(parent, child, wrapped)
    return wrapped


def unwrap(root: nn.Module, path: str) -> nn.Module:
    """Undo :func:`wrap` at ``path``; returns the original module."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    wrapped = getattr(parent, child)
    if not isinstance(wrapped, Wrapped):
        raise ValueError(f"{path} is not wrapped")
    setattr(parent, child, wrapped.base_layer)
    return wrapped.base_layer


class ParamDelta(nn.Module):
    """A weight-space delta: run the base module with effective parameters
    ``θ_eff = g(θ₀, u)`` (``functional_call``), leaving ``θ₀`` untouched.

    Subclasses implement :meth:`effective` returning ``{name: θ_eff}`` for the
    parameters they change.
    """

    def effective(self, base: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, base: nn.Module, *args, **kwargs) -> Any:
        return functional_call(base, self.effective(base), args, kwargs, strict=False)


def resolve_targets(system: ResidualSystem, targets: Sequence[str], layers: Sequence[int] | None = None) -> list[Site]:
    """Sites for ``targets`` in ``layers`` (all blocks by default).

    A target is a role of the family vocabulary (``q``, ``v``, ``ffn_out``, ...),
    ``re:<regex>`` matched against module paths inside a block, or a dotted
    suffix of such a path.  An unknown role or an empty match is an error that
    lists the family's roles.
    """
    fam = system.family
    n = system.n_layers
    asked = list(range(n)) if layers is None else block_list(layers)
    bad = [x for x in asked if not -n <= x < n]
    if bad:
        raise UnsupportedMethodError(f"layers {bad} out of range: the model has {n} blocks (0..{n - 1}, "
                                     f"or -{n}..-1 from the end)")
    layer_list = [x + n if x < 0 else x for x in asked]
    sites: list[Site] = []
    for layer in layer_list:
        block = system.blocks[layer]
        names = [name for name, _ in block.named_modules() if name and ".base_layer" not in name
                 and not name.endswith(".delta") and ".delta." not in name]
        for target in targets:
            if target in fam.roles:
                matches = [fam.roles[target]]
            elif target.startswith("re:"):
                rx = re.compile(target[3:])
                matches = [m for m in names if rx.search(m)]
            else:
                matches = [m for m in names if m == target or m.endswith("." + target)]
            if not matches:
                raise UnsupportedMethodError(
                    f"target {target!r} matches no module of family {fam.name!r}; roles: "
                    f"{', '.join(sorted(fam.roles))}; or use 're:<regex>' / a module-path suffix "
                    f"such as {names[1]!r}"
                )
            for path in matches:
                sites.append(Site(layer, target, f"{system.block_path(layer)}.{path}", block.get_submodule(path)))
    return sites


def block_list(layers: Sequence[int] | int) -> list[int]:
    """``layers`` as a list of ints (one int is one layer); a clear error for ``1.5``, ``"a"`` or ``[]``."""
    items = [layers] if isinstance(layers, (numbers.Number, str)) else list(layers)
    out = []
    for x in items:
        if isinstance(x, str) and x.strip().lstrip("-").isdigit():
            x = int(x)
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise ValueError(f"layers must be block indices (ints, negative counts from the end), got {layers!r}")
        out.append(int(x))
    if not out:
        raise ValueError("layers is empty: give at least one block index, or leave it unset for every block")
    return out


def block_of(system: ResidualSystem, path: str) -> int | None:
    """Block index of a parameter/module path relative to the base model, or None."""
    prefix = system.family.blocks + "."
    if not path.startswith(prefix):
        return None
    return int(path[len(prefix):].split(".", 1)[0])


class Controller(nn.Module):
    """Base class of every delta method.

    Subclasses set ``method`` (registry name), ``group`` (one of ``GROUPS``) and
    ``form`` (the one-line formula of G), and implement :meth:`attach` and
    :meth:`controls`.  ``weight_decay`` λ sets the default running cost
    ``R(u) = (λ/2)‖u‖²``.
    """

    method: ClassVar[str] = ""
    group: ClassVar[str] = ""
    form: ClassVar[str] = ""
    dense: ClassVar[bool] = False
    """Its deltas (or the tensors that make them) are as large as the model's weights: a checked or trained copy
    needs several times the model's memory (``verify --jobs`` runs such methods one at a time)."""

    def __init__(self, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.weight_decay = float(weight_decay)
        self.sites: list[Site] = []

    # to implement ------------------------------------------------------------------
    def attach(self, system: ResidualSystem) -> None:
        """Insert the deltas into ``system`` (raise UnsupportedMethodError if it cannot)."""
        raise NotImplementedError

    def controls(self) -> list[Control]:
        """The control variables (only trainable ones)."""
        raise NotImplementedError

    # defaults ------------------------------------------------------------------------
    def initial_state(self, x0: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial controls acting on x_0 (S×T×d) and its mask (S×T); identity by default."""
        return x0, attention_mask

    def running_cost(self, where: int | str) -> torch.Tensor:
        """``R_where(u) = (λ/2) Σ ‖u‖²`` over the controls acting at ``where``.

        A shared control's cost is split evenly over its layers, so that
        ``Σ_l R_l`` is its whole cost and ``-∂J/∂u = Σ_l ∇_u H_l`` holds.
        """
        total = torch.zeros(())
        if self.weight_decay == 0.0:
            return total
        for c in self.controls():
            share = cost_share(c, where)
            if share:
                total = total.to(c.param) + share * 0.5 * self.weight_decay * c.param.pow(2).sum()
        return total

    def straight_through_linearisation(self) -> contextlib.AbstractContextManager:
        """A context in which a straight-through control's forward is the estimator's
        linearisation at the current control, so that its true derivative *is* the
        straight-through gradient (used by finite-difference checks).  Identity
        (a no-op context) for ordinary, differentiable controllers.
        """
        return contextlib.nullcontext()

    def finalize(self, budget: int | float | None = None) -> bool:
        """The post-training step, called once by training after the last step.

        A controller whose trained deltas need a projection (diff pruning onto a
        sparsity budget: ``budget`` entries, or that fraction when < 1) does it here
        and returns True; the default does nothing and returns False.
        """
        return False

    def frozen_controls(self) -> list[Control]:
        """Delta tensors that act in the model but are no longer trained (earlier stages of a
        sequential combination); saved in checkpoints with the controls.  None by default."""
        return []

    def n_trainable(self) -> int:
        """Number of trainable scalars (the method's parameter budget)."""
        return sum(c.param.numel() for c in self.controls())

    def describe(self) -> dict:
        """Where it acts and in which form (for ``controltune methods``)."""
        return {
            "method": self.method, "group": self.group, "form": self.form,
            "layers": sorted({s.layer for s in self.sites} | {x for c in self.controls() for x in c.layers}),
            "modules": sorted({s.role for s in self.sites}),
            "kinds": sorted({c.kind for c in self.controls()}),
            "n_trainable": self.n_trainable(),
        }


# --- registry ------------------------------------------------------------------------
REGISTRY: dict[str, type[Controller]] = {}

ALIASES: dict[str, str] = {"riccati_lora": "riccati_feedback"}
"""Deprecated method names still accepted (committed results refer to them) -> registered name."""


def canonical(method: str) -> str:
    """The registered name of ``method``; a deprecated alias warns and maps to its new name."""
    if method in ALIASES:
        new = ALIASES[method]
        warnings.warn(f"method {method!r} is deprecated; it is registered as {new!r}", DeprecationWarning,
                      stacklevel=3)
        return new
    return method


def register(cls: type[Controller]) -> type[Controller]:
    """Class decorator adding a controller to the registry under ``cls.method``."""
    if not cls.method or cls.group not in GROUPS:
        raise ValueError(f"{cls.__name__} needs a method name and a group in {GROUPS}")
    REGISTRY[cls.method] = cls
    return cls


def accepted_options(method: str) -> list[str] | None:
    """Option names the constructor of ``method`` takes (None when it takes ``**kwargs``)."""
    params = inspect.signature(REGISTRY[canonical(method)]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_options(method: str, options: dict, where: str = "") -> None:
    """Raise a ValueError listing the accepted options when ``options`` has a key ``method`` does not take.

    ``where`` prefixes the offending key in the message (``"lora."`` for a part of a combination).
    """
    accepted = accepted_options(method)
    unknown = [k for k in options if accepted is not None and k not in accepted]
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" (did you mean {where}{close[0]}?)" if close else ""
    context = f"option {where + key!r}: " if where else ""
    raise ValueError(f"{context}{method} has no option {key!r}{hint}; accepted options of {method}: "
                     f"{', '.join(accepted) or 'none'}")


def construct(method: str, options: dict | None = None) -> Controller:
    """The controller ``method`` created with ``options``, not attached yet.

    Every problem with the options (unknown method or key, a value of the wrong type)
    is a ValueError (KeyError for the method) naming the method and what it accepts.
    """
    options = dict(options or {})
    method = canonical(method)
    if method not in REGISTRY:
        raise KeyError(f"unknown method {method!r}; registered: {', '.join(sorted(REGISTRY))}")
    check_options(method, options)
    try:
        return REGISTRY[method](**options)
    except TypeError as err:
        # A wrong value type (targets=5, a missing required option) is a user input error.
        raise ValueError(f"{method}: bad options {options}: {err}") from err


def build(method: str, system: ResidualSystem, **options) -> Controller:
    """Create the controller ``method`` with ``options`` and attach it to ``system``."""
    return system.add(construct(method, options))


# --- validation of constructor options (one message style for every controller) ---------


def positive_int(value: object, name: str, who: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else a ValueError naming ``who`` and ``name``.

    Accepts ints, integral floats (``4.0``) and digit strings; refuses ``2.5``, ``True``,
    ``"four"`` and values below ``minimum`` (a fractional rank must not be floored silently).
    """
    number = value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < minimum:
        raise ValueError(f"{who}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def positive_float(value: object, name: str, who: str) -> float:
    """``value`` as a finite float ``> 0``, else a ValueError naming ``who`` and ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{who}: {name} must be a positive number, got {value!r}")
    return number


def target_names(targets: Sequence[str] | str, who: str, name: str = "targets") -> tuple[str, ...]:
    """``targets`` as a non-empty tuple of non-empty strings (one string is one target).

    An empty list would attach nothing and silently train only the head, so it is refused.
    """
    if isinstance(targets, str):
        # `--opt targets=` arrives as "": the same mistake as an empty list.
        items: object = (targets,) if targets.strip() else ()
    else:
        items = targets
    if not isinstance(items, Sequence) or not all(isinstance(t, str) and t.strip() for t in items):
        raise ValueError(f"{who}: {name} must be module roles such as q,v (strings), got {targets!r}")
    if not items:
        raise ValueError(f"{who}: {name} is empty, so nothing would be tuned but the head; give at least one "
                         "role (e.g. q,v), a module-path suffix or re:<regex>")
    return tuple(t.strip() for t in items)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator (initialisations are drawn on CPU, then moved: device-agnostic)."""
    return torch.Generator().manual_seed(int(seed))


Initializer = Callable[[torch.Generator], torch.Tensor]


def base_prefix(model: nn.Module) -> str:
    """Dotted name of ``model.base_model`` inside the HF model ('' when the model is its own base), the prefix of
    every module name peft sees."""
    return next(n for n, m in model.named_modules() if m is model.base_model)
