// The 1×1 convolution on CUDA: one thread per pixel, W in shared memory, output channels accumulated
// 16 at a time in registers. The weight gradient stages tiles of ∂y and x in shared memory; each thread
// owns one weight entry and sums over a fixed set of pixel tiles, and the partials are added in a fixed
// order: deterministic.
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

constexpr int kOutChunk = 16;  // output channels accumulated per pass over a pixel's inputs
constexpr int kTile = 32;      // pixels per shared-memory tile in the weight gradient

template <typename scalar_t, typename acc_t>
__global__ void conv1x1_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ weight,
                               const acc_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t c_in,
                               int64_t c_out, int64_t hw, int64_t xsn, int64_t xsc, bool weight_in_shared) {
  extern __shared__ unsigned char shared_bytes[];
  const acc_t* w = weight;
  if (weight_in_shared) {
    acc_t* ws = reinterpret_cast<acc_t*>(shared_bytes);
    for (int64_t i = threadIdx.x; i < c_in * c_out; i += blockDim.x) ws[i] = weight[i];
    __syncthreads();
    w = ws;
  }
  const int64_t n = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= hw) return;
  const scalar_t* x_pix = x + n * xsn + p;
  scalar_t* out_pix = out + n * c_out * hw + p;
  for (int64_t o0 = 0; o0 < c_out; o0 += kOutChunk) {
    acc_t acc[kOutChunk];
#pragma unroll
    for (int j = 0; j < kOutChunk; ++j) acc[j] = (o0 + j < c_out && bias != nullptr) ? bias[o0 + j] : acc_t(0);
    for (int64_t k = 0; k < c_in; ++k) {
      const acc_t v = x_pix[k * xsc];
#pragma unroll
      for (int j = 0; j < kOutChunk; ++j) {
        if (o0 + j < c_out) acc[j] += w[(o0 + j) * c_in + k] * v;
      }
    }
#pragma unroll
    for (int j = 0; j < kOutChunk; ++j) {
      if (o0 + j < c_out) out_pix[(o0 + j) * hw] = static_cast<scalar_t>(acc[j]);
    }
  }
}

// Block (entry chunk e, part q): entries e·kThreads + threadIdx.x of ∂W, summed over the pixel tiles
// q, q + Q, q + 2Q, … of the whole batch.
template <typename scalar_t, typename acc_t>
__global__ void conv1x1_weight_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                           acc_t* __restrict__ partial, int64_t c_in, int64_t c_out, int64_t hw,
                                           int64_t tiles_per_sample, int64_t tiles) {
  extern __shared__ unsigned char shared_bytes[];
  acc_t* g_tile = reinterpret_cast<acc_t*>(shared_bytes);  // (c_out, kTile)
  acc_t* x_tile = g_tile + c_out * kTile;                     // (c_in, kTile)
  const int64_t entry = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool owns = entry < c_out * c_in;
  const int64_t o = owns ? entry / c_in : 0, k = owns ? entry % c_in : 0;
  acc_t sum = 0;
  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const int64_t n = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kTile;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < (c_out + c_in) * kTile; i += blockDim.x) {
      const int64_t row = i / kTile, p = p0 + i % kTile;
      acc_t value = 0;
      if (p < hw) value = row < c_out ? static_cast<acc_t>(g[(n * c_out + row) * hw + p])
                                      : static_cast<acc_t>(x[(n * c_in + row - c_out) * hw + p]);
      g_tile[i] = value;  // g_tile and x_tile are contiguous: row ≥ c_out lands in x_tile
    }
    __syncthreads();
    if (owns) {
#pragma unroll 8
      for (int j = 0; j < kTile; ++j) sum += g_tile[o * kTile + j] * x_tile[k * kTile + j];
    }
  }
  if (owns) partial[blockIdx.y * c_out * c_in + entry] = sum;
}

at::Tensor conv1x1_cuda(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "flowkern::conv1x1";
  check_conv1x1(x_in, weight, bias, op);
  const int64_t c_out = weight.size(0);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = inner_dense(x_in);
  const int64_t n = x.size(0), c_in = x.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(n <= 65535, op, ": at most 65535 samples per call, got ", n);
  at::Tensor out = at::empty({n, c_out, x.size(2), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor w = weight.to(acc_dtype).contiguous();
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->to(acc_dtype).contiguous()) : std::nullopt;
  const dim3 grid(blocks_for(hw), static_cast<unsigned>(n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1x1_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t weight_bytes = sizeof(acc_t) * c_in * c_out;
    const bool in_shared = weight_bytes <= 48 * 1024;
    conv1x1_kernel<scalar_t, acc_t><<<grid, kThreads, in_shared ? weight_bytes : 0, stream()>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), b ? b->const_data_ptr<acc_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), c_in, c_out, hw, x.stride(0), x.stride(1), in_shared);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int64_t tiles_per_sample = (hw + kTile - 1) / kTile, tiles = n * tiles_per_sample;
  const size_t shared = sizeof(double) * (c_in + c_out) * kTile;
  TORCH_CHECK(shared <= 48 * 1024, op, ": at most ", 48 * 1024 / (sizeof(double) * kTile),
              " input plus output channels, got ", c_in + c_out);
  const unsigned entry_blocks = blocks_for(c_out * c_in);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(tiles, 2 * sms / std::max<int64_t>(entry_blocks, 1) + 1));
  at::Tensor partial = at::zeros({parts, c_out, c_in}, x.options().dtype(acc_dtype));
  if (tiles > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1x1_weight_grad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const dim3 grid(entry_blocks, static_cast<unsigned>(parts));
      conv1x1_weight_grad_kernel<scalar_t, acc_t><<<grid, kThreads, sizeof(acc_t) * (c_in + c_out) * kTile, stream()>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), c_in, c_out,
          hw, tiles_per_sample, tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {partial.sum(0), g.to(acc_dtype).sum({0, 2, 3})};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("conv1x1", &cuda::conv1x1_cuda);
  m.impl("conv1x1_weight_grad", &cuda::conv1x1_weight_grad_cuda);
}

}  // namespace flowkern
