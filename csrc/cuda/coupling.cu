// Coupling on CUDA: one thread per pixel walks the channels, copying the pass-through ones and transforming
// the others; each block reduces its Σ log s (a deterministic block sum) into one partial per sample. An h
// of lower precision than x is read as it is and upcast in registers.
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

template <Scale S, bool Inverse, typename scalar_t, typename h_t, typename acc_t>
__global__ void coupling_kernel(const scalar_t* __restrict__ x, const h_t* __restrict__ h,
                                scalar_t* __restrict__ out, acc_t* __restrict__ partial, int64_t channels, int64_t hw,
                                int64_t width, int64_t xsn, int64_t xsc, int64_t hsn, int64_t hsc,
                                CouplingChannels ch, bool checkerboard, int64_t parity, acc_t bound) {
  const int64_t n = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t sum = 0;
  if (p < hw) {
    const bool active = !checkerboard || checkerboard_active(p / width, p % width, parity);
    const scalar_t* x_pix = x + n * xsn + p;
    const h_t* h_pix = h + n * hsn + p;
    scalar_t* out_pix = out + n * channels * hw + p;
    for (int64_t k = 0; k < ch.n_pass; ++k) {
      const int64_t c = ch.pass_start + k;
      out_pix[c * hw] = x_pix[c * xsc];
    }
    for (int64_t k = 0; k < ch.n_t; ++k) {
      const int64_t c = ch.t_start + k;
      const acc_t v = x_pix[c * xsc];
      if (!active) {
        out_pix[c * hw] = x_pix[c * xsc];
        continue;
      }
      if constexpr (S == Scale::Additive) {
        const acc_t shift = h_pix[k * hsc];
        out_pix[c * hw] = static_cast<scalar_t>(Inverse ? v - shift : v + shift);
      } else {
        acc_t s, logs;
        scale_and_log<S, ScalarMath>(static_cast<acc_t>(h_pix[k * hsc]), bound, s, logs);
        const acc_t shift = h_pix[(ch.n_t + k) * hsc];
        out_pix[c * hw] = static_cast<scalar_t>(couple<Inverse>(v, s, shift));
        sum += logs;
      }
    }
  }
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) partial[n * gridDim.x + blockIdx.x] = total;
}

template <Scale S, bool Inverse, typename scalar_t, typename h_t, typename acc_t>
__global__ void coupling_backward_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ gld,
                                         const scalar_t* __restrict__ v, const h_t* __restrict__ h,
                                         scalar_t* __restrict__ grad_in, h_t* __restrict__ grad_h,
                                         int64_t channels, int64_t h_channels, int64_t hw, int64_t width,
                                         CouplingChannels ch, bool checkerboard, int64_t parity, acc_t bound) {
  const int64_t n = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= hw) return;
  const bool active = !checkerboard || checkerboard_active(p / width, p % width, parity);
  const int64_t in_base = n * channels * hw + p, h_base = n * h_channels * hw + p;
  for (int64_t k = 0; k < ch.n_pass; ++k) {
    const int64_t i = in_base + (ch.pass_start + k) * hw;
    grad_in[i] = g[i];
  }
  const acc_t gl = gld[n];
  for (int64_t k = 0; k < ch.n_t; ++k) {
    const int64_t i = in_base + (ch.t_start + k) * hw;
    const int64_t raw_i = h_base + k * hw;
    const int64_t shift_i = S == Scale::Additive ? raw_i : h_base + (ch.n_t + k) * hw;
    if (!active) {
      grad_in[i] = g[i];
      grad_h[shift_i] = h_t(0);
      if constexpr (S != Scale::Additive) grad_h[raw_i] = h_t(0);
      continue;
    }
    acc_t gin, graw, gshift;
    const acc_t raw = S == Scale::Additive ? acc_t(0) : static_cast<acc_t>(h[raw_i]);
    const acc_t shift = S == Scale::Additive ? acc_t(0) : static_cast<acc_t>(h[shift_i]);
    couple_backward<S, Inverse, ScalarMath>(static_cast<acc_t>(g[i]), gl, static_cast<acc_t>(v[i]), raw, shift,
                                            bound, gin, graw, gshift);
    grad_in[i] = static_cast<scalar_t>(gin);
    grad_h[shift_i] = static_cast<h_t>(gshift);
    if constexpr (S != Scale::Additive) grad_h[raw_i] = static_cast<h_t>(graw);
  }
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> coupling_cuda(const at::Tensor& x_in, const at::Tensor& h_in,
                                                 c10::string_view mask, int64_t parity, c10::string_view scale,
                                                 double bound) {
  const char* op = Inverse ? "flowkern::coupling_inverse" : "flowkern::coupling_forward";
  const CouplingOptions o = coupling_options(x_in, h_in, mask, parity, scale, bound, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = inner_dense(x_in), h = inner_dense(h_in);
  const int64_t n = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3), hw = height * width;
  TORCH_CHECK(n <= 65535, op, ": at most 65535 samples per call, got ", n);
  at::Tensor out = at::empty({n, c, height, width}, x.options());
  const dim3 grid(blocks_for(hw), static_cast<unsigned>(n));
  at::Tensor partial = at::empty({n, static_cast<int64_t>(grid.x)}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (n == 0 || hw == 0) return {out, partial.sum(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_cuda", [&] {
    dispatch_h_type<scalar_t>(h.scalar_type(), [&](auto h_value) {
      using h_t = decltype(h_value);
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_scale(o.scale, [&](auto scale_constant) {
        constexpr Scale S = decltype(scale_constant)::value;
        coupling_kernel<S, Inverse, scalar_t, h_t, acc_t><<<grid, kThreads, 0, stream()>>>(
            x.const_data_ptr<scalar_t>(), h.const_data_ptr<h_t>(), out.mutable_data_ptr<scalar_t>(),
            partial.mutable_data_ptr<acc_t>(), c, hw, width, x.stride(0), x.stride(1), h.stride(0), h.stride(1),
            o.channels, o.checkerboard, parity, static_cast<acc_t>(bound));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {out, partial.sum(1)};
}

std::tuple<at::Tensor, at::Tensor> coupling_backward_cuda(const at::Tensor& grad_out, const at::Tensor& grad_logdet,
                                                          const at::Tensor& input, const at::Tensor& h_in,
                                                          c10::string_view mask, int64_t parity,
                                                          c10::string_view scale, double bound, bool inverse) {
  const char* op = "flowkern::coupling_backward";
  const CouplingOptions o = coupling_options(input, h_in, mask, parity, scale, bound, op);
  check_grad_out(grad_out, input, op);
  check_vector(grad_logdet, input.size(0), input, "grad_logdet", op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor g = grad_out.contiguous(), v = input.contiguous(), h = h_in.contiguous();
  const int64_t n = v.size(0), c = v.size(1), width = v.size(3), hw = v.size(2) * width;
  TORCH_CHECK(n <= 65535, op, ": at most 65535 samples per call, got ", n);
  at::Tensor grad_in = at::empty_like(v), grad_h = at::empty_like(h);
  if (n == 0 || hw == 0) return {grad_in, grad_h};
  const at::Tensor gld = grad_logdet.to(at::toOpMathType(v.scalar_type())).contiguous();
  const dim3 grid(blocks_for(hw), static_cast<unsigned>(n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "coupling_backward_cuda", [&] {
    dispatch_h_type<scalar_t>(h.scalar_type(), [&](auto h_value) {
      using h_t = decltype(h_value);
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_scale(o.scale, [&](auto scale_constant) {
        constexpr Scale S = decltype(scale_constant)::value;
        dispatch_bool(inverse, [&](auto inverse_constant) {
          constexpr bool Inverse = decltype(inverse_constant)::value;
          coupling_backward_kernel<S, Inverse, scalar_t, h_t, acc_t><<<grid, kThreads, 0, stream()>>>(
              g.const_data_ptr<scalar_t>(), gld.const_data_ptr<acc_t>(), v.const_data_ptr<scalar_t>(),
              h.const_data_ptr<h_t>(), grad_in.mutable_data_ptr<scalar_t>(), grad_h.mutable_data_ptr<h_t>(), c,
              h.size(1), hw, width, o.channels, o.checkerboard, parity, static_cast<acc_t>(bound));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {grad_in, grad_h};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("coupling_forward", &cuda::coupling_cuda<false>);
  m.impl("coupling_inverse", &cuda::coupling_cuda<true>);
  m.impl("coupling_backward", &cuda::coupling_backward_cuda);
}

}  // namespace flowkern
