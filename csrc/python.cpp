// The Python module sfron_ops._C (Python build only): importing it loads this library, whose
// TORCH_LIBRARY_IMPL registrars add the compiled kernels to the schemas of sfron_ops/_ops.py.
//
// It also gives each op a direct entry for eager calls. torch.ops reaches a kernel through the
// boxed calling convention, turning every tensor of every list into an IValue and back; for a
// step over a few dozen small tensors that conversion costs several times the kernel's own host
// work. These entries parse the same arguments (same names, same keyword-only scalars) straight
// into C++ lists and make an unboxed dispatcher call, so the dispatcher still picks the device
// kernel (through the Autograd kernel of csrc/autograd.cpp). Traced code uses torch.ops.
#ifdef SFRON_OPS_PY_MODULE
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <c10/util/StringUtil.h>
#include <torch/csrc/autograd/python_variable.h>

#include <sfron_ops/ops.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/tile_abi.h"

namespace sfron_ops::python {
namespace {

// A list or tuple of tensors as a vector (the references Python holds keep them alive too).
std::vector<at::Tensor> tensors(PyObject* obj, const char* op, const char* name) {
  if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
    throw torch::TypeError(c10::str(op, ": ", name, " must be a list of tensors, got ", Py_TYPE(obj)->tp_name));
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) {
      throw torch::TypeError(c10::str(op, ": ", name, "[", i, "] must be a tensor, got ", Py_TYPE(items[i])->tp_name));
    }
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return out;
}

std::optional<at::Tensor> optional_tensor(PyObject* obj, const char* op, const char* name) {
  if (obj == nullptr || obj == Py_None) return std::nullopt;
  if (!THPVariable_Check(obj)) {
    throw torch::TypeError(c10::str(op, ": ", name, " must be a tensor or None, got ", Py_TYPE(obj)->tp_name));
  }
  return THPVariable_Unpack(obj);
}

at::Tensor tensor(PyObject* obj, const char* op, const char* name) {
  std::optional<at::Tensor> t = optional_tensor(obj, op, name);
  if (!t) throw torch::TypeError(c10::str(op, ": ", name, " must be a tensor, got None"));
  return *t;
}

// A keyword-only float argument (a Python int or float; required).
double number(PyObject* obj, const char* op, const char* name) {
  if (obj == nullptr) throw torch::TypeError(c10::str(op, ": missing the keyword argument ", name));
  if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyLong_Check(obj))) {
    throw torch::TypeError(c10::str(op, ": ", name, " must be a number, got ", Py_TYPE(obj)->tp_name));
  }
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  return value;
}

// A keyword-only bool argument (required unless it has a default).
bool flag(PyObject* obj, const char* op, const char* name, std::optional<bool> fallback = std::nullopt) {
  if (obj == nullptr) {
    if (!fallback) throw torch::TypeError(c10::str(op, ": missing the keyword argument ", name));
    return *fallback;
  }
  if (!PyBool_Check(obj)) throw torch::TypeError(c10::str(op, ": ", name, " must be a bool, got ", Py_TYPE(obj)->tp_name));
  return obj == Py_True;
}

// The GIL is released around the kernel; the argument vectors outlive it, so no tensor reference
// count drops to Python's while the GIL is not held.
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

PyObject* masked_sq_norm(PyObject*, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static const char* names[] = {"grads", "masks", "norm_state", "alpha", "packed_masks", "alpha_tensor", nullptr};
  PyObject *grads, *masks, *norm_state, *alpha = nullptr, *packed = nullptr, *alpha_tensor = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOO:masked_sq_norm_", const_cast<char**>(names), &grads,
                                   &masks, &norm_state, &alpha, &packed, &alpha_tensor)) {
    return nullptr;
  }
  constexpr const char* op = "masked_sq_norm_";
  const auto g = tensors(grads, op, "grads"), m = tensors(masks, op, "masks");
  const at::Tensor ns = tensor(norm_state, op, "norm_state");
  const auto at_ = optional_tensor(alpha_tensor, op, "alpha_tensor");
  const double a = number(alpha, op, "alpha");
  const bool pk = flag(packed, op, "packed_masks", false);
  static const auto call = ops::handle<ops::MaskedSqNorm>("sfron_ops::masked_sq_norm_");
  {
    const WithoutGil no_gil;
    call.call(g, m, ns, a, pk, at_);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* sgd_update(PyObject*, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static const char* names[] = {"params", "grads", "masks", "momentum_buffers", "steps", "norm_state", "lr",
                                "scale", "momentum", "dampening", "weight_decay", "nesterov", "max_norm",
                                "packed_masks", "lr_tensor", "scale_tensor", nullptr};
  PyObject *params, *grads, *masks, *bufs, *steps, *norm_state;
  PyObject *lr = nullptr, *scale = nullptr, *momentum = nullptr, *dampening = nullptr, *weight_decay = nullptr,
           *nesterov = nullptr, *max_norm = nullptr, *packed = nullptr, *lr_tensor = nullptr, *scale_tensor = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|$OOOOOOOOOO:sgd_update_", const_cast<char**>(names),
                                   &params, &grads, &masks, &bufs, &steps, &norm_state, &lr, &scale, &momentum,
                                   &dampening, &weight_decay, &nesterov, &max_norm, &packed, &lr_tensor,
                                   &scale_tensor)) {
    return nullptr;
  }
  constexpr const char* op = "sgd_update_";
  const auto p = tensors(params, op, "params"), g = tensors(grads, op, "grads"), m = tensors(masks, op, "masks"),
             b = tensors(bufs, op, "momentum_buffers"), s = tensors(steps, op, "steps");
  const auto ns = optional_tensor(norm_state, op, "norm_state"), lt = optional_tensor(lr_tensor, op, "lr_tensor"),
             st = optional_tensor(scale_tensor, op, "scale_tensor");
  const double lr_ = number(lr, op, "lr"), scale_ = number(scale, op, "scale"),
               momentum_ = number(momentum, op, "momentum"), dampening_ = number(dampening, op, "dampening"),
               wd = number(weight_decay, op, "weight_decay"), max_norm_ = number(max_norm, op, "max_norm");
  const bool nesterov_ = flag(nesterov, op, "nesterov"), pk = flag(packed, op, "packed_masks", false);
  static const auto call = ops::handle<ops::SgdUpdate>("sfron_ops::sgd_update_");
  {
    const WithoutGil no_gil;
    call.call(p, g, m, b, s, ns, lr_, scale_, momentum_, dampening_, wd, nesterov_, max_norm_, pk, lt, st);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* adamw_update(PyObject*, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static const char* names[] = {"params", "grads", "masks", "exp_avgs", "exp_avg_sqs", "steps", "norm_state", "lr",
                                "scale", "beta1", "beta2", "eps", "weight_decay", "max_norm", "packed_masks",
                                "lr_tensor", "scale_tensor", nullptr};
  PyObject *params, *grads, *masks, *m1, *m2, *steps, *norm_state;
  PyObject *lr = nullptr, *scale = nullptr, *beta1 = nullptr, *beta2 = nullptr, *eps = nullptr,
           *weight_decay = nullptr, *max_norm = nullptr, *packed = nullptr, *lr_tensor = nullptr,
           *scale_tensor = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOO|$OOOOOOOOOO:adamw_update_", const_cast<char**>(names),
                                   &params, &grads, &masks, &m1, &m2, &steps, &norm_state, &lr, &scale, &beta1,
                                   &beta2, &eps, &weight_decay, &max_norm, &packed, &lr_tensor, &scale_tensor)) {
    return nullptr;
  }
  constexpr const char* op = "adamw_update_";
  const auto p = tensors(params, op, "params"), g = tensors(grads, op, "grads"), m = tensors(masks, op, "masks"),
             a = tensors(m1, op, "exp_avgs"), q = tensors(m2, op, "exp_avg_sqs"), s = tensors(steps, op, "steps");
  const auto ns = optional_tensor(norm_state, op, "norm_state"), lt = optional_tensor(lr_tensor, op, "lr_tensor"),
             st = optional_tensor(scale_tensor, op, "scale_tensor");
  const double lr_ = number(lr, op, "lr"), scale_ = number(scale, op, "scale"), b1 = number(beta1, op, "beta1"),
               b2 = number(beta2, op, "beta2"), eps_ = number(eps, op, "eps"),
               wd = number(weight_decay, op, "weight_decay"), max_norm_ = number(max_norm, op, "max_norm");
  const bool pk = flag(packed, op, "packed_masks", false);
  static const auto call = ops::handle<ops::AdamwUpdate>("sfron_ops::adamw_update_");
  {
    const WithoutGil no_gil;
    call.call(p, g, m, a, q, s, ns, lr_, scale_, b1, b2, eps_, wd, max_norm_, pk, lt, st);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* fisher_accumulate(PyObject*, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static const char* names[] = {"fishers", "grads", "scale", nullptr};
  PyObject *fishers, *grads, *scale = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O:fisher_accumulate_", const_cast<char**>(names), &fishers,
                                   &grads, &scale)) {
    return nullptr;
  }
  constexpr const char* op = "fisher_accumulate_";
  const auto f = tensors(fishers, op, "fishers"), g = tensors(grads, op, "grads");
  const double scale_ = number(scale, op, "scale");
  static const auto call = ops::handle<ops::FisherAccumulate>("sfron_ops::fisher_accumulate_");
  {
    const WithoutGil no_gil;
    call.call(f, g, scale_);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* saliency_mask(PyObject*, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static const char* names[] = {"forget_fishers", "remain_fishers", "masks", "kept", "gamma", nullptr};
  PyObject *forget, *remain, *masks, *kept, *gamma = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$O:saliency_mask_", const_cast<char**>(names), &forget,
                                   &remain, &masks, &kept, &gamma)) {
    return nullptr;
  }
  constexpr const char* op = "saliency_mask_";
  const auto f = tensors(forget, op, "forget_fishers"), r = tensors(remain, op, "remain_fishers"),
             m = tensors(masks, op, "masks");
  const at::Tensor k = tensor(kept, op, "kept");
  const double gamma_ = number(gamma, op, "gamma");
  static const auto call = ops::handle<ops::SaliencyMask>("sfron_ops::saliency_mask_");
  {
    const WithoutGil no_gil;
    call.call(f, r, m, k, gamma_);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* slow_sync(PyObject*, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  static const char* names[] = {"slow_params", "params", "alpha", "reset_fast", "norm_state", "counter", "period",
                                nullptr};
  PyObject *slow, *params, *alpha = nullptr, *reset_fast = nullptr, *norm_state = nullptr, *counter = nullptr,
           *period = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$OOOOO:slow_sync_", const_cast<char**>(names), &slow, &params,
                                   &alpha, &reset_fast, &norm_state, &counter, &period)) {
    return nullptr;
  }
  constexpr const char* op = "slow_sync_";
  const auto s = tensors(slow, op, "slow_params"), p = tensors(params, op, "params");
  const auto ns = optional_tensor(norm_state, op, "norm_state"), c = optional_tensor(counter, op, "counter");
  const double alpha_ = number(alpha, op, "alpha");
  const bool reset = flag(reset_fast, op, "reset_fast");
  int64_t period_ = 1;
  if (period != nullptr) {
    if (PyBool_Check(period) || !PyLong_Check(period)) {
      throw torch::TypeError(c10::str(op, ": period must be an int, got ", Py_TYPE(period)->tp_name));
    }
    period_ = PyLong_AsLongLong(period);
    if (period_ == -1 && PyErr_Occurred()) throw python_error();
  }
  static const auto call = ops::handle<ops::SlowSync>("sfron_ops::slow_sync_");
  {
    const WithoutGil no_gil;
    call.call(s, p, alpha_, reset, ns, c, period_);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// Two bytes per item of a list of gradients: (0, 0) for None, else (1 + dtype, layout). A step compares
// this with its plan's (sfron_ops.functional); reading dtype and layout through Python costs about ten
// times as much, a sizeable part of a step over a few dozen small tensors.
PyObject* grad_signature(PyObject*, PyObject* obj) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
    throw torch::TypeError(c10::str("grad_signature: expected a list, got ", Py_TYPE(obj)->tp_name));
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  std::string out(static_cast<size_t>(2 * n), '\0');
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (items[i] == Py_None) continue;
    if (!THPVariable_Check(items[i])) {
      throw torch::TypeError(c10::str("grad_signature: item ", i, " is a ", Py_TYPE(items[i])->tp_name));
    }
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    out[2 * i] = static_cast<char>(1 + static_cast<int>(t.scalar_type()));
    out[2 * i + 1] = static_cast<char>(t.layout());
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
  END_HANDLE_TH_ERRORS
}

// The instruction set of the CPU tile math in use, for reports and benchmarks.
PyObject* cpu_isa(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(sfron_ops::cpu::tile_kernels().name);
  END_HANDLE_TH_ERRORS
}

#define SFRON_OP_ENTRY(name, fn) \
  {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_VARARGS | METH_KEYWORDS, nullptr}

PyMethodDef methods[] = {
    SFRON_OP_ENTRY("masked_sq_norm_", masked_sq_norm),
    SFRON_OP_ENTRY("sgd_update_", sgd_update),
    SFRON_OP_ENTRY("adamw_update_", adamw_update),
    SFRON_OP_ENTRY("fisher_accumulate_", fisher_accumulate),
    SFRON_OP_ENTRY("saliency_mask_", saliency_mask),
    SFRON_OP_ENTRY("slow_sync_", slow_sync),
    {"grad_signature", grad_signature, METH_O, "Each gradient's dtype and layout (None: none) as bytes."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels run with (default, avx2, avx512)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace sfron_ops::python

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled sfron_ops kernels: importing this module registers them with the dispatcher; its functions are "
      "the ops' direct entries for eager calls.",
      -1,
      sfron_ops::python::methods,
  };
  return PyModule_Create(&module);
}
#endif
