"""The compiled extension ``flowkern._C`` built from ``csrc/``: C++ CPU kernels, and CUDA kernels when it
was built with CUDA. Its ops are ``torch.ops.flowkern.*`` (schemas in ``csrc/ops.cpp``); this module adds
their fake implementations and autograd. Importing it fails, with the reason, if the extension was not
built, was built for CPU features this CPU lacks, or does not load; flowkern then runs on the other backends.
"""
import torch

from ...reference.actnorm import actnorm_logdet
from ...reference._dtypes import compute_dtype
from .._ops import NAMESPACE, FusedOps
from .cpu_features import check_cpu_features

check_cpu_features()  # before loading: code built for AVX2 would die with SIGILL on a CPU without it
from ... import _C  # noqa: F401, E402  (loading the library registers the ops)

PREFIX = ""
ops = FusedOps(PREFIX).register_fakes_and_autograd()


def coupling_forward(x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """(x (N, C, H, W), h) → (y (N, C, H, W) contiguous, logdet (N,)). ``h`` may be of lower precision than
    ``x`` (a conditioner under autocast): the kernels read it as it is; its gradient comes in its dtype."""
    return ops.coupling_forward(x, h, mask, parity, scale, bound, layout)


def coupling_inverse(y, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """(y (N, C, H, W), h) → (x (N, C, H, W) contiguous, logdet (N,) of the forward map); ``h`` as above."""
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
    """Why the extension cannot run ops on ``device``, or ``None`` when it has kernels for it."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return f"the extension has kernels for CPU and CUDA tensors only, not {device.type}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{PREFIX}coupling_forward", key):
        return f"the extension was built without {key} kernels"
    return None


__all__ = ["ops", "PREFIX", "unsupported", "actnorm_forward", "actnorm_inverse", "conv1x1", "coupling_backward",
           "coupling_forward", "coupling_inverse", "fold_actnorms", "fold_actnorms_backward", "folded_lu_weight",
           "folded_lu_weight_inverse"]
