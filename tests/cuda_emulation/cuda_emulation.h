// CUDA's execution model on the CPU, so that csrc/cuda runs in tests on machines without a GPU.
//
// tests/cuda_emulation/__init__.py compiles every csrc/cuda source as C++ with this header
// forced in front and each `kernel<<<grid, block, shared, stream>>>(args)` rewritten into
// cuda_emulation::launch(grid, block, shared, stream, kernel, args). A launch copies its
// arguments (as a real launch does) and runs the blocks one after another; the threads of a
// block are fibers on the calling thread that switch only at barriers. So a kernel meets
// CUDA's rules where they decide correctness:
//  - __syncthreads / __syncthreads_or wait for every thread of the block, and
//    __shfl_down_sync for every thread of the warp. A barrier that some thread never
//    reaches (it returned, or waits at another barrier) is reported, not waited for.
//  - __shared__ variables exist once per block (fibers share their OS thread's
//    thread_local storage); threadIdx and blockIdx are set per fiber.
//  - Blocks and threads run in forward or in reverse order (set_reverse_order), so a
//    result that depends on scheduling shows up as a difference between the two.
// Not modelled: concurrency between blocks, memory ordering, timing, a separate device
// memory space (pointers are host pointers) and the limits of a particular GPU.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static thread_local

using std::isfinite;

namespace cuda_emulation {

constexpr int WARP = 32;
// by-value kernel arguments (a 32 KB table) live on the fiber's stack
constexpr size_t STACK_BYTES = 256 * 1024;
// CUDA 12.1+ on sm_70+: kernel parameters up to 32764 bytes
constexpr size_t PARAM_BYTES = 32764;

inline thread_local dim3 thread_index, block_index, block_dim, grid_dim;
inline thread_local bool reverse_order = false;
inline thread_local int64_t launches = 0;  // kernel launches so far (a test reads and resets it)

enum class Wait { Running, Block, Warp, Done };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::Running;
  uint64_t posted = 0;  // the value this thread brings to the barrier it waits at
};

struct Block {
  std::function<void()> body;
  ucontext_t scheduler;
  unsigned current = 0;
  int block_result = 0;                // __syncthreads_or of the last block barrier
  std::vector<uint64_t> warp_values;  // lane values of each warp's last shuffle
  std::exception_ptr error;
};

inline thread_local Block* active = nullptr;
inline thread_local std::vector<Fiber> pool;

inline Fiber& self() { return pool[active->current]; }

inline void fiber_entry() {
  try {
    active->body();
  } catch (...) {
    if (!active->error) active->error = std::current_exception();
  }
  self().wait = Wait::Done;  // returning resumes uc_link: the scheduler
}

// Parks the current fiber at a barrier until the scheduler releases it.
inline void park(Wait wait, uint64_t value) {
  Fiber& fiber = self();
  fiber.wait = wait;
  fiber.posted = value;
  swapcontext(&fiber.context, &active->scheduler);
}

// How many of the first n threads have returned, wait at __syncthreads, wait at a shuffle.
struct Waiting {
  unsigned done = 0, block = 0, warp = 0;
  explicit Waiting(unsigned n) {
    for (unsigned i = 0; i < n; ++i) {
      done += pool[i].wait == Wait::Done;
      block += pool[i].wait == Wait::Block;
      warp += pool[i].wait == Wait::Warp;
    }
  }
  std::string describe() const {
    return std::to_string(block) + " threads at __syncthreads, " + std::to_string(warp) + " at a warp shuffle, " +
           std::to_string(done) + " returned";
  }
};

inline void run_block(const std::function<void()>& body, unsigned threads) {
  if (pool.size() < threads) pool.resize(threads);
  Block block;
  block.body = body;
  block.warp_values.assign((threads + WARP - 1) / WARP * WARP, 0);
  Block* outer = active;
  active = &block;
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& fiber = pool[i];
    if (!fiber.stack) fiber.stack.reset(new char[STACK_BYTES]);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.get();
    fiber.context.uc_stack.ss_size = STACK_BYTES;
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
    fiber.wait = Wait::Running;
  }
  for (;;) {
    // run every runnable thread up to its next barrier or its end
    for (unsigned k = 0; k < threads; ++k) {
      const unsigned i = reverse_order ? threads - 1 - k : k;
      if (pool[i].wait != Wait::Running) continue;
      block.current = i;
      thread_index = dim3(i);
      swapcontext(&block.scheduler, &pool[i].context);
    }
    if (block.error) {
      active = outer;
      std::rethrow_exception(block.error);
    }
    const Waiting waiting(threads);
    if (waiting.done == threads) break;
    bool released = false;
    if (waiting.block == threads) {
      int any = 0;
      for (unsigned i = 0; i < threads; ++i) any |= pool[i].posted != 0;
      block.block_result = any;
      for (unsigned i = 0; i < threads; ++i) pool[i].wait = Wait::Running;
      released = true;
    }
    for (unsigned w = 0; w * WARP < threads && waiting.block != threads; ++w) {
      const unsigned first = w * WARP;
      if (first + WARP > threads) continue;  // a partial warp cannot complete a full-mask shuffle
      bool all = true;
      for (unsigned lane = 0; lane < WARP; ++lane) all &= pool[first + lane].wait == Wait::Warp;
      if (!all) continue;
      for (unsigned lane = 0; lane < WARP; ++lane) {
        block.warp_values[first + lane] = pool[first + lane].posted;
        pool[first + lane].wait = Wait::Running;
      }
      released = true;
    }
    if (!released) {
      active = outer;
      throw std::runtime_error("emulated CUDA: block " + std::to_string(block_index.x) +
                               " cannot go on (a barrier that not every thread reaches): " + waiting.describe());
    }
  }
  active = outer;
}

// Runs kernel(args...) like kernel<<<grid, block, shared_bytes, stream>>>(args...), then returns
// (the emulated stream is always synchronous).
template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, void (*kernel)(Params...), Args&&... args) {
  constexpr size_t param_bytes = (size_t{0} + ... + sizeof(std::decay_t<Params>));
  if (param_bytes > PARAM_BYTES) {
    throw std::runtime_error("emulated CUDA: " + std::to_string(param_bytes) + " bytes of kernel parameters (limit " +
                             std::to_string(PARAM_BYTES) + ")");
  }
  if (grid.x == 0 || grid.x > 2147483647u || grid.y != 1 || grid.z != 1 || block.x == 0 || block.x > 1024 ||
      block.y != 1 || block.z != 1 || shared_bytes != 0) {
    throw std::runtime_error("emulated CUDA: invalid launch configuration grid " + std::to_string(grid.x) +
                             ", block " + std::to_string(block.x) + ", dynamic shared memory " +
                             std::to_string(shared_bytes));
  }
  ++launches;
  // arguments are copied at the launch, converted to the parameter types
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  grid_dim = grid;
  block_dim = block;
  for (unsigned k = 0; k < grid.x; ++k) {
    block_index = dim3(reverse_order ? grid.x - 1 - k : k);
    run_block([&] { std::apply(kernel, params); }, block.x);
  }
}

}  // namespace cuda_emulation

#define threadIdx ::cuda_emulation::thread_index
#define blockIdx ::cuda_emulation::block_index
#define blockDim ::cuda_emulation::block_dim
#define gridDim ::cuda_emulation::grid_dim

inline void __syncthreads() { cuda_emulation::park(cuda_emulation::Wait::Block, 0); }

inline int __syncthreads_or(int predicate) {
  cuda_emulation::park(cuda_emulation::Wait::Block, predicate != 0);
  return cuda_emulation::active->block_result;
}

template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "emulated shuffles move up to 8 bytes");
  if (mask != 0xffffffffu) throw std::runtime_error("emulated CUDA: only full-warp shuffles are modelled");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const unsigned lane = threadIdx.x % cuda_emulation::WARP;
  const unsigned warp_first = threadIdx.x - lane;
  cuda_emulation::park(cuda_emulation::Wait::Warp, bits);
  if (lane + delta >= cuda_emulation::WARP) return value;  // no source lane: the caller's own value
  T out;
  std::memcpy(&out, &cuda_emulation::active->warp_values[warp_first + lane + delta], sizeof(T));
  return out;
}

// Blocks run one at a time, so an atomic addition is a plain one and a fence orders nothing.
template <class T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_same_v<T, unsigned int> || std::is_same_v<T, unsigned long long>,
                "emulated atomicAdd: the unsigned types the kernels use");
  const T old = *address;
  *address = old + value;
  return old;
}
inline void __threadfence() {}

// The emulation's one stream is never captured into a CUDA graph.
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
typedef int cudaError_t;
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return 0;
}
