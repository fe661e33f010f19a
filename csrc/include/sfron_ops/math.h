// Scalar formulas shared by the CPU and CUDA kernels, in float32 and in the
// operation order of sfron_ops/reference.py, so every backend rounds alike.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SFRON_HOST_DEVICE __host__ __device__
#else
#define SFRON_HOST_DEVICE
#endif

namespace sfron_ops {

// Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
constexpr float CLIP_EPS = 1e-6f;
// Guards the saliency ratio against empty Fisher entries, as the official code does.
constexpr float RATIO_EPS = 1e-15f;

// The direction coefficient scale * c with c = min(1, max_norm / (sqrt(sq_norm) + 1e-6)).
// The reference evaluates max_norm / x as reciprocal(x) * max_norm (Tensor.__rtruediv__)
// and clamps with NaN propagation; both are kept here.
SFRON_HOST_DEVICE inline float clipped_scale(float scale, float max_norm, float sq_norm) {
  float clip = (1.0f / (sqrtf(sq_norm) + CLIP_EPS)) * max_norm;
  clip = clip > 1.0f ? 1.0f : clip;
  return scale * clip;
}

// 1 - beta^t, Adam's bias correction for step t (float32 pow, as torch.pow on a float32 step).
SFRON_HOST_DEVICE inline float bias_correction(float beta, float t) { return 1.0f - powf(beta, t); }

}  // namespace sfron_ops
