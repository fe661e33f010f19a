// The library's entry points.
//
// Python build (setup.py defines SFRON_OPS_PY_MODULE): `sfron_ops._C` is an
// empty Python module. Importing it loads this shared object, whose static
// TORCH_LIBRARY_IMPL registrars add the CPU and CUDA kernels to the schemas
// that sfron_ops/_ops.py has already defined; the schemas live in Python so
// the package works without the compiled part.
//
// Stand-alone build (CMakeLists.txt defines SFRON_OPS_STANDALONE): there is no
// Python to define the schemas, so the fragment below does. Its strings must
// equal sfron_ops/_ops.py's SCHEMAS; tests/test_fused.py compares the two.
#ifdef SFRON_OPS_PY_MODULE
#include <Python.h>

#include "cpu/tile_abi.h"
#endif

#ifdef SFRON_OPS_STANDALONE
#include <torch/library.h>

// clang-format off
TORCH_LIBRARY(sfron_ops, m) {
  m.def("masked_sq_norm_(Tensor[] grads, Tensor[] masks, Tensor(a!) norm_state, *, float alpha, "
        "bool packed_masks=False, Tensor? alpha_tensor=None) -> ()");
  m.def("sgd_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] masks, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] steps, Tensor? norm_state, *, float lr, float scale, float momentum, float dampening, "
        "float weight_decay, bool nesterov, float max_norm, bool packed_masks=False, Tensor? lr_tensor=None, "
        "Tensor? scale_tensor=None) -> ()");
  m.def("adamw_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] masks, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor? norm_state, *, float lr, float scale, "
        "float beta1, float beta2, float eps, float weight_decay, float max_norm, bool packed_masks=False, "
        "Tensor? lr_tensor=None, Tensor? scale_tensor=None) -> ()");
  m.def("fisher_accumulate_(Tensor(a!)[] fishers, Tensor[] grads, *, float scale) -> ()");
  m.def("saliency_mask_(Tensor[] forget_fishers, Tensor[] remain_fishers, Tensor(a!)[] masks, "
        "Tensor(b!) kept, *, float gamma) -> ()");
  m.def("slow_sync_(Tensor(a!)[] slow_params, Tensor(b!)[] params, *, float alpha, bool reset_fast, "
        "Tensor? norm_state=None, Tensor(c!)? counter=None, int period=1) -> ()");
}
// clang-format on
#endif

#ifdef SFRON_OPS_PY_MODULE
namespace {

// The instruction set of the CPU tile math in use, for reports and benchmarks.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sfron_ops::cpu::tile_kernels().name);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels run with (default, avx2, avx512)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled sfron_ops kernels; importing this module registers them with the dispatcher.",
      -1,
      methods,
  };
  return PyModule_Create(&module);
}
#endif
