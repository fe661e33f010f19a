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

#include <optional>
#include <sstream>
#include <string>

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

}  // namespace sfron_ops
