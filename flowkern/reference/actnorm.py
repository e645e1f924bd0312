"""ActNorm: a per-channel affine map ``y = x · exp(log_scale) + bias``.

``x`` has shape (N, C, H, W); ``log_scale`` and ``bias`` have shape (C,). The log-det of every sample
is ``H · W · Σ log_scale``, shape (N,), in float32 (float64 for float64 inputs).
"""
import torch

from ._dtypes import compute_dtype


def _prepare(x, log_scale, bias):
    ct = compute_dtype(x.dtype)
    c = x.shape[1]
    return x.to(ct), log_scale.to(ct).view(1, c, 1, 1), bias.to(ct).view(1, c, 1, 1)


def actnorm_logdet(x, log_scale):
    """``H · W · Σ log_scale`` for every sample of ``x`` (N, C, H, W), shape (N,)."""
    ct = compute_dtype(x.dtype)
    per_sample = log_scale.to(ct).sum() * (x.shape[2] * x.shape[3])
    return per_sample.expand(x.shape[0])


def actnorm_forward(x, log_scale, bias):
    """(x (N, C, H, W), log_scale (C,), bias (C,)) → (y, logdet (N,))."""
    xc, ls, b = _prepare(x, log_scale, bias)
    return (xc * torch.exp(ls) + b).to(x.dtype), actnorm_logdet(x, log_scale)


def actnorm_inverse(y, log_scale, bias):
    """(y (N, C, H, W), log_scale (C,), bias (C,)) → (x, logdet (N,) of the forward map)."""
    yc, ls, b = _prepare(y, log_scale, bias)
    return ((yc - b) * torch.exp(-ls)).to(y.dtype), actnorm_logdet(y, log_scale)


def _fold(weight, log_scale):
    ct = compute_dtype(weight.dtype)
    scale = torch.exp(log_scale.to(ct)).view(-1, *(1,) * (weight.dim() - 1))
    return (weight.to(ct) * scale).to(weight.dtype)


def fold_actnorms(weight1, log_scale1, weight2, log_scale2):
    """The two ActNorms of a Glow conditioner folded into the convolutions before them:
    ``ActNorm(conv(x, W)) = conv(x, W·e^log_scale) + bias``, the scale over ``W``'s output channels (dim 0).

    weight_i (O_i, ...) and log_scale_i (O_i,) → (W1·e^log_scale1, W2·e^log_scale2), in the weights' dtype
    (computed in float32, float64 for float64)."""
    return _fold(weight1, log_scale1), _fold(weight2, log_scale2)


def fold_actnorms_backward(grad1, weight1, log_scale1, grad2, weight2, log_scale2):
    """``(∂W1, ∂log_scale1, ∂W2, ∂log_scale2)`` of :func:`fold_actnorms` from the gradients ``grad_i`` of its
    outputs (any floating dtype): ``∂W = ∂W_folded·e^log_scale`` and ``∂log_scale[o] = Σ ∂W_folded[o]·W_folded[o]``,
    by autograd through it, in the dtypes of the weights and log-scales."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (weight1, log_scale1, weight2, log_scale2)]
        folded = fold_actnorms(*leaves)
        upstream = [g.to(f.dtype) for g, f in zip((grad1, grad2), folded)]
        return torch.autograd.grad(folded, leaves, upstream)
