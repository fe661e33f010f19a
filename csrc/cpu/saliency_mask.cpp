// saliency_mask_ on CPU: m = [(F_f + eps) / (F_r + eps) >= gamma] in float32, eps = 1e-15; kept += ones.
//
// The ratio is an IEEE float32 division (not a multiplied-out comparison) so
// that Python's density cut-off, computed on the same ratio, selects the same
// elements.
#include <torch/library.h>

#include <sfron_ops/flat.h>
#include <sfron_ops/ops.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void saliency_mask_cpu(const ops::SaliencyMaskArgs& a) {
  Flattened flat = ops::flattened(a);
  const Layout layout(a.forget_fishers);
  const TileKernels& math = tile_kernels();
  const float threshold = static_cast<float>(a.gamma);
  std::vector<int64_t> chunk_kept(layout.chunks());

  layout.parallel_chunks([&](int64_t c) {
    int64_t count = 0;
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& forget = flat.at(0, t);
      const at::Tensor& remain = flat.at(1, t);
      const at::Tensor& mask = flat.at(2, t);
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        prefetch_ahead(forget.const_data_ptr(), sizeof(float), pos);
        prefetch_ahead(remain.const_data_ptr(), sizeof(float), pos);
        // bool and uint8 are both one byte holding 0 or 1
        count += math.saliency(n, forget.const_data_ptr<float>() + pos, remain.const_data_ptr<float>() + pos,
                               static_cast<uint8_t*>(mask.data_ptr()) + pos, threshold);
      });
    });
    chunk_kept[c] = count;
  });

  int64_t total = 0;
  for (int64_t k : chunk_kept) total += k;
  const at::Tensor& counter = flat.single(a.kept, Access::Write);
  *counter.data_ptr<int64_t>() += total;
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) {
  m.impl("saliency_mask_", &sfron_ops::ops::saliency_mask<sfron_ops::cpu::saliency_mask_cpu>);
}
