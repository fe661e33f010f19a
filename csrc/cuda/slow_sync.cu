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

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>

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
        s[k] = from_slow ? s[k] + weight * (p[k] - s[k]) : p[k] - (p[k] - s[k]) * one_minus_weight;
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

void slow_sync_cuda(at::TensorList slow_params, at::TensorList params, double alpha, bool reset_fast,
                    const std::optional<at::Tensor>& norm_state, const std::optional<at::Tensor>& counter,
                    int64_t period) {
  check_slow_sync_args(slow_params, params, norm_state, counter, period);
  if (params.empty()) return;

  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Flattened flat({{slow_params, Access::Write}, {params, reset_fast ? Access::Write : Access::Read}}, params.size());
  const at::Tensor none;
  const at::Tensor& state = norm_state.has_value() ? flat.single(*norm_state, Access::Read) : none;
  const at::Tensor& count = counter.has_value() ? flat.single(*counter, Access::Write) : none;
  unsigned int* arrivals = arrival_counter(params[0]);
  const std::vector<at::ScalarType> dtypes = present_dtypes(params);
  for (size_t d = 0; d < dtypes.size(); ++d) {
    std::vector<TensorRow<2>> rows;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() != dtypes[d]) continue;
      TensorRow<2> row;
      row.numel = params[i].numel();
      row.ptr[0] = flat.at(0, i).data_ptr();
      row.ptr[1] = flat.at(1, i).data_ptr();
      rows.push_back(row);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtypes[d], "slow_sync_cuda", [&] {
      using Functor = SlowSyncFunctor<scalar_t>;
      constexpr int64_t width = Functor::ILP * sizeof(scalar_t);
      for (auto& row : rows) row.align = {width, width};
      const Functor functor{static_cast<float>(alpha),
                            static_cast<float>(1.0 - alpha),
                            alpha < 0.5,
                            reset_fast,
                            state.defined() ? state.const_data_ptr<float>() : nullptr,
                            count.defined() ? count.data_ptr<float>() : nullptr,
                            static_cast<float>(period),
                            arrivals};
      multi_tensor_apply<2>(rows, functor, stream, 0, d + 1 == dtypes.size());
    });
  }
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) { m.impl("slow_sync_", &sfron_ops::cuda::slow_sync_cuda); }
