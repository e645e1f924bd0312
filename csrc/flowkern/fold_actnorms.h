// A Glow conditioner's two ActNorms folded into the convolutions before them, per entry, shared by the CPU and
// CUDA kernels: W_folded[o, k] = W[o, k]·e^log_scale[o]; backward ∂W[o, k] = ∂W_folded[o, k]·e^log_scale[o] and
// ∂log_scale[o] = e^log_scale[o]·Σ_k ∂W_folded[o, k]·W[o, k]; and the rows of both launchers' tensors.
// Conventions: flowkern/reference/actnorm.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "math.h"

namespace flowkern {
namespace fold {

// One weight, rows × row_size contiguous entries (a row per output channel), and the log-scale of each row.
template <typename T>
struct Pair {
  const T* weight;
  const T* log_scale;
  T* folded;
  int64_t rows, row_size;
};

template <typename T>
struct GradPair {
  const T* grad;  // of the folded weight
  const T* weight;
  const T* log_scale;
  T* grad_weight;
  T* grad_log_scale;
  int64_t rows, row_size;
};

// The launchers' views of contiguous tensors: a weight (O, ...) has O rows of numel / O entries.
inline int64_t row_size(const at::Tensor& weight) { return weight.size(0) ? weight.numel() / weight.size(0) : 0; }

template <typename T>
Pair<T> pair_of(const at::Tensor& weight, const at::Tensor& log_scale, at::Tensor& folded) {
  return {weight.const_data_ptr<T>(), log_scale.const_data_ptr<T>(), folded.mutable_data_ptr<T>(), weight.size(0),
          row_size(weight)};
}

template <typename T>
GradPair<T> grad_pair_of(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& log_scale,
                         at::Tensor& grad_weight, at::Tensor& grad_log_scale) {
  return {grad.const_data_ptr<T>(),          weight.const_data_ptr<T>(),         log_scale.const_data_ptr<T>(),
          grad_weight.mutable_data_ptr<T>(), grad_log_scale.mutable_data_ptr<T>(), weight.size(0),
          row_size(weight)};
}

// Entries begin, begin + step, ... < row_size of row o.
template <typename T, typename acc_t>
C10_HOST_DEVICE inline void fold_entries(const Pair<T>& p, int64_t o, int64_t begin, int64_t step) {
  const acc_t scale = ScalarMath::exp(static_cast<acc_t>(p.log_scale[o]));
  const int64_t base = o * p.row_size;
  for (int64_t k = begin; k < p.row_size; k += step) {
    p.folded[base + k] = static_cast<T>(static_cast<acc_t>(p.weight[base + k]) * scale);
  }
}

// Writes ∂W at those entries of row o and returns their part of Σ_k ∂W_folded[o, k]·W[o, k].
template <typename T, typename acc_t>
C10_HOST_DEVICE inline acc_t grad_entries(const GradPair<T>& p, int64_t o, acc_t scale, int64_t begin, int64_t step) {
  const int64_t base = o * p.row_size;
  acc_t through_scale = 0;
  for (int64_t k = begin; k < p.row_size; k += step) {
    const acc_t g = static_cast<acc_t>(p.grad[base + k]);
    p.grad_weight[base + k] = static_cast<T>(g * scale);
    through_scale += g * static_cast<acc_t>(p.weight[base + k]);
  }
  return through_scale;
}

}  // namespace fold
}  // namespace flowkern
