"""The folded LU weight of a 1×1 conv: ``W = P·(L + I)·(U + diag(sign·e^log_s))`` with the ActNorm before it
folded in, ``(W·diag(e^log_scale), W·bias, Σ log_s + Σ log_scale)``, and its gradient with respect to the
factors, as one kernel forward and two backward, instead of a dozen small PyTorch ops each way; and the inverse
map's weight and bias in one kernel of triangular substitutions.

A program holds one row (or column) of the (C, C) result as a vector and loops over the other index, so any C
runs in C programs of O(C²) work. Products with P skip its zero entries in the forward (one per row for a
permutation). The backward's second kernel reads the whole of ∂M = Pᵀ·∂W, which the first writes.
Conventions: :func:`flowkern.reference.folded_lu_weight`.
"""
import torch
import triton
import triton.language as tl

from ..._validation import check_folded_lu_weight
from ._common import check_launchable, empty


@triton.jit
def _upper_full_row(upper_ptr, sign_ptr, log_s_ptr, k, j, inside, C):
    """Row k of U + D at columns j: upper[k, j] for j > k, sign[k]·e^log_s[k] at j = k, zero before."""
    u = tl.load(upper_ptr + k * C + j, mask=inside & (j > k), other=0.0)
    return tl.where(j == k, tl.load(sign_ptr + k) * tl.exp(tl.load(log_s_ptr + k)), u)


@triton.jit
def _folded_lu_weight_kernel(perm_ptr, lower_ptr, upper_ptr, sign_ptr, log_s_ptr, log_scale_ptr, bias_ptr,
                             weight_ptr, bias_out_ptr, per_pixel_ptr, C, BLOCK: tl.constexpr):
    """Program i < C: row i of the folded weight and bias_out[i]; program C: the log-det per pixel."""
    i = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    inside = j < C
    if i < C:
        row = tl.zeros((BLOCK,), dtype=weight_ptr.dtype.element_ty)
        for r in range(C):
            p = tl.load(perm_ptr + i * C + r)
            if p != 0:  # W[i] += P[i, r]·M[r], M[r] = Σ_{k ≤ r} (L + I)[r, k]·(U + D)[k]
                m = _upper_full_row(upper_ptr, sign_ptr, log_s_ptr, r, j, inside, C)
                for k in range(r):
                    m += tl.load(lower_ptr + r * C + k) * _upper_full_row(upper_ptr, sign_ptr, log_s_ptr, k, j,
                                                                          inside, C)
                row += p * m
        scale = tl.exp(tl.load(log_scale_ptr + j, mask=inside, other=0.0))
        tl.store(weight_ptr + i * C + j, row * scale, mask=inside)
        tl.store(bias_out_ptr + i, tl.sum(row * tl.load(bias_ptr + j, mask=inside, other=0.0)))
    else:
        terms = tl.load(log_s_ptr + j, mask=inside, other=0.0) + tl.load(log_scale_ptr + j, mask=inside, other=0.0)
        tl.store(per_pixel_ptr, tl.sum(terms))


@triton.jit
def _product_grad_kernel(perm_ptr, lower_ptr, upper_ptr, sign_ptr, log_s_ptr, log_scale_ptr, bias_ptr, weight_ptr,
                         grad_weight_ptr, grad_bias_ptr, grad_per_pixel_ptr, grad_product_ptr, grad_log_scale_ptr,
                         grad_bias_in_ptr, C, BLOCK: tl.constexpr):
    """Program j: column j of ∂M = Pᵀ·∂W (∂W[i, j] = ∂folded[i, j]·e^log_scale[j] + ∂bias_out[i]·bias[j]),
    ∂log_scale[j] = Σ_i ∂folded[i, j]·folded[i, j] + ∂per_pixel and ∂bias[j] = Σ_i W[i, j]·∂bias_out[i]
    = M[:, j]·(Pᵀ·∂bias_out)."""
    j = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    inside = r < C
    scale = tl.exp(tl.load(log_scale_ptr + j))
    bias_j = tl.load(bias_ptr + j)
    grad_m = tl.zeros((BLOCK,), dtype=grad_product_ptr.dtype.element_ty)
    perm_t_grad_bias = tl.zeros((BLOCK,), dtype=grad_product_ptr.dtype.element_ty)
    for i in range(C):
        p_row = tl.load(perm_ptr + i * C + r, mask=inside, other=0.0)
        grad_bias_i = tl.load(grad_bias_ptr + i)
        grad_m += p_row * (tl.load(grad_weight_ptr + i * C + j) * scale + grad_bias_i * bias_j)
        perm_t_grad_bias += p_row * grad_bias_i
    tl.store(grad_product_ptr + r * C + j, grad_m, mask=inside)
    through_scale = tl.load(grad_weight_ptr + r * C + j, mask=inside, other=0.0) * tl.load(
        weight_ptr + r * C + j, mask=inside, other=0.0)
    tl.store(grad_log_scale_ptr + j, tl.sum(through_scale) + tl.load(grad_per_pixel_ptr))
    # M[:, j] = Σ_{k ≤ j} (L + I)[:, k]·(U + D)[k, j]
    m = tl.zeros((BLOCK,), dtype=grad_product_ptr.dtype.element_ty)
    for k in range(j + 1):
        unit_lower = tl.where(r == k, 1.0, tl.load(lower_ptr + r * C + k, mask=inside & (r > k), other=0.0))
        u = _upper_full_row(upper_ptr, sign_ptr, log_s_ptr, k, r, inside, C)  # row k of U + D, read at j below
        m += unit_lower * tl.sum(tl.where(r == j, u, 0.0))
    tl.store(grad_bias_in_ptr + j, tl.sum(m * perm_t_grad_bias))


@triton.jit
def _factor_grad_kernel(lower_ptr, upper_ptr, sign_ptr, log_s_ptr, grad_product_ptr, grad_per_pixel_ptr,
                        grad_lower_ptr, grad_upper_ptr, grad_log_s_ptr, C, BLOCK: tl.constexpr):
    """Program a: row a of ∂lower = tril(∂M·(U + D)ᵀ, −1) and of ∂upper = triu((L + I)ᵀ·∂M, 1), and
    ∂log_s[a] = ((L + I)ᵀ·∂M)[a, a]·sign[a]·e^log_s[a] + ∂per_pixel."""
    a = tl.program_id(0)
    b = tl.arange(0, BLOCK)
    inside = b < C
    lower = tl.zeros((BLOCK,), dtype=grad_lower_ptr.dtype.element_ty)
    for j in range(C):  # ∂L[a, b] = Σ_j ∂M[a, j]·(U + D)[b, j], over the columns j ≥ b where (U + D)[b, j] ≠ 0
        u_col = tl.load(upper_ptr + b * C + j, mask=inside & (b < j), other=0.0)
        u_col = tl.where(b == j, tl.load(sign_ptr + j) * tl.exp(tl.load(log_s_ptr + j)), u_col)
        lower += tl.load(grad_product_ptr + a * C + j) * u_col
    tl.store(grad_lower_ptr + a * C + b, tl.where(b < a, lower, 0.0), mask=inside)
    upper = tl.load(grad_product_ptr + a * C + b, mask=inside, other=0.0)
    for r in range(a + 1, C):  # ((L + I)ᵀ·∂M)[a, b] = ∂M[a, b] + Σ_{r > a} L[r, a]·∂M[r, b]
        upper += tl.load(lower_ptr + r * C + a) * tl.load(grad_product_ptr + r * C + b, mask=inside, other=0.0)
    tl.store(grad_upper_ptr + a * C + b, tl.where(b > a, upper, 0.0), mask=inside)
    diagonal = tl.load(sign_ptr + a) * tl.exp(tl.load(log_s_ptr + a))
    tl.store(grad_log_s_ptr + a, tl.sum(tl.where(b == a, upper, 0.0)) * diagonal + tl.load(grad_per_pixel_ptr))


@triton.jit
def _inverse_kernel(perm_ptr, lower_ptr, upper_ptr, sign_ptr, log_s_ptr, log_scale_ptr, bias_ptr, inverse_ptr,
                    bias_out_ptr, C, BLOCK: tl.constexpr):
    """Program j < C: column j of diag(e^−log_scale)·(U + D)⁻¹·(L + I)⁻¹·Pᵀ by forward then backward substitution
    on (Pᵀ)[:, j] = P[j, :], held as a vector; program C: the inverse bias −bias·e^−log_scale."""
    j = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    inside = k < C
    inv_scale = tl.exp(-tl.load(log_scale_ptr + k, mask=inside, other=0.0))
    if j < C:
        z = tl.load(perm_ptr + j * C + k, mask=inside, other=0.0)
        for r in range(C):  # z[r] −= Σ_{k < r} L[r, k]·z[k]
            lower_row = tl.load(lower_ptr + r * C + k, mask=inside & (k < r), other=0.0)
            z = tl.where(k == r, tl.sum(tl.where(k == r, z, 0.0)) - tl.sum(lower_row * z), z)
        for i in range(C):  # z[r] = (z[r] − Σ_{k > r} U[r, k]·z[k]) / D[r], from the last row up
            r = C - 1 - i
            upper_row = tl.load(upper_ptr + r * C + k, mask=inside & (k > r), other=0.0)
            diagonal = tl.load(sign_ptr + r) * tl.exp(tl.load(log_s_ptr + r))
            z = tl.where(k == r, (tl.sum(tl.where(k == r, z, 0.0)) - tl.sum(upper_row * z)) / diagonal, z)
        tl.store(inverse_ptr + k * C + j, z * inv_scale, mask=inside)
    else:
        tl.store(bias_out_ptr + k, -tl.load(bias_ptr + k, mask=inside, other=0.0) * inv_scale, mask=inside)


def _dense(*tensors):
    return [t.contiguous() for t in tensors]


def _check(perm, *factors):
    check_folded_lu_weight(perm, *factors)
    check_launchable(perm, "folded_lu_weight")
    if perm.dtype not in (torch.float32, torch.float64) or any(t.dtype != perm.dtype for t in factors):
        raise TypeError("folded_lu_weight: expected every factor in float32, or every factor in float64, got "
                        f"{', '.join(str(t.dtype) for t in (perm, *factors))}")


def launch_folded_lu_weight(perm, lower, upper, sign, log_s, log_scale, bias):
    """(perm, lower, upper (C, C), sign, log_s, log_scale, bias (C,)) → (weight (C, C), bias (C,), per pixel (0-d))."""
    _check(perm, lower, upper, sign, log_s, log_scale, bias)
    inputs = _dense(perm, lower, upper, sign, log_s, log_scale, bias)
    c = perm.shape[0]
    weight, bias_out, per_pixel = (empty(shape, perm.dtype, perm.device) for shape in ((c, c), (c,), ()))
    _folded_lu_weight_kernel[(c + 1,)](*inputs, weight, bias_out, per_pixel, c, BLOCK=triton.next_power_of_2(c))
    return weight, bias_out, per_pixel


def launch_folded_lu_weight_backward(grad_weight, grad_bias, grad_per_pixel, perm, lower, upper, sign, log_s, log_scale,
                              bias, weight):
    """The gradients of :func:`folded_lu_weight`'s outputs → those of (lower, upper, log_s, log_scale, bias)."""
    _check(perm, lower, upper, sign, log_s, log_scale, bias)
    c = perm.shape[0]
    for name, t, shape in (("grad_weight", grad_weight, (c, c)), ("grad_bias", grad_bias, (c,)),
                           ("grad_per_pixel", grad_per_pixel, ()), ("weight", weight, (c, c))):
        if tuple(t.shape) != shape or t.dtype != perm.dtype or t.device != perm.device:
            raise ValueError(f"folded_lu_weight backward: expected {name} of shape {shape}, dtype {perm.dtype} on "
                             f"{perm.device}, got {tuple(t.shape)}, {t.dtype} on {t.device}")
    perm, lower, upper, sign, log_s, log_scale, bias, weight, grad_weight, grad_bias, grad_per_pixel = _dense(
        perm, lower, upper, sign, log_s, log_scale, bias, weight, grad_weight, grad_bias, grad_per_pixel)
    c = perm.shape[0]
    block = triton.next_power_of_2(c)
    grad_product = torch.empty((c, c), dtype=perm.dtype, device=perm.device)
    grad_lower, grad_upper = (empty((c, c), perm.dtype, perm.device) for _ in range(2))
    grad_log_s, grad_log_scale, grad_bias_in = (empty((c,), perm.dtype, perm.device) for _ in range(3))
    _product_grad_kernel[(c,)](perm, lower, upper, sign, log_s, log_scale, bias, weight, grad_weight, grad_bias,
                               grad_per_pixel, grad_product, grad_log_scale, grad_bias_in, c, BLOCK=block)
    _factor_grad_kernel[(c,)](lower, upper, sign, log_s, grad_product, grad_per_pixel, grad_lower, grad_upper,
                              grad_log_s, c, BLOCK=block)
    return grad_lower, grad_upper, grad_log_s, grad_log_scale, grad_bias_in


def launch_folded_lu_weight_inverse(perm, lower, upper, sign, log_s, log_scale, bias):
    """The factors as :func:`folded_lu_weight` takes them → (inverse weight (C, C), inverse bias (C,)) of its map."""
    _check(perm, lower, upper, sign, log_s, log_scale, bias)
    c = perm.shape[0]
    inverse, bias_out = empty((c, c), perm.dtype, perm.device), empty((c,), perm.dtype, perm.device)
    _inverse_kernel[(c + 1,)](*_dense(perm, lower, upper, sign, log_s, log_scale, bias), inverse, bias_out, c,
                              BLOCK=triton.next_power_of_2(c))
    return inverse, bias_out
