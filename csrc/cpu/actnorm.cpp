// ActNorm on the CPU: one pass per (sample, channel) plane, parallel over planes, vectorised along the
// plane. The backward writes each plane's sums for ∂log_scale and ∂bias, then adds them over the batch
// in sample order: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "vec_math.h"

namespace flowkern {
namespace {

using at::vec::Vectorized;

// The per-channel factor of flowkern::actnorm from log_scale: e^{log_scale}, e^{−log_scale} for the inverse.
template <bool Inverse, typename acc_t>
acc_t channel_scale(acc_t log_scale) {
  return ScalarMath::exp(Inverse ? -log_scale : log_scale);
}

at::Tensor actnorm_cpu(const at::Tensor& x_in, const at::Tensor& log_scale, const at::Tensor& bias, bool inverse) {
  check_actnorm(x_in, log_scale, bias, "flowkern::actnorm");
  const at::Tensor x = inner_dense(x_in);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = at::empty({n, c, x.size(2), x.size(3)}, x.options());
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "actnorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor ls = log_scale.to(acc_dtype).contiguous(), b = bias.to(acc_dtype).contiguous();
    const acc_t *lsp = ls.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    const int64_t xsn = x.stride(0), xsc = x.stride(1);
    dispatch_bool(inverse, [&](auto inverse_constant) {
      constexpr bool Inverse = decltype(inverse_constant)::value;
      at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t ch = row % c;
          const acc_t scale = channel_scale<Inverse>(lsp[ch]);
          const scalar_t* in = xp + (row / c) * xsn + ch * xsc;
          scalar_t* o = outp + row * hw;
          using Vec = Vectorized<acc_t>;
          const Vec s(scale), b(bp[ch]);
          int64_t p = 0;
          for (; p + Vec::size() <= hw; p += Vec::size()) {
            store_as(actnorm<Inverse>(load_as<acc_t>(in + p), s, b), o + p);
          }
          for (; p < hw; ++p) o[p] = actnorm<Inverse>(acc_t(in[p]), scale, bp[ch]);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_backward_cpu(const at::Tensor& grad_out_in,
                                                                    const at::Tensor& input_in,
                                                                    const at::Tensor& log_scale,
                                                                    const at::Tensor& bias, bool inverse) {
  const char* op = "flowkern::actnorm_backward";
  check_actnorm(input_in, log_scale, bias, op);
  check_grad_out(grad_out_in, input_in, op);
  const at::Tensor g = grad_out_in.contiguous(), v = input_in.contiguous();
  const int64_t n = v.size(0), c = v.size(1), hw = v.size(2) * v.size(3);
  at::Tensor grad_in = at::empty_like(v);
  const auto acc_dtype = at::toOpMathType(v.scalar_type());
  at::Tensor partial = at::empty({2, n, c}, v.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "actnorm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor ls = log_scale.to(acc_dtype).contiguous(), b = bias.to(acc_dtype).contiguous();
    const acc_t *lsp = ls.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
    scalar_t* gin = grad_in.mutable_data_ptr<scalar_t>();
    acc_t* part = partial.mutable_data_ptr<acc_t>();
    dispatch_bool(inverse, [&](auto inverse_constant) {
      constexpr bool Inverse = decltype(inverse_constant)::value;
      at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t ch = row % c, base = row * hw;
          const acc_t scale = channel_scale<Inverse>(lsp[ch]);
          acc_t sum_log = 0, sum_bias = 0;
          int64_t p = 0;
          using Vec = Vectorized<acc_t>;
          const Vec s(scale), b(bp[ch]);
          Vec vlog(acc_t(0)), vbias(acc_t(0));
          for (; p + Vec::size() <= hw; p += Vec::size()) {
            Vec gi, gl, gb;
            actnorm_backward<Inverse>(load_as<acc_t>(gp + base + p), load_as<acc_t>(vp + base + p), s, b, gi, gl, gb);
            store_as(gi, gin + base + p);
            vlog = vlog + gl;
            vbias = vbias + gb;
          }
          sum_log = lane_sum(vlog);
          sum_bias = lane_sum(vbias);
          for (; p < hw; ++p) {
            acc_t gi, gl, gb;
            actnorm_backward<Inverse>(acc_t(gp[base + p]), acc_t(vp[base + p]), scale, bp[ch], gi, gl, gb);
            gin[base + p] = gi;
            sum_log += gl;
            sum_bias += gb;
          }
          part[row] = sum_log;
          part[n * c + row] = sum_bias;
        }
      });
    });
  });
  // (2, N, C) → (2, C): a sum over the batch in sample order
  at::Tensor sums = at::zeros({2, c}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "actnorm_backward_sum", [&] {
    const scalar_t* part = partial.const_data_ptr<scalar_t>();
    scalar_t* out = sums.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < 2; ++k)
      for (int64_t s = 0; s < n; ++s)
        for (int64_t ch = 0; ch < c; ++ch) out[k * c + ch] += part[(k * n + s) * c + ch];
  });
  return {grad_in, sums[0].to(log_scale.scalar_type()).clone(), sums[1].to(bias.scalar_type()).clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("actnorm", &actnorm_cpu);
  m.impl("actnorm_backward", &actnorm_backward_cpu);
}

}  // namespace flowkern
