// Controls of the emulation, and small kernels that check the emulation itself, reached through
// torch.ops.sfron_ops_cuda_emulated (tests/test_cuda_emulation.py).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <utility>

#include "multi_tensor_apply.cuh"  // the rewritten csrc/cuda header

namespace {

using cuda_emulation::launch;

__global__ void block_sum_kernel(const double* values, double* out) {
  __shared__ double shared[1024 / 32];
  const double total = sfron_ops::cuda::block_sum(values[threadIdx.x], shared);
  if (threadIdx.x == 0) *out = total;
}

// sfron_ops::cuda::block_sum over one block with one value per thread.
at::Tensor block_sum(const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kDouble && values.is_contiguous(), "block_sum: contiguous float64 values");
  at::Tensor out = at::empty({}, values.options());
  launch(1, static_cast<unsigned>(values.numel()), 0, nullptr, block_sum_kernel, values.const_data_ptr<double>(),
         out.data_ptr<double>());
  return out;
}

__global__ void early_return_kernel(int64_t returning_thread) {
  if (threadIdx.x == returning_thread) return;
  __syncthreads();
}

// A barrier that one thread never reaches: the emulation must report it.
void barrier_after_return(int64_t threads, int64_t returning_thread) {
  launch(1, static_cast<unsigned>(threads), 0, nullptr, early_return_kernel, returning_thread);
}

__global__ void vector_load_kernel(const float* data, int64_t index, float* out) {
  float values[4];
  sfron_ops::cuda::load<4>(data, index, values);
  for (int k = 0; k < 4; ++k) out[k] = values[k];
}

// sfron_ops::cuda::load<4> at data[index]: a 16-byte vector load, so data + index must be 16-byte aligned.
at::Tensor vector_load(const at::Tensor& data, int64_t index) {
  TORCH_CHECK(data.scalar_type() == at::kFloat && data.is_contiguous() && index + 4 <= data.numel(),
              "vector_load: float32 data with four elements from index");
  at::Tensor out = at::empty({4}, data.options());
  launch(1, 1, 0, nullptr, vector_load_kernel, data.const_data_ptr<float>(), index, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sfron_ops_cuda_emulated, m) {
  m.def("set_reverse_order(bool reverse) -> ()", [](bool reverse) { cuda_emulation::reverse_order = reverse; });
  // kernel launches since the last call (the count restarts at zero)
  m.def("take_launch_count() -> int", []() { return std::exchange(cuda_emulation::launches, int64_t{0}); });
  m.def("block_sum(Tensor values) -> Tensor", &block_sum);
  m.def("barrier_after_return(int threads, int returning_thread) -> ()", &barrier_after_return);
  m.def("vector_load(Tensor data, int index) -> Tensor", &vector_load);
}
