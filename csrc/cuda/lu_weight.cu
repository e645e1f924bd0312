// The folded LU weight of a 1×1 conv on CUDA, and its inverse map: one thread per output entry (per column of
// the inverse), from the per-entry math shared with
// the CPU (flowkern/lu_weight.h). The forward is one launch; the backward two, since its second pass reads the
// whole of ∂M that the first writes. At Glow's channel counts (12 to 96) each is a single wave of a few blocks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "../flowkern/lu_weight.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

template <typename T>
lu::Factors<T> factors(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& sign,
                       const at::Tensor& log_s) {
  return {perm.const_data_ptr<T>(), lower.const_data_ptr<T>(), upper.const_data_ptr<T>(), sign.const_data_ptr<T>(),
          log_s.const_data_ptr<T>(), perm.size(0)};
}

template <typename T>
__global__ void folded_lu_weight_kernel(lu::Factors<T> f, const T* __restrict__ log_scale, const T* __restrict__ bias,
                                        T* folded, T* bias_out, T* per_pixel, int64_t entries) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < entries) lu::forward_entry(f, log_scale, bias, t, folded, bias_out, per_pixel);
}

template <typename T>
__global__ void folded_lu_weight_product_grad_kernel(lu::Factors<T> f, lu::Gradients<T> g, T* grad_product,
                                                     T* grad_log_scale, T* grad_bias, int64_t entries) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < entries) lu::backward_product_entry(f, g, t, grad_product, grad_log_scale, grad_bias);
}

template <typename T>
__global__ void folded_lu_weight_factor_grad_kernel(lu::Factors<T> f, const T* __restrict__ grad_product,
                                                    const T* __restrict__ grad_per_pixel, T* grad_lower, T* grad_upper,
                                                    T* grad_log_s, int64_t entries) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < entries) lu::backward_factor_entry(f, grad_product, grad_per_pixel, t, grad_lower, grad_upper, grad_log_s);
}

template <typename T>
__global__ void folded_lu_weight_inverse_kernel(lu::Factors<T> f, const T* __restrict__ log_scale,
                                                const T* __restrict__ bias, T* inverse, T* bias_out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j <= f.c) lu::inverse_column(f, log_scale, bias, j, inverse, bias_out);
}

void check_entries(int64_t entries, const char* op) {
  TORCH_CHECK(launch::ceil_div(entries, kThreads) <= std::numeric_limits<int32_t>::max(), op,
              ": too many channels for one launch, got ", entries, " entries");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> folded_lu_weight_cuda(
    const at::Tensor& perm_in, const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& sign_in,
    const at::Tensor& log_s_in, const at::Tensor& log_scale_in, const at::Tensor& bias_in) {
  const char* op = "flowkern::folded_lu_weight";
  check_folded_lu_weight(perm_in, lower_in, upper_in, sign_in, log_s_in, log_scale_in, bias_in, op);
  const c10::cuda::CUDAGuard guard(perm_in.device());
  const at::Tensor perm = perm_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous(),
                   sign = sign_in.contiguous(), log_s = log_s_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   bias = bias_in.contiguous();
  const int64_t c = perm.size(0), entries = c * c + c + 1;
  check_entries(entries, op);
  at::Tensor folded = at::empty({c, c}, perm.options()), bias_out = at::empty({c}, perm.options()),
             per_pixel = at::empty({}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "folded_lu_weight_cuda", [&] {
    folded_lu_weight_kernel<scalar_t><<<blocks_for(entries), kThreads, 0, stream()>>>(
        factors<scalar_t>(perm, lower, upper, sign, log_s), log_scale.const_data_ptr<scalar_t>(),
        bias.const_data_ptr<scalar_t>(), folded.mutable_data_ptr<scalar_t>(), bias_out.mutable_data_ptr<scalar_t>(),
        per_pixel.mutable_data_ptr<scalar_t>(), entries);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {folded, bias_out, per_pixel};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> folded_lu_weight_backward_cuda(
    const at::Tensor& grad_weight_in, const at::Tensor& grad_bias_in, const at::Tensor& grad_per_pixel_in,
    const at::Tensor& perm_in, const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& sign_in,
    const at::Tensor& log_s_in, const at::Tensor& log_scale_in, const at::Tensor& bias_in, const at::Tensor& folded_in) {
  const char* op = "flowkern::folded_lu_weight_backward";
  check_folded_lu_weight(perm_in, lower_in, upper_in, sign_in, log_s_in, log_scale_in, bias_in, op);
  check_folded_lu_weight_grads(perm_in, grad_weight_in, grad_bias_in, grad_per_pixel_in, folded_in, op);
  const c10::cuda::CUDAGuard guard(perm_in.device());
  const at::Tensor perm = perm_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous(),
                   sign = sign_in.contiguous(), log_s = log_s_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   bias = bias_in.contiguous(), folded = folded_in.contiguous(), gw = grad_weight_in.contiguous(),
                   gb = grad_bias_in.contiguous(), gpp = grad_per_pixel_in.contiguous();
  const int64_t c = perm.size(0), entries = c * c + c;
  check_entries(entries, op);
  at::Tensor grad_product = at::empty({c, c}, perm.options()), grad_lower = at::empty({c, c}, perm.options()),
             grad_upper = at::empty({c, c}, perm.options()), grad_log_s = at::empty({c}, perm.options()),
             grad_log_scale = at::empty({c}, perm.options()), grad_bias = at::empty({c}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "folded_lu_weight_backward_cuda", [&] {
    const lu::Factors<scalar_t> f = factors<scalar_t>(perm, lower, upper, sign, log_s);
    const lu::Gradients<scalar_t> g{gw.const_data_ptr<scalar_t>(),        gb.const_data_ptr<scalar_t>(),
                                    gpp.const_data_ptr<scalar_t>(),       log_scale.const_data_ptr<scalar_t>(),
                                    bias.const_data_ptr<scalar_t>(),      folded.const_data_ptr<scalar_t>()};
    folded_lu_weight_product_grad_kernel<scalar_t><<<blocks_for(entries), kThreads, 0, stream()>>>(
        f, g, grad_product.mutable_data_ptr<scalar_t>(), grad_log_scale.mutable_data_ptr<scalar_t>(),
        grad_bias.mutable_data_ptr<scalar_t>(), entries);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    folded_lu_weight_factor_grad_kernel<scalar_t><<<blocks_for(entries), kThreads, 0, stream()>>>(
        f, grad_product.const_data_ptr<scalar_t>(), gpp.const_data_ptr<scalar_t>(),
        grad_lower.mutable_data_ptr<scalar_t>(), grad_upper.mutable_data_ptr<scalar_t>(),
        grad_log_s.mutable_data_ptr<scalar_t>(), entries);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_lower, grad_upper, grad_log_s, grad_log_scale, grad_bias};
}

// One thread per column: the substitutions are sequential within a column, independent across columns.
std::tuple<at::Tensor, at::Tensor> folded_lu_weight_inverse_cuda(
    const at::Tensor& perm_in, const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& sign_in,
    const at::Tensor& log_s_in, const at::Tensor& log_scale_in, const at::Tensor& bias_in) {
  const char* op = "flowkern::folded_lu_weight_inverse";
  check_folded_lu_weight(perm_in, lower_in, upper_in, sign_in, log_s_in, log_scale_in, bias_in, op);
  const c10::cuda::CUDAGuard guard(perm_in.device());
  const at::Tensor perm = perm_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous(),
                   sign = sign_in.contiguous(), log_s = log_s_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   bias = bias_in.contiguous();
  const int64_t c = perm.size(0);
  check_entries(c + 1, op);
  at::Tensor inverse = at::empty({c, c}, perm.options()), bias_out = at::empty({c}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "folded_lu_weight_inverse_cuda", [&] {
    folded_lu_weight_inverse_kernel<scalar_t><<<blocks_for(c + 1), kThreads, 0, stream()>>>(
        factors<scalar_t>(perm, lower, upper, sign, log_s), log_scale.const_data_ptr<scalar_t>(),
        bias.const_data_ptr<scalar_t>(), inverse.mutable_data_ptr<scalar_t>(), bias_out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {inverse, bias_out};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("folded_lu_weight", &cuda::folded_lu_weight_cuda);
  m.impl("folded_lu_weight_backward", &cuda::folded_lu_weight_backward_cuda);
  m.impl("folded_lu_weight_inverse", &cuda::folded_lu_weight_inverse_cuda);
}

}  // namespace flowkern
