// The 1×1 convolution on CUDA.
//
// Forward: one thread per pixel, Wᵀ in shared memory (a row of it, the weights of one input channel, is
// read by the whole warp at once: a broadcast), output channels accumulated kOutChunk at a time in
// registers, and the pixel's inputs loaded a chunk of channels at a time before their multiply-adds. One
// pixel a thread, not several: a deep Glow level (64 samples of 32² pixels) gives only 256 blocks of 256
// pixels, about two per SM, and fewer, larger blocks would leave SMs idle.
//
// Weight gradient: a block owns a kEntryTile × kEntryTile tile of ∂W and a fixed set of pixel tiles of the
// batch; each stage stages ∂y and x of 32 pixels (64 when 16-bit) in shared memory, pixel-major and padded
// (no bank conflicts on writes or reads), and each thread accumulates 2 × 2 entries in registers. Blocks of the first
// column of tiles also sum ∂y for the bias gradient. A second pass adds the blocks' partials in a fixed
// order: deterministic.
#include <torch/library.h>

#include <algorithm>

#include "../flowkern/checks.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

using launch::kOutChunk;
template <typename scalar_t>
constexpr int kInChunk = launch::in_chunk(sizeof(scalar_t));

template <typename scalar_t, typename w_t, typename acc_t, bool WeightShared>
__global__ void conv1x1_kernel(const scalar_t* __restrict__ x, const w_t* __restrict__ weight,
                               const w_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t c_in,
                               int64_t c_out, int64_t hw, int64_t tiles, int64_t xsn, int64_t xsc) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* wt = reinterpret_cast<acc_t*>(shared_bytes);  // Wᵀ: (c_in, co_pad), zero past c_out
  const int64_t co_pad = (c_out + kOutChunk - 1) / kOutChunk * kOutChunk;
  if constexpr (WeightShared) {
    for (int64_t i = threadIdx.x; i < c_in * co_pad; i += blockDim.x) {
      const int64_t k = i / co_pad, o = i % co_pad;
      wt[i] = o < c_out ? static_cast<acc_t>(weight[o * c_in + k]) : acc_t(0);
    }
    __syncthreads();
  }
  const int64_t n = blockIdx.x / tiles, p = (blockIdx.x % tiles) * kThreads + threadIdx.x;
  if (p >= hw) return;
  const scalar_t* x_pix = x + n * xsn + p;
  scalar_t* out_pix = out + n * c_out * hw + p;
  for (int64_t o0 = 0; o0 < c_out; o0 += kOutChunk) {
    acc_t acc[kOutChunk];
#pragma unroll
    for (int j = 0; j < kOutChunk; ++j) {
      acc[j] = (bias != nullptr && o0 + j < c_out) ? static_cast<acc_t>(bias[o0 + j]) : acc_t(0);
    }
    for (int64_t k0 = 0; k0 < c_in; k0 += kInChunk<scalar_t>) {
      acc_t v[kInChunk<scalar_t>];
#pragma unroll
      for (int u = 0; u < kInChunk<scalar_t>; ++u) {
        v[u] = k0 + u < c_in ? static_cast<acc_t>(x_pix[(k0 + u) * xsc]) : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kInChunk<scalar_t>; ++u) {
        const int64_t k = k0 + u;
        if (k >= c_in) break;
#pragma unroll
        for (int j = 0; j < kOutChunk; ++j) {
          acc_t w;
          if constexpr (WeightShared) {
            w = wt[k * co_pad + o0 + j];
          } else {
            w = o0 + j < c_out ? static_cast<acc_t>(weight[(o0 + j) * c_in + k]) : acc_t(0);
          }
          acc[j] += w * v[u];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kOutChunk; ++j) {
      if (o0 + j < c_out) out_pix[(o0 + j) * hw] = static_cast<scalar_t>(acc[j]);
    }
  }
}

using launch::kEntryTile;
template <typename scalar_t>
constexpr int kPixelTile = launch::pixel_tile(sizeof(scalar_t));
constexpr int kHalfTile = kEntryTile / 2;  // a thread's entries are kHalfTile apart in each direction

// Block (entry tile e, part q): entries (o0 + ty + a·16, k0 + tx + b·16), a, b ∈ {0, 1}, of ∂W summed over the
// pixel tiles q, q + Q, q + 2Q, … of the whole batch. partial: (Q, c_out·c_in + c_out), the bias terms last.
template <typename scalar_t, typename acc_t>
__global__ void conv1x1_weight_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                           acc_t* __restrict__ partial, int64_t c_in, int64_t c_out, int64_t hw,
                                           int64_t tiles_per_sample, int64_t tiles) {
  constexpr int kPixels = kPixelTile<scalar_t>;
  __shared__ acc_t g_tile[kPixels][kEntryTile + 1];  // pixel-major; +1 staggers the banks of a column
  __shared__ acc_t x_tile[kPixels][kEntryTile + 1];
  const int64_t in_tiles = (c_in + kEntryTile - 1) / kEntryTile;
  const int64_t o0 = (blockIdx.x / in_tiles) * kEntryTile, k0 = (blockIdx.x % in_tiles) * kEntryTile;
  const bool bias_block = blockIdx.x % in_tiles == 0;
  const int tx = threadIdx.x % kHalfTile, ty = threadIdx.x / kHalfTile;
  acc_t sum[2][2] = {{0, 0}, {0, 0}}, bias_sum[2] = {0, 0};
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t n = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kPixels;
    __syncthreads();  // the previous stage's reads are done
#pragma unroll
    for (int r = 0; r < kEntryTile * kPixels / kThreads; ++r) {
      const int i = threadIdx.x + r * kThreads, row = i / kPixels, col = i % kPixels;
      const int64_t p = p0 + col, o = o0 + row, k = k0 + row;
      g_tile[col][row] = (p < hw && o < c_out) ? static_cast<acc_t>(g[(n * c_out + o) * hw + p]) : acc_t(0);
      x_tile[col][row] = (p < hw && k < c_in) ? static_cast<acc_t>(x[(n * c_in + k) * hw + p]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kPixels; ++j) {
      const acc_t g0 = g_tile[j][ty], g1 = g_tile[j][ty + kHalfTile];
      const acc_t x0 = x_tile[j][tx], x1 = x_tile[j][tx + kHalfTile];
      sum[0][0] += g0 * x0;
      sum[0][1] += g0 * x1;
      sum[1][0] += g1 * x0;
      sum[1][1] += g1 * x1;
      if (bias_block && tx == 0) {
        bias_sum[0] += g0;
        bias_sum[1] += g1;
      }
    }
  }
  acc_t* part = partial + blockIdx.y * (c_out * c_in + c_out);
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t o = o0 + ty + a * kHalfTile;
    if (o >= c_out) continue;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t k = k0 + tx + b * kHalfTile;
      if (k < c_in) part[o * c_in + k] = sum[a][b];
    }
    if (bias_block && tx == 0) part[c_out * c_in + o] = bias_sum[a];
  }
}

// ∂W[r] = Σ_q partial[q][r] for r < c_out·c_in, ∂b[r'] likewise for the c_out bias terms after them; one thread
// per entry, adding the parts in order.
template <typename acc_t>
__global__ void sum_parts_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ grad_weight,
                                 acc_t* __restrict__ grad_bias, int64_t weight_entries, int64_t entries,
                                 int64_t parts) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= entries) return;
  acc_t sum = 0;
  for (int64_t q = 0; q < parts; ++q) sum += partial[q * entries + r];
  if (r < weight_entries) {
    grad_weight[r] = sum;
  } else {
    grad_bias[r - weight_entries] = sum;
  }
}

at::Tensor conv1x1_cuda(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "flowkern::conv1x1";
  check_conv1x1(x_in, weight, bias, op);
  const int64_t c_out = weight.size(0);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = inner_dense(x_in);
  const int64_t n = x.size(0), c_in = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = at::empty({n, c_out, x.size(2), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  // a weight of x's dtype or of its math type is read as it is; any other is cast to the math type
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const bool as_is = param_read_as_is(weight.scalar_type(), x.scalar_type());
  const at::Tensor w = (as_is ? weight : weight.to(acc_dtype)).contiguous();
  const std::optional<at::Tensor> b =
      bias ? std::optional<at::Tensor>(bias->to(w.scalar_type()).contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1x1_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const launch::Launch shape = launch::conv1x1(n, c_in, c_out, hw, sizeof(scalar_t), sizeof(acc_t));
    const dim3 blocks = checked_grid(shape, op);
    const int64_t tiles = tiles_per_plane(hw, shape.tile);
    dispatch_param_type<scalar_t>(w.scalar_type(), [&](auto weight_value) {
      using w_t = decltype(weight_value);
      dispatch_bool(shape.shared_bytes > 0, [&](auto shared_constant) {
        conv1x1_kernel<scalar_t, w_t, acc_t, decltype(shared_constant)::value>
            <<<blocks, kThreads, shape.shared_bytes, stream()>>>(
                x.const_data_ptr<scalar_t>(), w.const_data_ptr<w_t>(), b ? b->const_data_ptr<w_t>() : nullptr,
                out.mutable_data_ptr<scalar_t>(), c_in, c_out, hw, tiles, x.stride(0), x.stride(1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv1x1_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& x_in) {
  const char* op = "flowkern::conv1x1_weight_grad";
  check_conv1x1_weight_grad(grad_out, x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor g = grad_out.contiguous(), x = x_in.contiguous();
  const int64_t n = x.size(0), c_in = x.size(1), c_out = g.size(1), hw = x.size(2) * x.size(3);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor grad_weight = at::empty({c_out, c_in}, x.options().dtype(acc_dtype));
  at::Tensor grad_bias = at::empty({c_out}, grad_weight.options());
  if (n * hw == 0 || c_out == 0 || c_in == 0) return {grad_weight.zero_(), grad_bias.zero_()};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t entries = c_out * c_in + c_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1x1_weight_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t tiles_per_sample = tiles_per_plane(hw, kPixelTile<scalar_t>);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, conv1x1_weight_grad_kernel<scalar_t, acc_t>, kThreads, 0));
    const launch::Launch shape =
        launch::conv1x1_weight_grad(n, c_in, c_out, hw, sizeof(scalar_t), int64_t{std::max(per_sm, 1)} * sms);
    const dim3 grid = checked_grid(shape, op);
    const int64_t parts = shape.grid_y;
    at::Tensor partial = at::empty({parts, entries}, grad_weight.options());
    conv1x1_weight_grad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream()>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), c_in, c_out,
        hw, tiles_per_sample, n * tiles_per_sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_parts_kernel<acc_t><<<blocks_for(entries), kThreads, 0, stream()>>>(
        partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(),
        c_out * c_in, entries, parts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("conv1x1", &cuda::conv1x1_cuda);
  m.impl("conv1x1_weight_grad", &cuda::conv1x1_weight_grad_cuda);
}

}  // namespace flowkern
