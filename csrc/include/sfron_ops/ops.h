// The C++ side of the op schemas (sfron_ops/_ops.py): each op's signature, its arguments as one struct,
// and the entry that every device kernel is registered through.
//
// A device kernel is a function of the op's argument struct. The entry, sfron_ops::ops::<op><kernel>, has the
// schema's signature: it gathers the arguments, runs the op's checks (checks.h) before anything is touched,
// returns for an empty call and runs the kernel. The CPU and CUDA kernels of an op therefore share one
// signature, one set of checks and one argument list:
//
//   TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) { m.impl("sgd_update_", &ops::sgd_update<sgd_update_cpu>); }
//
// The signatures (ops::SgdUpdate, ...) also serve unboxed calls through the dispatcher: from the Autograd
// kernels down to the device kernels, and from the Python fast path.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>

#include <optional>

namespace sfron_ops::ops {

using TL = at::TensorList;
using OptT = const std::optional<at::Tensor>&;

using MaskedSqNorm = void(TL grads, TL masks, const at::Tensor& norm_state, double alpha, bool packed_masks,
                          OptT alpha_tensor);
using SgdUpdate = void(TL params, TL grads, TL masks, TL momentum_buffers, TL steps, OptT norm_state, double lr,
                       double scale, double momentum, double dampening, double weight_decay, bool nesterov,
                       double max_norm, bool packed_masks, OptT lr_tensor, OptT scale_tensor);
using AdamwUpdate = void(TL params, TL grads, TL masks, TL exp_avgs, TL exp_avg_sqs, TL steps, OptT norm_state,
                         double lr, double scale, double beta1, double beta2, double eps, double weight_decay,
                         double max_norm, bool packed_masks, OptT lr_tensor, OptT scale_tensor);
using FisherAccumulate = void(TL fishers, TL grads, double scale);
using SaliencyMask = void(TL forget_fishers, TL remain_fishers, TL masks, const at::Tensor& kept, double gamma);
using SlowSync = void(TL slow_params, TL params, double alpha, bool reset_fast, OptT norm_state, OptT counter,
                      int64_t period);

// The op `sfron_ops::<name>` with its C++ signature; looked up once per call site (a function static).
template <class Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ---------------------------------------------------------------- arguments, one struct per op
// They refer to the caller's arguments and live for the duration of the call.

struct MaskedSqNormArgs {
  TL grads, masks;
  const at::Tensor& norm_state;
  double alpha;
  bool packed_masks;
  OptT alpha_tensor;
};

struct SgdUpdateArgs {
  TL params, grads, masks, momentum_buffers, steps;
  OptT norm_state;
  double lr, scale, momentum, dampening, weight_decay;
  bool nesterov;
  double max_norm;
  bool packed_masks;
  OptT lr_tensor, scale_tensor;
};

struct AdamwUpdateArgs {
  TL params, grads, masks, exp_avgs, exp_avg_sqs, steps;
  OptT norm_state;
  double lr, scale, beta1, beta2, eps, weight_decay, max_norm;
  bool packed_masks;
  OptT lr_tensor, scale_tensor;
};

struct FisherAccumulateArgs {
  TL fishers, grads;
  double scale;
};

struct SaliencyMaskArgs {
  TL forget_fishers, remain_fishers, masks;
  const at::Tensor& kept;
  double gamma;
};

struct SlowSyncArgs {
  TL slow_params, params;
  double alpha;
  bool reset_fast;
  OptT norm_state, counter;
  int64_t period;
};

// ---------------------------------------------------------------- the lists each kernel reads and writes
// One spec per op for the CPU and the CUDA kernels: Flattened gets each list ready to be used as consecutive elements
// (working copies of strided tensors, which finish() writes back).

inline Access mask_access(bool packed) { return packed ? Access::Packed : Access::Read; }

inline Flattened flattened(const MaskedSqNormArgs& a) {
  return Flattened({{a.grads, Access::Read}, {a.masks, mask_access(a.packed_masks)}}, a.grads.size());
}

inline Flattened flattened(const SgdUpdateArgs& a) {
  return Flattened({{a.params, Access::Write},
                    {a.grads, Access::Read},
                    {a.masks, mask_access(a.packed_masks)},
                    {a.momentum != 0 ? a.momentum_buffers : at::TensorList(), Access::Write}},
                   a.params.size());
}

inline Flattened flattened(const AdamwUpdateArgs& a) {
  return Flattened({{a.params, Access::Write},
                    {a.grads, Access::Read},
                    {a.masks, mask_access(a.packed_masks)},
                    {a.exp_avgs, Access::Write},
                    {a.exp_avg_sqs, Access::Write}},
                   a.params.size());
}

inline Flattened flattened(const FisherAccumulateArgs& a) {
  return Flattened({{a.fishers, Access::Write}, {a.grads, Access::Read}}, a.grads.size());
}

inline Flattened flattened(const SaliencyMaskArgs& a) {
  return Flattened({{a.forget_fishers, Access::Read}, {a.remain_fishers, Access::Read}, {a.masks, Access::Write}},
                   a.forget_fishers.size());
}

inline Flattened flattened(const SlowSyncArgs& a) {
  return Flattened({{a.slow_params, Access::Write}, {a.params, a.reset_fast ? Access::Write : Access::Read}},
                   a.params.size());
}

// ---------------------------------------------------------------- entries

template <void (*Kernel)(const MaskedSqNormArgs&)>
void masked_sq_norm(TL grads, TL masks, const at::Tensor& norm_state, double alpha, bool packed_masks,
                    OptT alpha_tensor) {
  check_masked_sq_norm_args(grads, masks, norm_state, packed_masks, alpha_tensor);
  if (!grads.empty()) Kernel({grads, masks, norm_state, alpha, packed_masks, alpha_tensor});
}

template <void (*Kernel)(const SgdUpdateArgs&)>
void sgd_update(TL params, TL grads, TL masks, TL momentum_buffers, TL steps, OptT norm_state, double lr, double scale,
                double momentum, double dampening, double weight_decay, bool nesterov, double max_norm,
                bool packed_masks, OptT lr_tensor, OptT scale_tensor) {
  check_sgd_update_args(params, grads, masks, momentum_buffers, steps, norm_state, momentum, packed_masks, lr_tensor,
                        scale_tensor);
  if (params.empty()) return;
  Kernel({params, grads, masks, momentum_buffers, steps, norm_state, lr, scale, momentum, dampening, weight_decay,
          nesterov, max_norm, packed_masks, lr_tensor, scale_tensor});
}

template <void (*Kernel)(const AdamwUpdateArgs&)>
void adamw_update(TL params, TL grads, TL masks, TL exp_avgs, TL exp_avg_sqs, TL steps, OptT norm_state, double lr,
                  double scale, double beta1, double beta2, double eps, double weight_decay, double max_norm,
                  bool packed_masks, OptT lr_tensor, OptT scale_tensor) {
  check_adamw_update_args(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, packed_masks, lr_tensor,
                          scale_tensor);
  if (params.empty()) return;
  Kernel({params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, lr, scale, beta1, beta2, eps, weight_decay,
          max_norm, packed_masks, lr_tensor, scale_tensor});
}

template <void (*Kernel)(const FisherAccumulateArgs&)>
void fisher_accumulate(TL fishers, TL grads, double scale) {
  check_fisher_accumulate_args(fishers, grads);
  if (!grads.empty()) Kernel({fishers, grads, scale});
}

template <void (*Kernel)(const SaliencyMaskArgs&)>
void saliency_mask(TL forget_fishers, TL remain_fishers, TL masks, const at::Tensor& kept, double gamma) {
  check_saliency_mask_args(forget_fishers, remain_fishers, masks, kept);
  if (!forget_fishers.empty()) Kernel({forget_fishers, remain_fishers, masks, kept, gamma});
}

template <void (*Kernel)(const SlowSyncArgs&)>
void slow_sync(TL slow_params, TL params, double alpha, bool reset_fast, OptT norm_state, OptT counter,
               int64_t period) {
  check_slow_sync_args(slow_params, params, norm_state, counter, period);
  if (!params.empty()) Kernel({slow_params, params, alpha, reset_fast, norm_state, counter, period});
}

}  // namespace sfron_ops::ops
