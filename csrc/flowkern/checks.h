// Argument checks and small helpers shared by every kernel file (host code only).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <type_traits>

#include "math.h"

namespace flowkern {

struct CouplingOptions {
  bool checkerboard;
  int64_t parity;
  Scale scale;
  double bound;
  CouplingChannels channels;
};

// Validates mask/parity/scale/layout and the shapes of x (N, C, H, W) and h; op names the caller in messages.
// h has x's dtype or a lower precision (a conditioner run under autocast): see dispatch_h_type.
CouplingOptions coupling_options(const at::Tensor& x, const at::Tensor& h, c10::string_view mask, int64_t parity,
                                 c10::string_view scale, double bound, c10::string_view layout, const char* op);

// x, unless its (H, W) planes are not dense: then a contiguous copy. Kernels take N and C strides.
at::Tensor inner_dense(const at::Tensor& t);

void check_image(const at::Tensor& t, const char* name, const char* op);
void check_same_device_and_dtype(const at::Tensor& t, const at::Tensor& like, const char* name, const char* op);
void check_vector(const at::Tensor& t, int64_t size, const at::Tensor& like, const char* name, const char* op);
void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op);

// The arguments of each op family, as both the CPU and the CUDA kernels take them.
void check_actnorm(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& bias, const char* op);
void check_conv1x1(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const char* op);
void check_conv1x1_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const char* op);
// The LU factors (perm, lower, upper (C, C); sign, log_s (C,)) and the ActNorm's log_scale, bias (C,): one
// floating-point dtype and device, that of perm.
void check_folded_lu_weight(const at::Tensor& perm, const at::Tensor& lower, const at::Tensor& upper,
                            const at::Tensor& sign, const at::Tensor& log_s, const at::Tensor& log_scale,
                            const at::Tensor& bias, const char* op);
// and the gradients of the op's three outputs, (C, C), (C,) and 0-d, and its folded weight (C, C): of that dtype
// and device
void check_folded_lu_weight_grads(const at::Tensor& perm, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                  const at::Tensor& grad_per_pixel, const at::Tensor& weight, const char* op);
// Two (weight (O, ...), log_scale (O,)) pairs of one floating-point dtype and device, that of weight1; with
// grad1 and grad2 defined, the gradients of the folded weights too, each of its weight's shape, dtype and device.
void check_fold_actnorms(const at::Tensor& weight1, const at::Tensor& log_scale1, const at::Tensor& weight2,
                         const at::Tensor& log_scale2, const at::Tensor& grad1, const at::Tensor& grad2,
                         const char* op);
// grad_out of the input's shape, device and dtype
void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input, const char* op);

// Calls f with the Scale as a compile-time constant.
template <typename F>
void dispatch_scale(Scale scale, F&& f) {
  switch (scale) {
    case Scale::Sigmoid: return f(std::integral_constant<Scale, Scale::Sigmoid>{});
    case Scale::Exp: return f(std::integral_constant<Scale, Scale::Exp>{});
    case Scale::Additive: return f(std::integral_constant<Scale, Scale::Additive>{});
    case Scale::ReciprocalSigmoid: return f(std::integral_constant<Scale, Scale::ReciprocalSigmoid>{});
    case Scale::PlainExp: return f(std::integral_constant<Scale, Scale::PlainExp>{});
    case Scale::Atan: return f(std::integral_constant<Scale, Scale::Atan>{});
    case Scale::OffsetSigmoid: return f(std::integral_constant<Scale, Scale::OffsetSigmoid>{});
  }
}

// Whether a coupling over x of dtype x_type reads h of dtype h_type: its own, or a lower precision (float32 x:
// float16, bfloat16; float64 x: float32, float16, bfloat16), as a conditioner under autocast gives it. The one
// list of the h dtypes: coupling_options checks it, dispatch_h_type instantiates it (the Python side's is
// flowkern/reference/_dtypes.py LOWER_PRECISION; tests/test_native.py checks that the two agree).
constexpr bool reads_h_type(at::ScalarType x_type, at::ScalarType h_type) {
  const bool lower = h_type == at::kHalf || h_type == at::kBFloat16;
  return h_type == x_type || (x_type == at::kFloat && lower) ||
         (x_type == at::kDouble && (lower || h_type == at::kFloat));
}

// Calls f with a value of h's element type, for the h dtypes reads_h_type allows beside x of type scalar_t. The
// kernels read such an h directly and do their arithmetic in x's math type; ∂h is written in h's dtype.
template <typename scalar_t, typename F>
void dispatch_h_type(at::ScalarType h_type, F&& f) {
  constexpr at::ScalarType x_type = c10::CppTypeToScalarType<scalar_t>::value;
  if (h_type == x_type) return f(scalar_t{});
  if constexpr (reads_h_type(x_type, at::kHalf)) {
    if (h_type == at::kHalf) return f(c10::Half{});
  }
  if constexpr (reads_h_type(x_type, at::kBFloat16)) {
    if (h_type == at::kBFloat16) return f(c10::BFloat16{});
  }
  if constexpr (reads_h_type(x_type, at::kFloat)) {
    if (h_type == at::kFloat) return f(float{});
  }
  TORCH_CHECK(false, "flowkern: unchecked h dtype ", h_type, " for x of dtype ", x_type);
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f.template operator()<S, Inverse, scalar_t, h_t>() with x's and h's element types, the scale and the
// direction as compile-time constants, so that a launcher is one call of a template lambda naming its kernel.
template <typename F>
void dispatch_coupling(at::ScalarType x_type, at::ScalarType h_type, Scale scale, bool inverse, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_type, "flowkern_coupling", [&] {
    dispatch_h_type<scalar_t>(h_type, [&](auto h_value) {
      dispatch_scale(scale, [&](auto s) {
        dispatch_bool(inverse, [&](auto i) {
          f.template operator()<decltype(s)::value, decltype(i)::value, scalar_t, decltype(h_value)>();
        });
      });
    });
  });
}

}  // namespace flowkern
