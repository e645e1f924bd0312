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

at::Tensor conv1x1_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "flowkern::conv1x1";
  check_image(x_in, "input", op);
  check_weight(weight, x_in, op);
  const int64_t co = weight.size(0);
  if (bias) check_vector(*bias, co, x_in, "bias", op);
  const at::Tensor x = inner_dense(x_in);
  const int64_t n = x.size(0), ci = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = at::empty({n, co, x.size(2), x.size(3)}, x.options());
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor w = weight.to(acc_dtype).contiguous();
  const at::Tensor b = bias ? bias->to(acc_dtype).contiguous() : at::zeros({co}, w.options());
  const int64_t blocks = (hw + kPixelBlock - 1) / kPixelBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv1x1_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    const acc_t *wp = w.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    const int64_t xsn = x.stride(0), xsc = x.stride(1);
    at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
      acc_t acc[kPixelBlock];
      std::vector<acc_t> block_in(ci * kPixelBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / blocks, p0 = (task % blocks) * kPixelBlock;
        const int64_t len = std::min(kPixelBlock, hw - p0);
        for (int64_t k = 0; k < ci; ++k) {  // the block's inputs, in the arithmetic dtype
          const scalar_t* row = xp + s * xsn + k * xsc + p0;
          std::copy(row, row + len, block_in.data() + k * kPixelBlock);
        }
        for (int64_t o = 0; o < co; ++o) {
          int64_t p = 0;
          for (; p + Vec::size() <= len; p += Vec::size()) {
            Vec sum(bp[o]);
            for (int64_t k = 0; k < ci; ++k)
              sum = at::vec::fmadd(Vec(wp[o * ci + k]), Vec::loadu(block_in.data() + k * kPixelBlock + p), sum);
            sum.store(acc + p);
          }
          for (; p < len; ++p) {
            acc_t sum = bp[o];
            for (int64_t k = 0; k < ci; ++k) sum += wp[o * ci + k] * block_in[k * kPixelBlock + p];
            acc[p] = sum;
          }
          std::copy(acc, acc + len, outp + (s * co + o) * hw + p0);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv1x1_weight_grad_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in) {
  const char* op = "flowkern::conv1x1_weight_grad";
  check_image(grad_out_in, "grad_out", op);
  check_image(x_in, "input", op);
  check_same_device_and_dtype(grad_out_in, x_in, "grad_out", op);
  TORCH_CHECK(grad_out_in.size(0) == x_in.size(0) && grad_out_in.size(2) == x_in.size(2) &&
                  grad_out_in.size(3) == x_in.size(3),
              op, ": expected grad_out of shape (", x_in.size(0), ", C_out, ", x_in.size(2), ", ", x_in.size(3),
              "), got ", grad_out_in.sizes());
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
            int64_t p = 0;
            if constexpr (std::is_same_v<scalar_t, acc_t>) {
              using Vec = Vectorized<acc_t>;
              Vec sum(acc_t(0));
              for (; p + Vec::size() <= hw; p += Vec::size())
                sum = k < 0 ? sum + Vec::loadu(grow + p) : at::vec::fmadd(Vec::loadu(grow + p), Vec::loadu(xrow + p), sum);
              total += lane_sum(sum);
            }
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
