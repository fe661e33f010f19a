// slow_sync_ on CUDA: slow = slow + a * (p - slow), exact at a = 0 and a = 1; p = slow if reset_fast.
//
// The two-sided form of torch.lerp: s + a * (p - s) for a < 0.5, else p - (p - s) * (1 - a),
// which returns s itself at a = 0 and p itself at a = 1. One launch per dtype.
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

  __device__ __forceinline__ void operator()(const TensorTable<2>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
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
};

void slow_sync_cuda(at::TensorList slow_params, at::TensorList params, double alpha, bool reset_fast) {
  check_slow_sync_args(slow_params, params);
  if (params.empty()) return;

  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Flattened flat({{slow_params, Access::Write}, {params, reset_fast ? Access::Write : Access::Read}}, params.size());
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    std::vector<TensorRow<2>> rows;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() != dtype) continue;
      TensorRow<2> row;
      row.numel = params[i].numel();
      row.ptr[0] = flat.at(0, i).data_ptr();
      row.ptr[1] = flat.at(1, i).data_ptr();
      rows.push_back(row);
    }
    if (rows.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "slow_sync_cuda", [&] {
      using Functor = SlowSyncFunctor<scalar_t>;
      constexpr int64_t width = Functor::ILP * sizeof(scalar_t);
      for (auto& row : rows) row.align = {width, width};
      const Functor functor{static_cast<float>(alpha), static_cast<float>(1.0 - alpha), alpha < 0.5, reset_fast};
      multi_tensor_apply<2>(rows, functor, stream);
    });
  }
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) { m.impl("slow_sync_", &sfron_ops::cuda::slow_sync_cuda); }
