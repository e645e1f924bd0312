"""The invertible 1×1 convolution: a per-pixel channel mixing ``y[:, :, i, j] = W · x[:, :, i, j] + b``.

With the LU parametrisation ``W = P · L · (U + diag(sign · exp(log_s)))`` (P a permutation matrix, L unit
lower triangular from the strict lower part of ``lower``, U strictly upper triangular from ``upper``), the
log-det per sample is ``H · W · Σ log_s`` and ``W⁻¹ = (U + diag)⁻¹ · L⁻¹ · Pᵀ`` comes from two triangular
solves, never from a general matrix inverse.
"""
import torch
import torch.nn.functional as F

from ._dtypes import compute_dtype, full_precision


@full_precision
def conv1x1(x, weight, bias=None):
    """(x (N, C_in, H, W), weight (C_out, C_in), bias (C_out,) or None) → y (N, C_out, H, W)."""
    ct = compute_dtype(x.dtype)
    b = None if bias is None else bias.to(ct)
    y = F.conv2d(x.to(ct), weight.to(ct)[:, :, None, None], b)
    return y.to(x.dtype)


def _lu_factors(lower, upper, sign, log_s):
    ct = compute_dtype(lower.dtype)
    lower, upper, sign, log_s = lower.to(ct), upper.to(ct), sign.to(ct), log_s.to(ct)
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    unit_lower = torch.tril(lower, -1) + eye
    upper_full = torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s))
    return unit_lower, upper_full


@full_precision
def lu_weight(perm, lower, upper, sign, log_s):
    """``W = P · L · (U + diag(sign · exp(log_s)))``; every argument (C, C) except sign, log_s (C,).

    Assembled in float32 (float64 for float64 factors) whatever the factors' dtype.
    """
    unit_lower, upper_full = _lu_factors(lower, upper, sign, log_s)
    return perm.to(unit_lower.dtype) @ unit_lower @ upper_full


@full_precision
def folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias):
    """An LU 1×1 conv with the ActNorm before it folded in: ``(W·diag(e^log_scale) (C, C), W·bias (C,),
    Σ log_s + Σ log_scale (0-d))``, the weight, bias and log-det per pixel of ``x ↦ W·(x·e^log_scale + bias)``,
    with ``W = lu_weight(perm, lower, upper, sign, log_s)``; log_scale and bias (C,).

    Assembled in float32 (float64 for float64 factors) whatever the factors' dtype.
    """
    weight = lu_weight(perm, lower, upper, sign, log_s)
    log_scale, bias, log_s = (t.to(weight.dtype) for t in (log_scale, bias, log_s))
    return weight * log_scale.exp(), weight @ bias, log_s.sum() + log_scale.sum()


@full_precision
def folded_lu_weight_inverse(perm, lower, upper, sign, log_s, log_scale, bias):
    """The inverse of the map :func:`folded_lu_weight` describes, ``x = W_inv·y + b_inv``: ``(diag(e^−log_scale)·W⁻¹
    (C, C), −bias·e^−log_scale (C,))``, ``W⁻¹`` from :func:`lu_weight_inverse`'s triangular solves."""
    inverse = lu_weight_inverse(perm, lower, upper, sign, log_s)
    inv_scale = (-log_scale.to(inverse.dtype)).exp()
    return inv_scale[:, None] * inverse, -bias.to(inverse.dtype) * inv_scale


@full_precision
def lu_weight_inverse(perm, lower, upper, sign, log_s):
    """``W⁻¹`` by forward then backward substitution: ``(U + diag)⁻¹ · (L⁻¹ · Pᵀ)``."""
    unit_lower, upper_full = _lu_factors(lower, upper, sign, log_s)
    perm_t = perm.to(unit_lower.dtype).transpose(0, 1)
    half = torch.linalg.solve_triangular(unit_lower, perm_t, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(upper_full, half, upper=True)


def conv1x1_logdet(x, log_s):
    """Log-det per sample of an LU 1×1 conv over ``x`` (N, C, H, W): ``H · W · Σ log_s``, shape (N,)."""
    ct = compute_dtype(x.dtype)
    return (log_s.to(ct).sum() * (x.shape[2] * x.shape[3])).expand(x.shape[0])
