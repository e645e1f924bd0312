// ActNorm on CUDA: one block per (sample, channel, tile of pixels), so the channel's factor e^{±log_scale}
// and bias are computed once per thread, not looked up per element. Parameters of x's dtype or of its math
// type are read as they are (no cast launched). Each thread moves 16 bytes of a plane (at least 4 elements):
// one vector load or store where the planes are aligned, coalesced scalar ones otherwise. The
// backward writes one partial of ∂log_scale and ∂bias per block (deterministic block sums), and a second
// pass sums each channel's partials in a fixed order into gradients of the parameters' dtypes.
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "common.cuh"

namespace flowkern {
namespace cuda {
namespace {

template <typename T>
constexpr int kElements = launch::actnorm_elements(sizeof(T));  // elements a thread moves per plane

template <typename T>
constexpr int64_t kActnormTile = launch::actnorm_tile(sizeof(T));  // elements of one plane per block

template <typename T>
struct alignas(sizeof(T) * kElements<T>) Pack {
  T v[kElements<T>];
};

// Element j of this thread in the tile starting at p0: with Vector, a run of consecutive elements per thread
// (one vector access); otherwise elements kThreads apart. Either way a warp's accesses are coalesced.
template <bool Vector, typename T>
__device__ inline int64_t element(int64_t p0, int j) {
  return Vector ? p0 + static_cast<int64_t>(threadIdx.x) * kElements<T> + j : tile_pixel(p0, j);
}

// Loads this thread's elements of a plane (zeros past hw). With Vector, hw is a multiple of kElements, so a
// pack lies wholly inside or wholly outside the plane.
template <bool Vector, typename scalar_t, typename acc_t>
__device__ inline void load(const scalar_t* plane, int64_t p0, int64_t hw, acc_t (&out)[kElements<scalar_t>]) {
  if constexpr (Vector) {
    const int64_t p = element<true, scalar_t>(p0, 0);
    Pack<scalar_t> pack;
    if (p < hw) pack = *reinterpret_cast<const Pack<scalar_t>*>(plane + p);
#pragma unroll
    for (int j = 0; j < kElements<scalar_t>; ++j) out[j] = p < hw ? static_cast<acc_t>(pack.v[j]) : acc_t(0);
  } else {
#pragma unroll
    for (int j = 0; j < kElements<scalar_t>; ++j) {
      const int64_t p = element<false, scalar_t>(p0, j);
      out[j] = p < hw ? static_cast<acc_t>(plane[p]) : acc_t(0);
    }
  }
}

template <bool Vector, typename scalar_t, typename acc_t>
__device__ inline void store(scalar_t* plane, int64_t p0, int64_t hw, const acc_t (&values)[kElements<scalar_t>]) {
  if constexpr (Vector) {
    const int64_t p = element<true, scalar_t>(p0, 0);
    if (p >= hw) return;
    Pack<scalar_t> pack;
#pragma unroll
    for (int j = 0; j < kElements<scalar_t>; ++j) pack.v[j] = static_cast<scalar_t>(values[j]);
    *reinterpret_cast<Pack<scalar_t>*>(plane + p) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < kElements<scalar_t>; ++j) {
      const int64_t p = element<false, scalar_t>(p0, j);
      if (p < hw) plane[p] = static_cast<scalar_t>(values[j]);
    }
  }
}

// The channel's factor e^{±log_scale} and bias, in the math type.
template <bool Inverse, typename param_t, typename acc_t>
__device__ inline void channel_affine(const param_t* log_scale, const param_t* bias, int64_t c, acc_t& scale,
                                      acc_t& b) {
  const acc_t ls = static_cast<acc_t>(log_scale[c]);
  scale = ::exp(Inverse ? -ls : ls);
  b = static_cast<acc_t>(bias[c]);
}

template <bool Inverse, bool Vector, typename scalar_t, typename param_t, typename acc_t>
__global__ void actnorm_kernel(const scalar_t* __restrict__ x, const param_t* __restrict__ log_scale,
                               const param_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t channels,
                               int64_t hw, int64_t tiles, int64_t xsn, int64_t xsc) {
  const int64_t plane = blockIdx.x / tiles, n = plane / channels, c = plane % channels;
  const int64_t p0 = (blockIdx.x % tiles) * kActnormTile<scalar_t>;
  acc_t scale, b;
  channel_affine<Inverse>(log_scale, bias, c, scale, b);
  acc_t v[kElements<scalar_t>];
  load<Vector>(x + n * xsn + c * xsc, p0, hw, v);
#pragma unroll
  for (int j = 0; j < kElements<scalar_t>; ++j) v[j] = actnorm<Inverse>(v[j], scale, b);
  store<Vector>(out + plane * hw, p0, hw, v);
}

template <bool Inverse, bool Vector, typename scalar_t, typename param_t, typename acc_t>
__global__ void actnorm_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ v,
                                        const param_t* __restrict__ log_scale, const param_t* __restrict__ bias,
                                        scalar_t* __restrict__ grad_in, acc_t* __restrict__ partial_log,
                                        acc_t* __restrict__ partial_bias, int64_t channels, int64_t hw,
                                        int64_t tiles) {
  const int64_t plane = blockIdx.x / tiles, c = plane % channels;
  const int64_t p0 = (blockIdx.x % tiles) * kActnormTile<scalar_t>;
  acc_t scale, b;
  channel_affine<Inverse>(log_scale, bias, c, scale, b);
  acc_t gv[kElements<scalar_t>], vv[kElements<scalar_t>], gin[kElements<scalar_t>];
  load<Vector>(g + plane * hw, p0, hw, gv);
  load<Vector>(v + plane * hw, p0, hw, vv);
  acc_t sum_log = 0, sum_bias = 0;
#pragma unroll
  for (int j = 0; j < kElements<scalar_t>; ++j) {
    acc_t gl, gb;  // past hw g is zero, and so are both terms
    actnorm_backward<Inverse>(gv[j], vv[j], scale, b, gin[j], gl, gb);
    sum_log += gl;
    sum_bias += gb;
  }
  store<Vector>(grad_in + plane * hw, p0, hw, gin);
  const acc_t total_log = block_sum(sum_log), total_bias = block_sum(sum_bias);
  if (threadIdx.x == 0) {
    partial_log[blockIdx.x] = total_log;
    partial_bias[blockIdx.x] = total_bias;
  }
}

// Whether every plane of t (inner-dense) starts on a pack boundary and has a whole number of packs, so that
// the vector kernels may run.
bool vector_aligned(const at::Tensor& t, int64_t hw, int64_t elements) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (t.element_size() * elements) == 0 &&
         hw % elements == 0 && t.stride(0) % elements == 0 && t.stride(1) % elements == 0;
}

// The parameters as the kernels read them: as they are when both have x's dtype or its math type, else both
// cast to the math type.
// Returns whether they were cast.
bool kernel_params(const at::Tensor& log_scale, const at::Tensor& bias, const at::Tensor& x, at::Tensor& ls,
                   at::Tensor& b) {
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const auto type = log_scale.scalar_type();
  const bool cast = type != bias.scalar_type() || !param_read_as_is(type, x.scalar_type());
  ls = (cast ? log_scale.to(acc_dtype) : log_scale).contiguous();
  b = (cast ? bias.to(acc_dtype) : bias).contiguous();
  return cast;
}

at::Tensor actnorm_cuda(const at::Tensor& x_in, const at::Tensor& log_scale, const at::Tensor& bias, bool inverse) {
  const char* op = "flowkern::actnorm";
  check_actnorm(x_in, log_scale, bias, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = inner_dense(x_in);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t c = x.size(1), hw = x.size(2) * x.size(3);
  if (x.numel() == 0) return out;
  at::Tensor ls, b;
  kernel_params(log_scale, bias, x, ls, b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "actnorm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    check_plane(hw, op);
    const launch::Launch shape = launch::actnorm(x.size(0), c, hw, sizeof(scalar_t));
    const dim3 blocks = checked_grid(shape, op);
    const int64_t tiles = tiles_per_plane(hw, shape.tile);
    const bool vector = vector_aligned(x, hw, kElements<scalar_t>) && vector_aligned(out, hw, kElements<scalar_t>);
    dispatch_param_type<scalar_t>(ls.scalar_type(), [&](auto param_value) {
      using param_t = decltype(param_value);
      dispatch_bool(inverse, [&](auto inverse_constant) {
        dispatch_bool(vector, [&](auto vector_constant) {
          actnorm_kernel<decltype(inverse_constant)::value, decltype(vector_constant)::value, scalar_t, param_t, acc_t>
              <<<blocks, kThreads, 0, stream()>>>(x.const_data_ptr<scalar_t>(), ls.const_data_ptr<param_t>(),
                                                  b.const_data_ptr<param_t>(), out.mutable_data_ptr<scalar_t>(), c,
                                                  hw, tiles, x.stride(0), x.stride(1));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
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
  at::Tensor grad_in = at::empty_like(v);
  if (v.numel() == 0) {
    return {grad_in, at::zeros_like(log_scale, at::MemoryFormat::Contiguous),
            at::zeros_like(bias, at::MemoryFormat::Contiguous)};
  }
  at::Tensor ls, b;
  const bool cast_to_math = kernel_params(log_scale, bias, v, ls, b);
  // the second pass writes the gradients in the type the kernels read the parameters in
  at::Tensor grad_log = at::empty({c}, ls.options()), grad_bias = at::empty({c}, b.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "actnorm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    check_plane(hw, op);
    const launch::Launch shape = launch::actnorm(n, c, hw, sizeof(scalar_t));
    const dim3 blocks = checked_grid(shape, op);
    const int64_t tiles = tiles_per_plane(hw, shape.tile);
    const bool vector = vector_aligned(g, hw, kElements<scalar_t>) && vector_aligned(v, hw, kElements<scalar_t>) &&
                        vector_aligned(grad_in, hw, kElements<scalar_t>);
    const auto acc_dtype = at::toOpMathType(v.scalar_type());
    at::Tensor partial = at::empty({2, shape.grid_x}, v.options().dtype(acc_dtype));
    dispatch_param_type<scalar_t>(ls.scalar_type(), [&](auto param_value) {
      using param_t = decltype(param_value);
      dispatch_bool(inverse, [&](auto inverse_constant) {
        dispatch_bool(vector, [&](auto vector_constant) {
          actnorm_backward_kernel<decltype(inverse_constant)::value, decltype(vector_constant)::value, scalar_t,
                                  param_t, acc_t><<<blocks, kThreads, 0, stream()>>>(
              g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), ls.const_data_ptr<param_t>(),
              b.const_data_ptr<param_t>(), grad_in.mutable_data_ptr<scalar_t>(), partial[0].mutable_data_ptr<acc_t>(),
              partial[1].mutable_data_ptr<acc_t>(), c, hw, tiles);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
      const Partials<acc_t, param_t> bias_sums{partial[1].const_data_ptr<acc_t>(),
                                               grad_bias.mutable_data_ptr<param_t>(), c, n, tiles};
      sum_partials(Partials<acc_t, param_t>{partial[0].const_data_ptr<acc_t>(), grad_log.mutable_data_ptr<param_t>(),
                                            c, n, tiles},
                   &bias_sums);
    });
  });
  if (!cast_to_math) return {grad_in, grad_log, grad_bias};
  return {grad_in, grad_log.to(log_scale.scalar_type()), grad_bias.to(bias.scalar_type())};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("actnorm", &cuda::actnorm_cuda);
  m.impl("actnorm_backward", &cuda::actnorm_backward_cuda);
}

}  // namespace flowkern
