// The op schemas of the stand-alone library.
//
// Python build: the schemas live in sfron_ops/_ops.py (so the package works
// without the compiled part), and csrc/python.cpp is the module sfron_ops._C.
//
// Stand-alone build (CMakeLists.txt defines SFRON_OPS_STANDALONE): there is no
// Python to define the schemas, so the fragment below does. Its strings must
// equal sfron_ops/_ops.py's SCHEMAS; tests/test_fused.py compares the two.
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
