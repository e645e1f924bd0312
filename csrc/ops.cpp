// The op schemas of the flowkern namespace (the same as flowkern/backends/_ops.py SCHEMAS). Kernels are
// registered per device in cpu/ and cuda/; fake implementations and autograd on the Python side.
#include <torch/library.h>

TORCH_LIBRARY(flowkern, m) {
  m.def("coupling_forward(Tensor x, Tensor h, str mask, int parity, str scale, float bound) -> (Tensor, Tensor)");
  m.def("coupling_inverse(Tensor x, Tensor h, str mask, int parity, str scale, float bound) -> (Tensor, Tensor)");
  m.def("coupling_backward(Tensor grad_out, Tensor grad_logdet, Tensor input, Tensor h, str mask, int parity, "
        "str scale, float bound, bool inverse) -> (Tensor, Tensor)");
  m.def("actnorm(Tensor x, Tensor log_scale, Tensor bias, bool inverse) -> Tensor");
  m.def("actnorm_backward(Tensor grad_out, Tensor input, Tensor log_scale, Tensor bias, bool inverse) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv1x1(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("conv1x1_weight_grad(Tensor grad_out, Tensor x) -> (Tensor, Tensor)");
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
