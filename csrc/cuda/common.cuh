// What the CUDA kernels share: launch shape, the current stream, and a deterministic block reduction.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace flowkern {
namespace cuda {

constexpr int kThreads = 256;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline unsigned blocks_for(int64_t items) { return static_cast<unsigned>((items + kThreads - 1) / kThreads); }

// Σ v over the block in a fixed order (shuffles within each warp, then the warps' sums in warp order),
// so the result is bitwise the same on every run. Valid in thread 0; every thread must call it.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return total;
}

}  // namespace cuda
}  // namespace flowkern
