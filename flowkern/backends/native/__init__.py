"""The compiled extension ``flowkern._C`` built from ``csrc/``: C++ CPU kernels, and CUDA kernels when it
was built with CUDA. Its ops are ``torch.ops.flowkern.*`` (schemas in ``csrc/ops.cpp``); this module adds
their fake implementations and autograd. Importing it fails, with the reason, if the extension was not
built, was built for CPU features this CPU lacks, or does not load; flowkern then runs on the other backends.
"""
import torch

from .._ops import NAMESPACE, FusedOps
from .cpu_features import check_cpu_features

check_cpu_features()  # before loading: code built for AVX2 would die with SIGILL on a CPU without it
from ... import _C  # noqa: F401, E402  (loading the library registers the ops)

PREFIX = ""
ops = FusedOps(PREFIX).register_fakes_and_autograd()
globals().update(ops.functions())


def unsupported(device: torch.device) -> "str | None":
    """Why the extension cannot run ops on ``device``, or ``None`` when it has kernels for it."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return f"the extension has kernels for CPU and CUDA tensors only, not {device.type}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{PREFIX}coupling_forward", key):
        return f"the extension was built without {key} kernels"
    return None


__all__ = ["ops", "PREFIX", "unsupported", *ops.functions()]
