// The Autograd kernel of every op: the ops update optimizer state in place and are not
// differentiable, so this kernel does what ADInplaceOrView does for an in-place op (bump the
// version counter of every tensor the op writes) and calls the device kernel below it.
//
// Without it the dispatcher runs its generic, boxed autograd fallback, which turns every tensor
// argument into an IValue and back on each call: for a 62-parameter step that is most of the
// host time of the whole op.
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <sfron_ops/ops.h>

#include <initializer_list>
#include <optional>

namespace sfron_ops {
namespace {

using ops::OptT;
using ops::TL;

// What an in-place op does on the way down: refuse to write a tensor that requires grad while
// autograd records (optimizers step under torch.no_grad()), then bump the version counters.
void written(const char* op, std::initializer_list<TL> lists, std::initializer_list<const at::Tensor*> singles = {}) {
  if (c10::GradMode::is_enabled()) {
    for (TL list : lists) {
      for (size_t i = 0; i < list.size(); ++i) {
        TORCH_CHECK(!list[i].requires_grad(), op, ": writes a tensor that requires grad while autograd is on; ",
                    "call it under torch.no_grad(), as optimizers do");
      }
    }
  }
  for (TL list : lists) {
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
  for (const at::Tensor* t : singles) {
    if (t != nullptr && t->defined()) torch::autograd::impl::bump_version(*t);
  }
}

const at::Tensor* opt(OptT t) { return t.has_value() ? &*t : nullptr; }

void masked_sq_norm(TL grads, TL masks, const at::Tensor& norm_state, double alpha, bool packed_masks,
                    OptT alpha_tensor) {
  written("masked_sq_norm_", {}, {&norm_state});
  static const auto op = ops::handle<ops::MaskedSqNorm>("sfron_ops::masked_sq_norm_");
  const at::AutoDispatchBelowADInplaceOrView below;
  op.call(grads, masks, norm_state, alpha, packed_masks, alpha_tensor);
}

void sgd_update(TL params, TL grads, TL masks, TL momentum_buffers, TL steps, OptT norm_state, double lr,
                double scale, double momentum, double dampening, double weight_decay, bool nesterov, double max_norm,
                bool packed_masks, OptT lr_tensor, OptT scale_tensor) {
  written("sgd_update_", {params, momentum_buffers, steps});
  static const auto op = ops::handle<ops::SgdUpdate>("sfron_ops::sgd_update_");
  const at::AutoDispatchBelowADInplaceOrView below;
  op.call(params, grads, masks, momentum_buffers, steps, norm_state, lr, scale, momentum, dampening, weight_decay,
          nesterov, max_norm, packed_masks, lr_tensor, scale_tensor);
}

void adamw_update(TL params, TL grads, TL masks, TL exp_avgs, TL exp_avg_sqs, TL steps, OptT norm_state, double lr,
                  double scale, double beta1, double beta2, double eps, double weight_decay, double max_norm,
                  bool packed_masks, OptT lr_tensor, OptT scale_tensor) {
  written("adamw_update_", {params, exp_avgs, exp_avg_sqs, steps});
  static const auto op = ops::handle<ops::AdamwUpdate>("sfron_ops::adamw_update_");
  const at::AutoDispatchBelowADInplaceOrView below;
  op.call(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, lr, scale, beta1, beta2, eps, weight_decay,
          max_norm, packed_masks, lr_tensor, scale_tensor);
}

void fisher_accumulate(TL fishers, TL grads, double scale) {
  written("fisher_accumulate_", {fishers});
  static const auto op = ops::handle<ops::FisherAccumulate>("sfron_ops::fisher_accumulate_");
  const at::AutoDispatchBelowADInplaceOrView below;
  op.call(fishers, grads, scale);
}

void saliency_mask(TL forget_fishers, TL remain_fishers, TL masks, const at::Tensor& kept, double gamma) {
  written("saliency_mask_", {masks}, {&kept});
  static const auto op = ops::handle<ops::SaliencyMask>("sfron_ops::saliency_mask_");
  const at::AutoDispatchBelowADInplaceOrView below;
  op.call(forget_fishers, remain_fishers, masks, kept, gamma);
}

void slow_sync(TL slow_params, TL params, double alpha, bool reset_fast, OptT norm_state, OptT counter,
               int64_t period) {
  written("slow_sync_", {slow_params, params}, {opt(counter)});
  static const auto op = ops::handle<ops::SlowSync>("sfron_ops::slow_sync_");
  const at::AutoDispatchBelowADInplaceOrView below;
  op.call(slow_params, params, alpha, reset_fast, norm_state, counter, period);
}

}  // namespace
}  // namespace sfron_ops

TORCH_LIBRARY_IMPL(sfron_ops, Autograd, m) {
  m.impl("masked_sq_norm_", &sfron_ops::masked_sq_norm);
  m.impl("sgd_update_", &sfron_ops::sgd_update);
  m.impl("adamw_update_", &sfron_ops::adamw_update);
  m.impl("fisher_accumulate_", &sfron_ops::fisher_accumulate);
  m.impl("saliency_mask_", &sfron_ops::saliency_mask);
  m.impl("slow_sync_", &sfron_ops::slow_sync);
}
