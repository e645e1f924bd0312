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
