"""Fused Triton kernels for the flow-step ops, registered as ``flowkern::triton_*`` torch ops.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
Triton is first imported), which is how the kernels are tested without a GPU.
"""
import torch

from ._common import interpreting

if not (torch.cuda.is_available() or interpreting()):
    raise RuntimeError("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run them on the CPU")

from .actnorm import actnorm_forward, actnorm_inverse  # noqa: E402
from .conv1x1 import conv1x1  # noqa: E402
from .coupling import coupling_forward, coupling_inverse  # noqa: E402

__all__ = ["actnorm_forward", "actnorm_inverse", "conv1x1", "coupling_forward", "coupling_inverse"]
