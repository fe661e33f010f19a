// adamw_update_ on CPU: torch.optim.AdamW's rule with u = scale * c * m * g in place of the gradient.
//
//   t = step + 1;  m1 = beta1 * m1 + (1 - beta1) * u;  m2 = beta2 * m2 + (1 - beta2) * u * u;
//   p = p * (1 - lr * wd) - lr * (m1 / (1 - beta1^t)) / (sqrt(m2 / (1 - beta2^t)) + eps);  step = t
//
// c is the clip coefficient from norm_state; a set non-finite flag in norm_state
// skips the whole call, step counters included. One pass over all tensors.
#include <torch/library.h>

#include <sfron_ops/flat.h>
#include <sfron_ops/ops.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void adamw_update_cpu(const ops::AdamwUpdateArgs& a) {
  const std::optional<float> coef = step_coefficient(a.norm_state, host_scalar(a.scale, a.scale_tensor), a.max_norm);
  if (!coef) return;  // a non-finite direction: the step changes nothing
  // 1 - lr * wd in double, from the Python lr or from the float32 tensor one
  const double lr = a.lr_tensor.has_value() ? static_cast<double>(host_scalar(a.lr, a.lr_tensor)) : a.lr;
  const AdamScalars s{static_cast<float>(lr),            static_cast<float>(a.beta1),
                      static_cast<float>(a.beta2),        static_cast<float>(1.0 - a.beta1),
                      static_cast<float>(1.0 - a.beta2),  static_cast<float>(a.eps),
                      static_cast<float>(1.0 - lr * a.weight_decay)};
  Flattened flat = ops::flattened(a);
  const std::vector<MaskKind> kinds = mask_kinds(a.masks, a.packed_masks, a.params.size());
  std::vector<float> bias1, bias2;
  for (const at::Tensor& step : a.steps) {
    const float t = *step.const_data_ptr<float>() + 1.0f;
    bias1.push_back(bias_correction(s.beta1, t));
    bias2.push_back(bias_correction(s.beta2, t));
  }
  const Layout layout(a.params);
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
        float* p = edit_tile(param, pos, n, param_tile);
        const float* g = read_tile(grad, pos, n, grad_tile);
        const float* m = mask ? read_mask_tile(*mask, kinds[t], pos, n, mask_tile) : nullptr;
        float* m1 = edit_tile(avg, pos, n, avg_tile);
        float* m2 = edit_tile(sq, pos, n, sq_tile);
        math.adamw(n, p, g, m, m1, m2, *coef, bias1[t], bias2[t], s, u);
        write_back(param, pos, n, p);
        write_back(avg, pos, n, m1);
        write_back(sq, pos, n, m2);
      });
    });
  });

  advance_steps(a.steps);
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) {
  m.impl("adamw_update_", &sfron_ops::ops::adamw_update<sfron_ops::cpu::adamw_update_cpu>);
}
