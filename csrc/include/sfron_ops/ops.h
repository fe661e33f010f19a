// The C++ signatures of the ops (the schemas of sfron_ops/_ops.py), for unboxed calls through the
// dispatcher: from the Autograd kernels down to the device kernels, and from the Python fast path.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

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

}  // namespace sfron_ops::ops
