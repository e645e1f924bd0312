// Calls every flowkern op through the dispatcher, as a libtorch program would, in float32 and float64 (and the
// couplings with a lower-precision h), and
// checks it against a plain ATen reference written here from the definitions (not from flowkern's kernels);
// the backward ops against autograd through that reference. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& expected, const std::string& what, double tol = 1e-5) {
  const bool ok = got.sizes() == expected.sizes() && at::allclose(got.to(at::kDouble), expected.to(at::kDouble), tol, tol);
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: max abs error %g\n", what.c_str(),
                got.sizes() == expected.sizes() ? (got.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>()
                                                : -1.0);
  } else {
    std::printf("ok   %s\n", what.c_str());
  }
}

template <typename Signature>
auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Coupling = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::string_view, int64_t,
                                                    c10::string_view, double, c10::string_view);

// log s of each scale at raw
at::Tensor reference_log_scale(const at::Tensor& raw, const std::string& scale, double bound) {
  if (scale == "sigmoid") return at::log_sigmoid(raw + 2);
  if (scale == "reciprocal_sigmoid") return -at::log_sigmoid(raw + 2);
  if (scale == "plain_exp") return raw;
  if (scale == "atan") return 0.636 * bound * at::atan(raw);
  if (scale == "offset_sigmoid") return at::log(at::sigmoid(raw + 2) + 1e-3);
  return bound * at::tanh(raw);
}

// y = x·s + shift on the transformed elements, log s from the scale; returns (y or x, log-det).
std::tuple<at::Tensor, at::Tensor> reference_coupling(const at::Tensor& x, const at::Tensor& h_in, bool checkerboard,
                                                      int64_t parity, const std::string& scale, double bound,
                                                      const std::string& layout, bool inverse) {
  const at::Tensor h = h_in.to(x.scalar_type());  // a lower-precision h is exact in x's dtype
  const int64_t c = x.size(1), first = (c + 1) / 2;
  at::Tensor t, mask;
  if (checkerboard) {
    t = x;
    const auto i = at::arange(x.size(2)).view({-1, 1}), j = at::arange(x.size(3)).view({1, -1});
    mask = ((i + j + parity) % 2 == 1).to(x.scalar_type());
  } else {
    t = parity == 0 ? x.narrow(1, first, c - first) : x.narrow(1, 0, first);
    mask = at::ones({1}, x.options());
  }
  const int64_t n_t = t.size(1);
  at::Tensor logs = at::zeros_like(t), shift;
  if (scale == "additive") {
    shift = h;
  } else {
    at::Tensor raw;
    if (layout == "interleaved") {  // shift, raw = h[:, 0::2], h[:, 1::2]
      shift = h.slice(1, 0, 2 * n_t, 2);
      raw = h.slice(1, 1, 2 * n_t, 2);
    } else {
      const bool shift_first = layout == "shift_halves";
      raw = h.narrow(1, shift_first ? n_t : 0, n_t);
      shift = h.narrow(1, shift_first ? 0 : n_t, n_t);
    }
    logs = reference_log_scale(raw, scale, bound);
  }
  logs = logs * mask;
  shift = shift * mask;
  at::Tensor out = inverse ? (t - shift) * at::exp(-logs) : t * at::exp(logs) + shift;
  const at::Tensor logdet = logs.flatten(1).sum(1);
  if (!checkerboard) {
    const at::Tensor passed = parity == 0 ? x.narrow(1, 0, first) : x.narrow(1, first, c - first);
    out = parity == 0 ? at::cat({passed, out}, 1) : at::cat({out, passed}, 1);
  }
  return {out, logdet};
}

// float32 kernels against an ATen reference that rounds differently: 1e-5 (reductions 1e-4); float64: 1e-10;
// a 16-bit result: one rounding of its float32 value.
double tolerance(at::ScalarType dtype, bool reduction = false) {
  switch (dtype) {
    case at::kDouble: return 1e-10;
    case at::kBFloat16: return 1e-2;
    case at::kHalf: return 1e-3;
    default: return reduction ? 1e-4 : 1e-5;
  }
}

std::string dtype_name(at::ScalarType dtype) { return std::string(" ") + c10::toString(dtype); }

using CouplingBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, c10::string_view, int64_t,
                                                            c10::string_view, double, c10::string_view, bool);

// x of dtype, h of h_dtype (dtype or a lower precision, as under autocast).
void test_coupling(at::ScalarType dtype, at::ScalarType h_dtype) {
  auto forward = op<Coupling>("flowkern::coupling_forward");
  auto inverse = op<Coupling>("flowkern::coupling_inverse");
  auto backward = op<CouplingBackward>("flowkern::coupling_backward");
  for (const bool checkerboard : {false, true}) {
    for (const int64_t parity : {0, 1}) {
      for (const std::string scale : {"sigmoid", "reciprocal_sigmoid", "exp", "plain_exp", "atan", "offset_sigmoid",
                                       "additive"}) {
        for (const std::string layout : {"halves", "shift_halves", "interleaved"}) {
          if (scale == "additive" && layout != "halves") continue;  // additive h is the shift alone
          const int64_t c = 5, first = 3, n_t = checkerboard ? c : (parity == 0 ? c - first : first);
          const at::Tensor x = at::randn({3, c, 7, 5}, dtype);
          const at::Tensor h = at::randn({3, scale == "additive" ? n_t : 2 * n_t, 7, 5}, h_dtype);
          const char* mask = checkerboard ? "checkerboard" : "channel";
          const std::string name = std::string(mask) + " parity " + std::to_string(parity) + " " + scale + " " + layout +
                                   dtype_name(dtype) + (h_dtype == dtype ? "" : ", h" + dtype_name(h_dtype));
          for (const bool inv : {false, true}) {
            const std::string kind = inv ? "inverse " : "forward ";
            const auto [out, logdet] = (inv ? inverse : forward).call(x, h, mask, parity, scale, 1.5, layout);
            const auto [ref_out, ref_logdet] = reference_coupling(x, h, checkerboard, parity, scale, 1.5, layout, inv);
            expect_close(out, ref_out, "coupling_" + kind + name, tolerance(dtype));
            expect_close(logdet, ref_logdet, "coupling log-det " + kind + name, tolerance(dtype, true));

            const at::Tensor input = x.detach().requires_grad_(), cond = h.detach().requires_grad_();
            const auto [r_out, r_logdet] =
                reference_coupling(input, cond, checkerboard, parity, scale, 1.5, layout, inv);
            const at::Tensor grad_out = at::randn_like(x), grad_logdet = at::randn({3}, dtype);
            const bool has_logdet = r_logdet.requires_grad();  // additive coupling: a constant zero log-det
            const auto ref_grads = has_logdet
                                       ? torch::autograd::grad({r_out, r_logdet}, {input, cond}, {grad_out, grad_logdet})
                                       : torch::autograd::grad({r_out}, {input, cond}, {grad_out});
            const auto [grad_x, grad_h] =
                backward.call(grad_out, grad_logdet, x, h, mask, parity, scale, 1.5, layout, inv);
            expect_close(grad_x, ref_grads[0], "coupling_backward " + kind + "∂input " + name, tolerance(dtype, true));
            const bool grad_h_dtype = grad_h.scalar_type() == h_dtype;
            failures += grad_h_dtype ? 0 : 1;
            if (!grad_h_dtype) std::printf("FAIL ∂h of dtype %s, not h's\n", c10::toString(grad_h.scalar_type()));
            expect_close(grad_h, ref_grads[1], "coupling_backward " + kind + "∂h " + name,
                         h_dtype == dtype ? tolerance(dtype, true) : tolerance(h_dtype));
          }
        }
      }
    }
  }
}

using ActNormBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&, bool);

void test_actnorm_and_conv1x1(at::ScalarType dtype) {
  const std::string suffix = dtype_name(dtype);
  auto actnorm = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("flowkern::actnorm");
  auto actnorm_backward = op<ActNormBackward>("flowkern::actnorm_backward");
  const at::Tensor x = at::randn({4, 6, 9, 3}, dtype), log_scale = 0.3 * at::randn({6}, dtype);
  const at::Tensor bias = at::randn({6}, dtype);
  for (const bool inv : {false, true}) {
    const std::string kind = inv ? "inverse" : "forward";
    const auto reference = [inv](const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& bias) {
      const at::Tensor s = log_scale.view({1, -1, 1, 1}).exp(), b = bias.view({1, -1, 1, 1});
      return inv ? (x - b) / s : x * s + b;
    };
    expect_close(actnorm.call(x, log_scale, bias, inv), reference(x, log_scale, bias), "actnorm " + kind + suffix,
                 tolerance(dtype));
    const at::Tensor input = x.detach().requires_grad_(), ls = log_scale.detach().requires_grad_();
    const at::Tensor b = bias.detach().requires_grad_(), grad_out = at::randn_like(x);
    const auto ref = torch::autograd::grad({reference(input, ls, b)}, {input, ls, b}, {grad_out});
    const auto [grad_x, grad_log_scale, grad_bias] = actnorm_backward.call(grad_out, x, log_scale, bias, inv);
    expect_close(grad_x, ref[0], "actnorm_backward " + kind + " ∂x" + suffix, tolerance(dtype));
    expect_close(grad_log_scale, ref[1], "actnorm_backward " + kind + " ∂log_scale" + suffix, tolerance(dtype, true));
    expect_close(grad_bias, ref[2], "actnorm_backward " + kind + " ∂bias" + suffix, tolerance(dtype, true));
  }

  auto conv = op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
      "flowkern::conv1x1");
  const at::Tensor weight = at::randn({7, 6}, dtype), bias7 = at::randn({7}, dtype);
  const at::Tensor expected = at::einsum("oc,nchw->nohw", {weight, x}) + bias7.view({1, -1, 1, 1});
  expect_close(conv.call(x, weight, bias7), expected, "conv1x1" + suffix, tolerance(dtype, true));
  expect_close(conv.call(x, weight, std::nullopt), at::einsum("oc,nchw->nohw", {weight, x}),
               "conv1x1 without bias" + suffix, tolerance(dtype, true));

  auto weight_grad = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>(
      "flowkern::conv1x1_weight_grad");
  const at::Tensor g = at::randn({4, 7, 9, 3}, dtype);
  const auto [grad_w, grad_b] = weight_grad.call(g, x);
  expect_close(grad_w, at::einsum("nohw,nchw->oc", {g, x}), "conv1x1 weight gradient" + suffix, tolerance(dtype, true));
  expect_close(grad_b, g.sum({0, 2, 3}), "conv1x1 bias gradient" + suffix, tolerance(dtype, true));
}

// The LU weight with the ActNorm folded in, its gradients and its inverse map, against the products and solves
// written out here: W = P·(L + I)·(U + diag(sign·e^log_s)).
void test_folded_lu_weight(at::ScalarType dtype) {
  const std::string suffix = dtype_name(dtype);
  const int64_t c = 9;
  using Folded = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&);
  using Inverse = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&);
  using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
  const at::Tensor perm = at::eye(c, dtype).index({at::randperm(c)});
  const at::Tensor lower = 0.3 * at::randn({c, c}, dtype), upper = 0.3 * at::randn({c, c}, dtype);
  const at::Tensor sign = at::randn({c}, dtype).sign(), log_s = 0.2 * at::randn({c}, dtype);
  const at::Tensor log_scale = 0.2 * at::randn({c}, dtype), bias = at::randn({c}, dtype);
  const auto reference = [&](const at::Tensor& l, const at::Tensor& u, const at::Tensor& ls, const at::Tensor& lsc,
                             const at::Tensor& b) {
    const at::Tensor w = perm.matmul(l.tril(-1) + at::eye(c, dtype)).matmul(u.triu(1) + at::diag(sign * ls.exp()));
    return std::make_tuple(w * lsc.exp(), w.matmul(b), ls.sum() + lsc.sum());
  };
  const auto [weight, bias_out, per_pixel] =
      op<Folded>("flowkern::folded_lu_weight").call(perm, lower, upper, sign, log_s, log_scale, bias);
  std::vector<at::Tensor> leaves;
  for (const auto& t : {lower, upper, log_s, log_scale, bias}) leaves.push_back(t.detach().requires_grad_());
  const auto [w_ref, b_ref, pp_ref] = reference(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4]);
  expect_close(weight, w_ref, "folded_lu_weight weight" + suffix, tolerance(dtype, true));
  expect_close(bias_out, b_ref, "folded_lu_weight bias" + suffix, tolerance(dtype, true));
  expect_close(per_pixel, pp_ref, "folded_lu_weight log-det per pixel" + suffix, tolerance(dtype, true));
  const at::Tensor gw = at::randn({c, c}, dtype), gb = at::randn({c}, dtype), gpp = at::randn({}, dtype);
  const auto ref = torch::autograd::grad({w_ref, b_ref, pp_ref}, leaves, {gw, gb, gpp});
  const auto grads = op<Backward>("flowkern::folded_lu_weight_backward")
                         .call(gw, gb, gpp, perm, lower, upper, sign, log_s, log_scale, bias, weight);
  const at::Tensor got[] = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads),
                            std::get<4>(grads)};
  const char* names[] = {"∂lower", "∂upper", "∂log_s", "∂log_scale", "∂bias"};
  for (int i = 0; i < 5; ++i)
    expect_close(got[i], ref[i], std::string("folded_lu_weight_backward ") + names[i] + suffix, tolerance(dtype, true));
  const auto [inverse, inverse_bias] =
      op<Inverse>("flowkern::folded_lu_weight_inverse").call(perm, lower, upper, sign, log_s, log_scale, bias);
  expect_close(inverse.matmul(weight), at::eye(c, dtype), "folded_lu_weight_inverse ∘ forward" + suffix,
               tolerance(dtype, true));
  expect_close(inverse.matmul(bias_out) + inverse_bias, at::zeros({c}, dtype), "folded_lu_weight_inverse bias" + suffix,
               tolerance(dtype, true));
}

// A Glow conditioner's two ActNorms folded into its first two weights, and their gradients, against the products
// written out here: W_folded = W·e^log_scale over W's output channels.
void test_fold_actnorms(at::ScalarType dtype) {
  const std::string suffix = dtype_name(dtype);
  using Fold = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&);
  using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
  std::vector<at::Tensor> leaves;
  for (const auto& t : {at::randn({11, 3, 3, 3}, dtype), 0.3 * at::randn({11}, dtype), at::randn({11, 11, 1, 1}, dtype),
                        0.3 * at::randn({11}, dtype)})
    leaves.push_back(t.detach().requires_grad_());
  const at::Tensor ref1 = leaves[0] * leaves[1].exp().view({-1, 1, 1, 1}),
                   ref2 = leaves[2] * leaves[3].exp().view({-1, 1, 1, 1});
  const auto [folded1, folded2] = op<Fold>("flowkern::fold_actnorms").call(leaves[0].detach(), leaves[1].detach(),
                                                                           leaves[2].detach(), leaves[3].detach());
  expect_close(folded1, ref1, "fold_actnorms first weight" + suffix, tolerance(dtype, true));
  expect_close(folded2, ref2, "fold_actnorms second weight" + suffix, tolerance(dtype, true));
  const at::Tensor g1 = at::randn_like(folded1), g2 = at::randn_like(folded2);
  const auto ref = torch::autograd::grad({ref1, ref2}, leaves, {g1, g2});
  const auto grads = op<Backward>("flowkern::fold_actnorms_backward")
                         .call(g1, leaves[0].detach(), leaves[1].detach(), g2, leaves[2].detach(), leaves[3].detach());
  const at::Tensor got[] = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads)};
  const char* names[] = {"∂weight1", "∂log_scale1", "∂weight2", "∂log_scale2"};
  for (int i = 0; i < 4; ++i)
    expect_close(got[i], ref[i], std::string("fold_actnorms_backward ") + names[i] + suffix, tolerance(dtype, true));
}

void test_bad_input_is_refused() {
  auto forward = op<Coupling>("flowkern::coupling_forward");
  try {
    forward.call(at::randn({2, 4, 3, 3}), at::randn({2, 3, 3, 3}), "channel", 0, "sigmoid", 2.0, "halves");
    ++failures;
    std::printf("FAIL a wrongly shaped h was accepted\n");
  } catch (const c10::Error& e) {
    const bool says_why = std::string(e.what_without_backtrace()).find("expected h of shape (2, 4, 3, 3)") != std::string::npos;
    failures += says_why ? 0 : 1;
    std::printf("%s bad h refused: %s\n", says_why ? "ok  " : "FAIL", e.what_without_backtrace());
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    test_coupling(dtype, dtype);
    test_actnorm_and_conv1x1(dtype);
    test_folded_lu_weight(dtype);
    test_fold_actnorms(dtype);
  }
  test_coupling(at::kFloat, at::kBFloat16);
  test_coupling(at::kFloat, at::kHalf);
  test_coupling(at::kDouble, at::kFloat);
  test_bad_input_is_refused();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
