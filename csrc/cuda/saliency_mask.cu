// saliency_mask_ on CUDA: m = [(F_f + eps) / (F_r + eps) >= gamma] in float32, eps = 1e-15; kept += ones.
//
// The ratio is an IEEE float32 division (nvcc's default -prec-div=true; not a
// multiplied-out comparison) so that Python's density cut-off, computed on the
// same ratio, selects the same elements. The count is an integer, so the
// per-block atomic additions give the same total in any order.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/ops.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: forget Fishers (float32). List 1: remain Fishers (float32). List 2: masks (bool or uint8, written).
struct SaliencyFunctor {
  static constexpr int ILP = ilp_for<float>();
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
        keep[k] = salient(f[k], r[k], gamma) ? 1.0f : 0.0f;
        ones += keep[k] != 0.0f;
      }
      store<N>(mask, i, keep);
    });
    __shared__ unsigned long long shared[BLOCK_THREADS / 32];
    const unsigned long long total = block_sum(ones, shared);
    if (threadIdx.x == 0 && total != 0) atomicAdd(kept, total);
  }
};

void saliency_mask_cuda(const ops::SaliencyMaskArgs& a) {
  const c10::cuda::CUDAGuard guard(a.kept.device());
  // bool and uint8 masks are both one byte holding 0 or 1
  Flattened flat = ops::flattened(a);
  // two's complement: adding as unsigned 64-bit is adding to the int64 count
  auto* count = reinterpret_cast<unsigned long long*>(flat.single_data<int64_t>(a.kept, Access::Write));
  multi_tensor_apply<3>(tensor_rows<3>(flat, a.forget_fishers, at::kFloat),
                        SaliencyFunctor{static_cast<float>(a.gamma), count}, c10::cuda::getCurrentCUDAStream());
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) {
  m.impl("saliency_mask_", &sfron_ops::ops::saliency_mask<sfron_ops::cuda::saliency_mask_cuda>);
}
