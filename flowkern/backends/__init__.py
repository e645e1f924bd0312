"""Backend registry: which implementation of the fused ops runs.

A backend is a module that defines every name in ``flowkern.reference.OPS`` with the reference's
signature. ``"auto"`` resolves per call to the first available backend in ``AUTO_PREFERENCE`` for the
device of the op's input tensor.
"""
import contextlib
import importlib

from .. import reference

AUTO = "auto"

# name -> module path, imported on first use; an ImportError or BackendUnavailable says why not.
_MODULES = {
    "reference": "flowkern.reference",
    "triton": "flowkern.backends.triton",
    "native": "flowkern.backends.native",
}

# Fastest first, per device type; "reference" is always last and always available.
AUTO_PREFERENCE = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}


class BackendUnavailable(RuntimeError):
    """Raised when a known backend cannot be used here; the message says why."""


_loaded: dict = {}
_reasons: dict = {}
_current = AUTO
_auto: dict = {}  # device type -> backend module chosen by "auto"


def _load(name):
    if name in _loaded:
        return _loaded[name]
    if name in _reasons:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_reasons[name]}")
    try:
        module = importlib.import_module(_MODULES[name])
        missing = [op for op in reference.OPS if not callable(getattr(module, op, None))]
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


def set_backend(name: str) -> None:
    """Make ``name`` the active backend for every flowkern op and layer."""
    global _current
    _check_name(name)
    if name != AUTO:
        _load(name)
    _current = name


def get_backend() -> str:
    """The active backend's name (possibly ``"auto"``)."""
    return _current


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed code with backend ``name``, then restore the previous one."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(device) -> object:
    """The backend module that runs an op on ``device`` under the active setting."""
    if _current != AUTO:
        return _loaded[_current]
    module = _auto.get(device.type)
    if module is None:
        module = reference
        for name in AUTO_PREFERENCE.get(device.type, ("reference",)):
            try:
                module = _load(name)
                break
            except BackendUnavailable:
                continue
        _auto[device.type] = module
    return module
