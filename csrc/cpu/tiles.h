// CPU building blocks: the work split and float32 tiles.
//
// Every CPU kernel sees the tensors of one call as a single concatenated range
// of elements, cut into chunks of CHUNK elements (a chunk may span several
// small tensors). Chunks are the unit of parallel work and of the partial sums
// of the norm; their boundaries depend only on the tensor sizes, never on the
// thread count, which keeps reductions bitwise reproducible.
//
// Inside a chunk, each tensor's elements are processed in tiles of TILE
// elements. A tile of a float32 tensor is used where it lies; any other dtype
// (and every mask) is converted into a float32 scratch tile first and rounded
// back after the math. The math itself (tile_abi.h) is written once, on
// float32 tiles, and compiled per instruction set, so nothing is instantiated
// per dtype.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <sfron_ops/flat.h>
#include <sfron_ops/math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "tile_abi.h"

namespace sfron_ops::cpu {

// ---------------------------------------------------------------- tiles

// Asks for the cache lines PREFETCH_TILES tiles ahead of the tile at `begin`. A
// single core streaming one array reaches only about three quarters of its read
// bandwidth on the hardware prefetcher alone; prefetch instructions never fault,
// so running past the end of the tensor is harmless.
constexpr int64_t PREFETCH_TILES = 2;
inline void prefetch_ahead(const void* data, int64_t element_size, int64_t begin) {
  const char* ahead = static_cast<const char*>(data) + (begin + PREFETCH_TILES * TILE) * element_size;
  for (int64_t b = 0; b < TILE * element_size; b += 64) __builtin_prefetch(ahead + b);
}

// Elements [begin, begin + n) of a tensor's data as float32: the data itself when it
// is float32, else converted into `scratch`.
inline const float* read_tile(const void* data, at::ScalarType dtype, int64_t begin, int64_t n, float* scratch) {
  prefetch_ahead(data, at::elementSize(dtype), begin);
  switch (dtype) {
    case at::kFloat: return static_cast<const float*>(data) + begin;
    case at::kBFloat16:
      tile_kernels().to_float(static_cast<const uint16_t*>(data) + begin, Storage::BFloat16, n, scratch);
      return scratch;
    case at::kDouble:
      tile_kernels().to_float(static_cast<const double*>(data) + begin, Storage::Float64, n, scratch);
      return scratch;
    case at::kHalf: {
      const c10::Half* src = static_cast<const c10::Half*>(data) + begin;
      for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(src[j]);
      return scratch;
    }
    default: TORCH_CHECK(false, "sfron_ops: unsupported dtype ", dtype);
  }
}

// A tile to update in place: the data itself when it is float32, else a float copy
// in `scratch` that write_back() rounds into the tensor.
inline const float* read_tile(const at::Tensor& t, int64_t begin, int64_t n, float* scratch) {
  return read_tile(t.const_data_ptr(), t.scalar_type(), begin, n, scratch);
}

inline float* edit_tile(const at::Tensor& t, int64_t begin, int64_t n, float* scratch) {
  void* data = t.data_ptr();
  if (t.scalar_type() == at::kFloat) {
    prefetch_ahead(data, sizeof(float), begin);
    return static_cast<float*>(data) + begin;
  }
  read_tile(data, t.scalar_type(), begin, n, scratch);
  return scratch;
}

inline void write_back(const at::Tensor& t, int64_t begin, int64_t n, const float* tile) {
  void* data = t.data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: {
      float* dst = static_cast<float*>(data) + begin;
      if (dst != tile) std::memcpy(dst, tile, n * sizeof(float));
      return;
    }
    case at::kBFloat16:
      tile_kernels().from_float(tile, n, static_cast<uint16_t*>(data) + begin, Storage::BFloat16);
      return;
    case at::kDouble:
      tile_kernels().from_float(tile, n, static_cast<double*>(data) + begin, Storage::Float64);
      return;
    case at::kHalf: {
      c10::Half* dst = static_cast<c10::Half*>(data) + begin;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::Half>(tile[j]);
      return;
    }
    default: TORCH_CHECK(false, "sfron_ops: unsupported dtype ", t.scalar_type());
  }
}

// Mask elements [begin, begin + n) as float32 factors (bytes by their value, packed bits as 0/1).
inline const float* read_mask_tile(const at::Tensor& mask, MaskKind kind, int64_t begin, int64_t n, float* scratch) {
  const void* data = mask.const_data_ptr();
  switch (kind) {
    case MaskKind::None: return nullptr;
    case MaskKind::Float32: return read_tile(data, at::kFloat, begin, n, scratch);
    case MaskKind::Float16: return read_tile(data, at::kHalf, begin, n, scratch);
    case MaskKind::Byte: prefetch_ahead(data, 1, begin); break;
    case MaskKind::BFloat16: prefetch_ahead(data, 2, begin); break;
    case MaskKind::Float64: prefetch_ahead(data, 8, begin); break;
    case MaskKind::Packed: break;  // a tile is a single cache line: left to the hardware prefetcher
  }
  tile_kernels().mask_to_float(data, kind, begin, n, scratch);
  return scratch;
}

// ---------------------------------------------------------------- update steps

// value * tensor (a float32 0-dim CPU tensor scalar) in float32; value alone without a tensor.
inline float host_scalar(double value, const std::optional<at::Tensor>& tensor) {
  const float v = static_cast<float>(value);
  return tensor.has_value() ? v * *tensor->const_data_ptr<float>() : v;
}

// The direction coefficient scale * c of an update step (math.h), or nothing when norm_state flags a
// non-finite direction: then the step must leave every tensor as it was.
inline std::optional<float> step_coefficient(const std::optional<at::Tensor>& norm_state, float scale,
                                             double max_norm) {
  float values[2];
  if (norm_state.has_value() && norm_state->is_contiguous()) {
    std::memcpy(values, norm_state->const_data_ptr<float>(), sizeof(values));
  } else if (norm_state.has_value()) {  // a strided view of two elements is allowed
    std::memcpy(values, norm_state->contiguous().const_data_ptr<float>(), sizeof(values));
  }
  float coef;
  if (!sfron_ops::step_coefficient(norm_state.has_value() ? values : nullptr, scale, max_norm > 0,
                                   static_cast<float>(max_norm), &coef)) {
    return std::nullopt;
  }
  return coef;
}

// ---------------------------------------------------------------- work split

// Element counts of the tensors of one call and where each starts in the concatenation.
class Layout {
 public:
  explicit Layout(at::TensorList tensors) : starts_(tensors.size() + 1, 0) {
    for (size_t i = 0; i < tensors.size(); ++i) starts_[i + 1] = starts_[i] + tensors[i].numel();
  }

  int64_t total() const { return starts_.back(); }
  int64_t chunks() const { return (total() + CHUNK - 1) / CHUNK; }

  // Calls fn(tensor, begin, end) for each tensor piece of chunk c, in tensor order;
  // begin and end are element offsets inside that tensor.
  template <class Fn>
  void for_each_piece(int64_t c, Fn&& fn) const {
    const int64_t lo = c * CHUNK;
    const int64_t hi = std::min(total(), lo + CHUNK);
    size_t t = std::upper_bound(starts_.begin(), starts_.end(), lo) - starts_.begin() - 1;
    for (int64_t pos = lo; pos < hi; ++t) {
      const int64_t end = std::min(hi, starts_[t + 1]);
      if (end > pos) fn(t, pos - starts_[t], end - starts_[t]);
      pos = std::max(pos, end);
    }
  }

  // Runs fn(chunk) for every chunk, chunks spread over the intra-op threads.
  template <class Fn>
  void parallel_chunks(Fn&& fn) const {
    const int64_t n = chunks();
    if (n == 0) return;
    at::parallel_for(0, n, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) fn(c);
    });
  }

 private:
  std::vector<int64_t> starts_;
};

// step += 1 for every (float32, CPU) step counter of an update.
inline void advance_steps(at::TensorList steps) {
  for (const at::Tensor& step : steps) *step.data_ptr<float>() += 1.0f;
}

// Calls fn(begin, n) over [begin, end) in tiles of at most TILE elements.
template <class Fn>
inline void for_each_tile(int64_t begin, int64_t end, Fn&& fn) {
  for (int64_t pos = begin; pos < end; pos += TILE) fn(pos, std::min(TILE, end - pos));
}

}  // namespace sfron_ops::cpu
