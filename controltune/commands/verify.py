"""``controltune verify``: check co-states and Hamiltonian gradients of every method on a real model.

For each registered method (or those given with ``--methods a,b``): build it on a
fresh copy of the model, with weight decay so the running cost is exercised;
move its controls a little away from their initialisation (so gradients are
generic: LoRA's ``B = 0`` would make ``∂J/∂A`` vanish); solve the co-states; and
compare them (:func:`controltune.verification.verify`) on a small batch of real text (SST-2
dev sentences when the data is present) with three legs: reverse-mode autograd (whole
tensors), forward-mode AD (one JVP per control, per-layer state directions, one joint
direction) and finite differences (Richardson, along a joint direction and per-group
directions; ``--fd-mode legacy`` for the former one-per-control ladder).
Control-designed controllers (those taking ``n_design``) are designed on
``--design-examples`` train rows of at most ``--seq-len`` tokens: the check is about
their gradients, not the quality of their design.

The table gains a row per method as it runs (with the seconds it took); the JSON row
has every error, each leg's tolerance, largest error and time (``legs``).
A method that does not fit the model (``UnsupportedMethodError``) is reported as
*skipped* with its reason; a method that fails to build or to run is *failed*.
Exit status 1 if any check fails.  ``--jobs N`` checks N methods at a time in worker
processes (each loads the model once and gets ``cores // N`` torch threads; a worker killed,
e.g. out of memory, hands the methods not yet checked to this process); every method
reseeds torch with ``--seed`` before it is built, so its row does not depend on ``--jobs``.

Example::

    controltune verify --model minilm --methods lora,prompt --dtype float64 --json results/verify.json
"""

from __future__ import annotations

import argparse
import copy
import inspect
import time
import traceback
from typing import TYPE_CHECKING, Any

import torch

from ..results import stamp, write_json

if TYPE_CHECKING:
    from collections.abc import Iterator
    from concurrent.futures import Executor

    from transformers import PreTrainedTokenizerBase

    from ..control import Control
    from ..controllers.base import Controller
    from ..system import ResidualSystem
    from ..verification.report import Verification
    from ..zoo import LoadedModel

FALLBACK_SENTENCES = ["a gripping , funny and moving film .", "dull and lifeless .",
                      "the plot is thin but the acting is superb .", "not worth the ticket ."]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="minilm", help="minilm, random:<family> or a checkpoint folder")
    parser.add_argument("--methods", default="all", help="'all' or a comma-separated list of registered methods")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences in the check batch")
    parser.add_argument("--seq-len", type=int, default=16, help="max tokens per sequence")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="λ of every controller's running cost")
    parser.add_argument("--perturb", type=float, default=0.02, help="std of the random offset added to each control")
    parser.add_argument("--mode", default="graph", choices=["graph", "recompute"], help="co-state solver mode")
    parser.add_argument("--state-directions", type=int, default=2,
                        help="forward-mode directions per state x_l (and legacy FD directions)")
    parser.add_argument("--fd-state-directions", type=int, default=1, help="finite-difference directions per state")
    parser.add_argument("--fd-mode", default="directional", choices=["directional", "legacy"],
                        help="directional: Richardson along a joint and per-group directions; legacy: one "
                             "central difference per control on the --fd-steps ladder")
    parser.add_argument("--fd-step", type=float, default=None,
                        help="relative step h of the directional finite differences (default: verify.FD_STEP)")
    parser.add_argument("--fd-steps", type=float, nargs="+", default=[1e-6, 1e-5],
                        help="legacy mode: relative finite-difference steps (the smallest error counts)")
    parser.add_argument("--no-fd", action="store_true", help="skip the finite-difference leg")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward-mode leg")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="a controller option for every checked method that takes it (repeatable), e.g. "
                             "--methods unified_subspace --opt projections=sub.safetensors --opt delta=lora")
    parser.add_argument("--design-examples", type=int, default=8,
                        help="train rows the control-designed controllers are designed on")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="methods checked at a time, each in its own process with cores/N torch threads "
                             "(rows are printed in method order)")


def check_batch(tokenizer: PreTrainedTokenizerBase, batch_size: int, seq_len: int, seed: int) -> tuple[dict, str]:
    """A batch of real sentences and where they came from."""
    from ..batching import Collator
    from ..data import DataError, Example, load_split

    try:
        examples = load_split("sst2", "dev", n=batch_size, seed=seed)
        source = "sst2/dev"
    except DataError:
        texts = (FALLBACK_SENTENCES * batch_size)[:batch_size]
        examples = [Example(t, None, i % 2) for i, t in enumerate(texts)]
        source = "fixed sentences"
    return Collator(tokenizer, max_length=seq_len)(examples), source


def perturb(controls: list[Control], scale: float, seed: int) -> None:
    """``u ← u + scale·ξ``, ξ standard normal (seeded, drawn on CPU in float64)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in controls:
            c.param.add_(scale * torch.randn(c.param.shape, generator=gen, dtype=torch.float64).to(c.param))


def method_options(cls: type[Controller], weight_decay: float, design_examples: int | None = None,
                   max_length: int | None = None, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Example options of ``cls`` plus ``weight_decay`` when its constructor takes it.

    A control-designed controller (its constructor takes ``n_design``) also gets ``n_design =
    design_examples`` and ``max_length`` when they are given; ``given`` (``--opt``) options
    override, for the keys the constructor takes.
    """
    from .methods import EXAMPLE_OPTIONS

    options = copy.deepcopy(EXAMPLE_OPTIONS.get(cls.method, {}))
    accepted = inspect.signature(cls.__init__).parameters
    if "weight_decay" in accepted:
        options["weight_decay"] = weight_decay
    if "n_design" in accepted and design_examples is not None:
        options["n_design"] = design_examples
        if "max_length" in accepted and max_length is not None:
            options["max_length"] = max_length
    options.update({k: v for k, v in (given or {}).items() if k in accepted})
    return options


def verify_method(loaded: LoadedModel, method: str, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    """One result row (see the module docstring) for ``method``."""
    from ..controllers import REGISTRY, UnsupportedMethodError
    from ..controllers.spec import parse_options
    from ..system import ResidualSystem

    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the row does not depend on the methods checked before it (nor on --jobs)
    cls = REGISTRY[method]
    row: dict[str, Any] = {"method": method, "family": loaded.family.name, "dtype": args.dtype, "group": cls.group}
    system = ResidualSystem(copy.deepcopy(loaded), seed=args.seed)
    try:
        system.add(cls(**method_options(cls, args.weight_decay, args.design_examples, args.seq_len,
                                        parse_options(getattr(args, "opt", [])))))
    except UnsupportedMethodError as err:
        return {**row, "status": "skipped", "reason": str(err), "passed": None}
    except Exception as err:  # noqa: BLE001  (a method being written must not stop the others)
        return {**row, "status": "failed", "reason": f"build: {type(err).__name__}: {err}", "passed": False}
    built = time.perf_counter()
    if not system.controls():
        return {**row, "status": "skipped", "passed": None,
                "reason": f"{method} has no controls: no co-state or control gradient to check"}
    system.eval()
    try:
        perturb(system.controls(), args.perturb, args.seed)
        report = _verify(system, batch, args)
    except Exception as err:  # noqa: BLE001
        return {**row, "status": "failed", "reason": f"run: {type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=4), "passed": False}
    return {**row, **report_row(report, system),
            "seconds": {"build": built - start, **report.seconds, "total": time.perf_counter() - start}}


def _rows(loaded: LoadedModel, methods: list[str], batch: dict, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The rows of ``methods`` in order: here one by one, or from ``--jobs`` worker processes."""
    jobs = int(getattr(args, "jobs", 1) or 1)
    if jobs == 1 or len(methods) < 2:
        for method in methods:
            yield verify_method(loaded, method, batch, args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, torch.get_num_threads() // jobs)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    rows: dict[int, dict[str, Any]] = {}
    nxt = 0
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                                 initargs=(settings, threads)) as pool:
            for index, row in _scheduled(pool, jobs, methods, batch):
                rows[index] = row
                while nxt in rows:  # rows in method order
                    yield rows.pop(nxt)
                    nxt += 1
    except BrokenProcessPool:
        # A worker was killed (out of memory: each holds a copy of the model and its method): check the rest here.
        left = [i for i in range(nxt, len(methods)) if i not in rows]
        print(f"a --jobs worker died (out of memory? each holds a copy of the model and its method); checking the "
              f"{len(left)} remaining methods one by one in this process", flush=True)
        for i in range(nxt, len(methods)):
            yield rows.pop(i) if i in rows else verify_method(loaded, methods[i], batch, args)


def _scheduled(pool: Executor, jobs: int, methods: list[str], batch: dict) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, row)`` as methods finish in ``pool``: the dense ones (:attr:`Controller.dense`, several times the
    model's memory each) first and never two at a time, the others filling the remaining workers."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from ..controllers import REGISTRY

    pending = sorted(range(len(methods)), key=lambda i: not REGISTRY[methods[i]].dense)
    running: dict[Any, int] = {}
    while pending or running:
        dense_running = any(REGISTRY[methods[i]].dense for i in running.values())
        free = jobs - len(running)
        for i in list(pending):
            if free == 0:
                break
            if REGISTRY[methods[i]].dense and dense_running:
                continue
            running[pool.submit(_worker_row, methods[i], batch)] = i
            pending.remove(i)
            dense_running |= REGISTRY[methods[i]].dense
            free -= 1
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            yield running.pop(future), future.result()


_WORKER: dict[str, Any] = {}


def _worker_start(settings: dict[str, Any], threads: int) -> None:
    """A worker process: its thread budget and its own copy of the model."""
    from ..zoo import load_model

    torch.set_num_threads(threads)
    args = argparse.Namespace(**settings)
    _WORKER.update(args=args, loaded=load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed))


def _worker_row(method: str, batch: dict) -> dict[str, Any]:
    return verify_method(_WORKER["loaded"], method, batch, _WORKER["args"])


def _verify(system: ResidualSystem, batch: dict, args: argparse.Namespace) -> Verification:
    from ..verification import FD_STEP, verify

    return verify(system, batch, mode=args.mode, fd=not args.no_fd, forward=not args.no_forward,
                  n_state_directions=args.state_directions, fd_state_directions=args.fd_state_directions,
                  fd_mode=args.fd_mode, fd_step=FD_STEP if args.fd_step is None else args.fd_step,
                  fd_steps=tuple(args.fd_steps), seed=args.seed)


def report_row(report: Verification, system: ResidualSystem) -> dict[str, Any]:
    """The JSON row of a :class:`~controltune.verification.Verification` (legs, tolerances, every error)."""
    info = report.to_dict()
    ran = info["legs"]
    return {"status": "passed" if report.passed else "failed", "n_layers": report.n_layers,
            "n_controls": report.n_controls, "kinds": sorted({c.kind for c in system.controls()}),
            "max_rel_err_costate": report.max_rel_err_costate,
            "max_rel_err_control_grad": report.max_rel_err_control_grad,
            "max_rel_err_forward": report.max_rel_err_forward if "forward" in ran else None,
            "max_rel_err_fd": report.max_rel_err_fd if "fd" in ran else None,
            "max_rel_err_fd_raw": report.fd_raw_max if "fd" in ran else None,
            "tol_autograd": report.tol_autograd, "tol_forward": report.tol_forward, "tol_fd": report.tol_fd,
            "fd_raw_ceiling": report.fd_raw_ceiling, "legs": ran, "passed": report.passed,
            "failures": info["failures"][:10],
            **{k: info[k] for k in ("costate_autograd", "control_autograd", "costate_forward", "control_forward",
                                    "forward_joint", "costate_fd", "costate_fd_raw", "fd_directions",
                                    "fd_directions_raw", "control_fd", "fd_mode", "fd_step", "fd_refined", "fd_kinks",
                                    "zero_scale")}}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _reason(text: str, width: int = 240) -> str:
    """A failure reason on one table line, long enough to keep where it happened
    (a CoStateError names the layer of the first non-finite co-state and whether the
    forward pass had already diverged)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def check_given_options(methods: list[str], items: list[str]) -> None:
    """Refuse an ``--opt`` key that none of ``methods`` takes (it would be silently ignored)."""
    from ..controllers import REGISTRY
    from ..controllers.spec import parse_options

    for key in parse_options(items):
        if not any(key in inspect.signature(REGISTRY[m].__init__).parameters for m in methods):
            raise ValueError(f"--opt {key}: none of the checked methods ({', '.join(methods)}) takes {key!r}")


def run(args: argparse.Namespace) -> int:
    from ..controllers import REGISTRY
    from ..zoo import check_length, load_model

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    torch.manual_seed(args.seed)
    if args.methods == "all":
        methods = sorted(REGISTRY, key=lambda m: (REGISTRY[m].group, m))  # snapshot: the registry may grow
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in REGISTRY]
        if unknown:
            raise KeyError(f"unknown method(s) {unknown}; registered: {', '.join(sorted(REGISTRY))}")
    check_given_options(methods, args.opt)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed)
    check_length(loaded, args.seq_len, "--seq-len")
    batch, source = check_batch(loaded.tokenizer, args.batch_size, args.seq_len, args.seed)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    print(f"verify {args.model} ({loaded.family.name}, {args.dtype}) on {batch['input_ids'].shape[0]}×"
          f"{batch['input_ids'].shape[1]} tokens of {source}")
    header = (f"{'method':<22} {'family':<8} {'ctrls':>5} {'costate':>8} {'grad_u H':>8} {'forward':>8} "
              f"{'FD':>8} {'FD raw':>8} {'secs':>6}  result")
    print(header + "\n" + "-" * len(header), flush=True)
    results = []
    for row in _rows(loaded, methods, batch, args):
        method = row["method"]
        results.append(row)
        extra = row.get("reason", "") if row["status"] != "passed" else ""
        if row["status"] == "failed" and not extra:
            extra = "; ".join(row["failures"][:2])
        seconds = row.get("seconds", {}).get("total")
        print(f"{method:<22} {row['family']:<8} {row.get('n_controls', '-'):>5} "
              f"{_fmt(row.get('max_rel_err_costate')):>8} {_fmt(row.get('max_rel_err_control_grad')):>8} "
              f"{_fmt(row.get('max_rel_err_forward')):>8} "
              f"{_fmt(row.get('max_rel_err_fd')):>8} {_fmt(row.get('max_rel_err_fd_raw')):>8} "
              f"{'-' if seconds is None else f'{seconds:.1f}':>6}  "
              f"{row['status']}{'  ' + _reason(extra) if extra else ''}",
              flush=True)
    n_failed = sum(r["status"] == "failed" for r in results)
    n_skipped = sum(r["status"] == "skipped" for r in results)
    print(f"{len(results) - n_failed - n_skipped} passed, {n_failed} failed, {n_skipped} skipped")
    if args.json:
        config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json(args.json, {**stamp(config), "model": args.model, "dtype": args.dtype, "batch_source": source,
                               "results": results})
    return 1 if n_failed else 0
