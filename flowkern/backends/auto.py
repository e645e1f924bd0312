"""The ``"auto"`` backend: the first call of each op on each device times every backend that runs there on one
problem of a Glow's size (``PROBLEM``; with the call's dtypes and options, forward and, where the call records a
gradient, backward) and keeps the fastest for the rest of the process (:func:`auto_choices` shows what was
chosen and the times). Compiled code makes the same choice when it is traced. ``AUTO_PREFERENCE`` orders the
candidates; a later one must be ``AUTO_MARGIN`` faster to displace an earlier one, so timing noise does not flip
choices between runs.
"""
import dataclasses
import functools
import statistics
import threading
import time

import torch

from .. import reference
from . import registry
from .registry import _check_name, _load, unsupported

# Candidates for "auto" per device type, in order of preference; "reference" runs everywhere.
AUTO_PREFERENCE = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
AUTO_MARGIN = 0.9  # a candidate is chosen over an earlier one if it takes under 90% of its time
AUTO_ROUNDS = 5  # timed calls per candidate, after one untimed warm-up (which compiles Triton kernels)


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` chose for one op on one device, and why.

    ``seconds`` maps each candidate to the median time of a call (forward, plus backward when
    ``backward``), or to the reason it could not run these inputs.
    """
    backend: str
    seconds: dict
    backward: bool


_choices: dict = {}  # (device str, op) -> AutoChoice
_choosing = threading.Lock()


def auto_choices() -> dict:
    """``{(device, op): AutoChoice}`` for every op ``"auto"`` has chosen a backend for in this process."""
    return dict(_choices)


def pin_auto_choices(device, choices: dict) -> None:
    """Make ``"auto"`` run each op of ``choices`` (``{op: backend name}``) on ``device`` with that backend,
    without measuring: a resumed training run keeps the choices it started with."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for op, name in choices.items():
        if op not in reference.OPS:
            raise ValueError(f"unknown op {op!r}; expected one of: {', '.join(reference.OPS)}")
        _check_name(name)
        _load(name)
        _choices[(str(device), op)] = AutoChoice(name, {}, False)


def chosen(op: str, args) -> str:
    """The backend ``"auto"`` runs ``op`` on ``args`` with, on the device of ``args[0]``."""
    device = str(args[0].device)
    choice = None if torch.compiler.is_compiling() else _choices.get((device, op))
    # Compiled code chooses once, at trace time: the choice is a constant of the graph.
    return choice.backend if choice is not None else _choose(device, op, _describe(args))


# The problem "auto" times every op on: a Glow step's tensors at its first level, for 16 images of 32×32.
PROBLEM = (16, 12, 16, 16)


def _describe(args):
    """What of ``args`` the measurement keeps: each tensor's dtype and whether the call records its gradient,
    string options and absent tensors. Constants only, so that ``torch.compile`` can pass them to
    :func:`_choose`; numbers are left out, since a compiled graph may trace them as symbols."""
    grad = torch.is_grad_enabled()
    return tuple([("tensor", a.dtype, grad and a.requires_grad) if isinstance(a, torch.Tensor)
                  else a if a is None or isinstance(a, str) else "number" for a in args])


def _problem(op, described, device):
    """Random arguments of ``op`` at the sizes of ``PROBLEM``, with the dtypes, gradient flags and string
    options of the call ``described``, drawn from a generator of their own (the caller's random stream does not
    move)."""
    n, c, height, width = PROBLEM
    if op.startswith("coupling"):
        mask, scale, layout = described[2], described[4], described[6]
        h_channels = reference.conditioner_channels(c, mask, 0, scale)[1]
        shapes, options = [PROBLEM, (n, h_channels, height, width)], [mask, 0, scale, 2.0, layout]
    elif op.startswith("actnorm"):
        shapes, options = [PROBLEM, (c,), (c,)], []
    elif op.startswith("folded_lu_weight"):
        shapes, options = [(c, c)] * 3 + [(c,)] * 4, []
    elif op == "fold_actnorms":  # a Glow conditioner's first two convolutions, 256 hidden channels
        shapes, options = [(256, c // 2, 3, 3), (256,), (256, 256, 1, 1), (256,)], []
    else:
        shapes, options = [PROBLEM, (c, c), (c,)], []
    generator = torch.Generator().manual_seed(0)  # drawn on the CPU, for every device
    args = []
    for shape, a in zip(shapes, described):
        if a is not None:
            _, dtype, requires_grad = a
            a = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(requires_grad)
        args.append(a)
    if op.startswith("folded_lu_weight"):  # P is a permutation matrix
        args[0] = torch.eye(c, dtype=args[0].dtype, device=device)[torch.randperm(c, generator=generator).to(device)]
    return args + options


@torch._dynamo.assume_constant_result
def _choose(device: str, op: str, described: tuple) -> str:
    """The backend ``"auto"`` runs ``op`` with on ``device``: measured on the first call, then remembered."""
    with _choosing:
        choice = _choices.get((device, op))
        if choice is None:
            choice = _choices[(device, op)] = _measure(torch.device(device), op, described)
    return choice.backend


def _measure(device, op, described) -> AutoChoice:
    candidates = [name for name in AUTO_PREFERENCE.get(device.type, ()) if unsupported(name, device) is None]
    if "reference" not in candidates:
        candidates.append("reference")
        _load("reference")
    args = _problem(op, described, device)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if len(candidates) == 1:
        return AutoChoice(candidates[0], {}, bool(inputs))

    def call(fn):
        with torch.enable_grad() if inputs else torch.no_grad():
            out = fn(*args)
        if inputs:
            outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
            torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds, times = {}, {}
    for name in candidates:  # the warm-up: compiles, and finds the candidates that cannot run these inputs
        try:
            call(getattr(registry._loaded[name], op))
            times[name] = []
        except Exception as exc:
            seconds[name] = f"{type(exc).__name__}: {exc}"
    best, timed = fastest({name: functools.partial(call, getattr(registry._loaded[name], op)) for name in times})
    return AutoChoice(best or "reference", {**seconds, **timed}, bool(inputs))


def fastest(calls: dict, rounds: int = AUTO_ROUNDS):
    """``(name, seconds)``: the fastest of ``calls`` (``{name: fn}``, in order of preference, warmed up and
    synchronising), by the median of ``rounds`` calls each, round-robin so that a slow moment of the machine
    hits every candidate; a later candidate must take under ``AUTO_MARGIN`` of an earlier one's time.
    ``name`` is None when ``calls`` is empty."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best, seconds = None, {}
    for name, series in times.items():
        seconds[name] = statistics.median(series)
        if best is None or seconds[name] < AUTO_MARGIN * seconds[best]:
            best = name
    return best, seconds
