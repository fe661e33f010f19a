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

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>
#include <sfron_ops/math.h>

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
  unsigned int* arrivals;

  __device__ __forceinline__ void operator()(const TensorTable<5>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
    float coef = device_scalar(scale, scale_tensor);
    if (norm_state != nullptr) {
      if (norm_state[1] > 0) return;  // a non-finite direction: the step changes nothing
      if (max_norm > 0) coef = clipped_scale(coef, max_norm, norm_state[0]);
    }
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
      float p[N], u[N], m[N], m1[N], m2[N];
      load<N>(param, i, p);
      load<N>(grad, i, u);
      load<N>(exp_avg, i, m1);
      load<N>(exp_avg_sq, i, m2);
      if (kind != MaskKind::None) {
        load_mask<N>(kind, mask, i, m);
#pragma unroll
        for (int k = 0; k < N; ++k) u[k] = u[k] * m[k];
      }
#pragma unroll
      for (int k = 0; k < N; ++k) {
        u[k] = u[k] * coef;
        m1[k] = beta1 * m1[k] + one_minus_beta1 * u[k];
        m2[k] = beta2 * m2[k] + (one_minus_beta2 * u[k]) * u[k];
        const float denom = sqrtf(m2[k] / bias2) + eps;
        p[k] = p[k] * decay - (lr * (m1[k] / bias1)) / denom;
      }
      store<N>(param, i, p);
      store<N>(exp_avg, i, m1);
      store<N>(exp_avg_sq, i, m2);
    });
  }

  __device__ __forceinline__ void epilogue(const TensorTable<5>& table) const { advance_steps(table, norm_state); }
};

void adamw_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList masks, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList steps, const std::optional<at::Tensor>& norm_state,
                       double lr, double scale, double beta1, double beta2, double eps, double weight_decay,
                       double max_norm, bool packed_masks, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& scale_tensor) {
  check_adamw_update_args(params, grads, masks, exp_avgs, exp_avg_sqs, steps, norm_state, packed_masks, lr_tensor,
                          scale_tensor);
  if (params.empty()) return;

  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Flattened flat({{params, Access::Write},
                  {grads, Access::Read},
                  {masks, packed_masks ? Access::Packed : Access::Read},
                  {exp_avgs, Access::Write},
                  {exp_avg_sqs, Access::Write}},
                 params.size());
  const at::Tensor none;
  const at::Tensor& state = norm_state.has_value() ? flat.single(*norm_state, Access::Read) : none;
  const float* state_ptr = state.defined() ? state.const_data_ptr<float>() : nullptr;
  unsigned int* arrivals = arrival_counter(params[0]);

  for (const at::ScalarType dtype : present_dtypes(params)) {
    std::vector<TensorRow<5>> rows;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() != dtype) continue;
      TensorRow<5> row;
      row.numel = params[i].numel();
      row.step = steps[i].data_ptr<float>();
      row.ptr[0] = flat.at(0, i).data_ptr();
      row.ptr[1] = const_cast<void*>(flat.at(1, i).const_data_ptr());
      if (!masks.empty()) {
        row.mask_kind = mask_kind_of(masks[i], packed_masks);
        row.ptr[2] = const_cast<void*>(flat.at(2, i).const_data_ptr());
      }
      row.ptr[3] = flat.at(3, i).data_ptr();
      row.ptr[4] = flat.at(4, i).data_ptr();
      rows.push_back(row);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adamw_update_cuda", [&] {
      using Functor = AdamwFunctor<scalar_t>;
      constexpr int64_t width = Functor::ILP * sizeof(scalar_t);
      for (auto& row : rows) row.align = {width, width, mask_align(row.mask_kind, Functor::ILP), width, width};
      const Functor functor{state_ptr,
                            optional_data<float>(lr_tensor),
                            optional_data<float>(scale_tensor),
                            static_cast<float>(lr),
                            static_cast<float>(scale),
                            static_cast<float>(beta1),
                            static_cast<float>(beta2),
                            static_cast<float>(1.0 - beta1),
                            static_cast<float>(1.0 - beta2),
                            static_cast<float>(eps),
                            static_cast<float>(1.0 - lr * weight_decay),
                            weight_decay,
                            static_cast<float>(max_norm),
                            arrivals};
      multi_tensor_apply<5>(rows, functor, stream);
    });
  }
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) { m.impl("adamw_update_", &sfron_ops::cuda::adamw_update_cuda); }
