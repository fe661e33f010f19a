// fisher_accumulate_ on CPU: F = F + scale * g^2, F float32, g any floating dtype. One pass over all tensors.
#include <torch/library.h>

#include <sfron_ops/flat.h>
#include <sfron_ops/ops.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void fisher_accumulate_cpu(const ops::FisherAccumulateArgs& a) {
  Flattened flat = ops::flattened(a);
  const Layout layout(a.grads);
  const TileKernels& math = tile_kernels();
  const float s = static_cast<float>(a.scale);

  layout.parallel_chunks([&](int64_t c) {
    alignas(64) float grad_tile[TILE];
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& fisher = flat.at(0, t);
      const at::Tensor& grad = flat.at(1, t);
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        math.fisher(n, fisher.data_ptr<float>() + pos, read_tile(grad, pos, n, grad_tile), s);
      });
    });
  });
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) {
  m.impl("fisher_accumulate_", &sfron_ops::ops::fisher_accumulate<sfron_ops::cpu::fisher_accumulate_cpu>);
}
