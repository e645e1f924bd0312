// The math policy over at::vec::Vectorized, so the CPU kernels run flowkern/math.h a vector at a time.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace flowkern {

struct VecMath {
  template <typename V> static V exp(const V& v) { return v.exp(); }
  template <typename V> static V log1p(const V& v) { return v.log1p(); }
  template <typename V> static V tanh(const V& v) { return v.tanh(); }
  template <typename V> static V abs(const V& v) { return v.abs(); }
  template <typename V> static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  template <typename V> static V select_nonnegative(const V& z, const V& if_nonnegative, const V& if_negative) {
    return V::blendv(if_negative, if_nonnegative, z >= V(0));
  }
};

// The lanes of v summed in lane order: the same order on every run.
template <typename T>
T lane_sum(const at::vec::Vectorized<T>& v) {
  T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t i = 0; i < at::vec::Vectorized<T>::size(); ++i) total += lanes[i];
  return total;
}

}  // namespace flowkern
