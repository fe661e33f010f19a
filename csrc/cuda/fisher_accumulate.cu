// fisher_accumulate_ on CUDA: F = F + scale * g^2, F float32, g any floating dtype. One launch per grad dtype.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/ops.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: fishers (float32, updated). List 1: grads (T).
template <typename T>
struct FisherFunctor {
  static constexpr int ILP = ilp_for<T>();
  float scale;

  __device__ __forceinline__ void operator()(const TensorTable<2>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
    float* fisher = static_cast<float*>(table.ptr[0][t]);
    const T* grad = static_cast<const T*>(table.ptr[1][t]);
    for_each_element<ILP>(begin, end, table.vectorized[t], [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float f[N], g[N];
      load<N>(fisher, i, f);
      load<N>(grad, i, g);
#pragma unroll
      for (int k = 0; k < N; ++k) f[k] = fisher_update(f[k], g[k], scale);
      store<N>(fisher, i, f);
    });
  }
};

void fisher_accumulate_cuda(const ops::FisherAccumulateArgs& a) {
  const c10::cuda::CUDAGuard guard(a.grads[0].device());
  Flattened flat = ops::flattened(a);
  apply_per_dtype<2>(flat, a.grads, c10::cuda::getCurrentCUDAStream(), [&](auto zero) {
    return FisherFunctor<decltype(zero)>{static_cast<float>(a.scale)};
  });
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) {
  m.impl("fisher_accumulate_", &sfron_ops::ops::fisher_accumulate<sfron_ops::cuda::fisher_accumulate_cuda>);
}
