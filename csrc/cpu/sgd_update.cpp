// sgd_update_ on CPU: torch.optim.SGD's rule with u = scale * c * m * g in place of the gradient.
//
//   d = u + wd * p;  buf = d on the first step, else momentum * buf + (1 - dampening) * d;
//   d = d + momentum * buf (nesterov) or buf;  p = p - lr * d;  step += 1
//
// c is the clip coefficient from norm_state; a set non-finite flag in norm_state
// skips the whole call, step counters included. One pass over all tensors.
#include <torch/library.h>

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList masks,
                    at::TensorList momentum_buffers, at::TensorList steps, const std::optional<at::Tensor>& norm_state,
                    double lr, double scale, double momentum, double dampening, double weight_decay, bool nesterov,
                    double max_norm, bool packed_masks, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& scale_tensor) {
  check_sgd_update_args(params, grads, masks, momentum_buffers, steps, norm_state, momentum, packed_masks, lr_tensor,
                        scale_tensor);
  if (params.empty()) return;

  const std::optional<float> coefficient = step_coefficient(norm_state, host_scalar(scale, scale_tensor), max_norm);
  if (!coefficient) return;  // a non-finite direction: the step changes nothing
  const float coef = *coefficient;
  const SgdScalars s{host_scalar(lr, lr_tensor),       static_cast<float>(momentum),
                     static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
                     momentum != 0,                   weight_decay != 0,
                     nesterov};

  const bool use_buffers = s.use_momentum;
  Flattened flat({{params, Access::Write},
                  {grads, Access::Read},
                  {masks, packed_masks ? Access::Packed : Access::Read},
                  {use_buffers ? momentum_buffers : at::TensorList(), Access::Write}},
                 params.size());
  std::vector<int64_t> numels;
  std::vector<MaskKind> kinds;
  std::vector<uint8_t> first_step;
  for (size_t i = 0; i < params.size(); ++i) {
    numels.push_back(params[i].numel());
    kinds.push_back(masks.empty() ? MaskKind::None : mask_kind_of(masks[i], packed_masks));
    first_step.push_back(*steps[i].const_data_ptr<float>() == 0.0f);
  }
  const Layout layout(numels);
  const TileKernels& math = tile_kernels();

  layout.parallel_chunks([&](int64_t c) {
    alignas(64) float param_tile[TILE], grad_tile[TILE], mask_tile[TILE], buf_tile[TILE], d[TILE];
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& param = flat.at(0, t);
      const at::Tensor& grad = flat.at(1, t);
      const at::Tensor* mask = kinds[t] == MaskKind::None ? nullptr : &flat.at(2, t);
      const at::Tensor* buffer = use_buffers ? &flat.at(3, t) : nullptr;
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        float* p = edit_tile(param.data_ptr(), param.scalar_type(), pos, n, param_tile);
        const float* g = read_tile(grad.const_data_ptr(), grad.scalar_type(), pos, n, grad_tile);
        const float* m = mask ? read_mask_tile(mask->const_data_ptr(), kinds[t], pos, n, mask_tile) : nullptr;
        float* b = buffer ? edit_tile(buffer->data_ptr(), buffer->scalar_type(), pos, n, buf_tile) : nullptr;
        math.sgd(n, p, g, m, b, first_step[t] != 0, coef, s, d);
        write_back(param.data_ptr(), param.scalar_type(), pos, n, p);
        if (buffer) write_back(buffer->data_ptr(), buffer->scalar_type(), pos, n, b);
      });
    });
  });

  for (const at::Tensor& step : steps) *step.data_ptr<float>() += 1.0f;
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) { m.impl("sgd_update_", &sfron_ops::cpu::sgd_update_cpu); }
