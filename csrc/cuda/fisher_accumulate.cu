// fisher_accumulate_ on CUDA: F = F + scale * g^2, F float32, g any floating dtype. One launch per grad dtype.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>

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
      for (int k = 0; k < N; ++k) f[k] = f[k] + scale * (g[k] * g[k]);
      store<N>(fisher, i, f);
    });
  }
};

void fisher_accumulate_cuda(at::TensorList fishers, at::TensorList grads, double scale) {
  check_fisher_accumulate_args(fishers, grads);
  if (grads.empty()) return;

  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Flattened flat({{fishers, Access::Write}, {grads, Access::Read}}, grads.size());
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    std::vector<TensorRow<2>> rows;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (grads[i].scalar_type() != dtype) continue;
      TensorRow<2> row;
      row.numel = grads[i].numel();
      row.ptr[0] = flat.at(0, i).data_ptr();
      row.ptr[1] = const_cast<void*>(flat.at(1, i).const_data_ptr());
      rows.push_back(row);
    }
    if (rows.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fisher_accumulate_cuda", [&] {
      using Functor = FisherFunctor<scalar_t>;
      for (auto& row : rows) row.align = {Functor::ILP * 4, Functor::ILP * sizeof(scalar_t)};
      multi_tensor_apply<2>(rows, Functor{static_cast<float>(scale)}, stream);
    });
  }
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) { m.impl("fisher_accumulate_", &sfron_ops::cuda::fisher_accumulate_cuda); }
