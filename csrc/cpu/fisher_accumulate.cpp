// fisher_accumulate_ on CPU: F = F + scale * g^2, F float32, g any floating dtype. One pass over all tensors.
#include <torch/library.h>

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void fisher_accumulate_cpu(at::TensorList fishers, at::TensorList grads, double scale) {
  check_fisher_accumulate_args(fishers, grads);
  if (grads.empty()) return;

  Flattened flat({{fishers, Access::Write}, {grads, Access::Read}}, grads.size());
  std::vector<int64_t> numels;
  for (const at::Tensor& g : grads) numels.push_back(g.numel());
  const Layout layout(numels);
  const TileKernels& math = tile_kernels();
  const float s = static_cast<float>(scale);

  layout.parallel_chunks([&](int64_t c) {
    alignas(64) float grad_tile[TILE];
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& fisher = flat.at(0, t);
      const at::Tensor& grad = flat.at(1, t);
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        const float* g = read_tile(grad.const_data_ptr(), grad.scalar_type(), pos, n, grad_tile);
        math.fisher(n, fisher.data_ptr<float>() + pos, g, s);
      });
    });
  });
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) { m.impl("fisher_accumulate_", &sfron_ops::cpu::fisher_accumulate_cpu); }
