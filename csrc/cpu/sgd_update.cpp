// sgd_update_ on CPU: torch.optim.SGD's rule with u = scale * c * m * g in place of the gradient.
//
//   d = u + wd * p;  buf = d on the first step, else momentum * buf + (1 - dampening) * d;
//   d = d + momentum * buf (nesterov) or buf;  p = p - lr * d;  step += 1
//
// c is the clip coefficient from norm_state; a set non-finite flag in norm_state
// skips the whole call, step counters included. One pass over all tensors.
#include <torch/library.h>

#include <sfron_ops/flat.h>
#include <sfron_ops/ops.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void sgd_update_cpu(const ops::SgdUpdateArgs& a) {
  const std::optional<float> coef = step_coefficient(a.norm_state, host_scalar(a.scale, a.scale_tensor), a.max_norm);
  if (!coef) return;  // a non-finite direction: the step changes nothing
  const SgdScalars s{host_scalar(a.lr, a.lr_tensor),         static_cast<float>(a.momentum),
                     static_cast<float>(1.0 - a.dampening), static_cast<float>(a.weight_decay),
                     a.momentum != 0,                       a.weight_decay != 0,
                     a.nesterov};
  Flattened flat = ops::flattened(a);
  const std::vector<MaskKind> kinds = mask_kinds(a.masks, a.packed_masks, a.params.size());
  std::vector<uint8_t> first_step;
  for (const at::Tensor& step : a.steps) first_step.push_back(*step.const_data_ptr<float>() == 0.0f);
  const Layout layout(a.params);
  const TileKernels& math = tile_kernels();

  layout.parallel_chunks([&](int64_t c) {
    alignas(64) float param_tile[TILE], grad_tile[TILE], mask_tile[TILE], buf_tile[TILE], d[TILE];
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& param = flat.at(0, t);
      const at::Tensor& grad = flat.at(1, t);
      const at::Tensor* mask = kinds[t] == MaskKind::None ? nullptr : &flat.at(2, t);
      const at::Tensor* buffer = s.use_momentum ? &flat.at(3, t) : nullptr;
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        float* p = edit_tile(param, pos, n, param_tile);
        const float* g = read_tile(grad, pos, n, grad_tile);
        const float* m = mask ? read_mask_tile(*mask, kinds[t], pos, n, mask_tile) : nullptr;
        float* b = buffer ? edit_tile(*buffer, pos, n, buf_tile) : nullptr;
        math.sgd(n, p, g, m, b, first_step[t] != 0, *coef, s, d);
        write_back(param, pos, n, p);
        if (buffer) write_back(*buffer, pos, n, b);
      });
    });
  });

  advance_steps(a.steps);
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) {
  m.impl("sgd_update_", &sfron_ops::ops::sgd_update<sfron_ops::cpu::sgd_update_cpu>);
}
