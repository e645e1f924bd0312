"""The fused ops, as layers call them: inputs checked here once, then run by the active backend, in the
dtype of the flow's state even under ``torch.autocast`` (a coupling's ``h`` may come in lower precision).

Every op here goes to ``flowkern.backends.dispatch``; the small tensor algebra around them (masks, LU
assembly, squeeze, Gaussian standardisation) is not dispatched, and layers take it from
:mod:`flowkern.reference` directly. Shapes and conventions are documented in :mod:`flowkern.reference`.
"""
import torch

from . import backends, reference
from ._validation import (check_actnorm, check_conv1x1, check_coupling, check_fold_actnorms, check_folded_lu_weight,
                          check_weight)
from .reference._dtypes import compute_dtype, full_precision


@full_precision
def coupling_forward(x, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """Coupling ``x`` (N, C, H, W) given conditioner output ``h`` (its ``raw`` and ``shift`` in ``layout``'s
    order) → ``(y, logdet (N,))``."""
    check_coupling(x, h, mask, parity, scale, layout, "x")
    return backends.dispatch("coupling_forward", x, h, mask, parity, scale, float(bound), layout)


@full_precision
def coupling_inverse(y, h, mask="channel", parity=0, scale="sigmoid", bound=2.0, layout="halves"):
    """Inverse coupling of ``y`` (N, C, H, W) → ``(x, logdet (N,) of the forward map)``."""
    check_coupling(y, h, mask, parity, scale, layout, "y")
    return backends.dispatch("coupling_inverse", y, h, mask, parity, scale, float(bound), layout)


@full_precision
def actnorm_forward(x, log_scale, bias):
    """``y = x · exp(log_scale) + bias`` per channel of ``x`` (N, C, H, W) → ``(y, logdet (N,))``."""
    check_actnorm(x, log_scale, bias, "x")
    return backends.dispatch("actnorm_forward", x, log_scale, bias)


@full_precision
def actnorm_inverse(y, log_scale, bias):
    """``x = (y − bias) · exp(−log_scale)`` → ``(x, logdet (N,) of the forward map)``."""
    check_actnorm(y, log_scale, bias, "y")
    return backends.dispatch("actnorm_inverse", y, log_scale, bias)


def fold_actnorms(weight1, log_scale1, weight2, log_scale2):
    """A Glow conditioner's two ActNorms folded into the convolutions before them → ``(W1·e^log_scale1,
    W2·e^log_scale2)``, each scale over its weight's output channels (dim 0); see
    :func:`flowkern.reference.fold_actnorms`."""
    check_fold_actnorms(weight1, log_scale1, weight2, log_scale2)
    return backends.dispatch("fold_actnorms", weight1, log_scale1, weight2, log_scale2)


def fold_actnorms_backward(grad1, weight1, log_scale1, grad2, weight2, log_scale2, backend):
    """``(∂W1, ∂log_scale1, ∂W2, ∂log_scale2)`` of :func:`fold_actnorms` from the gradients of its outputs, as
    backend ``backend`` computes them (the one ``backends.choose("fold_actnorms", ...)`` named for the
    forward), in the dtypes of the weights and log-scales."""
    check_fold_actnorms(weight1, log_scale1, weight2, log_scale2, grad1, grad2)
    grad1, grad2 = grad1.to(weight1.dtype), grad2.to(weight2.dtype)  # under autocast, the convolutions' dtype
    return backends.run(backend, "fold_actnorms_backward", grad1, weight1, log_scale1, grad2, weight2, log_scale2)


@full_precision
def conv1x1(x, weight, bias=None):
    """Per-pixel channel mixing of ``x`` (N, C_in, H, W) by ``weight`` (C_out, C_in) → (N, C_out, H, W)."""
    check_conv1x1(x, weight, bias, "x")
    return backends.dispatch("conv1x1", x, weight, bias)


@full_precision
def folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias):
    """An LU 1×1 conv's weight with the ActNorm before it folded in → ``(W·diag(e^log_scale) (C, C), W·bias (C,),
    log-det per pixel (0-d))``, assembled in float32 (float64 for float64 factors) whatever their dtype; see
    :func:`flowkern.reference.folded_lu_weight`."""
    check_folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias)
    ct = compute_dtype(lower.dtype)
    return backends.dispatch("folded_lu_weight", *(t.to(ct) for t in (perm, lower, upper, sign, log_s, log_scale, bias)))


@full_precision
def folded_lu_weight_inverse(perm, lower, upper, sign, log_s, log_scale, bias):
    """The inverse of the map :func:`folded_lu_weight` describes → ``(inverse weight (C, C), inverse bias (C,))``;
    see :func:`flowkern.reference.folded_lu_weight_inverse`. Where a gradient is recorded the reference's
    composition runs, which autograd differentiates (the fused op has no backward)."""
    check_folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias)
    ct = compute_dtype(lower.dtype)
    args = [t.to(ct) for t in (perm, lower, upper, sign, log_s, log_scale, bias)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return reference.folded_lu_weight_inverse(*args)
    return backends.dispatch("folded_lu_weight_inverse", *args)


@full_precision
def coupling_backward(grad_y, grad_logdet, x, h, mask, parity, scale, bound, layout, backend):
    """``(∂x, ∂h)`` of :func:`coupling_forward` at ``(x, h)`` from ``grad_y`` (N, C, H, W) and ``grad_logdet``
    (N,) (either ``None`` for zero), as backend ``backend`` computes them (the one
    ``backends.choose("coupling_forward", ...)`` named for the forward): for autograd nodes that hold a coupling
    inside them and differentiate it by hand (:class:`flowkern.nn.glow_coupling.GlowCoupling`)."""
    return backends.run(backend, "coupling_backward", grad_y, grad_logdet, x, h, mask, parity, scale, float(bound),
                        layout)


@full_precision
def actnorm_conv1x1(x, log_scale, bias, weight):
    """ActNorm then a 1×1 conv in one pass: ``W·(x·e^log_scale + bias) = (W·diag(e^log_scale))·x + W·bias``.

    x (N, C, H, W), log_scale and bias (C,), weight (C_out, C) → y (N, C_out, H, W). Log-dets are not
    included: they are ``actnorm_logdet`` plus the convolution's.
    """
    check_actnorm(x, log_scale, bias, "x")
    check_weight(x, weight, "x")
    scale = torch.exp(log_scale).to(weight.dtype)  # the folded weight and bias are right by construction
    return backends.dispatch("conv1x1", x, weight * scale, weight @ bias.to(weight.dtype))


@full_precision
def actnorm_conv1x1_inverse(y, log_scale, bias, inverse_weight):
    """Inverse of :func:`actnorm_conv1x1` given ``W⁻¹`` (C, C): ``x = diag(e^−log_scale)·W⁻¹·y − bias·e^−log_scale``."""
    check_actnorm(y, log_scale, bias, "y")
    check_weight(y, inverse_weight, "y")
    inv_scale = torch.exp(-log_scale).to(inverse_weight.dtype)
    return backends.dispatch("conv1x1", y, inv_scale[:, None] * inverse_weight, -bias.to(inv_scale.dtype) * inv_scale)
