#include "flowkern/checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

namespace flowkern {

void check_image(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 4, op, ": expected ", name, " of shape (N, C, H, W), got ", t.dim(), " dimensions ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected a floating-point ", name, ", got ",
              t.scalar_type());
}

void check_same_device_and_dtype(const at::Tensor& t, const at::Tensor& like, const char* name, const char* op) {
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, " on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": expected ", name, " of dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
}

void check_vector(const at::Tensor& t, int64_t size, const at::Tensor& like, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": expected ", name, " of shape (", size, "), got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, " on ", like.device(), ", got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected a floating-point ", name, ", got ",
              t.scalar_type());
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": expected weight of shape (C_out, ",
              x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": expected weight on ", x.device(), ", got ", weight.device());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": expected a floating-point weight, got ",
              weight.scalar_type());
}

void check_actnorm(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& bias, const char* op) {
  check_image(x, "input", op);
  check_vector(log_scale, x.size(1), x, "log_scale", op);
  check_vector(bias, x.size(1), x, "bias", op);
}

void check_conv1x1(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const char* op) {
  check_image(x, "input", op);
  check_weight(weight, x, op);
  if (bias) check_vector(*bias, weight.size(0), x, "bias", op);
}

void check_conv1x1_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const char* op) {
  check_image(grad_out, "grad_out", op);
  check_image(x, "input", op);
  check_same_device_and_dtype(grad_out, x, "grad_out", op);
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(2) == x.size(2) && grad_out.size(3) == x.size(3), op,
              ": expected grad_out of shape (", x.size(0), ", C_out, ", x.size(2), ", ", x.size(3), "), got ",
              grad_out.sizes());
}

namespace {

void check_lu_part(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& perm, const char* name,
                   const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  check_same_device_and_dtype(t, perm, name, op);
}

}  // namespace

void check_folded_lu_weight(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                            const at::Tensor& sign, const at::Tensor& log_s, const at::Tensor& log_scale,
                            const at::Tensor& bias, const char* op) {
  TORCH_CHECK(perm.defined() && perm.dim() == 2 && perm.size(0) == perm.size(1), op,
              ": expected perm of shape (C, C), got ", perm.defined() ? perm.sizes() : at::IntArrayRef{});
  TORCH_CHECK(perm.scalar_type() == at::kFloat || perm.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 factors, got ", perm.scalar_type());
  const int64_t c = perm.size(0);
  check_lu_part(lower, {c, c}, perm, "lower", op);
  check_lu_part(upper, {c, c}, perm, "upper", op);
  check_lu_part(sign, {c}, perm, "sign", op);
  check_lu_part(log_s, {c}, perm, "log_s", op);
  check_lu_part(log_scale, {c}, perm, "log_scale", op);
  check_lu_part(bias, {c}, perm, "bias", op);
}

void check_folded_lu_weight_grads(const at::Tensor& perm, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                  const at::Tensor& grad_per_pixel, const at::Tensor& weight, const char* op) {
  const int64_t c = perm.size(0);
  check_lu_part(grad_weight, {c, c}, perm, "grad_weight", op);
  check_lu_part(grad_bias, {c}, perm, "grad_bias", op);
  check_lu_part(grad_per_pixel, {}, perm, "grad_per_pixel", op);
  check_lu_part(weight, {c, c}, perm, "weight", op);
}

void check_fold_actnorms(const at::Tensor& weight1, const at::Tensor& log_scale1, const at::Tensor& weight2,
                         const at::Tensor& log_scale2, const at::Tensor& grad1, const at::Tensor& grad2,
                         const char* op) {
  TORCH_CHECK(weight1.defined() && at::isFloatingType(weight1.scalar_type()), op,
              ": expected weight1 to be a floating-point tensor");
  const at::Tensor* weights[] = {&weight1, &weight2};
  const at::Tensor* log_scales[] = {&log_scale1, &log_scale2};
  const at::Tensor* grads[] = {&grad1, &grad2};
  const char* weight_names[] = {"weight1", "weight2"};
  const char* log_scale_names[] = {"log_scale1", "log_scale2"};
  const char* grad_names[] = {"grad1", "grad2"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor &weight = *weights[i], &log_scale = *log_scales[i];
    TORCH_CHECK(weight.defined() && weight.dim() >= 1, op, ": expected ", weight_names[i],
                " with at least one dimension (its output channels)");
    TORCH_CHECK(log_scale.defined() && log_scale.dim() == 1 && log_scale.size(0) == weight.size(0), op,
                ": expected ", log_scale_names[i], " of shape (", weight.size(0), "), one scale per output channel "
                "of ", weight_names[i], ", got ", log_scale.defined() ? log_scale.sizes() : at::IntArrayRef{});
    check_same_device_and_dtype(weight, weight1, weight_names[i], op);
    check_same_device_and_dtype(log_scale, weight1, log_scale_names[i], op);
    if (grads[i]->defined()) {
      TORCH_CHECK(grads[i]->sizes() == weight.sizes(), op, ": expected ", grad_names[i], " of shape ",
                  weight.sizes(), ", got ", grads[i]->sizes());
      check_same_device_and_dtype(*grads[i], weight, grad_names[i], op);
    }
  }
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input, const char* op) {
  check_image(grad_out, "grad_out", op);
  check_same_device_and_dtype(grad_out, input, "grad_out", op);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": expected grad_out of shape ", input.sizes(), ", got ",
              grad_out.sizes());
}

CouplingOptions coupling_options(const at::Tensor& x, const at::Tensor& h, c10::string_view mask, int64_t parity,
                                 c10::string_view scale, double bound, c10::string_view layout, const char* op) {
  check_image(x, "input", op);
  check_image(h, "h", op);
  TORCH_CHECK(h.device() == x.device(), op, ": expected h on ", x.device(), ", got ", h.device());
  const at::ScalarType xt = x.scalar_type(), ht = h.scalar_type();
  if (!reads_h_type(xt, ht)) {  // "Float, Half or BFloat16": x's dtype, then the lower ones it reads
    std::vector<std::string> allowed{c10::toString(xt)};
    for (const at::ScalarType t : {at::kFloat, at::kHalf, at::kBFloat16}) {
      if (t != xt && reads_h_type(xt, t)) allowed.emplace_back(c10::toString(t));
    }
    std::string list = allowed[0];
    for (size_t i = 1; i < allowed.size(); ++i) list += (i + 1 == allowed.size() ? " or " : ", ") + allowed[i];
    TORCH_CHECK(false, op, ": expected h of dtype ", list, " for an input of dtype ", xt, ", got ", ht);
  }
  TORCH_CHECK(mask == "channel" || mask == "checkerboard", op, ": mask must be 'channel' or 'checkerboard', got '",
              std::string(mask), "'");
  TORCH_CHECK(parity == 0 || parity == 1, op, ": parity must be 0 or 1, got ", parity);
  static const std::pair<const char*, Scale> scales[] = {
      {"sigmoid", Scale::Sigmoid}, {"reciprocal_sigmoid", Scale::ReciprocalSigmoid}, {"exp", Scale::Exp},
      {"plain_exp", Scale::PlainExp}, {"atan", Scale::Atan}, {"offset_sigmoid", Scale::OffsetSigmoid},
      {"additive", Scale::Additive}};
  const auto found = std::find_if(std::begin(scales), std::end(scales), [&](const auto& e) { return scale == e.first; });
  TORCH_CHECK(found != std::end(scales), op,
              ": scale must be 'sigmoid', 'reciprocal_sigmoid', 'exp', 'plain_exp', 'atan', 'offset_sigmoid' or "
              "'additive', got '", std::string(scale), "'");
  const Scale s = found->second;
  TORCH_CHECK(layout == "halves" || layout == "shift_halves" || layout == "interleaved", op,
              ": layout must be 'halves', 'shift_halves' or 'interleaved', got '", std::string(layout), "'");
  const bool checkerboard = mask == "checkerboard";
  TORCH_CHECK(checkerboard || x.size(1) >= 2, op, ": a channel-mask coupling needs at least 2 channels, got ",
              x.sizes());
  // the transformed channels (as flowkern/reference/coupling.py's transformed_range) and h's planes (h_planes)
  const int64_t first = (x.size(1) + 1) / 2;
  const int64_t t_start = checkerboard || parity == 1 ? 0 : first;
  const int64_t n_t = checkerboard ? x.size(1) : parity == 0 ? x.size(1) - first : first;
  CouplingChannels channels{t_start, n_t, 0, 0, 1};
  if (s != Scale::Additive) {
    if (layout == "halves") channels.shift_first = n_t;
    if (layout == "shift_halves") channels.raw_first = n_t;
    if (layout == "interleaved") channels = {t_start, n_t, 1, 0, 2};
  }
  const int64_t h_channels = s == Scale::Additive ? channels.n_t : 2 * channels.n_t;
  TORCH_CHECK(h.size(0) == x.size(0) && h.size(1) == h_channels && h.size(2) == x.size(2) && h.size(3) == x.size(3),
              op, ": expected h of shape (", x.size(0), ", ", h_channels, ", ", x.size(2), ", ", x.size(3),
              ") for a ", std::string(mask), "-mask ", std::string(scale), " coupling of an input of shape ",
              x.sizes(), ", got ", h.sizes());
  return {checkerboard, parity, s, bound, channels};
}

at::Tensor inner_dense(const at::Tensor& t) {
  const int64_t height = t.size(2), width = t.size(3);
  if ((width == 1 || t.stride(3) == 1) && (height == 1 || t.stride(2) == width)) return t;
  return t.contiguous();
}

}  // namespace flowkern
