// slow_sync_ on CUDA: slow = slow + a * (p - slow), exact at a = 0 and a = 1; p = slow if reset_fast.
//
// The two-sided form of torch.lerp: s + a * (p - s) for a < 0.5, else p - (p - s) * (1 - a),
// which returns s itself at a = 0 and p itself at a = 1. One launch per dtype.
//
// With a counter, every block decides from its value before the call whether this call syncs (the
// count reaches the period); the block that finishes the last launch writes the new count (Note
// [last block]). A set non-finite flag in norm_state skips the call, count included.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/ops.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: slow weights (T, updated). List 1: params (T; overwritten with the slow weights if reset_fast).
template <typename T>
struct SlowSyncFunctor {
  static constexpr int ILP = ilp_for<T>();
  float weight, one_minus_weight;
  bool from_slow, reset_fast;
  const float* norm_state;  // [sum of squares, non-finite flag] or null
  float* counter;           // remain steps since the last sync, or null (sync on every call)
  float period;
  unsigned int* arrivals;

  __device__ __forceinline__ bool skipped() const { return norm_state != nullptr && norm_state[1] > 0; }
  __device__ __forceinline__ bool due() const {
    return !skipped() && (counter == nullptr || *counter + 1.0f >= period);
  }

  __device__ __forceinline__ void operator()(const TensorTable<2>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
    if (!due()) return;
    T* slow = static_cast<T*>(table.ptr[0][t]);
    T* param = static_cast<T*>(table.ptr[1][t]);
    for_each_element<ILP>(begin, end, table.vectorized[t], [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float s[N], p[N];
      load<N>(slow, i, s);
      load<N>(param, i, p);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        s[k] = from_slow ? lerp_low(s[k], p[k], weight) : lerp_high(s[k], p[k], one_minus_weight);
      }
      store<N>(slow, i, s);
      // same dtype: p rounds to exactly the stored slow value
      if (reset_fast) store<N>(param, i, s);
    });
  }

  __device__ __forceinline__ void epilogue(const TensorTable<2>& table) const {
    if (!table.final_launch || counter == nullptr || threadIdx.x != 0 || skipped()) return;
    *counter = due() ? 0.0f : *counter + 1.0f;
  }
};

void slow_sync_cuda(const ops::SlowSyncArgs& a) {
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  Flattened flat = ops::flattened(a);
  const float* state = flat.single_data<float>(a.norm_state, Access::Read);
  float* count = flat.single_data<float>(a.counter, Access::Write);
  unsigned int* arrivals = arrival_counter(a.params[0]);
  apply_per_dtype<2>(flat, a.params, c10::cuda::getCurrentCUDAStream(), [&](auto zero) {
    return SlowSyncFunctor<decltype(zero)>{static_cast<float>(a.alpha),
                                           static_cast<float>(1.0 - a.alpha),
                                           a.alpha < 0.5,
                                           a.reset_fast,
                                           state,
                                           count,
                                           static_cast<float>(a.period),
                                           arrivals};
  });
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) {
  m.impl("slow_sync_", &sfron_ops::ops::slow_sync<sfron_ops::cuda::slow_sync_cuda>);
}
