"""The backends flowkern knows, and loading them: a backend is a module that defines every name in
``flowkern.reference.OPS`` (and ``BACKWARD_OPS``) with the reference's signature, and may define
``unsupported(device) -> str | None``: why it cannot run ops on ``device`` (``None`` when it can; a backend
without it runs everywhere). One that fails to load is unavailable, with the reason, never an error of flowkern.
"""
import importlib

import torch

from .. import reference

AUTO = "auto"

# name -> module path, imported on first use; an ImportError or BackendUnavailable says why not.
MODULES = {
    "reference": "flowkern.reference",
    "triton": "flowkern.backends.triton",
    "native": "flowkern.backends.native",
}


class BackendUnavailable(RuntimeError):
    """Raised when a known backend cannot be used here; the message says why."""


_loaded: dict = {}
_reasons: dict = {}


def _load(name):
    if name in _loaded:
        return _loaded[name]
    if name in _reasons:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_reasons[name]}")
    try:
        module = importlib.import_module(MODULES[name])
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
    if name != AUTO and name not in MODULES:
        known = ", ".join([*MODULES, AUTO])
        raise ValueError(f"unknown backend {name!r}; expected one of: {known}")


def available_backends(with_reasons: bool = False):
    """Names of the backends that load here, plus ``"auto"``.

    With ``with_reasons=True``: a dict from every known backend name to ``None`` when it is available,
    or to the reason it is not.
    """
    status = {}
    for name in MODULES:
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
