// Per-element math of the flow-step ops, shared by the CPU and CUDA kernels.
//
// Every function is a template over a math policy M and a value type T: ScalarMath with float/double
// on host and device, and on the CPU a policy over at::vec::Vectorized, so the math the CPU tests run is
// the math the GPU runs. Conventions are those of flowkern/reference/coupling.py.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace flowkern {

enum class Scale : int { Sigmoid = 0, Exp = 1, Additive = 2 };

struct ScalarMath {
  template <typename T> C10_HOST_DEVICE static T exp(T v) {
#ifdef __CUDA_ARCH__
    return ::exp(v);
#else
    return std::exp(v);
#endif
  }
  template <typename T> C10_HOST_DEVICE static T log1p(T v) {
#ifdef __CUDA_ARCH__
    return ::log1p(v);
#else
    return std::log1p(v);
#endif
  }
  template <typename T> C10_HOST_DEVICE static T tanh(T v) {
#ifdef __CUDA_ARCH__
    return ::tanh(v);
#else
    return std::tanh(v);
#endif
  }
  template <typename T> C10_HOST_DEVICE static T abs(T v) { return v < T(0) ? -v : v; }
  template <typename T> C10_HOST_DEVICE static T min(T a, T b) { return b < a ? b : a; }
};

// log s and d(log s)/d(raw) of the coupling's scale.
//   Sigmoid (Glow):   log s = log sigmoid(raw + 2),  d/draw = 1 − sigmoid(raw + 2) = e^{log s − z}
//   Exp (RealNVP):    log s = bound · tanh(raw),      d/draw = bound · (1 − tanh²)
template <Scale S, typename M, typename T>
C10_HOST_DEVICE inline void log_scale(T raw, T bound, T& logs, T& dlogs) {
  if constexpr (S == Scale::Sigmoid) {
    const T z = raw + T(2);
    logs = M::min(z, T(0)) - M::log1p(M::exp(T(0) - M::abs(z)));
    dlogs = M::exp(logs - z);
  } else {
    const T t = M::tanh(raw);
    logs = bound * t;
    dlogs = bound * (T(1) - t * t);
  }
}

// The transformed element: forward y = x·s + shift, inverse x = (y − shift)·s⁻¹.
template <bool Inverse, typename M, typename T>
C10_HOST_DEVICE inline T couple(T v, T logs, T shift) {
  if constexpr (Inverse) {
    return (v - shift) * M::exp(T(0) - logs);
  } else {
    return v * M::exp(logs) + shift;
  }
}

// Gradients at a transformed element from the upstream gradient g of the op's output and gld of its
// log-det; v is the op's input.
//   forward  y = x·s + shift:        ∂x = g·s,    ∂shift = g,       ∂log s = g·x·s + gld
//   inverse  x = (y − shift)·s⁻¹:    ∂y = g·s⁻¹,  ∂shift = −g·s⁻¹,  ∂log s = gld − g·x
template <Scale S, bool Inverse, typename M, typename T>
C10_HOST_DEVICE inline void couple_backward(T g, T gld, T v, T raw, T shift, T bound, T& grad_in, T& grad_raw,
                                            T& grad_shift) {
  if constexpr (S == Scale::Additive) {
    grad_in = g;
    grad_shift = Inverse ? T(0) - g : g;
    grad_raw = T(0);
  } else {
    T logs, dlogs;
    log_scale<S, M>(raw, bound, logs, dlogs);
    T glogs;
    if constexpr (Inverse) {
      const T inv_s = M::exp(T(0) - logs);
      grad_in = g * inv_s;
      grad_shift = T(0) - grad_in;
      glogs = gld - g * ((v - shift) * inv_s);
    } else {
      grad_in = g * M::exp(logs);
      grad_shift = g;
      glogs = grad_in * v + gld;
    }
    grad_raw = glogs * dlogs;
  }
}

// ActNorm with the per-channel factor computed once by the caller: scale = e^{log_scale} for the
// forward y = x·scale + bias, scale = e^{−log_scale} for the inverse x = (y − bias)·scale.
template <bool Inverse, typename T>
C10_HOST_DEVICE inline T actnorm(T v, T scale, T bias) {
  if constexpr (Inverse) {
    return (v - bias) * scale;
  } else {
    return v * scale + bias;
  }
}

// ActNorm gradients at one element (scale as above): ∂input, and the element's terms of ∂log_scale, ∂bias.
//   forward: ∂x = g·s,   ∂log_scale += ∂x·x,          ∂bias += g
//   inverse: ∂y = g·s⁻¹, ∂log_scale += −∂y·(y − bias), ∂bias += −∂y
template <bool Inverse, typename T>
C10_HOST_DEVICE inline void actnorm_backward(T g, T v, T scale, T bias, T& grad_in, T& grad_log_scale,
                                             T& grad_bias) {
  grad_in = g * scale;
  if constexpr (Inverse) {
    grad_log_scale = T(0) - grad_in * (v - bias);
    grad_bias = T(0) - grad_in;
  } else {
    grad_log_scale = grad_in * v;
    grad_bias = g;
  }
}

// The channel ranges of a coupling: which channels pass through, which are transformed.
struct CouplingChannels {
  int64_t pass_start, n_pass, t_start, n_t;
};

C10_HOST_DEVICE inline CouplingChannels coupling_channels(int64_t channels, bool checkerboard, int64_t parity) {
  if (checkerboard) return {0, 0, 0, channels};
  const int64_t first = (channels + 1) / 2, second = channels - first;
  return parity == 0 ? CouplingChannels{0, first, first, second} : CouplingChannels{first, second, 0, first};
}

C10_HOST_DEVICE inline bool checkerboard_active(int64_t i, int64_t j, int64_t parity) {
  return (i + j + parity) % 2 == 1;
}

}  // namespace flowkern
