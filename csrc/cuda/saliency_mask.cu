// saliency_mask_ on CUDA: m = [(F_f + eps) / (F_r + eps) >= gamma] in float32, eps = 1e-15; kept += ones.
//
// The ratio is an IEEE float32 division (nvcc's default -prec-div=true; not a
// multiplied-out comparison) so that Python's density cut-off, computed on the
// same ratio, selects the same elements. The count is an integer, so the
// per-block atomic additions give the same total in any order.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>
#include <sfron_ops/math.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: forget Fishers (float32). List 1: remain Fishers (float32). List 2: masks (bool or uint8, written).
struct SaliencyFunctor {
  static constexpr int ILP = 4;
  float gamma;
  unsigned long long* kept;

  __device__ __forceinline__ void operator()(const TensorTable<3>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
    const float* forget = static_cast<const float*>(table.ptr[0][t]);
    const float* remain = static_cast<const float*>(table.ptr[1][t]);
    uint8_t* mask = static_cast<uint8_t*>(table.ptr[2][t]);
    unsigned long long ones = 0;
    for_each_element<ILP>(begin, end, table.vectorized[t], [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float f[N], r[N], keep[N];
      load<N>(forget, i, f);
      load<N>(remain, i, r);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        keep[k] = (f[k] + RATIO_EPS) / (r[k] + RATIO_EPS) >= gamma ? 1.0f : 0.0f;
        ones += keep[k] != 0.0f;
      }
      store<N>(mask, i, keep);
    });
    __shared__ unsigned long long shared[BLOCK_THREADS / 32];
    const unsigned long long total = block_sum(ones, shared);
    if (threadIdx.x == 0 && total != 0) atomicAdd(kept, total);
  }
};

void saliency_mask_cuda(at::TensorList forget_fishers, at::TensorList remain_fishers, at::TensorList masks,
                        const at::Tensor& kept, double gamma) {
  check_saliency_mask_args(forget_fishers, remain_fishers, masks, kept);
  if (forget_fishers.empty()) return;

  const c10::cuda::CUDAGuard guard(kept.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Flattened flat({{forget_fishers, Access::Read}, {remain_fishers, Access::Read}, {masks, Access::Write}},
                 forget_fishers.size());
  const at::Tensor& counter = flat.single(kept, Access::Write);
  std::vector<TensorRow<3>> rows;
  for (size_t i = 0; i < forget_fishers.size(); ++i) {
    TensorRow<3> row;
    row.numel = forget_fishers[i].numel();
    row.ptr[0] = const_cast<void*>(flat.at(0, i).const_data_ptr());
    row.ptr[1] = const_cast<void*>(flat.at(1, i).const_data_ptr());
    row.ptr[2] = flat.at(2, i).data_ptr();  // bool and uint8 are both one byte holding 0 or 1
    row.align = {4 * SaliencyFunctor::ILP, 4 * SaliencyFunctor::ILP, SaliencyFunctor::ILP};
    rows.push_back(row);
  }
  // two's complement: adding as unsigned 64-bit is adding to the int64 count
  auto* count = reinterpret_cast<unsigned long long*>(counter.data_ptr<int64_t>());
  multi_tensor_apply<3>(rows, SaliencyFunctor{static_cast<float>(gamma), count}, stream);
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) { m.impl("saliency_mask_", &sfron_ops::cuda::saliency_mask_cuda); }
