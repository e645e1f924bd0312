"""Fused Triton kernels for the flow-step ops, registered as ``torch.ops.flowkern.triton_*``.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
Triton is first imported), which is how the kernels are tested without a GPU.
"""
import torch

from ...reference.actnorm import actnorm_logdet
from ...reference._dtypes import compute_dtype
from .._ops import NAMESPACE, SCHEMAS, FusedOps
from ._common import interpreting

if not (torch.cuda.is_available() or interpreting()):
    raise RuntimeError("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run them on the CPU")

from . import actnorm, conv1x1, coupling, fold_actnorms, lu_weight  # noqa: E402

PREFIX = "triton_"
_KERNELS = {  # torch.ops.flowkern.<name>: its launcher
    "triton_coupling_forward": coupling.launch_coupling_forward,
    "triton_coupling_inverse": coupling.launch_coupling_inverse,
    "triton_coupling_backward": coupling.launch_coupling_backward,
    "triton_actnorm": actnorm.launch_actnorm,
    "triton_actnorm_backward": actnorm.launch_actnorm_backward,
    "triton_conv1x1": conv1x1.launch_conv1x1,
    "triton_conv1x1_weight_grad": conv1x1.launch_conv1x1_weight_grad,
    "triton_folded_lu_weight": lu_weight.launch_folded_lu_weight,
    "triton_folded_lu_weight_backward": lu_weight.launch_folded_lu_weight_backward,
    "triton_folded_lu_weight_inverse": lu_weight.launch_folded_lu_weight_inverse,
    "triton_fold_actnorms": fold_actnorms.launch_fold_actnorms,
    "triton_fold_actnorms_backward": fold_actnorms.launch_fold_actnorms_backward,
}
for _name, _launch in _KERNELS.items():
    torch.library.define(f"{NAMESPACE}::{_name}", SCHEMAS[_name.removeprefix(PREFIX)])
    torch.library.impl(f"{NAMESPACE}::{_name}", ("cpu", "cuda"), _launch)

ops = FusedOps(PREFIX).register_fakes_and_autograd()


def coupling_forward(x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """(x (N, C, H, W), h) → (y (N, C, H, W) contiguous, logdet (N,))."""
    return ops.coupling_forward(x, h, mask, parity, scale, bound, layout)


def coupling_inverse(y, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """(y (N, C, H, W), h) → (x (N, C, H, W) contiguous, logdet (N,) of the forward map)."""
    return ops.coupling_inverse(y, h, mask, parity, scale, bound, layout)


def actnorm_forward(x, log_scale, bias):
    """(x (N, C, H, W), log_scale (C,), bias (C,)) → (y contiguous, logdet (N,))."""
    return ops.actnorm(x, log_scale, bias, False), actnorm_logdet(x, log_scale)


def actnorm_inverse(y, log_scale, bias):
    """(y (N, C, H, W), log_scale (C,), bias (C,)) → (x contiguous, logdet (N,) of the forward map)."""
    return ops.actnorm(y, log_scale, bias, True), actnorm_logdet(y, log_scale)


def conv1x1(x, weight, bias=None):
    """(x (N, C_in, H, W), weight (C_out, C_in), bias (C_out,) or None) → y (N, C_out, H, W)."""
    return ops.conv1x1(x, weight, bias)


def coupling_backward(grad_y, grad_logdet, x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0,
                      layout="halves"):
    """(∂x, ∂h) of :func:`coupling_forward` from (∂y, ∂logdet), either ``None`` for zero."""
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    if grad_logdet is None:
        grad_logdet = x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))
    return ops.coupling_backward(grad_y, grad_logdet, x, h, mask, parity, scale, bound, layout, False)


def folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias):
    """(perm, lower, upper (C, C), sign, log_s, log_scale, bias (C,), one float32 or float64 dtype) →
    (weight (C, C), bias (C,), log-det per pixel (0-d))."""
    return ops.folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias)


def folded_lu_weight_inverse(perm, lower, upper, sign, log_s, log_scale, bias):
    """The factors as :func:`folded_lu_weight` takes them → (inverse weight (C, C), inverse bias (C,)) of its map."""
    return ops.folded_lu_weight_inverse(perm, lower, upper, sign, log_s, log_scale, bias)


def fold_actnorms(weight1, log_scale1, weight2, log_scale2):
    """(weight_i (O_i, ...), log_scale_i (O_i,)) → (W1·e^log_scale1, W2·e^log_scale2), contiguous."""
    return ops.fold_actnorms(weight1, log_scale1, weight2, log_scale2)


def fold_actnorms_backward(grad1, weight1, log_scale1, grad2, weight2, log_scale2):
    """(∂W1, ∂log_scale1, ∂W2, ∂log_scale2) of :func:`fold_actnorms` from the gradients of its outputs."""
    return ops.fold_actnorms_backward(grad1, weight1, log_scale1, grad2, weight2, log_scale2)


def unsupported(device: torch.device) -> "str | None":
    """Why the Triton kernels cannot run on ``device``, or ``None`` when they can."""
    if device.type == "cuda" and torch.cuda.is_available():
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"


__all__ = ["ops", "PREFIX", "unsupported", "actnorm_forward", "actnorm_inverse", "conv1x1", "coupling_backward",
           "coupling_forward", "coupling_inverse", "fold_actnorms", "fold_actnorms_backward", "folded_lu_weight",
           "folded_lu_weight_inverse"]
