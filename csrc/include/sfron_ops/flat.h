// Host-side preparation shared by the CPU and CUDA kernels: every op reads
// tensor i of each list as numel_i consecutive elements, in one order that all
// lists share.
//
// Tensors that are contiguous, or dense with identical strides across one index
// (channels_last parameters with channels_last gradients and state), are used in
// place. Anything else (views with gaps, mismatched layouts, row-major order
// needed by packed masks) runs on contiguous working copies, and the copies of
// mutated tensors are written back by finish(). That path is for correctness,
// not speed.
#pragma once

#include <ATen/core/Tensor.h>

#include <sfron_ops/kinds.h>

#include <deque>
#include <optional>
#include <utility>
#include <vector>

namespace sfron_ops {

inline MaskKind mask_kind_of(const at::Tensor& mask, bool packed) {
  if (packed) return MaskKind::Packed;
  switch (mask.scalar_type()) {
    case at::kBool:
    case at::kByte: return MaskKind::Byte;
    case at::kFloat: return MaskKind::Float32;
    case at::kHalf: return MaskKind::Float16;
    case at::kBFloat16: return MaskKind::BFloat16;
    case at::kDouble: return MaskKind::Float64;
    default: TORCH_CHECK(false, "unsupported mask dtype ", mask.scalar_type());
  }
}

// The MaskKind of each of `count` tensors: None for all when there are no masks.
inline std::vector<MaskKind> mask_kinds(at::TensorList masks, bool packed, size_t count) {
  std::vector<MaskKind> kinds(count, MaskKind::None);
  for (size_t i = 0; i < masks.size(); ++i) kinds[i] = mask_kind_of(masks[i], packed);
  return kinds;
}

// What a kernel does with a list.
enum class Access { Read, Write, Packed };

struct ListSpec {
  at::TensorList tensors;  // empty: the list is absent (no mask, no momentum)
  Access access;
};

// Tensors are held by pointer: to the caller's own (the lists outlive the call) or to a working copy
// owned here. Copying an at::Tensor that Python also holds costs a trip through the interpreter
// for its reference count, with the GIL; a call does none of that for tensors used in place.
class Flattened {
 public:
  Flattened(std::vector<ListSpec> specs, size_t count) : specs_(std::move(specs)), tensors_(specs_.size()) {
    bool logical_order = false;
    for (const auto& spec : specs_) logical_order |= spec.access == Access::Packed && !spec.tensors.empty();
    for (auto& list : tensors_) list.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      const bool in_place = logical_order ? all_contiguous(i) : same_dense_layout(i);
      for (size_t k = 0; k < specs_.size(); ++k) {
        if (specs_[k].tensors.empty()) continue;
        const at::Tensor& t = specs_[k].tensors[i];
        tensors_[k].push_back(in_place || specs_[k].access == Access::Packed ? &t : working(t, specs_[k].access));
      }
    }
  }

  // Tensor i of list k, ready to be read as consecutive elements.
  const at::Tensor& at(size_t k, size_t i) const { return *tensors_[k][i]; }
  bool present(size_t k) const { return !tensors_[k].empty(); }
  size_t lists() const { return specs_.size(); }
  Access access(size_t k) const { return specs_[k].access; }

  // The address of tensor i of list k (mutable data only where the kernel writes the list).
  void* pointer(size_t k, size_t i) const {
    const at::Tensor& t = at(k, i);
    return specs_[k].access == Access::Write ? t.data_ptr() : const_cast<void*>(t.const_data_ptr());
  }

  // A contiguous stand-in for a single tensor (e.g. norm_state).
  const at::Tensor& single(const at::Tensor& t, Access access) { return *working(t, access); }

  // The data of a single tensor (norm_state, a counter) through its stand-in; null for an absent optional one.
  template <typename T>
  T* single_data(const at::Tensor& t, Access access) {
    const at::Tensor& u = single(t, access);
    return access == Access::Write ? u.data_ptr<T>() : const_cast<T*>(u.const_data_ptr<T>());
  }
  template <typename T>
  T* single_data(const std::optional<at::Tensor>& t, Access access) {
    return t.has_value() ? single_data<T>(*t, access) : nullptr;
  }

  // Copy the results of mutated working copies back into the caller's tensors.
  void finish() {
    for (auto& [original, copy] : writeback_) original->copy_(*copy);
    writeback_.clear();
  }

 private:
  const at::Tensor* working(const at::Tensor& t, Access access) {
    if (t.is_contiguous()) return &t;
    const at::Tensor* copy = &owned_.emplace_back(t.contiguous());
    if (access == Access::Write) writeback_.emplace_back(&t, copy);
    return copy;
  }

  bool all_contiguous(size_t i) const {
    for (const auto& spec : specs_) {
      if (!spec.tensors.empty() && spec.access != Access::Packed && !spec.tensors[i].is_contiguous()) return false;
    }
    return true;
  }

  bool same_dense_layout(size_t i) const {
    const at::Tensor* first = nullptr;
    for (const auto& spec : specs_) {
      if (spec.tensors.empty()) continue;
      const at::Tensor& t = spec.tensors[i];
      if (t.numel() <= 1) continue;
      if (!t.is_non_overlapping_and_dense()) return false;
      if (first == nullptr) {
        first = &t;
      } else if (t.strides() != first->strides()) {
        return false;
      }
    }
    return true;
  }

  std::vector<ListSpec> specs_;
  std::vector<std::vector<const at::Tensor*>> tensors_;
  std::deque<at::Tensor> owned_;  // working copies (a deque keeps their addresses)
  std::vector<std::pair<const at::Tensor*, const at::Tensor*>> writeback_;
};

}  // namespace sfron_ops
