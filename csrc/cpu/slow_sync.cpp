// slow_sync_ on CPU: slow = slow + a * (p - slow), exact at a = 0 and a = 1; p = slow if reset_fast.
//
// With a counter: on every period-th call only; a set non-finite flag in norm_state skips the call.
//
// The two-sided form of torch.lerp: s + a * (p - s) for a < 0.5, else p - (p - s) * (1 - a),
// which returns s itself at a = 0 and p itself at a = 1.
#include <torch/library.h>

#include <cstring>

#include <sfron_ops/flat.h>
#include <sfron_ops/ops.h>

#include "tiles.h"

namespace sfron_ops::cpu {
namespace {

void slow_sync_cpu(const ops::SlowSyncArgs& a) {
  if (!step_coefficient(a.norm_state, 1.0f, 0.0)) return;  // a skipped step: no sync, no count
  if (a.counter.has_value()) {
    float* count = a.counter->data_ptr<float>();
    if (*count + 1.0f < static_cast<float>(a.period)) {
      *count += 1.0f;
      return;
    }
    *count = 0.0f;
  }

  Flattened flat = ops::flattened(a);
  const Layout layout(a.params);
  const TileKernels& math = tile_kernels();
  const float weight = static_cast<float>(a.alpha);
  const float one_minus_weight = static_cast<float>(1.0 - a.alpha);
  const bool from_slow = a.alpha < 0.5;

  layout.parallel_chunks([&](int64_t c) {
    alignas(64) float slow_tile[TILE], param_tile[TILE];
    layout.for_each_piece(c, [&](size_t t, int64_t begin, int64_t end) {
      const at::Tensor& slow = flat.at(0, t);
      const at::Tensor& param = flat.at(1, t);
      for_each_tile(begin, end, [&](int64_t pos, int64_t n) {
        float* s = edit_tile(slow, pos, n, slow_tile);
        math.lerp(n, s, read_tile(param, pos, n, param_tile), weight, one_minus_weight, from_slow);
        write_back(slow, pos, n, s);
        // p <- slow: both tensors share a dtype, so this is a byte copy of the tile just stored. A tile
        // that already holds those bytes (all of them at a = 1, where slow becomes p) is not written,
        // which keeps its cache lines clean and saves a quarter of the memory traffic.
        if (a.reset_fast) {
          const int64_t size = slow.element_size();
          const char* from = static_cast<const char*>(slow.const_data_ptr()) + pos * size;
          char* to = static_cast<char*>(param.data_ptr()) + pos * size;
          if (std::memcmp(to, from, n * size) != 0) std::memcpy(to, from, n * size);
        }
      });
    });
  });
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cpu

TORCH_LIBRARY_IMPL(sfron_ops, CPU, m) {
  m.impl("slow_sync_", &sfron_ops::ops::slow_sync<sfron_ops::cpu::slow_sync_cpu>);
}
