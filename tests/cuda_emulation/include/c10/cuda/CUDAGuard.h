// Emulated kernels run on host memory: there is no device to make current.
#pragma once
#include <c10/core/Device.h>

#include "../../../cuda_emulation.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
