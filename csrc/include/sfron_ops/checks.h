// Argument checks shared by the CPU and CUDA kernels.
//
// They mirror the Python checks in sfron_ops/_ops.py (which run for the
// reference, foreach and fake kernels) and word their messages the same way:
// the op, the argument, the index and the offending value. A compiled kernel
// calls them before it touches anything, so a bad call leaves every tensor as
// it was. On top of the Python checks, a compiled kernel needs every tensor of
// one call on one device (the reference can mix devices across indices).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace sfron_ops {

// "torch.float32" rather than c10's "Float", as Python prints dtypes.
inline std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// "(2, 3)", "(5,)" or "()", as Python prints a shape tuple.
inline std::string shape_name(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t d = 0; d < shape.size(); ++d) out << (d ? ", " : "") << shape[d];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

inline bool is_mask_dtype(at::ScalarType dtype) {
  return dtype == at::kBool || dtype == at::kByte || dtype == at::kFloat || dtype == at::kHalf ||
         dtype == at::kBFloat16 || dtype == at::kDouble;
}

inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
}

inline void check_length(const char* op, const char* key, at::TensorList tensors, size_t expected) {
  TORCH_CHECK(tensors.size() == expected, op, ": ", key, " has ", tensors.size(), " tensors, expected ", expected);
}

// Same length as `like`, and every tensor shaped and placed like its counterpart.
inline void check_aligned(const char* op, const char* key, at::TensorList tensors, at::TensorList like) {
  check_length(op, key, tensors, like.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].sizes() == like[i].sizes(), op, ": ", key, "[", i, "] has shape ",
                shape_name(tensors[i].sizes()), ", expected ", shape_name(like[i].sizes()));
    TORCH_CHECK(tensors[i].device() == like[i].device(), op, ": ", key, "[", i, "] is on ", tensors[i].device(),
                ", expected ", like[i].device());
  }
}

// A list that may also be empty (no mask, no momentum buffers).
inline void check_aligned_or_empty(const char* op, const char* key, at::TensorList tensors, at::TensorList like) {
  if (!tensors.empty()) check_aligned(op, key, tensors, like);
}

// Every tensor of `like` on the device of its first tensor: one kernel call runs on one device.
inline void check_one_device(const char* op, const char* key, at::TensorList like) {
  for (size_t i = 1; i < like.size(); ++i) {
    TORCH_CHECK(like[i].device() == like[0].device(), op, ": ", key, "[", i, "] is on ", like[i].device(),
                ", expected ", like[0].device(), " (the device of ", key, "[0]); one call runs on one device");
  }
}

inline void check_dtype(const char* op, const char* key, at::TensorList tensors, at::ScalarType dtype) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].scalar_type() == dtype, op, ": ", key, "[", i, "] has dtype ",
                dtype_name(tensors[i].scalar_type()), ", expected ", dtype_name(dtype));
  }
}

// tensors[i] has the dtype of like[i] (state tensors follow their parameter).
inline void check_dtype_like(const char* op, const char* key, at::TensorList tensors, at::TensorList like) {
  for (size_t i = 0; i < tensors.size() && i < like.size(); ++i) {
    TORCH_CHECK(tensors[i].scalar_type() == like[i].scalar_type(), op, ": ", key, "[", i, "] has dtype ",
                dtype_name(tensors[i].scalar_type()), ", expected ", dtype_name(like[i].scalar_type()));
  }
}

inline void check_floating(const char* op, const char* key, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(is_float_dtype(tensors[i].scalar_type()), op, ": ", key, "[", i, "] has non-floating dtype ",
                dtype_name(tensors[i].scalar_type()));
  }
}

// Masks: empty (no mask), or aligned with `like`; bool, uint8 or floating point.
// Packed: one contiguous uint8 tensor of ceil(numel / 8) bytes per tensor.
inline void check_masks(const char* op, at::TensorList masks, at::TensorList like, bool packed) {
  if (!packed) {
    check_aligned_or_empty(op, "masks", masks, like);
    for (size_t i = 0; i < masks.size(); ++i) {
      TORCH_CHECK(is_mask_dtype(masks[i].scalar_type()), op, ": masks[", i, "] has unsupported dtype ",
                  dtype_name(masks[i].scalar_type()));
    }
    return;
  }
  TORCH_CHECK(masks.size() == like.size(), op, ": packed_masks needs one mask per tensor");
  for (size_t i = 0; i < masks.size(); ++i) {
    const int64_t bytes = (like[i].numel() + 7) / 8;
    TORCH_CHECK(masks[i].scalar_type() == at::kByte && masks[i].numel() == bytes && masks[i].is_contiguous(), op,
                ": packed masks[", i, "] must be contiguous uint8 with ", bytes, " bytes, got ",
                dtype_name(masks[i].scalar_type()), " with ", masks[i].numel());
    TORCH_CHECK(masks[i].device() == like[i].device(), op, ": masks[", i, "] is on ", masks[i].device(),
                ", expected ", like[i].device());
  }
}

// [sum of squares, non-finite flag]: float32, two elements, on the device of every tensor.
inline void check_norm_state(const char* op, const at::Tensor& norm_state, at::TensorList like, const char* key) {
  TORCH_CHECK(norm_state.scalar_type() == at::kFloat && norm_state.numel() == 2, op,
              ": norm_state must be a float32 tensor of 2 elements, got ", dtype_name(norm_state.scalar_type()),
              " with ", norm_state.numel(), " elements");
  for (size_t i = 0; i < like.size(); ++i) {
    TORCH_CHECK(like[i].device() == norm_state.device(), op, ": norm_state is on ", norm_state.device(), " but ", key,
                "[", i, "] is on ", like[i].device());
  }
}

inline void check_norm_state(const char* op, const std::optional<at::Tensor>& norm_state, at::TensorList like,
                             const char* key) {
  if (norm_state.has_value()) check_norm_state(op, *norm_state, like, key);
}

// An optional float32 0-dim tensor scalar (a tensor lr, a step counter) on the device of every tensor.
inline void check_scalar_tensor(const char* op, const char* key, const std::optional<at::Tensor>& t,
                                at::TensorList like) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1, op, ": ", key,
              " must be a float32 scalar tensor, got ", dtype_name(t->scalar_type()), " with ", t->numel(),
              " elements");
  for (size_t i = 0; i < like.size(); ++i) {
    TORCH_CHECK(like[i].device() == t->device(), op, ": ", key, " is on ", t->device(), " but tensor ", i, " is on ",
                like[i].device());
  }
}

// One float32 scalar step counter per parameter, on the parameter's device.
inline void check_steps(const char* op, at::TensorList steps, at::TensorList like) {
  check_length(op, "steps", steps, like.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat, op, ": steps[", i,
                "] must be a float32 scalar, got ", dtype_name(steps[i].scalar_type()), " with ", steps[i].numel(),
                " elements");
    TORCH_CHECK(steps[i].device() == like[i].device(), op, ": steps[", i, "] is on ", steps[i].device(),
                ", expected ", like[i].device());
  }
}

// No two tensors an op writes share memory (a parameter twice, overlapping views, one step counter for two
// parameters): their elements would be updated twice, and on a GPU by racing blocks.
struct WrittenList {
  const char* key;
  at::TensorList tensors;
};

inline void check_distinct_writes(const char* op, std::initializer_list<WrittenList> lists) {
  struct Span {
    uintptr_t begin, end;
    const char* key;
    size_t index;
  };
  std::vector<Span> spans;
  for (const WrittenList& list : lists) {
    for (size_t i = 0; i < list.tensors.size(); ++i) {
      const at::Tensor& t = list.tensors[i];
      if (!t.defined() || t.numel() == 0) continue;
      int64_t last = 0;
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
      const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      spans.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()), list.key, i});
    }
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK(spans[k].begin >= spans[k - 1].end, op, ": ", spans[k - 1].key, "[", spans[k - 1].index, "] and ",
                spans[k].key, "[", spans[k].index, "] share memory; each tensor the op writes must be its own");
  }
}

// ---------------------------------------------------------------- per op
// Everything one op checks, called by its CPU and its CUDA kernel alike.

inline void check_masked_sq_norm_args(at::TensorList grads, at::TensorList masks, const at::Tensor& norm_state,
                                      bool packed_masks, const std::optional<at::Tensor>& alpha_tensor) {
  constexpr const char* op = "masked_sq_norm_";
  check_masks(op, masks, grads, packed_masks);
  check_scalar_tensor(op, "alpha_tensor", alpha_tensor, grads);
  check_norm_state(op, norm_state, grads, "grads");
  check_floating(op, "grads", grads);
}

// What the two update ops share: parameters, gradients, masks, step counters and the norm state.
inline void check_update_args(const char* op, at::TensorList params, at::TensorList grads, at::TensorList masks,
                              at::TensorList steps, const std::optional<at::Tensor>& norm_state, bool packed_masks,
                              const std::optional<at::Tensor>& lr_tensor,
                              const std::optional<at::Tensor>& scale_tensor) {
  check_aligned(op, "grads", grads, params);
  check_scalar_tensor(op, "lr_tensor", lr_tensor, params);
  check_scalar_tensor(op, "scale_tensor", scale_tensor, params);
  check_masks(op, masks, params, packed_masks);
  check_steps(op, steps, params);
  check_norm_state(op, norm_state, params, "params");
  check_floating(op, "params", params);
  check_dtype_like(op, "grads", grads, params);
}

inline void check_sgd_update_args(at::TensorList params, at::TensorList grads, at::TensorList masks,
                                  at::TensorList momentum_buffers, at::TensorList steps,
                                  const std::optional<at::Tensor>& norm_state, double momentum, bool packed_masks,
                                  const std::optional<at::Tensor>& lr_tensor,
                                  const std::optional<at::Tensor>& scale_tensor) {
  constexpr const char* op = "sgd_update_";
  check_update_args(op, params, grads, masks, steps, norm_state, packed_masks, lr_tensor, scale_tensor);
  check_aligned_or_empty(op, "momentum_buffers", momentum_buffers, params);
  TORCH_CHECK(momentum == 0 || momentum_buffers.size() == params.size(), op, ": momentum=", momentum,
              " needs one momentum buffer per parameter");
  check_dtype_like(op, "momentum_buffers", momentum_buffers, params);
  check_one_device(op, "params", params);
  check_distinct_writes(op, {{"params", params}, {"momentum_buffers", momentum_buffers}, {"steps", steps}});
}

inline void check_adamw_update_args(at::TensorList params, at::TensorList grads, at::TensorList masks,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                                    const std::optional<at::Tensor>& norm_state, bool packed_masks,
                                    const std::optional<at::Tensor>& lr_tensor,
                                    const std::optional<at::Tensor>& scale_tensor) {
  constexpr const char* op = "adamw_update_";
  check_update_args(op, params, grads, masks, steps, norm_state, packed_masks, lr_tensor, scale_tensor);
  check_aligned(op, "exp_avgs", exp_avgs, params);
  check_aligned(op, "exp_avg_sqs", exp_avg_sqs, params);
  check_dtype_like(op, "exp_avgs", exp_avgs, params);
  check_dtype_like(op, "exp_avg_sqs", exp_avg_sqs, params);
  check_one_device(op, "params", params);
  check_distinct_writes(op, {{"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"steps", steps}});
}

inline void check_fisher_accumulate_args(at::TensorList fishers, at::TensorList grads) {
  constexpr const char* op = "fisher_accumulate_";
  check_aligned(op, "fishers", fishers, grads);
  check_dtype(op, "fishers", fishers, at::kFloat);
  check_floating(op, "grads", grads);
  check_one_device(op, "grads", grads);
  check_distinct_writes(op, {{"fishers", fishers}});
}

inline void check_saliency_mask_args(at::TensorList forget_fishers, at::TensorList remain_fishers,
                                     at::TensorList masks, const at::Tensor& kept) {
  constexpr const char* op = "saliency_mask_";
  check_aligned(op, "remain_fishers", remain_fishers, forget_fishers);
  check_aligned(op, "masks", masks, forget_fishers);
  check_dtype(op, "forget_fishers", forget_fishers, at::kFloat);
  check_dtype(op, "remain_fishers", remain_fishers, at::kFloat);
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK(masks[i].scalar_type() == at::kBool || masks[i].scalar_type() == at::kByte, op, ": masks[", i,
                "] must be bool or uint8, got ", dtype_name(masks[i].scalar_type()));
  }
  TORCH_CHECK(kept.scalar_type() == at::kLong && kept.numel() == 1, op, ": kept must be an int64 scalar, got ",
              dtype_name(kept.scalar_type()), " with ", kept.numel(), " elements");
  check_one_device(op, "forget_fishers", forget_fishers);
  for (size_t i = 0; i < forget_fishers.size(); ++i) {
    TORCH_CHECK(kept.device() == forget_fishers[i].device(), op, ": kept is on ", kept.device(),
                " but forget_fishers[", i, "] is on ", forget_fishers[i].device());
  }
  check_distinct_writes(op, {{"masks", masks}, {"kept", kept}});
}

inline void check_slow_sync_args(at::TensorList slow_params, at::TensorList params,
                                 const std::optional<at::Tensor>& norm_state, const std::optional<at::Tensor>& counter,
                                 int64_t period) {
  constexpr const char* op = "slow_sync_";
  check_aligned(op, "slow_params", slow_params, params);
  check_norm_state(op, norm_state, params, "params");
  check_scalar_tensor(op, "counter", counter, params);
  TORCH_CHECK(period >= 1, op, ": period must be at least 1, got ", period);
  check_floating(op, "params", params);
  check_dtype_like(op, "slow_params", slow_params, params);
  check_one_device(op, "params", params);
  const at::Tensor none;
  check_distinct_writes(op, {{"slow_params", slow_params}, {"params", params}, {"counter", counter ? *counter : none}});
}

}  // namespace sfron_ops
