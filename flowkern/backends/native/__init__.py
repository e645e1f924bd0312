"""The compiled extension ``flowkern._C`` built from ``csrc/``: C++ CPU kernels, and CUDA kernels when it
was built with CUDA. Its ops are ``torch.ops.flowkern.*`` (schemas in ``csrc/ops.cpp``); this module adds
their fake implementations and autograd. Importing it fails, with the reason, if the extension was not
built or does not load; flowkern then runs on the other backends.
"""
from ... import _C  # noqa: F401  (loading the library registers the ops)
from .._ops import FusedOps

PREFIX = ""
ops = FusedOps(PREFIX).register_fakes_and_autograd()
globals().update(ops.functions())
__all__ = ["ops", "PREFIX", *ops.functions()]
