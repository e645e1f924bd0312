// The op schemas of the flowkern namespace (the same as flowkern/backends/_ops.py SCHEMAS). Kernels are
// registered per device in cpu/ and cuda/; fake implementations and autograd on the Python side. Beside them,
// _cuda_launch: the CUDA kernels' launch shapes, read by the static performance model.
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <vector>

#include "flowkern/launch.h"

namespace {

// The launch shape of a CUDA kernel (flowkern/launch.h) over n samples of c channels (c → c for the 1×1 conv)
// of hw pixels of dtype: [grid_x, grid_y, threads per block, dynamic shared bytes, pixels per block, elements
// of each input a thread requests at once]. `wave`: the blocks of the weight gradient that fit on the device at once. For the
// static performance model; launches nothing.
std::vector<int64_t> cuda_launch(c10::string_view kernel, int64_t n, int64_t c, int64_t hw, c10::ScalarType dtype,
                                 int64_t wave) {
  TORCH_CHECK(n > 0 && c > 0 && hw > 0, "flowkern::_cuda_launch: expected positive n, c and hw, got ", n, ", ", c,
              ", ", hw);
  TORCH_CHECK(c10::isFloatingType(dtype), "flowkern::_cuda_launch: expected a floating-point dtype, got ", dtype);
  const int64_t element_size = c10::elementSize(dtype), acc_size = c10::elementSize(at::toOpMathType(dtype));
  namespace launch = flowkern::launch;
  launch::Launch l{};
  if (kernel == "coupling") {
    l = launch::coupling(n, c, hw);
  } else if (kernel == "actnorm") {
    l = launch::actnorm(n, c, hw, element_size);
  } else if (kernel == "conv1x1") {
    l = launch::conv1x1(n, c, c, hw, element_size, acc_size);
  } else if (kernel == "conv1x1_weight_grad") {
    l = launch::conv1x1_weight_grad(n, c, c, hw, element_size, wave);
  } else {
    TORCH_CHECK(false, "flowkern::_cuda_launch: expected kernel 'coupling', 'actnorm', 'conv1x1' or ",
                "'conv1x1_weight_grad', got '", kernel, "'");
  }
  return {l.grid_x, l.grid_y, flowkern::launch::kThreads, l.shared_bytes, l.tile, l.ahead};
}

}  // namespace

TORCH_LIBRARY(flowkern, m) {
  m.def("coupling_forward(Tensor x, Tensor h, str mask, int parity, str scale, float bound, str layout) -> "
        "(Tensor, Tensor)");
  m.def("coupling_inverse(Tensor x, Tensor h, str mask, int parity, str scale, float bound, str layout) -> "
        "(Tensor, Tensor)");
  m.def("coupling_backward(Tensor grad_out, Tensor grad_logdet, Tensor input, Tensor h, str mask, int parity, "
        "str scale, float bound, str layout, bool inverse) -> (Tensor, Tensor)");
  m.def("actnorm(Tensor x, Tensor log_scale, Tensor bias, bool inverse) -> Tensor");
  m.def("actnorm_backward(Tensor grad_out, Tensor input, Tensor log_scale, Tensor bias, bool inverse) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv1x1(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("conv1x1_weight_grad(Tensor grad_out, Tensor x) -> (Tensor, Tensor)");
  m.def("folded_lu_weight(Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s, Tensor log_scale, "
        "Tensor bias) -> (Tensor, Tensor, Tensor)");
  m.def("folded_lu_weight_backward(Tensor grad_weight, Tensor grad_bias, Tensor grad_per_pixel, Tensor perm, "
        "Tensor lower, Tensor upper, Tensor sign, Tensor log_s, Tensor log_scale, Tensor bias, Tensor weight) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("folded_lu_weight_inverse(Tensor perm, Tensor lower, Tensor upper, Tensor sign, Tensor log_s, "
        "Tensor log_scale, Tensor bias) -> (Tensor, Tensor)");
  m.def("fold_actnorms(Tensor weight1, Tensor log_scale1, Tensor weight2, Tensor log_scale2) -> (Tensor, Tensor)");
  m.def("fold_actnorms_backward(Tensor grad1, Tensor weight1, Tensor log_scale1, Tensor grad2, Tensor weight2, "
        "Tensor log_scale2) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_cuda_launch(str kernel, int n, int c, int hw, ScalarType dtype, int wave=0) -> int[]", &cuda_launch);
}

#ifdef FLOWKERN_PYTHON_MODULE
// Importing flowkern._C loads this library, which registers the ops; the module itself is empty.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "flowkern's compiled ops (torch.ops.flowkern)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
#endif
