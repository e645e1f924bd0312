// Per-element math of the flow-step ops, shared by the CPU and CUDA kernels.
//
// Every function is a template over a math policy M and a value type T: ScalarMath with float/double
// on host and device, and on the CPU a policy over at::vec::Vectorized, so the math the CPU tests run is
// the math the GPU runs. Conventions are those of flowkern/reference/coupling.py.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace flowkern {

enum class Scale : int { Sigmoid = 0, Exp = 1, Additive = 2, ReciprocalSigmoid = 3, PlainExp = 4, Atan = 5,
                         OffsetSigmoid = 6 };

// FrEIA's factor before atan in its "ATAN" clamp (for 2/π): log s = kAtanGain · bound · atan(raw).
constexpr double kAtanGain = 0.636;
// nflows' floor on its sigmoid scale: s = sigmoid(raw + 2) + kSigmoidOffset.
constexpr double kSigmoidOffset = 1e-3;

// On the device the CUDA math library's overloads, on the host std::.
#ifdef __CUDA_ARCH__
#define FLOWKERN_MATH(fn) ::fn
#else
#define FLOWKERN_MATH(fn) std::fn
#endif

struct ScalarMath {
  template <typename T> C10_HOST_DEVICE static T exp(T v) { return FLOWKERN_MATH(exp)(v); }
  template <typename T> C10_HOST_DEVICE static T log(T v) { return FLOWKERN_MATH(log)(v); }
  template <typename T> C10_HOST_DEVICE static T log1p(T v) { return FLOWKERN_MATH(log1p)(v); }
  template <typename T> C10_HOST_DEVICE static T tanh(T v) { return FLOWKERN_MATH(tanh)(v); }
  template <typename T> C10_HOST_DEVICE static T atan(T v) { return FLOWKERN_MATH(atan)(v); }
  template <typename T> C10_HOST_DEVICE static T abs(T v) { return v < T(0) ? -v : v; }
  template <typename T> C10_HOST_DEVICE static T min(T a, T b) { return b < a ? b : a; }
  template <typename T> C10_HOST_DEVICE static T select_nonnegative(T z, T if_nonnegative, T if_negative) {
    return z >= T(0) ? if_nonnegative : if_negative;
  }
};

#undef FLOWKERN_MATH

// Glow's scale s = sigmoid(z), z = raw + 2, from e = e^{−|z|} ∈ (0, 1] and r = 1/(1+e): s = r for z ≥ 0,
// e·r otherwise, so that no exp overflows.
template <typename M, typename T>
C10_HOST_DEVICE inline void sigmoid_terms(T raw, T& z, T& e, T& r, T& s) {
  z = raw + T(2);
  e = M::exp(T(0) - M::abs(z));
  r = T(1) / (T(1) + e);
  s = M::select_nonnegative(z, r, e * r);
}

// The coupling's scale at raw, for the forward and inverse maps: s and log s.
//   Sigmoid (Glow):      s as above, log s = min(z, 0) − log1p(e). One exp and one log1p.
//   ReciprocalSigmoid:   s = 1/sigmoid(z), log s = log1p(e) − min(z, 0).
//   Exp (RealNVP):       log s = bound · tanh(raw), s = e^{log s}.
//   PlainExp:            log s = raw.
//   Atan (FrEIA):        log s = kAtanGain · bound · atan(raw).
//   OffsetSigmoid (nflows): s = sigmoid(z) + kSigmoidOffset, log s = log(s) (s ≥ kSigmoidOffset: no cancellation).
template <Scale S, typename M, typename T>
C10_HOST_DEVICE inline void scale_and_log(T raw, T bound, T& s, T& logs) {
  if constexpr (S == Scale::Sigmoid || S == Scale::ReciprocalSigmoid) {
    T z, e, r, sig;
    sigmoid_terms<M>(raw, z, e, r, sig);
    logs = M::min(z, T(0)) - M::log1p(e);
    if constexpr (S == Scale::ReciprocalSigmoid) {
      logs = T(0) - logs;
      s = T(1) / sig;
    } else {
      s = sig;
    }
  } else if constexpr (S == Scale::OffsetSigmoid) {
    T z, e, r, sig;
    sigmoid_terms<M>(raw, z, e, r, sig);
    s = sig + T(kSigmoidOffset);
    logs = M::log(s);
  } else {
    if constexpr (S == Scale::Exp) {
      logs = bound * M::tanh(raw);
    } else if constexpr (S == Scale::PlainExp) {
      logs = raw;
    } else {
      logs = T(kAtanGain) * bound * M::atan(raw);
    }
    s = M::exp(logs);
  }
}

// The scale at raw for the backward: s and d(log s)/d(raw), without a logarithm.
//   Sigmoid: d log s/d raw = 1 − sigmoid = e/(1+e) or 1/(1+e); ReciprocalSigmoid its negative.
//   Exp: bound · (1 − tanh²(raw)).   PlainExp: 1.   Atan: kAtanGain · bound / (1 + raw²).
//   OffsetSigmoid: sigmoid · (1 − sigmoid) / s.
template <Scale S, typename M, typename T>
C10_HOST_DEVICE inline void scale_and_slope(T raw, T bound, T& s, T& dlogs) {
  if constexpr (S == Scale::Sigmoid || S == Scale::ReciprocalSigmoid) {
    T z, e, r, sig;
    sigmoid_terms<M>(raw, z, e, r, sig);
    dlogs = M::select_nonnegative(z, e * r, r);
    if constexpr (S == Scale::ReciprocalSigmoid) {
      dlogs = T(0) - dlogs;
      s = T(1) / sig;
    } else {
      s = sig;
    }
  } else if constexpr (S == Scale::OffsetSigmoid) {
    T z, e, r, sig;
    sigmoid_terms<M>(raw, z, e, r, sig);
    s = sig + T(kSigmoidOffset);
    dlogs = sig * M::select_nonnegative(z, e * r, r) / s;
  } else if constexpr (S == Scale::Exp) {
    const T t = M::tanh(raw);
    s = M::exp(bound * t);
    dlogs = bound * (T(1) - t * t);
  } else if constexpr (S == Scale::PlainExp) {
    s = M::exp(raw);
    dlogs = T(1);
  } else {
    const T gain = T(kAtanGain) * bound;
    s = M::exp(gain * M::atan(raw));
    dlogs = gain / (T(1) + raw * raw);
  }
}

// The transformed element: forward y = x·s + shift, inverse x = (y − shift)/s.
template <bool Inverse, typename T>
C10_HOST_DEVICE inline T couple(T v, T s, T shift) {
  if constexpr (Inverse) {
    return (v - shift) / s;
  } else {
    return v * s + shift;
  }
}

// Gradients at a transformed element from the upstream gradient g of the op's output and gld of its
// log-det; v is the op's input.
//   forward  y = x·s + shift:      ∂x = g·s,  ∂shift = g,      ∂log s = g·x·s + gld
//   inverse  x = (y − shift)/s:    ∂y = g/s,  ∂shift = −g/s,   ∂log s = gld − g·x
template <Scale S, bool Inverse, typename M, typename T>
C10_HOST_DEVICE inline void couple_backward(T g, T gld, T v, T raw, T shift, T bound, T& grad_in, T& grad_raw,
                                            T& grad_shift) {
  if constexpr (S == Scale::Additive) {
    grad_in = g;
    grad_shift = Inverse ? T(0) - g : g;
    grad_raw = T(0);
  } else {
    T s, dlogs;
    scale_and_slope<S, M>(raw, bound, s, dlogs);
    T glogs;
    if constexpr (Inverse) {
      grad_in = g / s;
      grad_shift = T(0) - grad_in;
      glogs = gld - grad_in * (v - shift);
    } else {
      grad_in = g * s;
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

// The channels of a coupling: the n_t transformed ones from t_start, and where transformed channel k finds its
// terms in h: raw in plane raw_first + step·k, shift in plane shift_first + step·k (the layout).
struct CouplingChannels {
  int64_t t_start, n_t, raw_first, shift_first, step;
  C10_HOST_DEVICE int64_t raw_plane(int64_t k) const { return raw_first + step * k; }
  C10_HOST_DEVICE int64_t shift_plane(int64_t k) const { return shift_first + step * k; }
};

C10_HOST_DEVICE inline bool checkerboard_active(int64_t i, int64_t j, int64_t parity) {
  return (i + j + parity) % 2 == 1;
}

}  // namespace flowkern
