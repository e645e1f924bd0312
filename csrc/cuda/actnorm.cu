// ActNorm on CUDA: the forward is elementwise; the backward gives each block a tile of pixels of one
// sample, walks the channels, and writes per-channel block sums for ∂log_scale and ∂bias (deterministic
// block reductions, then a fixed-order sum of the partials).
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

template <bool Inverse, typename scalar_t, typename acc_t>
__global__ void actnorm_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale,
                               const acc_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t channels,
                               int64_t hw, int64_t xsn, int64_t xsc, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / hw, p = i % hw, c = row % channels;
    const acc_t v = x[(row / channels) * xsn + c * xsc + p];
    out[i] = static_cast<scalar_t>(actnorm<Inverse>(v, scale[c], bias[c]));
  }
}

template <bool Inverse, typename scalar_t, typename acc_t>
__global__ void actnorm_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ v,
                                        const acc_t* __restrict__ scale, const acc_t* __restrict__ bias,
                                        scalar_t* __restrict__ grad_in, acc_t* __restrict__ partial_log,
                                        acc_t* __restrict__ partial_bias, int64_t channels, int64_t hw) {
  const int64_t n = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t parts = static_cast<int64_t>(gridDim.x) * gridDim.y, slot = n * gridDim.x + blockIdx.x;
  for (int64_t c = 0; c < channels; ++c) {
    acc_t gl = 0, gb = 0;
    if (p < hw) {
      const int64_t i = (n * channels + c) * hw + p;
      acc_t gi;
      actnorm_backward<Inverse>(static_cast<acc_t>(g[i]), static_cast<acc_t>(v[i]), scale[c], bias[c], gi, gl, gb);
      grad_in[i] = static_cast<scalar_t>(gi);
    }
    const acc_t sum_log = block_sum(gl), sum_bias = block_sum(gb);
    if (threadIdx.x == 0) {
      partial_log[c * parts + slot] = sum_log;
      partial_bias[c * parts + slot] = sum_bias;
    }
  }
}

at::Tensor actnorm_cuda(const at::Tensor& x_in, const at::Tensor& log_scale, const at::Tensor& bias, bool inverse) {
  check_actnorm(x_in, log_scale, bias, "flowkern::actnorm");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = inner_dense(x_in);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t total = x.numel(), hw = x.size(2) * x.size(3);
  if (total == 0) return out;
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor ls = log_scale.to(acc_dtype);
  const at::Tensor scale = (inverse ? -ls : ls).exp().contiguous(), b = bias.to(acc_dtype).contiguous();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(blocks_for(total), 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "actnorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_bool(inverse, [&](auto inverse_constant) {
      actnorm_kernel<decltype(inverse_constant)::value, scalar_t, acc_t><<<blocks, kThreads, 0, stream()>>>(
          x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(), x.size(1), hw, x.stride(0), x.stride(1), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward_cuda(const at::Tensor& grad_out,
                                                                     const at::Tensor& input,
                                                                     const at::Tensor& log_scale,
                                                                     const at::Tensor& bias, bool inverse) {
  const char* op = "flowkern::actnorm_backward";
  check_actnorm(input, log_scale, bias, op);
  check_grad_out(grad_out, input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor g = grad_out.contiguous(), v = input.contiguous();
  const int64_t n = v.size(0), c = v.size(1), hw = v.size(2) * v.size(3);
  TORCH_CHECK(n <= 65535, op, ": at most 65535 samples per call, got ", n);
  const auto acc_dtype = at::toOpMathType(v.scalar_type());
  at::Tensor grad_in = at::empty_like(v);
  const dim3 grid(blocks_for(std::max<int64_t>(hw, 1)), static_cast<unsigned>(std::max<int64_t>(n, 1)));
  at::Tensor partial = at::zeros({2, c, static_cast<int64_t>(grid.x) * grid.y}, v.options().dtype(acc_dtype));
  if (v.numel() > 0) {
    const at::Tensor ls = log_scale.to(acc_dtype);
    const at::Tensor scale = (inverse ? -ls : ls).exp().contiguous(), b = bias.to(acc_dtype).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "actnorm_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_bool(inverse, [&](auto inverse_constant) {
        actnorm_backward_kernel<decltype(inverse_constant)::value, scalar_t, acc_t><<<grid, kThreads, 0, stream()>>>(
            g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
            b.const_data_ptr<acc_t>(), grad_in.mutable_data_ptr<scalar_t>(), partial[0].mutable_data_ptr<acc_t>(),
            partial[1].mutable_data_ptr<acc_t>(), c, hw);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  const at::Tensor sums = partial.sum(2);
  return {grad_in, sums[0].to(log_scale.scalar_type()).clone(), sums[1].to(bias.scalar_type()).clone()};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("actnorm", &cuda::actnorm_cuda);
  m.impl("actnorm_backward", &cuda::actnorm_backward_cuda);
}

}  // namespace flowkern
