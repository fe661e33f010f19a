// sgd_update_ on CUDA: torch.optim.SGD's rule with u = scale * c * m * g in place of the gradient.
//
//   d = u + wd * p;  buf = d on the first step, else momentum * buf + (1 - dampening) * d;
//   d = d + momentum * buf (nesterov) or buf;  p = p - lr * d;  step += 1
//
// The clip coefficient c, the skip flag and tensor scalars (lr, scale) are read
// on the device by every block, so no value travels to the host and the step can
// be captured in a CUDA graph. One launch (per dtype): the block that finishes
// last advances the step counters (Note [last block]).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/ops.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: params (T, updated). List 1: grads (T). List 2: masks (any MaskKind; absent: no mask).
// List 3: momentum buffers (T, updated; absent without momentum). Step counters: advanced by the epilogue.
template <typename T>
struct SgdFunctor {
  static constexpr int ILP = ilp_for<T>();
  const float* norm_state;    // [sum of squares, non-finite flag] or null
  const float* lr_tensor;     // multiplies lr, or null
  const float* scale_tensor;  // multiplies scale, or null
  float lr, scale, momentum, one_minus_dampening, weight_decay, max_norm;
  bool clip, use_momentum, use_weight_decay, nesterov;
  unsigned int* arrivals;

  __device__ __forceinline__ void operator()(const TensorTable<4>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
    float coef;
    if (!step_coefficient(norm_state, device_scalar(scale, scale_tensor), clip, max_norm, &coef)) return;
    const float lr = device_scalar(this->lr, lr_tensor);
    T* param = static_cast<T*>(table.ptr[0][t]);
    const T* grad = static_cast<const T*>(table.ptr[1][t]);
    const void* mask = table.ptr[2][t];
    T* buffer = static_cast<T*>(table.ptr[3][t]);
    const MaskKind kind = static_cast<MaskKind>(table.mask_kind[t]);
    const bool first_step = *table.step[t] == 0.0f;
    for_each_element<ILP>(begin, end, table.vectorized[t], [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float p[N], d[N], buf[N];
      load<N>(param, i, p);
      load_direction<N>(grad, kind, mask, i, coef, d);
      if (use_weight_decay) {
#pragma unroll
        for (int k = 0; k < N; ++k) d[k] = with_weight_decay(d[k], p[k], weight_decay);
      }
      if (use_momentum) {
        if (!first_step) load<N>(buffer, i, buf);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          buf[k] = first_step ? d[k] : momentum_buffer(buf[k], d[k], momentum, one_minus_dampening);
          d[k] = nesterov ? sfron_ops::nesterov(d[k], buf[k], momentum) : buf[k];
        }
        store<N>(buffer, i, buf);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) p[k] = descend(p[k], d[k], lr);
      store<N>(param, i, p);
    });
  }

  __device__ __forceinline__ void epilogue(const TensorTable<4>& table) const { advance_steps(table, norm_state); }
};

void sgd_update_cuda(const ops::SgdUpdateArgs& a) {
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  const bool use_momentum = a.momentum != 0;
  Flattened flat = ops::flattened(a);
  const float* state = flat.single_data<float>(a.norm_state, Access::Read);
  unsigned int* arrivals = arrival_counter(a.params[0]);
  apply_per_dtype<4>(flat, a.params, c10::cuda::getCurrentCUDAStream(), [&](auto zero) {
    return SgdFunctor<decltype(zero)>{state,
                                      optional_data<float>(a.lr_tensor),
                                      optional_data<float>(a.scale_tensor),
                                      static_cast<float>(a.lr),
                                      static_cast<float>(a.scale),
                                      static_cast<float>(a.momentum),
                                      static_cast<float>(1.0 - a.dampening),
                                      static_cast<float>(a.weight_decay),
                                      static_cast<float>(a.max_norm),
                                      static_cast<float>(a.max_norm) > 0,
                                      use_momentum,
                                      a.weight_decay != 0,
                                      a.nesterov,
                                      arrivals};
  }, a.steps, 2, a.packed_masks);
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) {
  m.impl("sgd_update_", &sfron_ops::ops::sgd_update<sfron_ops::cuda::sgd_update_cuda>);
}
