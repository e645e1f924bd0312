// Calls every flowkern op through the dispatcher, as a libtorch program would, and checks it against a
// plain ATen reference written here from the definitions (not from flowkern's kernels). Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>

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
                                                    c10::string_view, double);

// y = x·s + shift on the transformed elements, log s from the scale; returns (y or x, log-det).
std::tuple<at::Tensor, at::Tensor> reference_coupling(const at::Tensor& x, const at::Tensor& h, bool checkerboard,
                                                      int64_t parity, const std::string& scale, double bound,
                                                      bool inverse) {
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
    const at::Tensor raw = h.narrow(1, 0, n_t);
    shift = h.narrow(1, n_t, n_t);
    logs = scale == "sigmoid" ? at::log_sigmoid(raw + 2) : bound * at::tanh(raw);
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

void test_coupling() {
  auto forward = op<Coupling>("flowkern::coupling_forward");
  auto inverse = op<Coupling>("flowkern::coupling_inverse");
  for (const bool checkerboard : {false, true}) {
    for (const int64_t parity : {0, 1}) {
      for (const std::string scale : {"sigmoid", "exp", "additive"}) {
        const int64_t c = 5, first = 3, n_t = checkerboard ? c : (parity == 0 ? c - first : first);
        const at::Tensor x = at::randn({3, c, 7, 5}, at::kFloat);
        const at::Tensor h = at::randn({3, scale == "additive" ? n_t : 2 * n_t, 7, 5}, at::kFloat);
        const std::string name = std::string(checkerboard ? "checkerboard" : "channel") + " parity " +
                                 std::to_string(parity) + " " + scale;
        for (const bool inv : {false, true}) {
          const auto [out, logdet] = (inv ? inverse : forward)
                                         .call(x, h, checkerboard ? "checkerboard" : "channel", parity, scale, 1.5);
          const auto [ref_out, ref_logdet] = reference_coupling(x, h, checkerboard, parity, scale, 1.5, inv);
          expect_close(out, ref_out, "coupling_" + std::string(inv ? "inverse " : "forward ") + name);
          expect_close(logdet, ref_logdet, "coupling log-det " + name, 1e-4);
        }
      }
    }
  }
}

void test_actnorm_and_conv1x1() {
  auto actnorm = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("flowkern::actnorm");
  const at::Tensor x = at::randn({4, 6, 9, 3}), log_scale = 0.3 * at::randn({6}), bias = at::randn({6});
  const at::Tensor s = log_scale.view({1, -1, 1, 1}).exp(), b = bias.view({1, -1, 1, 1});
  expect_close(actnorm.call(x, log_scale, bias, false), x * s + b, "actnorm forward");
  expect_close(actnorm.call(x, log_scale, bias, true), (x - b) / s, "actnorm inverse");

  auto conv = op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
      "flowkern::conv1x1");
  const at::Tensor weight = at::randn({7, 6}), bias7 = at::randn({7});
  const at::Tensor expected = at::einsum("oc,nchw->nohw", {weight, x}) + bias7.view({1, -1, 1, 1});
  expect_close(conv.call(x, weight, bias7), expected, "conv1x1", 1e-4);

  auto weight_grad = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>(
      "flowkern::conv1x1_weight_grad");
  const at::Tensor g = at::randn({4, 7, 9, 3});
  const auto [grad_w, grad_b] = weight_grad.call(g, x);
  expect_close(grad_w, at::einsum("nohw,nchw->oc", {g, x}), "conv1x1 weight gradient", 1e-4);
  expect_close(grad_b, g.sum({0, 2, 3}), "conv1x1 bias gradient", 1e-4);
}

void test_bad_input_is_refused() {
  auto forward = op<Coupling>("flowkern::coupling_forward");
  try {
    forward.call(at::randn({2, 4, 3, 3}), at::randn({2, 3, 3, 3}), "channel", 0, "sigmoid", 2.0);
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
  test_coupling();
  test_actnorm_and_conv1x1();
  test_bad_input_is_refused();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
