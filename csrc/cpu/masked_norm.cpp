// masked_sq_norm_ on CPU: norm_state[0] += sum((alpha * m * g)^2), norm_state[1] = 1 if any term is not finite.
//
// Note [deterministic norm]: each chunk (tiles.h) sums its squares into LANES
// float accumulators per tile, then into double lane totals, in a fixed
// element -> lane order; the chunk totals are added in chunk order. Nothing
// depends on the number of threads or the instruction set, so a resumed run
// clips exactly as the uninterrupted one did.
#include <torch/library.h>

#include <sfron_ops/flat.h>
#include <sfron_ops/ops.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void masked_sq_norm_cpu(const ops::MaskedSqNormArgs& a) {
  Flattened flat = ops::flattened(a);
  const at::Tensor& state = flat.single(a.norm_state, Access::Write);
  const std::vector<MaskKind> kinds = mask_kinds(a.masks, a.packed_masks, a.grads.size());
  const Layout layout(a.grads);
  const float coef = host_scalar(a.alpha, a.alpha_tensor);
  const TileKernels& math = tile_kernels();
  std::vector<double> chunk_sums(layout.chunks());
  std::vector<uint8_t> chunk_bad(layout.chunks());

  layout.parallel_chunks([&](int64_t c) {
    double squares[LANES] = {};
    float probe[LANES] = {};  // sum of u * 0: zero while every u is finite, NaN once one is not
    alignas(64) float grad_tile[TILE], mask_tile[TILE];
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& grad = flat.at(0, t);
      const at::Tensor* mask = kinds[t] == MaskKind::None ? nullptr : &flat.at(1, t);
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        const float* g = read_tile(grad, pos, n, grad_tile);
        const float* m = mask ? read_mask_tile(*mask, kinds[t], pos, n, mask_tile) : nullptr;
        math.norm(n, g, m, coef, squares, probe);
      });
    });
    double total = 0.0;
    bool bad = false;
    for (int64_t l = 0; l < LANES; ++l) {
      total += squares[l];
      bad |= probe[l] != probe[l];
    }
    chunk_sums[c] = total;
    chunk_bad[c] = bad;
  });

  double total = 0.0;
  bool bad = false;
  for (size_t c = 0; c < chunk_sums.size(); ++c) {
    total += chunk_sums[c];
    bad |= chunk_bad[c] != 0;
  }
  float* ns = state.data_ptr<float>();
  ns[0] = static_cast<float>(static_cast<double>(ns[0]) + total);
  // torch.maximum(norm_state[1], flag): NaN stays NaN
  const float flag = bad ? 1.0f : 0.0f;
  ns[1] = ns[1] != ns[1] ? ns[1] : (ns[1] > flag ? ns[1] : flag);
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) {
  m.impl("masked_sq_norm_", &sfron_ops::ops::masked_sq_norm<sfron_ops::cpu::masked_sq_norm_cpu>);
}
