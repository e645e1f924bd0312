// The (C, C) algebra of an LU-parametrised 1×1 conv with the ActNorm before it folded in, one output entry per
// call, shared by the CPU and CUDA kernels of flowkern::folded_lu_weight and its backward.
//
//   W = P·M,  M = (L + I)·(U + D),  D = diag(sign·e^log_s);  folded weight W·diag(e^log_scale), bias W·bias,
//   log-det per pixel Σ log_s + Σ log_scale.
//
// Every matrix is (C, C) row-major and contiguous; L is read below its diagonal and U above it only. Products
// with P run over the non-zero entries of its rows or columns: one each for a permutation matrix, so an entry
// of W costs O(C), while any other P is still multiplied exactly. Conventions: flowkern/reference/conv1x1.py.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "math.h"

namespace flowkern {
namespace lu {

template <typename T>
struct Factors {
  const T* perm;
  const T* lower;
  const T* upper;
  const T* sign;
  const T* log_s;
  int64_t c;

  C10_HOST_DEVICE T diagonal(int64_t k) const { return sign[k] * ScalarMath::exp(log_s[k]); }
  // (L + I)[r][k]
  C10_HOST_DEVICE T unit_lower(int64_t r, int64_t k) const {
    return k < r ? lower[r * c + k] : (k == r ? T(1) : T(0));
  }
  // (U + D)[k][j]
  C10_HOST_DEVICE T upper_full(int64_t k, int64_t j) const {
    return k < j ? upper[k * c + j] : (k == j ? diagonal(k) : T(0));
  }
  // M[r][j] = Σ_{k ≤ min(r, j)} (L + I)[r][k]·(U + D)[k][j]
  C10_HOST_DEVICE T product(int64_t r, int64_t j) const {
    const int64_t last = r < j ? r : j;
    T acc = 0;
    for (int64_t k = 0; k <= last; ++k) acc += unit_lower(r, k) * upper_full(k, j);
    return acc;
  }
  // W[i][j] = Σ_r P[i][r]·M[r][j]
  C10_HOST_DEVICE T weight(int64_t i, int64_t j) const {
    T acc = 0;
    for (int64_t r = 0; r < c; ++r) {
      const T p = perm[i * c + r];
      if (p != T(0)) acc += p * product(r, j);
    }
    return acc;
  }
};

// The forward's C·C + C + 1 outputs, entry t: folded[i][j] for t < C·C, bias_out[i] for the next C, per_pixel last.
template <typename T>
C10_HOST_DEVICE inline void forward_entry(const Factors<T>& f, const T* log_scale, const T* bias, int64_t t,
                                          T* folded, T* bias_out, T* per_pixel) {
  const int64_t c = f.c, square = c * c;
  if (t < square) {
    const int64_t j = t % c;
    folded[t] = f.weight(t / c, j) * ScalarMath::exp(log_scale[j]);
  } else if (t < square + c) {
    const int64_t i = t - square;
    T acc = 0;
    for (int64_t j = 0; j < c; ++j) acc += f.weight(i, j) * bias[j];
    bias_out[i] = acc;
  } else {
    T acc = 0;
    for (int64_t k = 0; k < c; ++k) acc += f.log_s[k] + log_scale[k];
    *per_pixel = acc;
  }
}

// What the backward reads besides the factors: the forward's inputs and folded weight, and the output gradients.
template <typename T>
struct Gradients {
  const T* grad_weight;     // ∂folded (C, C)
  const T* grad_bias;       // ∂bias_out (C,)
  const T* grad_per_pixel;  // 0-d
  const T* log_scale;
  const T* bias;
  const T* folded;
};

// Backward, first pass, C·C + C entries: ∂M[r][j] = Σ_i P[i][r]·∂W[i][j] with ∂W[i][j] = ∂folded[i][j]·e^log_scale[j]
// + ∂bias_out[i]·bias[j], for t < C·C; then per column j, ∂log_scale[j] = Σ_i ∂folded[i][j]·folded[i][j] + ∂per_pixel
// and ∂bias[j] = Σ_i W[i][j]·∂bias_out[i].
template <typename T>
C10_HOST_DEVICE inline void backward_product_entry(const Factors<T>& f, const Gradients<T>& g, int64_t t,
                                                   T* grad_product, T* grad_log_scale, T* grad_bias_in) {
  const int64_t c = f.c, square = c * c;
  if (t < square) {
    const int64_t r = t / c, j = t % c;
    const T scale = ScalarMath::exp(g.log_scale[j]);
    T acc = 0;
    for (int64_t i = 0; i < c; ++i) {
      const T p = f.perm[i * c + r];
      if (p != T(0)) acc += p * (g.grad_weight[i * c + j] * scale + g.grad_bias[i] * g.bias[j]);
    }
    grad_product[t] = acc;
  } else {
    const int64_t j = t - square;
    T through_scale = 0, through_bias = 0;
    for (int64_t i = 0; i < c; ++i) {
      through_scale += g.grad_weight[i * c + j] * g.folded[i * c + j];
      through_bias += f.weight(i, j) * g.grad_bias[i];
    }
    grad_log_scale[j] = through_scale + *g.grad_per_pixel;
    grad_bias_in[j] = through_bias;
  }
}

// ∂(U + D)[k][j] = Σ_{r ≥ k} (L + I)[r][k]·∂M[r][j]
template <typename T>
C10_HOST_DEVICE inline T grad_upper_full(const Factors<T>& f, const T* grad_product, int64_t k, int64_t j) {
  T acc = grad_product[k * f.c + j];
  for (int64_t r = k + 1; r < f.c; ++r) acc += f.lower[r * f.c + k] * grad_product[r * f.c + j];
  return acc;
}

// Backward, second pass over ∂M, C·C + C entries: ∂lower[a][b] and ∂upper[a][b] for t < C·C (zero on and on the
// unread side of the diagonal), then ∂log_s[k] = ∂(U + D)[k][k]·sign[k]·e^log_s[k] + ∂per_pixel.
template <typename T>
C10_HOST_DEVICE inline void backward_factor_entry(const Factors<T>& f, const T* grad_product, const T* grad_per_pixel,
                                                  int64_t t, T* grad_lower, T* grad_upper, T* grad_log_s) {
  const int64_t c = f.c, square = c * c;
  if (t < square) {
    const int64_t a = t / c, b = t % c;
    T lower = 0;
    if (b < a) {  // ∂L[a][b] = Σ_{j ≥ b} ∂M[a][j]·(U + D)[b][j]
      for (int64_t j = b; j < c; ++j) lower += grad_product[a * c + j] * f.upper_full(b, j);
    }
    grad_lower[t] = lower;
    grad_upper[t] = a < b ? grad_upper_full(f, grad_product, a, b) : T(0);
  } else {
    const int64_t k = t - square;
    grad_log_s[k] = grad_upper_full(f, grad_product, k, k) * f.diagonal(k) + *grad_per_pixel;
  }
}

// The inverse map x = W_inv·y + b_inv of x ↦ W·(x·e^log_scale + bias): W_inv = diag(e^−log_scale)·(U + D)⁻¹·(L + I)⁻¹·Pᵀ
// and b_inv = −bias·e^−log_scale. Call j < C writes column j of W_inv, by forward then backward substitution on
// (Pᵀ)[:, j] = P[j, :] in place in that column (no general inverse); call C writes b_inv.
template <typename T>
C10_HOST_DEVICE inline void inverse_column(const Factors<T>& f, const T* log_scale, const T* bias, int64_t j,
                                           T* inverse, T* bias_out) {
  const int64_t c = f.c;
  if (j == c) {
    for (int64_t i = 0; i < c; ++i) bias_out[i] = -bias[i] * ScalarMath::exp(-log_scale[i]);
    return;
  }
  T* column = inverse + j;  // entry r at column[r * c]
  for (int64_t r = 0; r < c; ++r) {  // (L + I)·z = Pᵀ e_j
    T acc = f.perm[j * c + r];
    for (int64_t k = 0; k < r; ++k) acc -= f.lower[r * c + k] * column[k * c];
    column[r * c] = acc;
  }
  for (int64_t r = c - 1; r >= 0; --r) {  // (U + D)·w = z
    T acc = column[r * c];
    for (int64_t k = r + 1; k < c; ++k) acc -= f.upper[r * c + k] * column[k * c];
    column[r * c] = acc / f.diagonal(r);
  }
  for (int64_t r = 0; r < c; ++r) column[r * c] *= ScalarMath::exp(-log_scale[r]);
}

}  // namespace lu
}  // namespace flowkern
