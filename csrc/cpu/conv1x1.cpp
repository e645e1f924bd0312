// The 1×1 convolution on the CPU: blocks of pixels in parallel, each output channel accumulated over the
// input channels with vector multiply-adds while the block's inputs stay in cache. The weight gradient
// gives each output channel to one task, which sums over the batch and pixels in a fixed order.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "vec_math.h"

namespace flowkern {
namespace {

using at::vec::Vectorized;
constexpr int64_t kPixelBlock = 256;
constexpr int64_t kOutBlock = 4;

// out[j, p] = bias[j] + Σ_k w[j, k] · in[k, p] for Outs output channels j (rows of w are ci apart) and the
// len pixels of a block; rows of in are in_stride apart, rows of out out_stride. Each input vector is
// loaded once for all Outs outputs.
template <int64_t Outs, typename acc_t>
void mix_outputs(const acc_t* w, const acc_t* bias, const acc_t* in, int64_t in_stride, int64_t ci, int64_t len,
                 acc_t* out, int64_t out_stride) {
  using Vec = Vectorized<acc_t>;
  int64_t p = 0;
  for (; p + Vec::size() <= len; p += Vec::size()) {
    Vec sum[Outs];
    for (int64_t j = 0; j < Outs; ++j) sum[j] = Vec(bias[j]);
    for (int64_t k = 0; k < ci; ++k) {
      const Vec x = Vec::loadu(in + k * in_stride + p);
      for (int64_t j = 0; j < Outs; ++j) sum[j] = at::vec::fmadd(Vec(w[j * ci + k]), x, sum[j]);
    }
    for (int64_t j = 0; j < Outs; ++j) sum[j].store(out + j * out_stride + p);
  }
  for (; p < len; ++p) {
    for (int64_t j = 0; j < Outs; ++j) {
      acc_t sum = bias[j];
      for (int64_t k = 0; k < ci; ++k) sum += w[j * ci + k] * in[k * in_stride + p];
      out[j * out_stride + p] = sum;
    }
  }
}

// The whole convolution: blocks of kPixelBlock pixels of one sample in parallel. float and double read
// x and write out in place; reduced types go through float blocks.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void conv1x1_blocks(const scalar_t* xp, int64_t xsn, int64_t xsc, const acc_t* wp, const acc_t* bp, scalar_t* outp,
                    int64_t n, int64_t ci, int64_t co, int64_t hw) {
  const int64_t blocks = (hw + kPixelBlock - 1) / kPixelBlock;
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> block_in(direct ? 0 : ci * kPixelBlock), block_out(direct ? 0 : co * kPixelBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / blocks, p0 = (task % blocks) * kPixelBlock;
      const int64_t len = std::min(kPixelBlock, hw - p0);
      const acc_t* in;
      int64_t in_stride, out_stride;
      acc_t* out_block;
      if constexpr (direct) {
        in = xp + s * xsn + p0;
        in_stride = xsc;
        out_block = outp + s * co * hw + p0;
        out_stride = hw;
      } else {
        for (int64_t k = 0; k < ci; ++k) {
          const scalar_t* row = xp + s * xsn + k * xsc + p0;
          std::copy(row, row + len, block_in.data() + k * kPixelBlock);
        }
        in = block_in.data();
        in_stride = out_stride = kPixelBlock;
        out_block = block_out.data();
      }
      int64_t o = 0;
      for (; o + kOutBlock <= co; o += kOutBlock)
        mix_outputs<kOutBlock>(wp + o * ci, bp + o, in, in_stride, ci, len, out_block + o * out_stride, out_stride);
      for (; o < co; ++o)
        mix_outputs<1>(wp + o * ci, bp + o, in, in_stride, ci, len, out_block + o * out_stride, out_stride);
      if constexpr (!direct) {
        for (int64_t j = 0; j < co; ++j)
          std::copy(block_out.data() + j * kPixelBlock, block_out.data() + j * kPixelBlock + len,
                    outp + (s * co + j) * hw + p0);
      }
    }
  });
}

at::Tensor conv1x1_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "flowkern::conv1x1";
  check_conv1x1(x_in, weight, bias, op);
  const int64_t co = weight.size(0);
  const at::Tensor x = inner_dense(x_in);
  const int64_t n = x.size(0), ci = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = at::empty({n, co, x.size(2), x.size(3)}, x.options());
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor w = weight.to(acc_dtype).contiguous();
  const at::Tensor b = bias ? bias->to(acc_dtype).contiguous() : at::zeros({co}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1x1_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    conv1x1_blocks<scalar_t>(x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), w.const_data_ptr<acc_t>(),
                             b.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n, ci, co, hw);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv1x1_weight_grad_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in) {
  const char* op = "flowkern::conv1x1_weight_grad";
  check_conv1x1_weight_grad(grad_out_in, x_in, op);
  const at::Tensor g = grad_out_in.contiguous(), x = x_in.contiguous();
  const int64_t n = x.size(0), ci = x.size(1), co = g.size(1), hw = x.size(2) * x.size(3);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor grad_w = at::empty({co, ci}, x.options().dtype(acc_dtype));
  at::Tensor grad_b = at::empty({co}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1x1_weight_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    acc_t *gw = grad_w.mutable_data_ptr<acc_t>(), *gb = grad_b.mutable_data_ptr<acc_t>();
    at::parallel_for(0, co, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        for (int64_t k = -1; k < ci; ++k) {  // k = −1: the bias gradient, Σ g
          acc_t total = 0;
          for (int64_t s = 0; s < n; ++s) {
            const scalar_t* grow = gp + (s * co + o) * hw;
            const scalar_t* xrow = k < 0 ? grow : xp + (s * ci + k) * hw;
            using Vec = Vectorized<acc_t>;
            Vec sum(acc_t(0));
            int64_t p = 0;
            for (; p + Vec::size() <= hw; p += Vec::size()) {
              const Vec gv = load_as<acc_t>(grow + p);
              sum = k < 0 ? sum + gv : at::vec::fmadd(gv, load_as<acc_t>(xrow + p), sum);
            }
            total += lane_sum(sum);
            for (; p < hw; ++p) total += k < 0 ? acc_t(grow[p]) : acc_t(grow[p]) * acc_t(xrow[p]);
          }
          (k < 0 ? gb[o] : gw[o * ci + k]) = total;
        }
      }
    });
  });
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("conv1x1", &conv1x1_cpu);
  m.impl("conv1x1_weight_grad", &conv1x1_weight_grad_cpu);
}

}  // namespace flowkern
