// adamw_update_ on CPU: torch.optim.AdamW's rule with u = scale * c * m * g in place of the gradient.
//
//   t = step + 1;  m1 = beta1 * m1 + (1 - beta1) * u;  m2 = beta2 * m2 + (1 - beta2) * u * u;
//   p = p * (1 - lr * wd) - lr * (m1 / (1 - beta1^t)) / (sqrt(m2 / (1 - beta2^t)) + eps);  step = t
//
// c is the clip coefficient from norm_state; a set non-finite flag in norm_state
// skips the whole call, step counters included. One pass over all tensors.
#include <torch/library.h>

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>
#include <sfron_ops/math.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void adamw_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList masks, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, const std::optional<at::Tensor>& norm_state,
                      double lr, double scale, double beta1, double beta2, double eps, double weight_decay,
                      double max_norm, bool packed_masks, const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& scale_tensor) {
  check_adamw_update_args(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, packed_masks, lr_tensor,
                          scale_tensor);
  if (params.empty()) return;

  const std::optional<float> coefficient = step_coefficient(norm_state, host_scalar(scale, scale_tensor), max_norm);
  if (!coefficient) return;  // a non-finite direction: the step changes nothing
  const float coef = *coefficient;
  // 1 - lr * wd in double, from the Python lr or from the float32 tensor one
  const double lr_value = lr_tensor.has_value() ? static_cast<double>(host_scalar(lr, lr_tensor)) : lr;
  const AdamScalars s{static_cast<float>(lr_value),   static_cast<float>(beta1),
                      static_cast<float>(beta2),      static_cast<float>(1.0 - beta1),
                      static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                      static_cast<float>(1.0 - lr_value * weight_decay)};

  Flattened flat({{params, Access::Write},
                  {grads, Access::Read},
                  {masks, packed_masks ? Access::Packed : Access::Read},
                  {exp_avgs, Access::Write},
                  {exp_avg_sqs, Access::Write}},
                 params.size());
  std::vector<int64_t> numels;
  std::vector<MaskKind> kinds;
  std::vector<float> bias1, bias2;
  for (size_t i = 0; i < params.size(); ++i) {
    numels.push_back(params[i].numel());
    kinds.push_back(masks.empty() ? MaskKind::None : mask_kind_of(masks[i], packed_masks));
    const float t = *steps[i].const_data_ptr<float>() + 1.0f;
    bias1.push_back(bias_correction(s.beta1, t));
    bias2.push_back(bias_correction(s.beta2, t));
  }
  const Layout layout(numels);
  const TileKernels& math = tile_kernels();

  layout.parallel_chunks([&](int64_t c) {
    alignas(64) float param_tile[TILE], grad_tile[TILE], mask_tile[TILE], avg_tile[TILE], sq_tile[TILE], u[TILE];
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& param = flat.at(0, t);
      const at::Tensor& grad = flat.at(1, t);
      const at::Tensor* mask = kinds[t] == MaskKind::None ? nullptr : &flat.at(2, t);
      const at::Tensor& avg = flat.at(3, t);
      const at::Tensor& sq = flat.at(4, t);
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        float* p = edit_tile(param.data_ptr(), param.scalar_type(), pos, n, param_tile);
        const float* g = read_tile(grad.const_data_ptr(), grad.scalar_type(), pos, n, grad_tile);
        const float* m = mask ? read_mask_tile(mask->const_data_ptr(), kinds[t], pos, n, mask_tile) : nullptr;
        float* m1 = edit_tile(avg.data_ptr(), avg.scalar_type(), pos, n, avg_tile);
        float* m2 = edit_tile(sq.data_ptr(), sq.scalar_type(), pos, n, sq_tile);
        math.adamw(n, p, g, m, m1, m2, coef, bias1[t], bias2[t], s, u);
        write_back(param.data_ptr(), param.scalar_type(), pos, n, p);
        write_back(avg.data_ptr(), avg.scalar_type(), pos, n, m1);
        write_back(sq.data_ptr(), sq.scalar_type(), pos, n, m2);
      });
    });
  });

  for (const at::Tensor& step : steps) *step.data_ptr<float>() += 1.0f;
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) { m.impl("adamw_update_", &sfron_ops::cpu::adamw_update_cpu); }
