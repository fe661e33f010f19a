// The step counters of sgd_update_ and adamw_update_ (see advance_steps in multi_tensor_apply.cuh).
#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {
namespace {

constexpr int STEP_CAPACITY = 3900;

struct StepTable {
  float* step[STEP_CAPACITY];
  int count;
};

__global__ void advance_steps_kernel(const __grid_constant__ StepTable table, const float* norm_state) {
  if (norm_state != nullptr && norm_state[1] > 0) return;
  for (int i = threadIdx.x; i < table.count; i += blockDim.x) *table.step[i] += 1.0f;
}

}  // namespace

void advance_steps(at::TensorList steps, const float* norm_state, cudaStream_t stream) {
  auto table = std::make_unique<StepTable>();
  for (size_t first = 0; first < steps.size(); first += STEP_CAPACITY) {
    table->count = 0;
    for (size_t i = first; i < steps.size() && table->count < STEP_CAPACITY; ++i) {
      table->step[table->count++] = steps[i].data_ptr<float>();
    }
    advance_steps_kernel<<<1, 256, 0, stream>>>(*table, norm_state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace sfron_ops::cuda
