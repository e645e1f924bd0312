// Coupling on CUDA: one block per (sample, channel, tile of pixels). A pass-through channel is copied; a
// transformed one loads all its x, raw and shift values before the arithmetic, and inactive pixels of a
// checkerboard are predicated, not branched around. Each block reduces its Σ log s (a deterministic block
// sum) into one partial, and a second pass sums each sample's partials in a fixed order. An h of lower
// precision than x is read as it is and upcast in registers.
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

// The block's place: sample n, channel c, the first pixel p0 of its tile, and k = c − t_start (the channel's
// index among the transformed ones, which places its raw and shift in h; valid when 0 ≤ k < n_t).
struct CouplingBlock {
  int64_t n, c, p0, k;
  bool transformed;
};

__device__ inline CouplingBlock coupling_block(int64_t channels, int64_t tiles, const CouplingChannels& ch) {
  const int64_t plane = blockIdx.x / tiles, n = plane / channels, c = plane % channels;
  const int64_t k = c - ch.t_start;
  return {n, c, (blockIdx.x % tiles) * kTile, k, k >= 0 && k < ch.n_t};
}

// A pass-through channel's tile copied as it is: all loads, then all stores.
template <typename scalar_t>
__device__ inline void copy_tile(const scalar_t* src, scalar_t* dst, int64_t p0, int64_t hw) {
  scalar_t v[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t p = tile_pixel(p0, j);
    if (p < hw) v[j] = src[p];
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t p = tile_pixel(p0, j);
    if (p < hw) dst[p] = v[j];
  }
}

__device__ inline bool pixel_active(bool checkerboard, int64_t p, int width, int64_t parity) {
  const int q = static_cast<int>(p);  // a plane has fewer than 2^31 pixels (checked at launch)
  return !checkerboard || checkerboard_active(q / width, q % width, parity);
}

template <Scale S, bool Inverse, typename scalar_t, typename h_t, typename acc_t>
__global__ void coupling_kernel(const scalar_t* __restrict__ x, const h_t* __restrict__ h,
                                scalar_t* __restrict__ out, acc_t* __restrict__ partial, int64_t channels, int64_t hw,
                                int width, int64_t tiles, int64_t xsn, int64_t xsc, int64_t hsn, int64_t hsc,
                                CouplingChannels ch, bool checkerboard, int64_t parity, acc_t bound) {
  const CouplingBlock b = coupling_block(channels, tiles, ch);
  const scalar_t* x_plane = x + b.n * xsn + b.c * xsc;
  scalar_t* out_plane = out + (b.n * channels + b.c) * hw;
  if (!b.transformed) {
    copy_tile(x_plane, out_plane, b.p0, hw);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc_t(0);
    return;  // the whole block takes this branch: no block_sum below is left waiting
  }
  const h_t* shift_plane = h + b.n * hsn + ch.shift_plane(b.k) * hsc;
  const h_t* raw_plane = h + b.n * hsn + ch.raw_plane(b.k) * hsc;
  acc_t v[kPerThread], raw[kPerThread], shift[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t p = tile_pixel(b.p0, j);
    const bool in = p < hw;
    v[j] = in ? static_cast<acc_t>(x_plane[p]) : acc_t(0);
    shift[j] = in ? static_cast<acc_t>(shift_plane[p]) : acc_t(0);
    raw[j] = (S != Scale::Additive && in) ? static_cast<acc_t>(raw_plane[p]) : acc_t(0);
  }
  acc_t sum = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t p = tile_pixel(b.p0, j);
    const bool on = p < hw && pixel_active(checkerboard, p, width, parity);
    acc_t y;
    if constexpr (S == Scale::Additive) {
      y = Inverse ? v[j] - shift[j] : v[j] + shift[j];
    } else {
      acc_t s, logs;
      scale_and_log<S, ScalarMath>(raw[j], bound, s, logs);
      y = couple<Inverse>(v[j], s, shift[j]);
      sum += on ? logs : acc_t(0);
    }
    if (p < hw) out_plane[p] = static_cast<scalar_t>(on ? y : v[j]);
  }
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

template <Scale S, bool Inverse, typename scalar_t, typename h_t, typename acc_t>
__global__ void coupling_backward_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ gld,
                                         const scalar_t* __restrict__ v, const h_t* __restrict__ h,
                                         scalar_t* __restrict__ grad_in, h_t* __restrict__ grad_h,
                                         int64_t channels, int64_t h_channels, int64_t hw, int width, int64_t tiles,
                                         CouplingChannels ch, bool checkerboard, int64_t parity, acc_t bound) {
  const CouplingBlock b = coupling_block(channels, tiles, ch);
  const int64_t plane = (b.n * channels + b.c) * hw;
  const scalar_t* g_plane = g + plane;
  scalar_t* grad_in_plane = grad_in + plane;
  if (!b.transformed) {
    copy_tile(g_plane, grad_in_plane, b.p0, hw);
    return;
  }
  const int64_t raw_plane = (b.n * h_channels + ch.raw_plane(b.k)) * hw;
  const int64_t shift_plane = (b.n * h_channels + ch.shift_plane(b.k)) * hw;
  const scalar_t* v_plane = v + plane;
  const acc_t gl = gld[b.n];
  acc_t gv[kPerThread], vv[kPerThread], raw[kPerThread], shift[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t p = tile_pixel(b.p0, j);
    const bool in = p < hw;
    gv[j] = in ? static_cast<acc_t>(g_plane[p]) : acc_t(0);
    vv[j] = (S != Scale::Additive && in) ? static_cast<acc_t>(v_plane[p]) : acc_t(0);
    raw[j] = (S != Scale::Additive && in) ? static_cast<acc_t>(h[raw_plane + p]) : acc_t(0);
    shift[j] = (S != Scale::Additive && in) ? static_cast<acc_t>(h[shift_plane + p]) : acc_t(0);
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t p = tile_pixel(b.p0, j);
    if (p >= hw) continue;
    const bool on = pixel_active(checkerboard, p, width, parity);
    acc_t gin, graw, gshift;
    couple_backward<S, Inverse, ScalarMath>(gv[j], gl, vv[j], raw[j], shift[j], bound, gin, graw, gshift);
    grad_in_plane[p] = static_cast<scalar_t>(on ? gin : gv[j]);
    grad_h[shift_plane + p] = static_cast<h_t>(on ? gshift : acc_t(0));
    if constexpr (S != Scale::Additive) grad_h[raw_plane + p] = static_cast<h_t>(on ? graw : acc_t(0));
  }
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> coupling_cuda(const at::Tensor& x_in, const at::Tensor& h_in,
                                                 c10::string_view mask, int64_t parity, c10::string_view scale,
                                                 double bound, c10::string_view layout) {
  const char* op = Inverse ? "flowkern::coupling_inverse" : "flowkern::coupling_forward";
  const CouplingOptions o = coupling_options(x_in, h_in, mask, parity, scale, bound, layout, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = inner_dense(x_in), h = inner_dense(h_in);
  const int64_t n = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3), hw = height * width;
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor out = at::empty({n, c, height, width}, x.options());
  at::Tensor logdet = at::empty({n}, x.options().dtype(acc_dtype));
  if (n == 0) return {out, logdet};
  if (c == 0 || hw == 0) return {out, logdet.zero_()};
  check_plane(hw, op);
  const launch::Launch shape = launch::coupling(n, c, hw);
  const dim3 blocks = checked_grid(shape, op);
  at::Tensor partial = at::empty({shape.grid_x}, logdet.options());
  dispatch_coupling(x.scalar_type(), h.scalar_type(), o.scale, Inverse,
                    [&]<Scale S, bool Inv, typename scalar_t, typename h_t>() {
    using acc_t = at::opmath_type<scalar_t>;
    coupling_kernel<S, Inv, scalar_t, h_t, acc_t><<<blocks, kThreads, 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), h.const_data_ptr<h_t>(), out.mutable_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<acc_t>(), c, hw, static_cast<int>(width), tiles_per_plane(hw), x.stride(0),
        x.stride(1), h.stride(0), h.stride(1), o.channels, o.checkerboard, parity, static_cast<acc_t>(bound));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials(Partials<acc_t>{partial.const_data_ptr<acc_t>(), logdet.mutable_data_ptr<acc_t>(), n, 1,
                                 c * tiles_per_plane(hw)});
  });
  return {out, logdet};
}

std::tuple<at::Tensor, at::Tensor> coupling_backward_cuda(const at::Tensor& grad_out, const at::Tensor& grad_logdet,
                                                          const at::Tensor& input, const at::Tensor& h_in,
                                                          c10::string_view mask, int64_t parity,
                                                          c10::string_view scale, double bound,
                                                          c10::string_view layout, bool inverse) {
  const char* op = "flowkern::coupling_backward";
  const CouplingOptions o = coupling_options(input, h_in, mask, parity, scale, bound, layout, op);
  check_grad_out(grad_out, input, op);
  check_vector(grad_logdet, input.size(0), input, "grad_logdet", op);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor g = grad_out.contiguous(), v = input.contiguous(), h = h_in.contiguous();
  const int64_t n = v.size(0), c = v.size(1), width = v.size(3), hw = v.size(2) * width;
  at::Tensor grad_in = at::empty_like(v), grad_h = at::empty_like(h);
  if (v.numel() == 0) return {grad_in, grad_h};
  check_plane(hw, op);
  const dim3 blocks = checked_grid(launch::coupling(n, c, hw), op);
  const at::Tensor gld = grad_logdet.to(at::toOpMathType(v.scalar_type())).contiguous();
  dispatch_coupling(v.scalar_type(), h.scalar_type(), o.scale, inverse,
                    [&]<Scale S, bool Inverse, typename scalar_t, typename h_t>() {
    using acc_t = at::opmath_type<scalar_t>;
    coupling_backward_kernel<S, Inverse, scalar_t, h_t, acc_t><<<blocks, kThreads, 0, stream()>>>(
        g.const_data_ptr<scalar_t>(), gld.const_data_ptr<acc_t>(), v.const_data_ptr<scalar_t>(),
        h.const_data_ptr<h_t>(), grad_in.mutable_data_ptr<scalar_t>(), grad_h.mutable_data_ptr<h_t>(), c, h.size(1),
        hw, static_cast<int>(width), tiles_per_plane(hw), o.channels, o.checkerboard, parity,
        static_cast<acc_t>(bound));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
