// A Glow conditioner's two ActNorms folded into the convolutions before them, on CUDA: one block per row (output
// channel) of either weight, blockIdx.y choosing the weight, so both pairs take one launch each way; the entries
// from the per-entry math shared with the CPU (flowkern/fold_actnorms.h), ∂log_scale by a fixed-order block sum.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "../flowkern/fold_actnorms.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

template <typename T, typename acc_t>
__global__ void fold_actnorms_kernel(fold::Pair<T> first, fold::Pair<T> second) {
  const fold::Pair<T>& p = blockIdx.y == 0 ? first : second;
  if (blockIdx.x >= p.rows) return;  // the whole block returns
  fold::fold_entries<T, acc_t>(p, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t>
__global__ void fold_actnorms_backward_kernel(fold::GradPair<T> first, fold::GradPair<T> second) {
  const fold::GradPair<T>& p = blockIdx.y == 0 ? first : second;
  const int64_t o = blockIdx.x;
  if (o >= p.rows) return;  // the whole block returns
  const acc_t scale = ScalarMath::exp(static_cast<acc_t>(p.log_scale[o]));
  const acc_t total = block_sum(fold::grad_entries<T, acc_t>(p, o, scale, threadIdx.x, blockDim.x));
  if (threadIdx.x == 0) p.grad_log_scale[o] = static_cast<T>(scale * total);
}

dim3 grid_for(const at::Tensor& weight1, const at::Tensor& weight2, const char* op) {
  const int64_t rows = std::max(weight1.size(0), weight2.size(0));
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 output channels, got ", rows);
  return dim3(static_cast<unsigned>(rows), 2);
}

std::tuple<at::Tensor, at::Tensor> fold_actnorms_cuda(const at::Tensor& weight1_in, const at::Tensor& log_scale1_in,
                                                      const at::Tensor& weight2_in, const at::Tensor& log_scale2_in) {
  const char* op = "flowkern::fold_actnorms";
  check_fold_actnorms(weight1_in, log_scale1_in, weight2_in, log_scale2_in, {}, {}, op);
  const c10::cuda::CUDAGuard guard(weight1_in.device());
  const at::Tensor weight1 = weight1_in.contiguous(), log_scale1 = log_scale1_in.contiguous(),
                   weight2 = weight2_in.contiguous(), log_scale2 = log_scale2_in.contiguous();
  at::Tensor folded1 = at::empty_like(weight1), folded2 = at::empty_like(weight2);
  const dim3 grid = grid_for(weight1, weight2, op);
  if (grid.x == 0) return {folded1, folded2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight1.scalar_type(), "fold_actnorms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fold_actnorms_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream()>>>(
        fold::pair_of<scalar_t>(weight1, log_scale1, folded1), fold::pair_of<scalar_t>(weight2, log_scale2, folded2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {folded1, folded2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_actnorms_backward_cuda(
    const at::Tensor& grad1_in, const at::Tensor& weight1_in, const at::Tensor& log_scale1_in,
    const at::Tensor& grad2_in, const at::Tensor& weight2_in, const at::Tensor& log_scale2_in) {
  const char* op = "flowkern::fold_actnorms_backward";
  check_fold_actnorms(weight1_in, log_scale1_in, weight2_in, log_scale2_in, grad1_in, grad2_in, op);
  const c10::cuda::CUDAGuard guard(weight1_in.device());
  const at::Tensor grad1 = grad1_in.contiguous(), weight1 = weight1_in.contiguous(),
                   log_scale1 = log_scale1_in.contiguous(), grad2 = grad2_in.contiguous(),
                   weight2 = weight2_in.contiguous(), log_scale2 = log_scale2_in.contiguous();
  at::Tensor grad_weight1 = at::empty_like(weight1), grad_log_scale1 = at::empty_like(log_scale1),
             grad_weight2 = at::empty_like(weight2), grad_log_scale2 = at::empty_like(log_scale2);
  const dim3 grid = grid_for(weight1, weight2, op);
  if (grid.x == 0) return {grad_weight1, grad_log_scale1, grad_weight2, grad_log_scale2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight1.scalar_type(), "fold_actnorms_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fold_actnorms_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream()>>>(
        fold::grad_pair_of<scalar_t>(grad1, weight1, log_scale1, grad_weight1, grad_log_scale1),
        fold::grad_pair_of<scalar_t>(grad2, weight2, log_scale2, grad_weight2, grad_log_scale2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_weight1, grad_log_scale1, grad_weight2, grad_log_scale2};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("fold_actnorms", &fold_actnorms_cuda);
  m.impl("fold_actnorms_backward", &fold_actnorms_backward_cuda);
}

}  // namespace cuda
}  // namespace flowkern
