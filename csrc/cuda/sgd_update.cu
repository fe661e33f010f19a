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

#include <sfron_ops/checks.h>
#include <sfron_ops/flat.h>
#include <sfron_ops/math.h>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

// List 0: params (T, updated). List 1: grads (T). List 2: masks (any MaskKind; absent: no mask).
// List 3: momentum buffers (T, updated; absent without momentum). Step counters: advanced by the epilogue.
template <typename T>
struct SgdFunctor {
  static constexpr int ILP = ilp_for<T>();
  const float* norm_state;  // [sum of squares, non-finite flag] or null
  const float* lr_tensor;     // multiplies lr, or null
  const float* scale_tensor;  // multiplies scale, or null
  float lr, scale, momentum, one_minus_dampening, weight_decay, max_norm;
  bool use_momentum, use_weight_decay, nesterov;
  unsigned int* arrivals;

  __device__ __forceinline__ void operator()(const TensorTable<4>& table, int t, int64_t begin, int64_t end,
                                             int64_t) const {
    float coef = device_scalar(scale, scale_tensor);
    if (norm_state != nullptr) {
      if (norm_state[1] > 0) return;  // a non-finite direction: the step changes nothing
      if (max_norm > 0) coef = clipped_scale(coef, max_norm, norm_state[0]);
    }
    const float lr = device_scalar(this->lr, lr_tensor);
    T* param = static_cast<T*>(table.ptr[0][t]);
    const T* grad = static_cast<const T*>(table.ptr[1][t]);
    const void* mask = table.ptr[2][t];
    T* buffer = static_cast<T*>(table.ptr[3][t]);
    const MaskKind kind = static_cast<MaskKind>(table.mask_kind[t]);
    const bool first_step = *table.step[t] == 0.0f;
    for_each_element<ILP>(begin, end, table.vectorized[t], [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float p[N], d[N], m[N], buf[N];
      load<N>(param, i, p);
      load<N>(grad, i, d);
      if (kind != MaskKind::None) {
        load_mask<N>(kind, mask, i, m);
#pragma unroll
        for (int k = 0; k < N; ++k) d[k] = d[k] * m[k];
      }
#pragma unroll
      for (int k = 0; k < N; ++k) {
        d[k] = d[k] * coef;
        if (use_weight_decay) d[k] = d[k] + weight_decay * p[k];
      }
      if (use_momentum) {
        if (!first_step) load<N>(buffer, i, buf);
#pragma unroll
        for (int k = 0; k < N; ++k) {
          buf[k] = first_step ? d[k] : momentum * buf[k] + one_minus_dampening * d[k];
          d[k] = nesterov ? d[k] + momentum * buf[k] : buf[k];
        }
        store<N>(buffer, i, buf);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) p[k] = p[k] - lr * d[k];
      store<N>(param, i, p);
    });
  }

  __device__ __forceinline__ void epilogue(const TensorTable<4>& table) const { advance_steps(table, norm_state); }
};

void sgd_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList masks,
                     at::TensorList momentum_buffers, at::TensorList steps, const std::optional<at::Tensor>& norm_state,
                     double lr, double scale, double momentum, double dampening, double weight_decay, bool nesterov,
                     double max_norm, bool packed_masks, const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& scale_tensor) {
  check_sgd_update_args(params, grads, masks, momentum_buffers, steps, norm_state, momentum, packed_masks, lr_tensor,
                        scale_tensor);
  if (params.empty()) return;

  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool use_momentum = momentum != 0;
  Flattened flat({{params, Access::Write},
                  {grads, Access::Read},
                  {masks, packed_masks ? Access::Packed : Access::Read},
                  {use_momentum ? momentum_buffers : at::TensorList(), Access::Write}},
                 params.size());
  const at::Tensor none;
  const at::Tensor& state = norm_state.has_value() ? flat.single(*norm_state, Access::Read) : none;
  const float* state_ptr = state.defined() ? state.const_data_ptr<float>() : nullptr;
  unsigned int* arrivals = arrival_counter(params[0]);

  for (const at::ScalarType dtype : present_dtypes(params)) {
    std::vector<TensorRow<4>> rows;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() != dtype) continue;
      TensorRow<4> row;
      row.numel = params[i].numel();
      row.step = steps[i].data_ptr<float>();
      row.ptr[0] = flat.at(0, i).data_ptr();
      row.ptr[1] = const_cast<void*>(flat.at(1, i).const_data_ptr());
      if (!masks.empty()) {
        row.mask_kind = mask_kind_of(masks[i], packed_masks);
        row.ptr[2] = const_cast<void*>(flat.at(2, i).const_data_ptr());
      }
      if (use_momentum) row.ptr[3] = flat.at(3, i).data_ptr();
      rows.push_back(row);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sgd_update_cuda", [&] {
      using Functor = SgdFunctor<scalar_t>;
      for (auto& row : rows) {
        row.align = {Functor::ILP * sizeof(scalar_t), Functor::ILP * sizeof(scalar_t),
                     mask_align(row.mask_kind, Functor::ILP), Functor::ILP * sizeof(scalar_t)};
      }
      const Functor functor{state_ptr,
                            optional_data<float>(lr_tensor),
                            optional_data<float>(scale_tensor),
                            static_cast<float>(lr),
                            static_cast<float>(scale),
                            static_cast<float>(momentum),
                            static_cast<float>(1.0 - dampening),
                            static_cast<float>(weight_decay),
                            static_cast<float>(max_norm),
                            use_momentum,
                            weight_decay != 0,
                            nesterov,
                            arrivals};
      multi_tensor_apply<4>(rows, functor, stream);
    });
  }
  flat.finish();
}

}  // namespace
}  // namespace sfron_ops::cuda

TORCH_LIBRARY_IMPL(sfron_ops, CUDA, m) { m.impl("sgd_update_", &sfron_ops::cuda::sgd_update_cuda); }
