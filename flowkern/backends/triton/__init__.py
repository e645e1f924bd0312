"""Fused Triton kernels for the flow-step ops, registered as ``torch.ops.flowkern.triton_*``.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
Triton is first imported), which is how the kernels are tested without a GPU.
"""
import torch

from .._ops import NAMESPACE, SCHEMAS, FusedOps
from ._common import interpreting

if not (torch.cuda.is_available() or interpreting()):
    raise RuntimeError("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run them on the CPU")

from . import actnorm, conv1x1, coupling  # noqa: E402

PREFIX = "triton_"
_KERNELS = {
    "coupling_forward": coupling.coupling_forward,
    "coupling_inverse": coupling.coupling_inverse,
    "coupling_backward": coupling.coupling_backward,
    "actnorm": actnorm.actnorm,
    "actnorm_backward": actnorm.actnorm_backward,
    "conv1x1": conv1x1.conv1x1,
    "conv1x1_weight_grad": conv1x1.conv1x1_weight_grad,
}
for _name, _kernel in _KERNELS.items():
    torch.library.define(f"{NAMESPACE}::{PREFIX}{_name}", SCHEMAS[_name])
    torch.library.impl(f"{NAMESPACE}::{PREFIX}{_name}", ("cpu", "cuda"), _kernel)

ops = FusedOps(PREFIX).register_fakes_and_autograd()
globals().update(ops.functions())


def unsupported(device: torch.device) -> "str | None":
    """Why the Triton kernels cannot run on ``device``, or ``None`` when they can."""
    if device.type == "cuda" and torch.cuda.is_available():
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"


__all__ = ["ops", "PREFIX", "unsupported", *ops.functions()]
