"""The CPU features the compiled extension was built for, checked against this CPU before it is loaded."""
import re


def build_features() -> tuple:
    """What ``setup.py`` recorded when it built ``flowkern._C`` (e.g. ``("avx2", "fma", "f16c")``)."""
    try:
        from ..._build import CPU_FEATURES
    except ImportError:  # built some other way (CMake), or not built: nothing recorded to check
        return ()
    return tuple(CPU_FEATURES)


def cpu_features(cpuinfo="/proc/cpuinfo") -> set:
    """This CPU's feature flags, or None when the system does not list them."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return None if match is None else set(match.group(1).split())


def check_cpu_features(required=None, available=None) -> None:
    """Raise RuntimeError naming what this CPU lacks of what the extension needs."""
    required = build_features() if required is None else required
    available = cpu_features() if available is None else available
    if not required or available is None:
        return
    missing = [f for f in required if f not in available]
    if missing:
        raise RuntimeError(f"the extension was built for CPUs with {', '.join(required).upper()}, and this CPU "
                           f"lacks {', '.join(missing).upper()}; rebuild it on this machine (pip install -e .)")
