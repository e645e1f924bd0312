// The folded LU weight of a 1×1 conv on the CPU: every output entry from the shared per-entry math
// (flowkern/lu_weight.h), entries in parallel once the (C, C) problem is large enough to pay for threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "../flowkern/lu_weight.h"

namespace flowkern {
namespace {

// An entry costs O(C) multiply-adds: tasks of about 16K of them.
int64_t grain(int64_t c) { return std::max<int64_t>(1, 16384 / c); }

template <typename T>
lu::Factors<T> factors(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper, const at::Tensor& sign,
                       const at::Tensor& log_s) {
  return {perm.const_data_ptr<T>(), lower.const_data_ptr<T>(), upper.const_data_ptr<T>(), sign.const_data_ptr<T>(),
          log_s.const_data_ptr<T>(), perm.size(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> folded_lu_weight_cpu(
    const at::Tensor& perm_in, const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& sign_in,
    const at::Tensor& log_s_in, const at::Tensor& log_scale_in, const at::Tensor& bias_in) {
  const char* op = "flowkern::folded_lu_weight";
  check_folded_lu_weight(perm_in, lower_in, upper_in, sign_in, log_s_in, log_scale_in, bias_in, op);
  const at::Tensor perm = perm_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous(),
                   sign = sign_in.contiguous(), log_s = log_s_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   bias = bias_in.contiguous();
  const int64_t c = perm.size(0);
  at::Tensor folded = at::empty({c, c}, perm.options()), bias_out = at::empty({c}, perm.options()),
             per_pixel = at::empty({}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "folded_lu_weight_cpu", [&] {
    const lu::Factors<scalar_t> f = factors<scalar_t>(perm, lower, upper, sign, log_s);
    const scalar_t *ls = log_scale.const_data_ptr<scalar_t>(), *b = bias.const_data_ptr<scalar_t>();
    scalar_t *w = folded.mutable_data_ptr<scalar_t>(), *bo = bias_out.mutable_data_ptr<scalar_t>(),
             *pp = per_pixel.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, c * c + c + 1, grain(c), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) lu::forward_entry(f, ls, b, t, w, bo, pp);
    });
  });
  return {folded, bias_out, per_pixel};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> folded_lu_weight_backward_cpu(
    const at::Tensor& grad_weight_in, const at::Tensor& grad_bias_in, const at::Tensor& grad_per_pixel_in,
    const at::Tensor& perm_in, const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& sign_in,
    const at::Tensor& log_s_in, const at::Tensor& log_scale_in, const at::Tensor& bias_in, const at::Tensor& folded_in) {
  const char* op = "flowkern::folded_lu_weight_backward";
  check_folded_lu_weight(perm_in, lower_in, upper_in, sign_in, log_s_in, log_scale_in, bias_in, op);
  check_folded_lu_weight_grads(perm_in, grad_weight_in, grad_bias_in, grad_per_pixel_in, folded_in, op);
  const at::Tensor perm = perm_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous(),
                   sign = sign_in.contiguous(), log_s = log_s_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   bias = bias_in.contiguous(), folded = folded_in.contiguous(), gw = grad_weight_in.contiguous(),
                   gb = grad_bias_in.contiguous(), gpp = grad_per_pixel_in.contiguous();
  const int64_t c = perm.size(0);
  at::Tensor grad_product = at::empty({c, c}, perm.options()), grad_lower = at::empty({c, c}, perm.options()),
             grad_upper = at::empty({c, c}, perm.options()), grad_log_s = at::empty({c}, perm.options()),
             grad_log_scale = at::empty({c}, perm.options()), grad_bias = at::empty({c}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "folded_lu_weight_backward_cpu", [&] {
    const lu::Factors<scalar_t> f = factors<scalar_t>(perm, lower, upper, sign, log_s);
    const lu::Gradients<scalar_t> g{gw.const_data_ptr<scalar_t>(),        gb.const_data_ptr<scalar_t>(),
                                    gpp.const_data_ptr<scalar_t>(),       log_scale.const_data_ptr<scalar_t>(),
                                    bias.const_data_ptr<scalar_t>(),      folded.const_data_ptr<scalar_t>()};
    scalar_t* gm = grad_product.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, c * c + c, grain(c), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        lu::backward_product_entry(f, g, t, gm, grad_log_scale.mutable_data_ptr<scalar_t>(),
                                   grad_bias.mutable_data_ptr<scalar_t>());
    });
    at::parallel_for(0, c * c + c, grain(c), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        lu::backward_factor_entry(f, static_cast<const scalar_t*>(gm), g.grad_per_pixel, t,
                                  grad_lower.mutable_data_ptr<scalar_t>(), grad_upper.mutable_data_ptr<scalar_t>(),
                                  grad_log_s.mutable_data_ptr<scalar_t>());
    });
  });
  return {grad_lower, grad_upper, grad_log_s, grad_log_scale, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> folded_lu_weight_inverse_cpu(
    const at::Tensor& perm_in, const at::Tensor& lower_in, const at::Tensor& upper_in, const at::Tensor& sign_in,
    const at::Tensor& log_s_in, const at::Tensor& log_scale_in, const at::Tensor& bias_in) {
  const char* op = "flowkern::folded_lu_weight_inverse";
  check_folded_lu_weight(perm_in, lower_in, upper_in, sign_in, log_s_in, log_scale_in, bias_in, op);
  const at::Tensor perm = perm_in.contiguous(), lower = lower_in.contiguous(), upper = upper_in.contiguous(),
                   sign = sign_in.contiguous(), log_s = log_s_in.contiguous(), log_scale = log_scale_in.contiguous(),
                   bias = bias_in.contiguous();
  const int64_t c = perm.size(0);
  at::Tensor inverse = at::empty({c, c}, perm.options()), bias_out = at::empty({c}, perm.options());
  AT_DISPATCH_FLOATING_TYPES(perm.scalar_type(), "folded_lu_weight_inverse_cpu", [&] {
    const lu::Factors<scalar_t> f = factors<scalar_t>(perm, lower, upper, sign, log_s);
    const scalar_t *ls = log_scale.const_data_ptr<scalar_t>(), *b = bias.const_data_ptr<scalar_t>();
    scalar_t *w = inverse.mutable_data_ptr<scalar_t>(), *bo = bias_out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, c + 1, std::max<int64_t>(1, grain(c) / c), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) lu::inverse_column(f, ls, b, j, w, bo);
    });
  });
  return {inverse, bias_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("folded_lu_weight", &folded_lu_weight_cpu);
  m.impl("folded_lu_weight_backward", &folded_lu_weight_backward_cpu);
  m.impl("folded_lu_weight_inverse", &folded_lu_weight_inverse_cpu);
}

}  // namespace flowkern
