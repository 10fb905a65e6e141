"""How much is lost by restricting a delta to a low-dimensional structure?

A reference control ``u*`` (a trained high-rank LoRA, or full fine-tuning) is
written as weight deltas ``u*_l = {ΔW_{l,m}}`` on linear maps m of block l
(``W -> W + ΔW``, :class:`DeltaWeights`).  It is projected onto a structure Π:

* ``rank``      rank-r truncation of each ΔW (Eckart–Young, by SVD);
* ``subspace``  orthogonal projection of the flattened delta onto a seeded
                Gaussian subspace of dimension d (intrinsic-dimension tuning);
* ``sparse``    the k entries of largest magnitude (diff pruning);
* ``layers``    the delta kept only in the k blocks with the largest ‖u*_l‖.

Theory: ``|J(u*) − J(Πu*)| ≤ Lip · dist(u*, Πu*)``; :func:`compare` evaluates
for one projection the distances (per layer), the Grönwall bounds with
certified (composed, on the probed domain), global (composed, valid everywhere),
trajectory-local (Jacobian norms) and sampled (lower-bound) constants, the
co-state estimate ``−Σ⟨∇_u H, Πu* − u*⟩``, the measured gap and the dev-score
change; every bound's tightness is ``bound / measured gap``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import gronwall as gw
from . import lipschitz as lp
from .controllers.base import Control, Controller, ParamDelta, resolve_targets, unwrap, wrap
from .families.base import linear_io

STRUCTURES = ("rank", "subspace", "sparse", "layers")
REFERENCES = ("lora:<rank>", "full")


# --- the control as weight deltas ---------------------------------------------------------------


class WeightDelta(ParamDelta):
    """``W -> W + ΔW`` on one linear map; ``delta`` is stored in the layout of ``base.weight``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.transposed = type(base).__name__ == "Conv1D"  # GPT-2 keeps W as d_in×d_out
        self.delta = nn.Parameter(torch.zeros_like(base.weight))

    def effective(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": base.weight + self.delta}

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` as ``d_out×d_in``."""
        return self.delta.T if self.transposed else self.delta

    def set_dense(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.delta.copy_(value.T if self.transposed else value)


class DeltaWeights(Controller):
    """Weight deltas ``W -> W + ΔW`` on the ``targets`` linear maps of ``layers`` (one layer control each).

    Not a tuning method of its own (it is not registered): it is the common
    coordinate system in which references and their projections are compared.
    Controls are named ``delta.<layer>.<role>``; :meth:`values` / :meth:`assign`
    read and write ``{"<layer>.<role>": ΔW (d_out×d_in)}``.
    """

    method = "weight_delta"
    group = "reference"
    form = "W x -> (W + ΔW) x"

    def __init__(self, targets: Sequence[str], layers: Sequence[int] | None = None,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.targets = tuple(targets)
        self.layers = layers
        self.deltas = nn.ModuleDict()

    def attach(self, system) -> None:
        self.sites = resolve_targets(system, self.targets, self.layers)
        for site in self.sites:
            linear_io(site.module)  # rejects a non-linear target with a clear error
            delta = WeightDelta(site.module)
            self.deltas[_key(site.layer, site.role)] = delta
            wrap(system.base, site.path, delta)

    def controls(self) -> list[Control]:
        return [Control(f"delta.{s.layer}.{s.role}", self.deltas[_key(s.layer, s.role)].delta, "layer", (s.layer,))
                for s in self.sites]

    def values(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.<role>": ΔW}`` (detached copies, d_out×d_in)."""
        return {f"{s.layer}.{s.role}": self.deltas[_key(s.layer, s.role)].delta_weight().detach().clone()
                for s in self.sites}

    def assign(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set every ΔW from ``values`` (keys exactly those of :meth:`values`)."""
        expected = {f"{s.layer}.{s.role}" for s in self.sites}
        if set(values) != expected:
            raise KeyError(f"delta keys differ: missing {sorted(expected - set(values))}, "
                           f"unknown {sorted(set(values) - expected)}")
        for s in self.sites:
            self.deltas[_key(s.layer, s.role)].set_dense(values[f"{s.layer}.{s.role}"])


def _key(layer: int, role: str) -> str:
    return f"{layer}_{role}".replace(".", "_").replace(":", "_")


def key_layer(key: str) -> int:
    """Block of a delta key ``"<layer>.<role>"``."""
    return int(key.split(".", 1)[0])


def key_role(key: str) -> str:
    return key.split(".", 1)[1]


def per_layer_distance(u: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor], n_layers: int) -> list[float]:
    """``‖u_l − v_l‖`` for l = 0..L-1 (Frobenius over the block's deltas)."""
    out = [0.0] * n_layers
    for k in u:
        out[key_layer(k)] += float((u[k] - v[k]).pow(2).sum())
    return [math.sqrt(x) for x in out]


# --- projections onto low-dimensional structures -----------------------------------------------


def project_rank(values: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Best rank-``rank`` approximation of each ΔW in Frobenius norm (truncated SVD, Eckart–Young)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    out = {}
    for k, w in values.items():
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = min(rank, s.numel())
        out[k] = (u[:, :r] * s[:r]) @ vh[:r]
    return out


def project_sparse(values: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Keep the ``k`` entries of largest magnitude over all deltas (ties: by position), zero the rest."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat.abs(), min(k, flat.numel())).indices] = True
    out, start = {}, 0
    for key, v in values.items():
        n = v.numel()
        out[key] = torch.where(keep[start:start + n].view_as(v), v, torch.zeros_like(v))
        start += n
    return out


def project_layers(values: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Keep the delta only in the ``k`` blocks with the largest ``‖u_l‖`` (others zeroed)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    norms: dict[int, float] = {}
    for key, v in values.items():
        norms[key_layer(key)] = norms.get(key_layer(key), 0.0) + float(v.pow(2).sum())
    kept = set(sorted(norms, key=lambda layer: (-norms[layer], layer))[:k])
    return {key: v if key_layer(key) in kept else torch.zeros_like(v) for key, v in values.items()}


def project_subspace(values: Mapping[str, torch.Tensor], dim: int, seed: int = 0,
                     chunk: int = 1 << 16) -> dict[str, torch.Tensor]:
    """Orthogonal projection of the flattened delta v (length D) onto ``span(G)``, G a seeded D×dim Gaussian.

    ``Πv = G (GᵀG)⁻¹ Gᵀ v``; G is generated in row chunks from ``seed`` (never stored
    whole), twice: once for ``GᵀG`` and ``Gᵀv``, once for ``G c``.  Cost ``O(D·dim²)``.
    """
    if dim < 0:
        raise ValueError(f"dim must be >= 0, got {dim}")
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in values.values()])
    d_total = flat.numel()
    if dim == 0:
        proj = torch.zeros_like(flat)
    elif dim >= d_total:
        proj = flat.clone()
    else:
        gram = torch.zeros(dim, dim, dtype=torch.float64)
        gtv = torch.zeros(dim, dtype=torch.float64)
        for i, g in _gaussian_chunks(d_total, dim, seed, chunk):
            gram += g.T @ g
            gtv += g.T @ flat[i:i + g.shape[0]]
        coef = torch.linalg.solve(gram, gtv)
        proj = torch.empty_like(flat)
        for i, g in _gaussian_chunks(d_total, dim, seed, chunk):
            proj[i:i + g.shape[0]] = g @ coef
    out, start = {}, 0
    for key, v in values.items():
        out[key] = proj[start:start + v.numel()].view_as(v).to(v)
        start += v.numel()
    return out


def _gaussian_chunks(n_rows: int, dim: int, seed: int, chunk: int):
    gen = torch.Generator().manual_seed(int(seed))
    for i in range(0, n_rows, chunk):
        yield i, torch.randn(min(chunk, n_rows - i), dim, generator=gen, dtype=torch.float64)


PROJECTIONS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "rank": project_rank, "subspace": project_subspace, "sparse": project_sparse, "layers": project_layers,
}


def project(values: Mapping[str, torch.Tensor], structure: str, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Project ``values`` onto ``structure`` (one of ``STRUCTURES``) of the given ``size``."""
    if structure not in PROJECTIONS:
        raise ValueError(f"structure {structure!r} is not one of {STRUCTURES}")
    if structure == "subspace":
        return project_subspace(values, int(size), seed)
    return PROJECTIONS[structure](values, int(size))


# --- turning a trained controller into weight deltas -------------------------------------------


def lora_to_deltas(system) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Remove every LoRA controller from ``system``; return its targets and ``{"<layer>.<role>": s·BA}``."""
    from .controllers.lora import LoRA

    loras = [c for c in system.controllers if isinstance(c, LoRA)]
    if not loras:
        raise ValueError("the system has no LoRA controller")
    values: dict[str, torch.Tensor] = {}
    roles: list[str] = []
    for lora in loras:
        for site in lora.sites:
            delta = lora.deltas[f"{site.layer}_{site.role}".replace(".", "_").replace(":", "_")]
            values[f"{site.layer}.{site.role}"] = delta.delta_weight().detach().clone()
            roles.append(site.role)
            unwrap(system.base, site.path)
    system.controllers = nn.ModuleList([c for c in system.controllers if not isinstance(c, LoRA)])
    return list(dict.fromkeys(roles)), values


def full_to_deltas(system, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    """Turn a trained ``full`` controller into weight deltas on the ``targets`` linear maps.

    Those maps' weights go back to θ₀ and their ``θ − θ₀`` is returned; every other
    fine-tuned parameter (biases, norms, embeddings, other maps) keeps its trained
    value and becomes part of the frozen system both u* and Πu* share.
    """
    from .families.base import dense_weight

    full = [c for c in system.controllers if getattr(c, "method", "") == "full"]
    if not full:
        raise ValueError("the system has no full fine-tuning controller")
    ctrl = full[0]
    by_param = {id(c.param): c for c in ctrl.controls()}
    values = {}
    for site in resolve_targets(system, targets):
        w = site.module.weight
        c = by_param.get(id(w))
        if c is None:
            raise ValueError(f"{site.path}.weight is not a control of the full controller")
        theta0 = ctrl.initial_value(c)
        with torch.no_grad():
            delta = w.detach() - theta0
            w.copy_(theta0)
        values[f"{site.layer}.{site.role}"] = delta.T.clone() if dense_weight(site.module) is not w else delta.clone()
    for c in ctrl.controls():
        c.param.requires_grad_(False)
    system.controllers = nn.ModuleList([c for c in system.controllers if c is not ctrl])
    return values


# --- one comparison u* vs Πu* -----------------------------------------------------------------


@dataclass
class ReferenceConstants:
    """Per-layer constants at the reference u* (independent of the projection).

    ``local_a/local_b``: Jacobian spectral norms (state: of G for pre-LN); ``sampled_a/b``:
    sampled lower bounds; ``local_phi``: ``‖∂Φ̄/∂x_L‖``; ``grads``: ``∇_u H`` per delta key;
    ``costate_norms``: ``‖p_l‖`` for l = 0..L.
    """

    local_a: list[float]
    local_b: list[float]
    sampled_a: list[float]
    sampled_b: list[float]
    local_phi: float
    grads: dict[str, torch.Tensor]
    costate_norms: list[float]
    seconds: float
    power_converged: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"local_a": self.local_a, "local_b": self.local_b, "sampled_a": self.sampled_a,
                "sampled_b": self.sampled_b, "local_phi": self.local_phi, "costate_norms": self.costate_norms,
                "grad_norm_per_layer": self.grad_norm_per_layer(), "seconds": self.seconds,
                "power_converged": self.power_converged}

    def grad_norm_per_layer(self) -> list[float]:
        """``‖∇_{u_l} H_l‖`` per block."""
        n = len(self.local_a)
        return per_layer_distance(self.grads, {k: torch.zeros_like(v) for k, v in self.grads.items()}, n)


def _delta_controller(system) -> DeltaWeights:
    found = [c for c in system.controllers if isinstance(c, DeltaWeights)]
    if len(found) != 1:
        raise ValueError(f"the system needs exactly one DeltaWeights controller, has {len(found)}")
    return found[0]


def reference_constants(system, batch: dict, iters: int = 20, tol: float = 1e-4, sampled_steps: int = 3,
                        sampled_radius: float = 1e-2, use_pmp: bool = True, progress: bool = False
                        ) -> ReferenceConstants:
    """Trajectory-local and sampled per-layer constants and ``∇_u H`` at the current deltas u*."""
    from tqdm.auto import tqdm

    t0 = time.time()
    dw = _delta_controller(system)
    kernel = system.kernel
    system.set_kernel("eager")
    try:
        with torch.no_grad():
            traj = system.rollout(batch)
        la, lb, sa, sb, conv = [], [], [], [], []
        for layer in tqdm(range(system.n_layers), desc="per-layer constants", disable=not progress):
            x = traj.states[layer]
            ra = lp.local_state_lipschitz(system, layer, x, traj.ctx, iters=iters, tol=tol)
            rb = lp.local_control_lipschitz(system, layer, x, traj.ctx, iters=iters, tol=tol)
            la.append(ra.sigma)
            lb.append(rb.sigma)
            conv.append(ra.converged and rb.converged)
            sa.append(lp.sampled_state_lipschitz(system, layer, x, traj.ctx, radius=sampled_radius, samples=1,
                                                 steps=sampled_steps))
            sb.append(lp.sampled_control_lipschitz(system, layer, x, traj.ctx, radius=sampled_radius, samples=1,
                                                   steps=sampled_steps))
        local_phi = lp.local_terminal_lipschitz(system, traj.final, traj.ctx, batch)
    finally:
        system.set_kernel(kernel)
    grads, costate_norms = gw.hamiltonian_gradients(system, batch, use_pmp=use_pmp)
    by_name = {c.name: k for c, k in zip(dw.controls(), dw.values())}
    dense = {}
    for c in dw.controls():
        key = by_name[c.name]
        g = grads[c.name]
        dense[key] = g.T if dw.deltas[_key(key_layer(key), key_role(key))].transposed else g
    return ReferenceConstants(la, lb, sa, sb, local_phi, dense, costate_norms, time.time() - t0, conv)


def _by_control(dw: DeltaWeights, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense ``{"<layer>.<role>": ΔW}`` -> ``{control name: tensor in the parameter's layout}``."""
    out = {}
    for s in dw.sites:
        delta = dw.deltas[_key(s.layer, s.role)]
        v = values[f"{s.layer}.{s.role}"]
        out[f"delta.{s.layer}.{s.role}"] = v.T if delta.transposed else v
    return out


def _probe_all(system, states: Sequence[torch.Tensor], ctx) -> list[lp.LayerDomain]:
    return [lp.probe_block(system, layer, states[layer], ctx) for layer in range(system.n_layers)]


@torch.no_grad()
def _cost(system, batch: dict):
    traj = system.rollout(batch)
    j = system.terminal_cost(traj.final, traj.ctx, batch)
    r = [float(system.running_cost(layer)) for layer in range(system.n_layers)]
    return traj, float(j) + sum(r), r


def compare(system, batch: dict, reference: Mapping[str, torch.Tensor], projected: Mapping[str, torch.Tensor],
            constants: ReferenceConstants, dev: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """Every bound, the co-state estimate and the measured gap ``|J(u*) − J(Πu*)|`` for one projection.

    The system's :class:`DeltaWeights` is left at ``reference`` on return.
    ``dev`` (optional) scores the system at Πu* on the dev set.
    """
    dw = _delta_controller(system)
    n = system.n_layers
    post_ln = system.family.post_ln
    dw.assign(projected)
    traj_p, j_p, r_p = _cost(system, batch)
    dom_p = _probe_all(system, traj_p.states, traj_p.ctx)
    weights_p = [lp.block_weights(system, layer) for layer in range(n)]
    dev_p = dev() if dev is not None else None  # scores of Πu* (the caller scores u* once)
    sigma_f = [lp.final_norm_sigma(system, traj_p.final, traj_p.ctx)]
    dw.assign(reference)
    traj, j_ref, r_ref = _cost(system, batch)
    dom_ref = _probe_all(system, traj.states, traj.ctx)
    dom_mixed = _probe_all(system, traj_p.states, traj.ctx)  # f_l(x'_l, u*): the Grönwall mixed point
    weights = [lp.block_weights(system, layer) for layer in range(n)]
    sigma_f.append(lp.final_norm_sigma(system, traj.final, traj.ctx))

    dist = per_layer_distance(reference, projected, n)
    site_dist = {k: float((reference[k] - projected[k]).norm()) for k in reference}
    running = sum(abs(a - b) for a, b in zip(r_ref, r_p))
    gap = abs(j_ref - j_p)

    bounds: dict[str, dict[str, Any]] = {}
    for label in ("certified", "global"):
        gains, drive, domains = [], [], []
        for layer in range(n):
            if label == "certified":
                dom = dom_ref[layer].merge(dom_mixed[layer]).merge(dom_p[layer])
            else:
                dom = lp.global_domain(system, layer, traj.ctx, weights[layer], weights_p[layer])
            cb = lp.composed_block_bound(system, layer, dom, weights[layer], weights_p[layer])
            gains.append(cb.a)
            drive.append(sum(cb.b[key_role(k)] * site_dist[k] for k in reference
                             if key_layer(k) == layer))
            domains.append({"a": cb.a, "b": cb.b, **dom.to_dict()})
        if label == "certified":
            sig = [s for s in sigma_f if s is not None]
            phi = lp.terminal_lipschitz(system, traj.ctx, min(sig) if sig else None)
        else:
            phi = lp.terminal_lipschitz(system, traj.ctx)
        g = gw.gronwall(gw.state_gains(gains, post_ln), drive, phi, running)
        bounds[label] = {**g.to_dict(), "layers": domains}
    for label, a, b, phi in (("local", constants.local_a, constants.local_b, constants.local_phi),
                             ("sampled", constants.sampled_a, constants.sampled_b, constants.local_phi)):
        g = gw.gronwall(gw.state_gains(a, post_ln), [bl * d for bl, d in zip(b, dist)], phi, running)
        bounds[label] = g.to_dict()
    # First-order bounds through the true adjoint instead of a product of norms:
    # |δJ| ≈ |Σ_l ⟨p_{l+1}, ∂f_l/∂u Δu_l⟩| ≤ Σ_l ‖p_{l+1}‖ b_l ‖Δu_l‖, and ≤ Σ_l ‖∇_{u_l}H_l‖ ‖Δu_l‖.
    adj = [constants.costate_norms[layer + 1] * constants.local_b[layer] * dist[layer] for layer in range(n)]
    bounds["adjoint"] = {"cost": sum(adj) + running, "contributions": adj, "running": running}
    cs = [g * d for g, d in zip(constants.grad_norm_per_layer(), dist)]
    bounds["costate_cs"] = {"cost": sum(cs) + running, "contributions": cs, "running": running}
    # ‖∂Φ̄/∂x_L‖·‖δx_L‖ with δx_L the exact linearisation of the rollout (product of Jacobians, not of norms).
    kernel = system.kernel
    system.set_kernel("eager")
    try:
        dx = gw.linearized_state_change(system, batch, _by_control(dw, {k: projected[k] - reference[k]
                                                                        for k in reference}))
    finally:
        system.set_kernel(kernel)
    bounds["tangent"] = {"cost": constants.local_phi * dx + running, "state": dx, "running": running}
    for v in bounds.values():
        v["tightness"] = v["cost"] / gap if gap > 0 else None  # undefined when Πu* = u* on the batch
    est = gw.costate_estimate(constants.grads, dict(reference), dict(projected))
    row = {
        "distance": math.sqrt(sum(d * d for d in dist)), "distance_per_layer": dist,
        "relative_distance": math.sqrt(sum(d * d for d in dist)) / max(
            math.sqrt(sum(float(v.pow(2).sum()) for v in reference.values())), 1e-300),
        "J_reference": j_ref, "J_projected": j_p, "gap": gap, "signed_gap": j_p - j_ref,
        "costate_estimate": est, "costate_tightness": abs(est) / gap if gap > 0 else None,
        "bounds": bounds, "certified_holds": bounds["certified"]["cost"] >= gap,
        "global_holds": bounds["global"]["cost"] >= gap,
    }
    if dev_p is not None:
        row["dev_projected"] = dev_p
    return row


# --- the study: reference, constants, sweep ------------------------------------------------------


@dataclass
class Reference:
    """A trained reference u* as weight deltas in a system ready for the comparison.

    Attributes:
        system: the ResidualSystem with one :class:`DeltaWeights` at u* (and the trained head).
        values: ``{"<layer>.<role>": ΔW}``, u*.
        spec: the task's :class:`~controltune.data.TaskSpec`.
        tokenizer: the model's tokenizer.
        info: how it was trained (method, steps, train metrics).
    """

    system: Any
    values: dict[str, torch.Tensor]
    spec: Any
    tokenizer: Any
    info: dict[str, Any]


def parse_reference(text: str) -> tuple[str, int | None]:
    """``"lora:16"`` -> ``("lora", 16)``, ``"full"`` -> ``("full", None)``."""
    if text == "full":
        return "full", None
    if text.startswith("lora:") and text[5:].isdigit() and int(text[5:]) >= 1:
        return "lora", int(text[5:])
    raise ValueError(f"reference {text!r} is not one of {REFERENCES} (e.g. lora:16)")


def train_reference(model: str, task: str, reference: str = "lora:16", targets: Sequence[str] = ("q", "v"),
                    train_size: int | None = 2000, steps: int = 400, batch_size: int = 16, max_length: int = 64,
                    lr: float | None = None, seed: int = 0, device: str = "cpu", dtype: str = "float64",
                    cache: str | None = None, progress: bool = True) -> Reference:
    """Train u* on ``task`` (float32) and return it as weight deltas on ``targets`` in ``dtype``.

    ``lora:R`` trains a rank-R LoRA on ``targets`` (α = 2R) and the head; ``full``
    trains every parameter, then the ``targets`` maps' deltas become the control
    (other fine-tuned parameters stay, shared by u* and Πu*).  Training is
    :func:`controltune.train.train`.  With ``cache`` (a file path) a LoRA reference
    is saved there and re-used by a later call with the same arguments.
    """
    from pathlib import Path

    from .controllers import build
    from .data import load_split, resolve_task
    from .system import ResidualSystem
    from .train import TrainConfig, train
    from .zoo import DTYPES, load_model

    kind, rank = parse_reference(reference)
    spec = resolve_task(task)
    config = {"model": model, "task": spec.name, "reference": reference, "targets": list(targets),
              "train_size": train_size, "steps": steps, "batch_size": batch_size, "max_length": max_length,
              "lr": lr, "seed": seed}
    loaded = load_model(model, dtype="float32", device=device, seed=seed)
    system = ResidualSystem(loaded, num_labels=spec.num_labels, seed=seed)
    cached = None
    if cache is not None and kind == "lora" and Path(cache).is_file():
        cached = torch.load(cache, weights_only=False)
        if cached.get("config") != config:
            cached = None
    if cached is None:
        if kind == "lora":
            build("lora", system, rank=rank, alpha=2.0 * rank, targets=tuple(targets), seed=seed)
        else:
            build("full", system)
        examples = load_split(spec, "train", n=train_size, seed=seed)
        rate = lr if lr is not None else (5e-5 if kind == "full" else 5e-4)
        metrics = train(system, examples, None, spec, TrainConfig(
            lr=rate, steps=steps, batch_size=batch_size, max_length=max_length, warmup=0.1, seed=seed,
            progress=progress), tokenizer=loaded.tokenizer)
        info = {**config, "lr": rate, "final_train_loss": metrics["curves"]["train_loss"][-1],
                "wall_time_s": metrics["wall_time_s"]}
        if kind == "lora":
            roles, values = lora_to_deltas(system)
        else:
            values = full_to_deltas(system, targets)
            roles = list(dict.fromkeys(key_role(k) for k in values))
        if cache is not None and kind == "lora":
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"config": config, "values": values, "roles": roles, "info": info,
                        "head": {k: v.detach().clone() for k, v in system.readout.head.state_dict().items()}}, cache)
    else:
        values, roles, info = cached["values"], cached["roles"], cached["info"]
        system.readout.head.load_state_dict(cached["head"])
    layers = sorted({key_layer(k) for k in values})
    dw = system.add(DeltaWeights(roles, layers))
    system.to(DTYPES[dtype])
    for p in system.parameters():
        p.requires_grad_(False)
    for c in system.controls():
        c.param.requires_grad_(True)
    values = {k: v.to(DTYPES[dtype]) for k, v in values.items()}
    dw.assign(values)
    system.eval()
    return Reference(system, values, spec, loaded.tokenizer, info)


def evaluation_batch(ref: Reference, size: int = 32, max_length: int = 64, seed: int = 0) -> dict:
    """A fixed batch of ``size`` dev examples on which J, the gap and the bounds are computed."""
    from .data import Collator, load_split

    return Collator(ref.tokenizer, max_length)(load_split(ref.spec, "dev", n=size, seed=seed))


def dev_scorer(ref: Reference, size: int | None = None, max_length: int = 64, seed: int = 0
               ) -> Callable[[], dict[str, float]]:
    """``() -> dev metrics`` of the system as it currently is (``size`` dev rows; None: all)."""
    from .data import load_split
    from .train import evaluate

    examples = load_split(ref.spec, "dev", n=size, seed=seed)
    return lambda: evaluate(ref.system, examples, ref.spec, ref.tokenizer, batch_size=64, max_length=max_length)


def sweep(ref: Reference, batch: dict, constants: ReferenceConstants, structure: str, sizes: Sequence[int],
          dev: Callable[[], dict[str, float]] | None = None, seed: int = 0, done: set | None = None,
          on_row: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`compare` u* with its projection onto ``structure`` for each size (skipping ``done`` sizes)."""
    from tqdm.auto import tqdm

    if structure not in STRUCTURES:
        raise ValueError(f"structure {structure!r} is not one of {STRUCTURES}")
    rows = []
    for size in tqdm(list(sizes), desc=structure, disable=not progress):
        if done and (structure, int(size)) in done:
            continue
        t0 = time.time()
        projected = project(ref.values, structure, int(size), seed)
        row = {"structure": structure, "size": int(size),
               **compare(ref.system, batch, ref.values, projected, constants, dev), "seconds": time.time() - t0}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


__all__ = [
    "PROJECTIONS", "REFERENCES", "STRUCTURES", "DeltaWeights", "Reference", "ReferenceConstants", "WeightDelta",
    "compare", "dev_scorer", "evaluation_batch", "full_to_deltas", "key_layer", "key_role", "lora_to_deltas",
    "parse_reference", "per_layer_distance", "project", "project_layers", "project_rank", "project_sparse",
    "project_subspace", "reference_constants", "sweep", "train_reference",
]
