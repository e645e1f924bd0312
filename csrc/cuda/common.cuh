// What the CUDA kernels share: launch shape, the current stream, tiles of a plane, and deterministic sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "../flowkern/launch.h"

namespace flowkern {
namespace cuda {

using launch::kPerThread;
using launch::kThreads;
using launch::kTile;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline unsigned blocks_for(int64_t items) { return static_cast<unsigned>(launch::ceil_div(items, kThreads)); }

inline int64_t tiles_per_plane(int64_t hw, int64_t tile = kTile) { return launch::ceil_div(hw, tile); }

// The grid of a launch (csrc/flowkern/launch.h), checked against CUDA's limits. Kernels over (plane, tile)
// blocks take a 1-D grid: one division per block, not per element, and no 65535 limit on the number of
// planes (samples × channels).
inline dim3 checked_grid(const launch::Launch& l, const char* op) {
  TORCH_CHECK(l.grid_x <= std::numeric_limits<int32_t>::max(), op, ": the launch needs ", l.grid_x,
              " blocks, more than 2^31 - 1");
  TORCH_CHECK(l.grid_y <= launch::kMaxGridY, op, ": the launch needs ", l.grid_y, " rows of blocks, more than ",
              launch::kMaxGridY);
  return dim3(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y));
}

// Kernels over planes index a plane's pixels with 32-bit integers.
inline void check_plane(int64_t hw, const char* op) {
  TORCH_CHECK(hw <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 pixels per plane, got ", hw);
}

// The pixel of element j of this thread in the tile starting at p0: consecutive threads take consecutive
// pixels (coalesced), and a thread's elements are kThreads apart.
__device__ inline int64_t tile_pixel(int64_t p0, int j) {
  return p0 + threadIdx.x + static_cast<int64_t>(j) * kThreads;
}

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

// Whether a parameter of dtype param_type is read by the kernels as it is beside an x of dtype x_type: it has
// x's dtype or x's math type (a float32 parameter beside a 16-bit x). Any other is cast to the math type first.
inline bool param_read_as_is(at::ScalarType param_type, at::ScalarType x_type) {
  return param_type == x_type || param_type == at::toOpMathType(x_type);
}

// Calls f with a value of the element type of a parameter read as it is: scalar_t, or its math type.
template <typename scalar_t, typename F>
void dispatch_param_type(at::ScalarType param_type, F&& f) {
  if (param_type == c10::CppTypeToScalarType<scalar_t>::value) return f(scalar_t{});
  return f(at::opmath_type<scalar_t>{});
}

// The second pass of a reduction whose blocks wrote one partial each: for r < rows,
// out[r] = Σ_{o < outer, i < inner} partial[(o·rows + r)·inner + i], summed in a fixed order by block r and
// written as out_t.
template <typename acc_t, typename out_t = acc_t>
struct Partials {
  const acc_t* partial;
  out_t* out;
  int64_t rows, outer, inner;
};

template <typename acc_t, typename out_t>
__global__ void sum_partials_kernel(Partials<acc_t, out_t> first, Partials<acc_t, out_t> second) {
  const Partials<acc_t, out_t>& s = blockIdx.y == 0 ? first : second;
  const int64_t r = blockIdx.x;
  if (r >= s.rows) return;  // the whole block returns
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < s.outer * s.inner; i += blockDim.x) {
    sum += s.partial[((i / s.inner) * s.rows + r) * s.inner + i % s.inner];
  }
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) s.out[r] = static_cast<out_t>(total);
}

// Launches sum_partials_kernel over one reduction, or two independent ones in the same launch.
template <typename acc_t, typename out_t>
void sum_partials(const Partials<acc_t, out_t>& first, const Partials<acc_t, out_t>* second = nullptr) {
  const int64_t rows = std::max(first.rows, second ? second->rows : 0);
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>(rows), second ? 2u : 1u);
  sum_partials_kernel<acc_t, out_t><<<grid, kThreads, 0, stream()>>>(first, second ? *second : first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace flowkern
