// masked_sq_norm_ on CUDA: norm_state[0] += sum((alpha * m * g)^2), norm_state[1] = 1 if any term is not finite.
//
// Note [deterministic norm]: one block per chunk writes the chunk's sum of
// squares and non-finite flag to its own slot (no float atomics); the block
// that finishes the call's last launch (Note [last block]) then adds the slots
// in a fixed order, in double, into norm_state. Chunks are fixed by the tensor
// sizes, so the result does not depend on the GPU, the launch split or the
// scheduling, and a resumed run clips exactly like an uninterrupted one. One
// launch per grad dtype (one in all usual cases), nothing else.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/ops.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: grads (T). List 1: masks (any MaskKind; absent: no mask).
// Writes sums[chunk] and flags[chunk] for the chunk it processes; the last block of the call's last
// launch adds all of them into norm_state.
template <typename T>
struct NormFunctor {
  static constexpr int ILP = ilp_for<T>();
  float alpha;
  const float* alpha_tensor;  // multiplies alpha, or null
  float* sums;
  uint8_t* flags;
  int64_t total_chunks;
  float* norm_state;
  unsigned int* arrivals;

  __device__ __forceinline__ void operator()(const TensorTable<2>& table, int t, int64_t begin, int64_t end,
                                             int64_t chunk) const {
    const T* grad = static_cast<const T*>(table.ptr[0][t]);
    const void* mask = table.ptr[1][t];
    const MaskKind kind = static_cast<MaskKind>(table.mask_kind[t]);
    const float coef = device_scalar(alpha, alpha_tensor);
    float squares = 0.0f;
    bool bad = false;
    for_each_element<ILP>(begin, end, table.vectorized[t], [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float u[N];
      load_direction<N>(grad, kind, mask, i, coef, u);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        squares += u[k] * u[k];
        bad |= !isfinite(u[k]);
      }
    });
    __shared__ float shared[BLOCK_THREADS / 32];
    const float total = block_sum(squares, shared);
    const int any_bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
      sums[chunk] = total;
      flags[chunk] = any_bad != 0;
    }
  }

  // norm_state[0] += sum of sums[0, total_chunks) in double; norm_state[1] = max(norm_state[1], any flag)
  __device__ __forceinline__ void epilogue(const TensorTable<2>& table) const {
    if (!table.final_launch) return;
    double total = 0.0;
    int bad = 0;
    for (int64_t i = threadIdx.x; i < total_chunks; i += BLOCK_THREADS) {
      total += static_cast<double>(sums[i]);
      bad |= flags[i];
    }
    __shared__ double shared[BLOCK_THREADS / 32];
    total = block_sum(total, shared);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
      norm_state[0] = static_cast<float>(static_cast<double>(norm_state[0]) + total);
      // torch.maximum(norm_state[1], flag): NaN stays NaN
      const float flag = bad ? 1.0f : 0.0f;
      const float old = norm_state[1];
      norm_state[1] = old != old ? old : (old > flag ? old : flag);
    }
  }
};

void masked_sq_norm_cuda(const ops::MaskedSqNormArgs& a) {
  const c10::cuda::CUDAGuard guard(a.norm_state.device());
  Flattened flat = ops::flattened(a);
  const at::Tensor& state = flat.single(a.norm_state, Access::Write);

  int64_t total_chunks = 0;
  for (const at::Tensor& g : a.grads) total_chunks += chunks_of(g.numel());
  // one float sum and one flag byte per chunk
  at::Tensor partial = at::empty({std::max<int64_t>(total_chunks, 1) * 5}, state.options().dtype(at::kByte));
  float* sums = reinterpret_cast<float*>(partial.data_ptr());
  uint8_t* flags = partial.data_ptr<uint8_t>() + total_chunks * 4;
  unsigned int* arrivals = arrival_counter(state);
  apply_per_dtype<2>(flat, a.grads, c10::cuda::getCurrentCUDAStream(), [&](auto zero) {
    return NormFunctor<decltype(zero)>{static_cast<float>(a.alpha), optional_data<float>(a.alpha_tensor), sums, flags,
                                       total_chunks, state.data_ptr<float>(), arrivals};
  }, {}, 1, a.packed_masks);
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) {
  m.impl("masked_sq_norm_", &sfron_ops::ops::masked_sq_norm<sfron_ops::cuda::masked_sq_norm_cuda>);
}
