// The host side of multi_tensor_apply.cuh: the arrival counters of Note [last block].
#include <ATen/ops/zeros.h>

#include <map>
#include <mutex>
#include <utility>

#include "multi_tensor_apply.cuh"

namespace sfron_ops::cuda {

unsigned int* arrival_counter(const at::Tensor& like) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto options = like.options().dtype(at::kInt);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    // the zeroing is a node of the graph, so every replay starts from zero; a counter kept from an
    // eager launch would do too, but a stream that is only ever captured has none
    static std::mutex captured_mutex;
    static std::vector<at::Tensor> captured;  // the graph's kernels hold the address: keep it allocated
    at::Tensor counter = at::zeros({1}, options);
    const std::lock_guard<std::mutex> lock(captured_mutex);
    captured.push_back(counter);
    return reinterpret_cast<unsigned int*>(counter.data_ptr<int>());
  }
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> counters;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counter = counters[{like.device().index(), stream}];
  if (!counter.defined()) counter = at::zeros({1}, options);
  return reinterpret_cast<unsigned int*>(counter.data_ptr<int>());
}

}  // namespace sfron_ops::cuda
