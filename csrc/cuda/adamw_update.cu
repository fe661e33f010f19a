// adamw_update_ on CUDA: torch.optim.AdamW's rule with u = scale * c * m * g in place of the gradient.
//
//   t = step + 1;  m1 = beta1 * m1 + (1 - beta1) * u;  m2 = beta2 * m2 + (1 - beta2) * u * u;
//   p = p * (1 - lr * wd) - lr * (m1 / (1 - beta1^t)) / (sqrt(m2 / (1 - beta2^t)) + eps);  step = t
//
// The clip coefficient c, the skip flag, tensor scalars (lr, scale) and each
// tensor's step are read on the device, so no value travels to the host and the
// step can be captured in a CUDA graph. One launch (per dtype): the block that
// finishes last advances the step counters (Note [last block]).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sfron_ops/ops.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: params (T, updated). List 1: grads (T). List 2: masks (any MaskKind; absent: no mask).
// List 3: exp_avgs (T, updated). List 4: exp_avg_sqs (T, updated). Step counters: advanced by the epilogue.
template <typename T>
struct AdamwFunctor {
  static constexpr int ILP = ilp_for<T>();
  const float* norm_state;    // [sum of squares, non-finite flag] or null
  const float* lr_tensor;     // multiplies lr, or null
  const float* scale_tensor;  // multiplies scale, or null
  float lr, scale, beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  float decay;                // 1 - lr * wd, when lr_tensor is null
  double weight_decay;
  float max_norm;
  bool clip;
  unsigned int* arrivals;

  __device__ __forceinline__ void operator()(const TensorTable<5>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
    float coef;
    if (!step_coefficient(norm_state, device_scalar(scale, scale_tensor), clip, max_norm, &coef)) return;
    const float lr = device_scalar(this->lr, lr_tensor);
    // 1 - lr * wd in double, from the float32 tensor lr as from the Python one
    const float decay =
        lr_tensor != nullptr ? static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay) : this->decay;
    T* param = static_cast<T*>(table.ptr[0][t]);
    const T* grad = static_cast<const T*>(table.ptr[1][t]);
    const void* mask = table.ptr[2][t];
    T* exp_avg = static_cast<T*>(table.ptr[3][t]);
    T* exp_avg_sq = static_cast<T*>(table.ptr[4][t]);
    const MaskKind kind = static_cast<MaskKind>(table.mask_kind[t]);
    const float step = *table.step[t] + 1.0f;
    const float bias1 = bias_correction(beta1, step);
    const float bias2 = bias_correction(beta2, step);
    for_each_element<ILP>(begin, end, table.vectorized[t], [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float p[N], u[N], m1[N], m2[N];
      load<N>(param, i, p);
      load<N>(exp_avg, i, m1);
      load<N>(exp_avg_sq, i, m2);
      load_direction<N>(grad, kind, mask, i, coef, u);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        m1[k] = first_moment(m1[k], u[k], beta1, one_minus_beta1);
        m2[k] = second_moment(m2[k], u[k], beta2, one_minus_beta2);
        p[k] = adamw_param(p[k], m1[k], m2[k], decay, lr, bias1, bias2, eps);
      }
      store<N>(param, i, p);
      store<N>(exp_avg, i, m1);
      store<N>(exp_avg_sq, i, m2);
    });
  }

  __device__ __forceinline__ void epilogue(const TensorTable<5>& table) const { advance_steps(table, norm_state); }
};

void adamw_update_cuda(const ops::AdamwUpdateArgs& a) {
  const c10::cuda::CUDAGuard guard(a.params[0].device());
  Flattened flat = ops::flattened(a);
  const float* state = flat.single_data<float>(a.norm_state, Access::Read);
  unsigned int* arrivals = arrival_counter(a.params[0]);
  apply_per_dtype<5>(flat, a.params, c10::cuda::getCurrentCUDAStream(), [&](auto zero) {
    return AdamwFunctor<decltype(zero)>{state,
                                        optional_data<float>(a.lr_tensor),
                                        optional_data<float>(a.scale_tensor),
                                        static_cast<float>(a.lr),
                                        static_cast<float>(a.scale),
                                        static_cast<float>(a.beta1),
                                        static_cast<float>(a.beta2),
                                        static_cast<float>(1.0 - a.beta1),
                                        static_cast<float>(1.0 - a.beta2),
                                        static_cast<float>(a.eps),
                                        static_cast<float>(1.0 - a.lr * a.weight_decay),
                                        a.weight_decay,
                                        static_cast<float>(a.max_norm),
                                        static_cast<float>(a.max_norm) > 0,
                                        arrivals};
  }, a.steps, 2, a.packed_masks);
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) {
  m.impl("adamw_update_", &sfron_ops::ops::adamw_update<sfron_ops::cuda::adamw_update_cuda>);
}
