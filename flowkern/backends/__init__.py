"""Backend registry: which implementation of each fused op runs.

A backend is a module that defines every name in ``flowkern.reference.OPS`` with the reference's
signature, and may define ``unsupported(device) -> str | None``: why it cannot run ops on ``device``
(``None`` when it can; a backend without it runs everywhere).

The active setting is a process-wide default (:func:`set_backend`), overridden inside
:func:`use_backend` blocks, which are local to the thread or task that entered them. Under ``"auto"``,
the first call of each op on each device times every backend that runs there on one problem of a Glow's
size (``PROBLEM``; with the call's dtypes and options, forward and, where the call records a gradient,
backward) and keeps the fastest for the rest of the process (:func:`auto_choices` shows what was chosen
and the times). Compiled code makes the same choice when it is traced. ``AUTO_PREFERENCE`` orders the
candidates; a later one must be ``AUTO_MARGIN`` faster to displace an earlier one, so timing noise does
not flip choices between runs.
"""
import contextlib
import contextvars
import dataclasses
import functools
import importlib
import statistics
import threading
import time

import torch

from .. import reference

AUTO = "auto"

# name -> module path, imported on first use; an ImportError or BackendUnavailable says why not.
_MODULES = {
    "reference": "flowkern.reference",
    "triton": "flowkern.backends.triton",
    "native": "flowkern.backends.native",
}

# Candidates for "auto" per device type, in order of preference; "reference" runs everywhere.
AUTO_PREFERENCE = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
AUTO_MARGIN = 0.9  # a candidate is chosen over an earlier one if it takes under 90% of its time
AUTO_ROUNDS = 5  # timed calls per candidate, after one untimed warm-up (which compiles Triton kernels)


class BackendUnavailable(RuntimeError):
    """Raised when a known backend cannot be used here; the message says why."""


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` chose for one op on one device, and why.

    ``seconds`` maps each candidate to the median time of a call (forward, plus backward when
    ``backward``), or to the reason it could not run these inputs.
    """
    backend: str
    seconds: dict
    backward: bool


_loaded: dict = {}
_reasons: dict = {}
_default = AUTO
_override = contextvars.ContextVar("flowkern_backend", default=None)
_choices: dict = {}  # (device str, op) -> AutoChoice
_choosing = threading.Lock()


def _load(name):
    if name in _loaded:
        return _loaded[name]
    if name in _reasons:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_reasons[name]}")
    try:
        module = importlib.import_module(_MODULES[name])
        missing = [op for op in reference.OPS + reference.BACKWARD_OPS if not callable(getattr(module, op, None))]
        if missing:
            raise BackendUnavailable(f"it does not define {', '.join(missing)}")
    except Exception as exc:  # any failure to load makes the backend unavailable, never flowkern
        _reasons[name] = f"{type(exc).__name__}: {exc}"
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_reasons[name]}") from exc
    _loaded[name] = module
    return module


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    if name != AUTO and name not in _MODULES:
        known = ", ".join([*_MODULES, AUTO])
        raise ValueError(f"unknown backend {name!r}; expected one of: {known}")


def available_backends(with_reasons: bool = False):
    """Names of the backends that load here, plus ``"auto"``.

    With ``with_reasons=True``: a dict from every known backend name to ``None`` when it is available,
    or to the reason it is not.
    """
    status = {}
    for name in _MODULES:
        try:
            _load(name)
            status[name] = None
        except BackendUnavailable:
            status[name] = _reasons[name]
    status[AUTO] = None
    if with_reasons:
        return status
    return [name for name, reason in status.items() if reason is None]


def unsupported(name: str, device) -> "str | None":
    """Why backend ``name`` cannot run ops on ``device`` (a ``torch.device`` or str), or ``None`` if it can."""
    _check_name(name)
    if name == AUTO:
        return None
    try:
        module = _load(name)
    except BackendUnavailable as exc:
        return str(exc)
    check = getattr(module, "unsupported", None)
    return None if check is None else check(torch.device(device))


def set_backend(name: str) -> None:
    """Make ``name`` the process-wide backend for every flowkern op and layer (outside :func:`use_backend`)."""
    global _default
    _check_name(name)
    if name != AUTO:
        _load(name)
    _default = name


def get_backend() -> str:
    """The active backend's name (possibly ``"auto"``) in this thread or task."""
    name = _override.get()
    return _default if name is None else name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed code with backend ``name``, in this thread or task only, then restore the previous one.

    ``torch.compile`` guards on the active backend: code compiled under one backend is recompiled, not
    reused, when called under another.
    """
    _check_name(name)
    if name != AUTO:
        _load(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


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


def choose(op: str, *args) -> str:
    """The name of the backend :func:`dispatch` runs ``op`` on ``args`` with: the active setting's, or under
    ``"auto"`` the one chosen for the device of ``args[0]``."""
    name = get_backend()
    if name == AUTO:
        device = str(args[0].device)
        choice = None if torch.compiler.is_compiling() else _choices.get((device, op))
        # Compiled code chooses once, at trace time: the choice is a constant of the graph.
        name = choice.backend if choice is not None else _choose(device, op, _describe(args))
    return name


def dispatch(op: str, *args):
    """Run fused op ``op`` (a name in ``reference.OPS``) on ``args`` with the backend :func:`choose` picks."""
    return getattr(_loaded[choose(op, *args)], op)(*args)


def run(name: str, op: str, *args):
    """Run ``op`` (a name in ``reference.OPS`` or ``reference.BACKWARD_OPS``) of backend ``name``, which
    :func:`choose` returned."""
    return getattr(_loaded[name], op)(*args)


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
            call(getattr(_loaded[name], op))
            times[name] = []
        except Exception as exc:
            seconds[name] = f"{type(exc).__name__}: {exc}"
    best, timed = fastest({name: functools.partial(call, getattr(_loaded[name], op)) for name in times})
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
