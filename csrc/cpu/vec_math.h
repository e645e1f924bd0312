// The math policy over at::vec::Vectorized, so the CPU kernels run flowkern/math.h a vector at a time.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace flowkern {

// log1p and tanh without Sleef's general log1p and tanh, which cost here several times an exp.
struct VecMath {
  template <typename V> static V exp(const V& v) { return v.exp(); }
  template <typename V> static V log(const V& v) { return v.log(); }

  // log(1 + u) for u in [0, 1] (the kernels pass e^{−|z|}): 2·atanh(v) with v = u / (2 + u) ≤ 1/3, whose
  // odd series 2·(v + v³/3 + v⁵/5 + …) reaches the type's precision within 8 terms (float) or 17 (double).
  template <typename V> static V log1p(const V& u) {
    using T = typename V::value_type;
    constexpr int terms = sizeof(T) == 4 ? 8 : 17;
    const V v = u / (V(T(2)) + u);
    const V v2 = v * v;
    V series(T(1) / (2 * terms - 1));
    for (int k = terms - 2; k >= 0; --k) series = at::vec::fmadd(series, v2, V(T(1) / (2 * k + 1)));
    return V(T(2)) * v * series;
  }

  // tanh(a) = ±(1 − e)/(1 + e) with e = e^{−2|a|}, and its Taylor series below |a| = 0.05, where 1 − e
  // cancels (the first omitted term is below 1e-15 relative there).
  template <typename V> static V tanh(const V& a) {
    using T = typename V::value_type;
    const V x = a.abs();
    const V e = (V(T(-2)) * x).exp();
    const V big = (V(1) - e) / (V(1) + e);
    const V x2 = x * x;
    const V small =
        x * (V(1) - x2 * (V(T(1) / 3) - x2 * (V(T(2) / 15) - x2 * (V(T(17) / 315) - x2 * V(T(62) / 2835)))));
    const V t = V::blendv(big, small, x < V(T(0.05)));
    return V::blendv(t, V(0) - t, a < V(0));
  }

  template <typename V> static V atan(const V& v) { return v.atan(); }
  template <typename V> static V abs(const V& v) { return v.abs(); }
  template <typename V> static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  template <typename V> static V select_nonnegative(const V& z, const V& if_nonnegative, const V& if_negative) {
    return V::blendv(if_negative, if_nonnegative, z >= V(0));
  }
};

// A vector of T from Vectorized<T>::size() elements of type S: a plain load when S is T; otherwise each
// element converted (a lower-precision h read into the kernels' arithmetic type).
template <typename T, typename S>
at::vec::Vectorized<T> load_as(const S* p) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, S>) {
    return Vec::loadu(p);
  } else {
    T lanes[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<T>(p[i]);
    return Vec::loadu(lanes);
  }
}

// v stored as Vectorized<T>::size() elements of type S, each rounded to S when S is not T.
template <typename S, typename T>
void store_as(const at::vec::Vectorized<T>& v, S* p) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, S>) {
    v.store(p);
  } else {
    T lanes[Vec::size()];
    v.store(lanes);
    for (int64_t i = 0; i < Vec::size(); ++i) p[i] = static_cast<S>(lanes[i]);
  }
}

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
