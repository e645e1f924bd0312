// A Glow conditioner's two ActNorms folded into the convolutions before them, on the CPU: the rows of both
// weights from the shared per-entry math (flowkern/fold_actnorms.h), rows in parallel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "../flowkern/fold_actnorms.h"

namespace flowkern {
namespace {

// Tasks of about 16K entries.
int64_t grain(int64_t row_size) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_size, 1)); }

std::tuple<at::Tensor, at::Tensor> fold_actnorms_cpu(const at::Tensor& weight1_in, const at::Tensor& log_scale1_in,
                                                     const at::Tensor& weight2_in, const at::Tensor& log_scale2_in) {
  check_fold_actnorms(weight1_in, log_scale1_in, weight2_in, log_scale2_in, {}, {}, "flowkern::fold_actnorms");
  const at::Tensor weight1 = weight1_in.contiguous(), log_scale1 = log_scale1_in.contiguous(),
                   weight2 = weight2_in.contiguous(), log_scale2 = log_scale2_in.contiguous();
  at::Tensor folded1 = at::empty_like(weight1), folded2 = at::empty_like(weight2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight1.scalar_type(), "fold_actnorms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const fold::Pair<scalar_t> pairs[] = {fold::pair_of<scalar_t>(weight1, log_scale1, folded1),
                                          fold::pair_of<scalar_t>(weight2, log_scale2, folded2)};
    for (const auto& p : pairs) {
      at::parallel_for(0, p.rows, grain(p.row_size), [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) fold::fold_entries<scalar_t, acc_t>(p, o, 0, 1);
      });
    }
  });
  return {folded1, folded2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_actnorms_backward_cpu(
    const at::Tensor& grad1_in, const at::Tensor& weight1_in, const at::Tensor& log_scale1_in,
    const at::Tensor& grad2_in, const at::Tensor& weight2_in, const at::Tensor& log_scale2_in) {
  check_fold_actnorms(weight1_in, log_scale1_in, weight2_in, log_scale2_in, grad1_in, grad2_in,
                      "flowkern::fold_actnorms_backward");
  // a channels-last convolution's weight gradient is copied here: rows are read as the weights store them
  const at::Tensor grad1 = grad1_in.contiguous(), weight1 = weight1_in.contiguous(),
                   log_scale1 = log_scale1_in.contiguous(), grad2 = grad2_in.contiguous(),
                   weight2 = weight2_in.contiguous(), log_scale2 = log_scale2_in.contiguous();
  at::Tensor grad_weight1 = at::empty_like(weight1), grad_log_scale1 = at::empty_like(log_scale1),
             grad_weight2 = at::empty_like(weight2), grad_log_scale2 = at::empty_like(log_scale2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight1.scalar_type(), "fold_actnorms_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const fold::GradPair<scalar_t> pairs[] = {
        fold::grad_pair_of<scalar_t>(grad1, weight1, log_scale1, grad_weight1, grad_log_scale1),
        fold::grad_pair_of<scalar_t>(grad2, weight2, log_scale2, grad_weight2, grad_log_scale2)};
    for (const auto& p : pairs) {
      at::parallel_for(0, p.rows, grain(p.row_size), [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) {
          const acc_t scale = ScalarMath::exp(static_cast<acc_t>(p.log_scale[o]));
          p.grad_log_scale[o] = static_cast<scalar_t>(scale * fold::grad_entries<scalar_t, acc_t>(p, o, scale, 0, 1));
        }
      });
    }
  });
  return {grad_weight1, grad_log_scale1, grad_weight2, grad_log_scale2};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("fold_actnorms", &fold_actnorms_cpu);
  m.impl("fold_actnorms_backward", &fold_actnorms_backward_cpu);
}

}  // namespace flowkern
