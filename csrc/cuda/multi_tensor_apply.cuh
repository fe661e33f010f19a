// Multi-tensor apply: one kernel launch runs a functor over many tensors.
//
// The host packs, for up to TensorTable<DEPTH>::CAPACITY tensors, the data
// pointers of every list (DEPTH of them), the element counts, the step
// counters and the first chunk of each tensor into one kernel-argument struct
// of about 32 KB (CUDA 12.1+ accepts 32764 bytes of parameters on sm_70+, and
// the struct is a __grid_constant__, so it is read in place from the constant
// bank). Every block processes one chunk of CHUNK elements of one tensor and
// finds its tensor by a binary search over the chunk starts; a ResNet-18's 62
// tensors take one launch, and a longer list simply takes several.
//
// Arguments travel by value, so a launch records everything it needs and a
// CUDA graph can capture it. Nothing here reads device memory on the host.
//
// Note [last block]
//     Work that must wait for a whole launch (adding the norm's partial sums,
//     advancing the step counters, the slow-weight counter) is done by the block
//     that finishes last, not by a launch of its own: a functor with an
//     `arrivals` counter gets its `epilogue(table)` called by that block. Every
//     block makes its stores visible and counts itself with an atomic; the one
//     that counts gridDim.x - 1 runs the epilogue and sets the counter back to
//     zero for the next launch. Each launch's table lists all of its rows, empty
//     tensors included (they own no chunk but their step counters advance), and
//     `final_launch` marks the last launch of a call.
//
// Inside a chunk, a tensor whose pointers are all aligned to the vector width
// is read with ILP elements per load (16 bytes for the parameter dtype) and
// the last ILP - 1 elements of the tensor element by element; other tensors go
// element by element throughout (for_each_element).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <sfron_ops/flat.h>
#include <sfron_ops/kinds.h>
#include <sfron_ops/math.h>

#include <array>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace sfron_ops::cuda {

constexpr int BLOCK_THREADS = 512;
// Elements per block. A multiple of every vector width; small enough that a
// ResNet-18 (11 M parameters) gives about 700 blocks for 132 SMs.
constexpr int64_t CHUNK = 16384;
// Kernel-parameter budget for a table plus a functor (limit: 32764 bytes).
constexpr int64_t ARG_BYTES = 32000;
constexpr int64_t FUNCTOR_BYTES = 256;

template <int DEPTH>
struct TensorTable {
  static constexpr int64_t ROW_BYTES = DEPTH * 8 + 8 + 8 + 8 + 2;  // pointers, numel, step, chunk start, flags
  static constexpr int CAPACITY = static_cast<int>((ARG_BYTES - FUNCTOR_BYTES - 48) / ROW_BYTES);

  void* ptr[DEPTH][CAPACITY];
  int64_t numel[CAPACITY];
  float* step[CAPACITY];
  int64_t chunk_start[CAPACITY + 1];  // chunk_start[t]: first chunk of tensor t within this launch
  uint8_t vectorized[CAPACITY];
  uint8_t mask_kind[CAPACITY];
  int count;
  int64_t chunks;      // chunks of this launch (the grid has at least one block)
  int64_t chunk_base;  // index of this launch's first chunk among all chunks of the call
  bool final_launch;   // the last launch of the call

  // The tensor whose chunks contain `chunk` (chunk_start is increasing).
  __device__ __forceinline__ int find(int64_t chunk) const {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (chunk_start[mid] <= chunk) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
};

// 16-byte loads of the parameter dtype (at least 2 elements, so doubles pair up).
constexpr int ilp_for(int64_t element_size) { return element_size >= 8 ? 2 : static_cast<int>(16 / element_size); }
template <typename T>
constexpr int ilp_for() {
  return ilp_for(sizeof(T));
}

// One tensor index of a call: the pointer of each list (nullptr for an absent list). Built by tensor_rows.
template <int DEPTH>
struct TensorRow {
  std::array<void*, DEPTH> ptr{};
  int64_t numel = 0;
  float* step = nullptr;
  MaskKind mask_kind = MaskKind::None;
  bool vectorized = false;  // every pointer allows ILP-wide accesses
};

// Whether the calling block is the last of its launch to finish (Note [last block]); true in every
// thread of that block, which then sees the stores of all the other blocks.
__device__ __forceinline__ bool last_block(unsigned int* arrivals) {
  __shared__ int last;
  __syncthreads();  // this block's loads and stores are done
  if (threadIdx.x == 0) {
    __threadfence();  // its stores are visible before it is counted
    last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
    if (last) *arrivals = 0u;  // every block has counted itself: ready for the next launch
  }
  __syncthreads();
  if (last) __threadfence();
  return last != 0;
}

template <class Functor, class = void>
struct has_epilogue : std::false_type {};
template <class Functor>
struct has_epilogue<Functor, std::void_t<decltype(&Functor::arrivals)>> : std::true_type {};

template <int DEPTH, class Functor>
__global__ void __launch_bounds__(BLOCK_THREADS)
    multi_tensor_kernel(const __grid_constant__ TensorTable<DEPTH> table, const Functor functor) {
  const int64_t chunk = blockIdx.x;
  if (chunk < table.chunks) {
    const int t = table.find(chunk);
    const int64_t begin = (chunk - table.chunk_start[t]) * CHUNK;
    const int64_t end = begin + CHUNK < table.numel[t] ? begin + CHUNK : table.numel[t];
    functor(table, t, begin, end, table.chunk_base + chunk);
  }
  if constexpr (has_epilogue<Functor>::value) {
    if (last_block(functor.arrivals)) functor.epilogue(table);
  }
}

// A counter at zero for Note [last block], on the device of `like`, for the current stream: kept per
// device and stream for eager launches; while the stream is being captured into a CUDA graph, a new one
// that the graph zeroes before each replay.
unsigned int* arrival_counter(const at::Tensor& like);

inline int64_t chunks_of(int64_t numel) { return (numel + CHUNK - 1) / CHUNK; }

// The floating dtypes among `tensors`, in a fixed order: a call makes one launch sequence per dtype.
inline std::vector<at::ScalarType> present_dtypes(at::TensorList tensors) {
  std::vector<at::ScalarType> out;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble}) {
    for (const at::Tensor& t : tensors) {
      if (t.scalar_type() == dtype) {
        out.push_back(dtype);
        break;
      }
    }
  }
  return out;
}

// The rows of the tensors of `like` that have dtype `dtype`: the pointer of tensor i in every list of `flat`
// (nullptr for an absent list), its step counter when there are `steps`, its mask kind when list `mask_list`
// holds the masks, and whether every pointer allows accesses of ilp_for(dtype) elements (packed masks are
// read a byte at a time and never constrain it).
template <int DEPTH>
std::vector<TensorRow<DEPTH>> tensor_rows(const Flattened& flat, at::TensorList like, at::ScalarType dtype,
                                          at::TensorList steps = {}, int mask_list = -1, bool packed_masks = false) {
  const int ilp = ilp_for(at::elementSize(dtype));
  std::vector<TensorRow<DEPTH>> rows;
  for (size_t i = 0; i < like.size(); ++i) {
    if (like[i].scalar_type() != dtype) continue;
    TensorRow<DEPTH> row;
    row.numel = like[i].numel();
    if (!steps.empty()) row.step = steps[i].data_ptr<float>();
    row.vectorized = true;
    for (int d = 0; d < DEPTH; ++d) {
      if (!flat.present(d)) continue;
      row.ptr[d] = flat.pointer(d, i);
      if (d == mask_list) row.mask_kind = mask_kind_of(flat.at(d, i), packed_masks);
      if (flat.access(d) == Access::Packed) continue;
      const auto width = static_cast<uintptr_t>(ilp * flat.at(d, i).element_size());
      row.vectorized &= reinterpret_cast<uintptr_t>(row.ptr[d]) % width == 0;
    }
    rows.push_back(row);
  }
  return rows;
}

// Runs `functor` over the chunks of every row, in as few launches as the table allows.
// Chunk indices passed to the functor count from `chunk_base` in row order, so per-chunk
// outputs (the norm's partial sums) land in the same place whatever the launch split.
// `final_call`: whether the last launch made here is the last one of the op's call.
// Returns the number of chunks.
template <int DEPTH, class Functor>
int64_t multi_tensor_apply(const std::vector<TensorRow<DEPTH>>& rows, const Functor& functor, cudaStream_t stream,
                           int64_t chunk_base = 0, bool final_call = true) {
  static_assert(sizeof(TensorTable<DEPTH>) + sizeof(Functor) <= 32764, "kernel arguments too large");
  auto table = std::make_unique<TensorTable<DEPTH>>();
  table->count = 0;
  table->chunk_base = chunk_base;
  int64_t chunks = 0;
  int64_t total = 0;
  auto launch = [&](bool final_launch) {
    if (table->count == 0) return;
    table->chunk_start[table->count] = chunks;
    table->chunks = chunks;
    table->final_launch = final_launch;
    const unsigned grid = static_cast<unsigned>(chunks > 0 ? chunks : 1);
    multi_tensor_kernel<DEPTH, Functor><<<grid, BLOCK_THREADS, 0, stream>>>(*table, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table->chunk_base += chunks;
    table->count = 0;
    chunks = 0;
  };
  for (const TensorRow<DEPTH>& row : rows) {
    // one launch covers at most 2^31 - 1 blocks
    if (table->count == TensorTable<DEPTH>::CAPACITY || chunks + chunks_of(row.numel) > INT32_MAX) launch(false);
    const int t = table->count++;
    for (int d = 0; d < DEPTH; ++d) table->ptr[d][t] = row.ptr[d];
    table->numel[t] = row.numel;
    table->step[t] = row.step;
    table->mask_kind[t] = static_cast<uint8_t>(row.mask_kind);
    table->vectorized[t] = row.vectorized;
    table->chunk_start[t] = chunks;
    chunks += chunks_of(row.numel);
    total += chunks_of(row.numel);
  }
  launch(final_call);
  return total;
}

// A call's launches: one sequence per dtype of `like` (a fixed order), each over tensor_rows with the functor that
// make(scalar_t{}) builds for the dtype. Chunk indices continue from one sequence to the next, and the last launch
// of the last sequence is the call's final one (Note [last block]).
template <int DEPTH, class Make>
void apply_per_dtype(const Flattened& flat, at::TensorList like, cudaStream_t stream, Make&& make,
                     at::TensorList steps = {}, int mask_list = -1, bool packed_masks = false) {
  const std::vector<at::ScalarType> dtypes = present_dtypes(like);
  int64_t chunk_base = 0;
  for (size_t d = 0; d < dtypes.size(); ++d) {
    const auto rows = tensor_rows<DEPTH>(flat, like, dtypes[d], steps, mask_list, packed_masks);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtypes[d], "multi_tensor_apply", [&] {
      chunk_base += multi_tensor_apply<DEPTH>(rows, make(scalar_t{}), stream, chunk_base, d + 1 == dtypes.size());
    });
  }
}

// ------------------------------------------------------------------ element access

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N consecutive elements from index i as float32 (N = ILP: one aligned vector load; N = 1: one element).
template <int N, typename T>
__device__ __forceinline__ void load(const T* data, int64_t i, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = static_cast<float>(data[i]);
  } else {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(data + i);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = static_cast<float>(pack.v[k]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store(T* data, int64_t i, const float (&in)[N]) {
  if constexpr (N == 1) {
    data[i] = static_cast<T>(in[0]);
  } else {
    Pack<T, N> pack;
#pragma unroll
    for (int k = 0; k < N; ++k) pack.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T, N>*>(data + i) = pack;
  }
}

// Mask factors for elements [i, i + N): bytes by their value, packed bits as 0/1, floats as they are.
// The kind is the same for a whole block, so the switch does not diverge.
template <int N>
__device__ __forceinline__ void load_mask(MaskKind kind, const void* mask, int64_t i, float (&out)[N]) {
  switch (kind) {
    case MaskKind::Byte: load<N>(static_cast<const uint8_t*>(mask), i, out); return;
    case MaskKind::Float32: load<N>(static_cast<const float*>(mask), i, out); return;
    case MaskKind::Float16: load<N>(static_cast<const c10::Half*>(mask), i, out); return;
    case MaskKind::BFloat16: load<N>(static_cast<const c10::BFloat16*>(mask), i, out); return;
    case MaskKind::Float64: load<N>(static_cast<const double*>(mask), i, out); return;
    case MaskKind::Packed: {
      // N divides 8 and i is a multiple of N, so the N bits sit in one byte
      const uint32_t byte = static_cast<const uint8_t*>(mask)[i >> 3] >> (i & 7);
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = static_cast<float>((byte >> k) & 1u);
      return;
    }
    case MaskKind::None: break;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = 1.0f;
}


// Calls body(width, i) for every element group [i, i + N) of [begin, end) this thread owns, where
// width is std::integral_constant<int, N>: groups of N = ILP when the tensor is vectorized, then single
// elements (N = 1) for the tail.
template <int ILP, class Body>
__device__ __forceinline__ void for_each_element(int64_t begin, int64_t end, bool vectorized, Body&& body) {
  int64_t scalar_begin = begin;
  if (vectorized) {
    scalar_begin = begin + (end - begin) / ILP * ILP;
    for (int64_t i = begin + threadIdx.x * ILP; i < scalar_begin; i += BLOCK_THREADS * ILP) {
      body(std::integral_constant<int, ILP>{}, i);
    }
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += BLOCK_THREADS) body(std::integral_constant<int, 1>{}, i);
}


// u = (g * m) * coef (math.h's direction) for the N elements at i; g * coef without a mask.
template <int N, typename T>
__device__ __forceinline__ void load_direction(const T* grad, MaskKind kind, const void* mask, int64_t i, float coef,
                                               float (&u)[N]) {
  load<N>(grad, i, u);
  if (kind == MaskKind::None) {
#pragma unroll
    for (int k = 0; k < N; ++k) u[k] = direction(u[k], coef);
    return;
  }
  float m[N];
  load_mask<N>(kind, mask, i, m);
#pragma unroll
  for (int k = 0; k < N; ++k) u[k] = direction(u[k], m[k], coef);
}

// ------------------------------------------------------------------ block reductions

// Sum over the block in a fixed order (the result is the same on every run). Once per buffer: a
// second call on `shared` could overwrite it while warp 0 still reads it (put a barrier between).
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* shared /* BLOCK_THREADS / 32 entries */) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  T total = 0;
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  return total;  // valid in thread 0
}

// ------------------------------------------------------------------ epilogues

// The step counters of a launch's rows: step += 1 unless norm_state (may be null) flags a
// non-finite direction. Run by the last block, after every block has read them.
template <int DEPTH>
__device__ __forceinline__ void advance_steps(const TensorTable<DEPTH>& table, const float* norm_state) {
  if (norm_state != nullptr && norm_state[1] > 0) return;
  for (int t = threadIdx.x; t < table.count; t += BLOCK_THREADS) *table.step[t] += 1.0f;
}

// The data of an optional tensor scalar, or null.
template <typename T>
inline const T* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// A tensor scalar's value times `value` (value alone without one), read where the kernel runs.
__device__ __forceinline__ float device_scalar(float value, const float* tensor) {
  return tensor != nullptr ? value * *tensor : value;
}

}  // namespace sfron_ops::cuda
