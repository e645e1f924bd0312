"""Gaussian priors written as bijections: ``eps = (z − mean) · exp(−log_std)``.

A learned conditional prior N(mean, exp(log_std)²) over ``z`` equals a standard normal over ``eps`` plus
the log-det ``−Σ log_std``, so every latent a model returns is standard normal and sampling at temperature
T draws ``eps ~ N(0, T²)``.
"""
import math

import torch

from ._dtypes import compute_dtype


def standardize(z, mean, log_std):
    """(z, mean, log_std), broadcastable, → (eps of z's shape and dtype, logdet (N,))."""
    ct = compute_dtype(z.dtype)
    log_std = log_std.to(ct).expand(z.shape)
    eps = (z.to(ct) - mean.to(ct)) * torch.exp(-log_std)
    return eps.to(z.dtype), -log_std.flatten(1).sum(dim=1)


def unstandardize(eps, mean, log_std):
    """The inverse of :func:`standardize`: (eps, mean, log_std), broadcastable, → z of eps's shape and dtype."""
    ct = compute_dtype(eps.dtype)
    return torch.addcmul(mean.to(ct), eps.to(ct), torch.exp(log_std.to(ct))).to(eps.dtype)


def standard_normal_log_prob(z):
    """Per-sample log density of N(0, I) at ``z`` (N, ...), in nats, float32 (float64 for float64)."""
    z = z.to(compute_dtype(z.dtype)).flatten(1)
    return -0.5 * (z.pow(2).sum(dim=1) + z.shape[1] * math.log(2 * math.pi))
