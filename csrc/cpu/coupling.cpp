// Coupling on the CPU: one pass per (sample, channel) plane, parallel over planes, vectorised along the
// plane in the math type (16-bit inputs and outputs converted on load and store). Each transformed plane
// writes its Σ log s; a sample's log-det sums them in channel order, so it does not depend on the number of
// threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../flowkern/checks.h"
#include "vec_math.h"

namespace flowkern {
namespace {

using at::vec::Vectorized;

// One transformed element in the arithmetic dtype; adds its log s to total. For additive coupling, raw is
// the shift (h holds nothing else) and is not used.
template <Scale S, bool Inverse, typename acc_t>
inline acc_t transform_element(acc_t v, acc_t raw, acc_t shift, acc_t bound, acc_t& total) {
  if constexpr (S == Scale::Additive) {
    return Inverse ? v - shift : v + shift;
  } else {
    acc_t s, logs;
    scale_and_log<S, ScalarMath>(raw, bound, s, logs);
    total += logs;
    return couple<Inverse>(v, s, shift);
  }
}

// One transformed plane of the channel mask; returns its Σ log s. h (raw, shift) may be of lower precision.
template <Scale S, bool Inverse, typename scalar_t, typename h_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t transform_plane(const scalar_t* x, const h_t* raw, const h_t* shift, scalar_t* out, int64_t len,
                      acc_t bound) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  Vec sum(acc_t(0));
  for (; i + Vec::size() <= len; i += Vec::size()) {
    const Vec v = load_as<acc_t>(x + i), sh = load_as<acc_t>(shift + i);
    if constexpr (S == Scale::Additive) {
      store_as(Inverse ? v - sh : v + sh, out + i);
    } else {
      Vec s, logs;
      scale_and_log<S, VecMath>(load_as<acc_t>(raw + i), Vec(bound), s, logs);
      store_as(couple<Inverse>(v, s, sh), out + i);
      sum = sum + logs;
    }
  }
  acc_t total = lane_sum(sum);
  for (; i < len; ++i) out[i] = transform_element<S, Inverse>(acc_t(x[i]), acc_t(raw[i]), acc_t(shift[i]), bound, total);
  return total;
}

// One plane of the checkerboard: only pixels with (i + j + parity) odd are transformed.
template <Scale S, bool Inverse, typename scalar_t, typename h_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t transform_checkerboard_plane(const scalar_t* x, const h_t* raw, const h_t* shift, scalar_t* out,
                                   int64_t height, int64_t width, int64_t parity, acc_t bound) {
  acc_t total = 0;
  for (int64_t i = 0; i < height; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      const int64_t p = i * width + j;
      if (!checkerboard_active(i, j, parity)) {
        out[p] = x[p];
        continue;
      }
      out[p] = transform_element<S, Inverse>(acc_t(x[p]), acc_t(raw[p]), acc_t(shift[p]), bound, total);
    }
  }
  return total;
}

// The coupling over every (sample, channel) plane, planes in parallel; then each sample's log-det from its
// transformed planes' sums, in channel order.
template <Scale S, bool Inverse, typename scalar_t, typename h_t>
void couple_planes(const at::Tensor& x, const at::Tensor& h, const CouplingOptions& o, at::Tensor& out,
                   at::Tensor& partial, at::Tensor& logdet) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), c = x.size(1), height = x.size(2), width = x.size(3), hw = height * width;
  const CouplingChannels ch = o.channels;
  const acc_t bound = static_cast<acc_t>(o.bound);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const h_t* hp = h.const_data_ptr<h_t>();
  scalar_t* op_out = out.mutable_data_ptr<scalar_t>();
  acc_t* part = partial.mutable_data_ptr<acc_t>();
  const int64_t xsn = x.stride(0), xsc = x.stride(1), hsn = h.stride(0), hsc = h.stride(1);
  at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row / c, k_all = row % c;
      const scalar_t* x_row = xp + s * xsn + k_all * xsc;
      scalar_t* out_row = op_out + row * hw;
      const int64_t k = k_all - ch.t_start;
      if (k < 0 || k >= ch.n_t) {  // pass-through channel
        std::copy(x_row, x_row + hw, out_row);
        continue;
      }
      const h_t* raw = hp + s * hsn + ch.raw_plane(k) * hsc;
      const h_t* shift = hp + s * hsn + ch.shift_plane(k) * hsc;
      part[s * ch.n_t + k] =
          o.checkerboard
              ? transform_checkerboard_plane<S, Inverse>(x_row, raw, shift, out_row, height, width, o.parity, bound)
              : transform_plane<S, Inverse>(x_row, raw, shift, out_row, hw, bound);
    }
  });
  acc_t* ld = logdet.mutable_data_ptr<acc_t>();
  for (int64_t s = 0; s < n; ++s) {
    acc_t total = 0;
    for (int64_t k = 0; k < ch.n_t; ++k) total += part[s * ch.n_t + k];
    ld[s] = total;
  }
}

template <bool Inverse>
std::tuple<at::Tensor, at::Tensor> coupling_cpu(const at::Tensor& x_in, const at::Tensor& h_in,
                                                c10::string_view mask, int64_t parity, c10::string_view scale,
                                                double bound, c10::string_view layout) {
  const char* op = Inverse ? "flowkern::coupling_inverse" : "flowkern::coupling_forward";
  const CouplingOptions o = coupling_options(x_in, h_in, mask, parity, scale, bound, layout, op);
  const at::Tensor x = inner_dense(x_in), h = inner_dense(h_in);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor partial = at::empty({x.size(0), o.channels.n_t}, x.options().dtype(acc_dtype));
  at::Tensor logdet = at::empty({x.size(0)}, x.options().dtype(acc_dtype));
  dispatch_coupling(x.scalar_type(), h.scalar_type(), o.scale, Inverse,
                    [&]<Scale S, bool Inv, typename scalar_t, typename h_t>() {
                      couple_planes<S, Inv, scalar_t, h_t>(x, h, o, out, partial, logdet);
                    });
  return {out, logdet};
}

// Gradients of one transformed plane; for the checkerboard, pass-through pixels get ∂in = g, ∂h = 0.
template <Scale S, bool Inverse, typename scalar_t, typename h_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_plane(const scalar_t* g, acc_t gld, const scalar_t* v, const h_t* raw, const h_t* shift,
                    scalar_t* grad_in, h_t* grad_raw, h_t* grad_shift, int64_t height, int64_t width,
                    bool checkerboard, int64_t parity, acc_t bound) {
  const int64_t len = height * width;
  int64_t p = 0;
  if (!checkerboard) {
    using Vec = Vectorized<acc_t>;
    for (; p + Vec::size() <= len; p += Vec::size()) {
      Vec gin, graw, gshift;
      const Vec r = S == Scale::Additive ? Vec(acc_t(0)) : load_as<acc_t>(raw + p);
      const Vec sh = S == Scale::Additive ? Vec(acc_t(0)) : load_as<acc_t>(shift + p);
      couple_backward<S, Inverse, VecMath>(load_as<acc_t>(g + p), Vec(gld), load_as<acc_t>(v + p), r, sh, Vec(bound),
                                           gin, graw, gshift);
      store_as(gin, grad_in + p);
      store_as(gshift, grad_shift + p);
      if constexpr (S != Scale::Additive) store_as(graw, grad_raw + p);
    }
  }
  for (; p < len; ++p) {
    if (checkerboard && !checkerboard_active(p / width, p % width, parity)) {
      grad_in[p] = g[p];
      grad_shift[p] = h_t(0);
      if constexpr (S != Scale::Additive) grad_raw[p] = h_t(0);
      continue;
    }
    acc_t gin, graw, gshift;
    const acc_t r = S == Scale::Additive ? acc_t(0) : acc_t(raw[p]);
    const acc_t sh = S == Scale::Additive ? acc_t(0) : acc_t(shift[p]);
    couple_backward<S, Inverse, ScalarMath>(acc_t(g[p]), gld, acc_t(v[p]), r, sh, bound, gin, graw, gshift);
    grad_in[p] = static_cast<scalar_t>(gin);
    grad_shift[p] = static_cast<h_t>(gshift);
    if constexpr (S != Scale::Additive) grad_raw[p] = static_cast<h_t>(graw);
  }
}

// The gradients over every (sample, channel) plane, planes in parallel: a pass-through plane's ∂in is g.
template <Scale S, bool Inverse, typename scalar_t, typename h_t>
void couple_planes_backward(const at::Tensor& g, const at::Tensor& gld, const at::Tensor& v, const at::Tensor& h,
                            const CouplingOptions& o, at::Tensor& grad_in, at::Tensor& grad_h) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = v.size(0), c = v.size(1), height = v.size(2), width = v.size(3), hw = height * width;
  const int64_t h_channels = h.size(1);
  const CouplingChannels ch = o.channels;
  const acc_t* gldp = gld.const_data_ptr<acc_t>();
  const scalar_t *gp = g.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
  const h_t* hp = h.const_data_ptr<h_t>();
  scalar_t* gin = grad_in.mutable_data_ptr<scalar_t>();
  h_t* gh = grad_h.mutable_data_ptr<h_t>();
  at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t s = row / c, k = row % c - ch.t_start;
      if (k < 0 || k >= ch.n_t) {
        std::copy(gp + row * hw, gp + (row + 1) * hw, gin + row * hw);
        continue;
      }
      const int64_t raw_row = (s * h_channels + ch.raw_plane(k)) * hw;
      const int64_t shift_row = (s * h_channels + ch.shift_plane(k)) * hw;
      backward_plane<S, Inverse>(gp + row * hw, gldp[s], vp + row * hw, hp + raw_row, hp + shift_row, gin + row * hw,
                                 gh + raw_row, gh + shift_row, height, width, o.checkerboard, o.parity,
                                 static_cast<acc_t>(o.bound));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> coupling_backward_cpu(const at::Tensor& grad_out_in,
                                                         const at::Tensor& grad_logdet, const at::Tensor& input_in,
                                                         const at::Tensor& h_in, c10::string_view mask,
                                                         int64_t parity, c10::string_view scale, double bound,
                                                         c10::string_view layout, bool inverse) {
  const char* op = "flowkern::coupling_backward";
  const CouplingOptions o = coupling_options(input_in, h_in, mask, parity, scale, bound, layout, op);
  check_grad_out(grad_out_in, input_in, op);
  check_vector(grad_logdet, input_in.size(0), input_in, "grad_logdet", op);
  const at::Tensor g = grad_out_in.contiguous(), v = input_in.contiguous(), h = h_in.contiguous();
  const at::Tensor gld = grad_logdet.to(at::toOpMathType(v.scalar_type())).contiguous();
  at::Tensor grad_in = at::empty_like(v, at::MemoryFormat::Contiguous);
  at::Tensor grad_h = at::empty_like(h, at::MemoryFormat::Contiguous);
  dispatch_coupling(v.scalar_type(), h.scalar_type(), o.scale, inverse,
                    [&]<Scale S, bool Inverse, typename scalar_t, typename h_t>() {
                      couple_planes_backward<S, Inverse, scalar_t, h_t>(g, gld, v, h, o, grad_in, grad_h);
                    });
  return {grad_in, grad_h};
}

}  // namespace

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("coupling_forward", &coupling_cpu<false>);
  m.impl("coupling_inverse", &coupling_cpu<true>);
  m.impl("coupling_backward", &coupling_backward_cpu);
}

}  // namespace flowkern
