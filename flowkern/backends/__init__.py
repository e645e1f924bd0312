"""Which implementation of each fused op runs: the registry of backends (:mod:`.registry`), the active
setting, and ``"auto"``'s measured choice (:mod:`.auto`).

The active setting is a process-wide default (:func:`set_backend`), overridden inside :func:`use_backend`
blocks, which are local to the thread or task that entered them.
"""
import contextlib
import contextvars

from . import auto, registry
from .auto import AutoChoice, auto_choices, fastest, pin_auto_choices
from .registry import AUTO, MODULES, BackendUnavailable, _check_name, _load, available_backends, unsupported

_default = AUTO
_override = contextvars.ContextVar("flowkern_backend", default=None)


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


def choose(op: str, *args) -> str:
    """The name of the backend :func:`dispatch` runs ``op`` on ``args`` with: the active setting's, or under
    ``"auto"`` the one chosen for the device of ``args[0]``."""
    name = get_backend()
    return auto.chosen(op, args) if name == AUTO else name


def dispatch(op: str, *args):
    """Run fused op ``op`` (a name in ``reference.OPS``) on ``args`` with the backend :func:`choose` picks."""
    return getattr(registry._loaded[choose(op, *args)], op)(*args)


def run(name: str, op: str, *args):
    """Run ``op`` (a name in ``reference.OPS`` or ``reference.BACKWARD_OPS``) of backend ``name``, which
    :func:`choose` returned."""
    return getattr(registry._loaded[name], op)(*args)


__all__ = ["AUTO", "MODULES", "AutoChoice", "BackendUnavailable", "auto_choices", "available_backends", "choose",
           "dispatch", "fastest", "get_backend", "pin_auto_choices", "run", "set_backend", "unsupported",
           "use_backend"]
