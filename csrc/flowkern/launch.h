// The launch shape of each CUDA kernel, as host arithmetic on sizes. The launchers in cuda/ take their grids
// from here, and the extension exports the same functions as flowkern::_cuda_launch, so that the static
// performance model (benchmarks/gpu_model.py) reads the grids the GPU gets instead of a copy of them.
#pragma once

#include <algorithm>
#include <cstdint>

namespace flowkern {
namespace launch {

constexpr int kThreads = 256;  // threads per block, every kernel
// Elements of a plane per thread in the couplings: each thread issues the loads of all of them before any
// arithmetic, so a block keeps kThreads·kPerThread loads of each input in flight.
constexpr int kPerThread = 4;
constexpr int64_t kTile = kThreads * kPerThread;  // elements of one (H, W) plane per coupling block

// ActNorm: elements a thread moves per plane, 16 bytes and at least 4 (each thread's loads are issued together).
constexpr int actnorm_elements(int64_t element_size) { return element_size >= 4 ? 4 : 16 / element_size; }
constexpr int64_t actnorm_tile(int64_t element_size) { return kThreads * actnorm_elements(element_size); }

// 1×1 conv: output channels accumulated per pass over a pixel's inputs, and input channels loaded together
// (32 bytes of each pixel's inputs in flight per thread, at least 8 channels).
constexpr int kOutChunk = 16;
constexpr int in_chunk(int64_t element_size) { return element_size >= 4 ? 8 : 32 / element_size; }
constexpr int64_t kSharedWeight = 48 * 1024;  // Wᵀ up to this size lives in shared memory, larger is read from L1/L2

// Weight gradient: a block's tile of ∂W is kEntryTile output × kEntryTile input channels, and it stages
// pixel_tile pixels at a time (32, or 64 for 16-bit inputs: 16 bytes of loads in flight per thread).
constexpr int kEntryTile = 32;
constexpr int pixel_tile(int64_t element_size) { return element_size >= 4 ? 32 : 64; }
constexpr int64_t kMaxGridY = 65535;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Launch {
  int64_t grid_x, grid_y;  // blocks of kThreads threads
  int64_t shared_bytes;    // dynamic shared memory per block
  int64_t tile;            // pixels per block (per stage, for the weight gradient)
  int64_t ahead;           // elements of each input a thread requests before it waits on any of them
};

// Couplings: one block per (sample, channel, tile of kTile pixels).
inline Launch coupling(int64_t n, int64_t c, int64_t hw) {
  return {n * c * ceil_div(hw, kTile), 1, 0, kTile, kPerThread};
}

// ActNorm: one block per (sample, channel, tile of actnorm_tile pixels).
inline Launch actnorm(int64_t n, int64_t c, int64_t hw, int64_t element_size) {
  return {n * c * ceil_div(hw, actnorm_tile(element_size)), 1, 0, actnorm_tile(element_size),
          actnorm_elements(element_size)};
}

// 1×1 conv: one block per (sample, tile of kThreads pixels), one pixel a thread; Wᵀ, padded to whole output
// chunks and in the math type (acc_size bytes), goes to dynamic shared memory when it fits kSharedWeight.
inline Launch conv1x1(int64_t n, int64_t c_in, int64_t c_out, int64_t hw, int64_t element_size, int64_t acc_size) {
  const int64_t weight_bytes = acc_size * c_in * ceil_div(c_out, kOutChunk) * kOutChunk;
  return {n * ceil_div(hw, kThreads), 1, weight_bytes <= kSharedWeight ? weight_bytes : 0, kThreads,
          in_chunk(element_size)};
}

// Weight gradient: (entry tile, part) blocks, the parts sized so that the grid fills one wave of `wave`
// resident blocks; each part sums whole pixel tiles of the batch.
inline Launch conv1x1_weight_grad(int64_t n, int64_t c_in, int64_t c_out, int64_t hw, int64_t element_size,
                                  int64_t wave) {
  const int64_t entry_tiles = ceil_div(c_out, kEntryTile) * ceil_div(c_in, kEntryTile);
  const int64_t pixel_tiles = n * ceil_div(hw, pixel_tile(element_size));
  const int64_t parts = std::clamp<int64_t>(ceil_div(std::max<int64_t>(wave, 1), entry_tiles), 1,
                                            std::max<int64_t>(std::min(pixel_tiles, kMaxGridY), 1));
  return {entry_tiles, parts, 0, pixel_tile(element_size), kEntryTile * pixel_tile(element_size) / kThreads};
}

}  // namespace launch
}  // namespace flowkern
