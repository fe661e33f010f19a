// The per-element math of every op, written once for the CPU tile math (csrc/cpu/tile_math.h) and the
// CUDA functors (csrc/cuda/*.cu).
//
// Each formula is a plain float32 expression in the operation order of sfron_ops/reference.py. Every
// operation rounds once: the builds forbid contraction into FMAs (-ffp-contract=off, nvcc --fmad=false)
// and nothing reassociates, so a formula gives the same bits wherever it is compiled. T is float, or a
// GCC vector of floats where the CPU code works on whole vectors; the scalars broadcast.
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

// ---------------------------------------------------------------- the direction

// The direction coefficient scale * c with c = min(1, max_norm / (sqrt(sq_norm) + 1e-6)).
// The reference evaluates max_norm / x as reciprocal(x) * max_norm (Tensor.__rtruediv__)
// and clamps with NaN propagation; both are kept here.
SFRON_HOST_DEVICE inline float clipped_scale(float scale, float max_norm, float sq_norm) {
  float clip = (1.0f / (sqrtf(sq_norm) + CLIP_EPS)) * max_norm;
  clip = clip > 1.0f ? 1.0f : clip;
  return scale * clip;
}

// The coefficient of an update step from norm_state ([sum of squares, non-finite flag], or null): false when
// the flag is set (the step changes nothing), else true with *coef = scale, clipped when `clip`.
SFRON_HOST_DEVICE inline bool step_coefficient(const float* norm_state, float scale, bool clip, float max_norm,
                                               float* coef) {
  if (norm_state != nullptr && norm_state[1] > 0) return false;
  *coef = norm_state != nullptr && clip ? clipped_scale(scale, max_norm, norm_state[0]) : scale;
  return true;
}

// u = (g * m) * coef, or g * coef without a mask. An infinite g under a zero mask gives NaN, as in the reference.
template <class T>
SFRON_HOST_DEVICE inline T direction(T g, T m, float coef) {
  return (g * m) * coef;
}
template <class T>
SFRON_HOST_DEVICE inline T direction(T g, float coef) {
  return g * coef;
}

// ---------------------------------------------------------------- SGD (torch.optim.SGD's rule on u)

// d = u + wd * p
template <class T>
SFRON_HOST_DEVICE inline T with_weight_decay(T d, T param, float weight_decay) {
  return d + weight_decay * param;
}

// buf = momentum * buf + (1 - dampening) * d; on the first step the buffer is d itself
template <class T>
SFRON_HOST_DEVICE inline T momentum_buffer(T buf, T d, float momentum, float one_minus_dampening) {
  return momentum * buf + one_minus_dampening * d;
}

// d + momentum * buf: the Nesterov direction
template <class T>
SFRON_HOST_DEVICE inline T nesterov(T d, T buf, float momentum) {
  return d + momentum * buf;
}

// p - lr * d
template <class T>
SFRON_HOST_DEVICE inline T descend(T param, T d, float lr) {
  return param - lr * d;
}

// ---------------------------------------------------------------- AdamW (torch.optim.AdamW's rule on u)

// 1 - beta^t, Adam's bias correction for step t (float32 pow, as torch.pow on a float32 step).
SFRON_HOST_DEVICE inline float bias_correction(float beta, float t) { return 1.0f - powf(beta, t); }

// m1 = beta1 * m1 + (1 - beta1) * u
template <class T>
SFRON_HOST_DEVICE inline T first_moment(T m1, T u, float beta1, float one_minus_beta1) {
  return beta1 * m1 + one_minus_beta1 * u;
}

// m2 = beta2 * m2 + (1 - beta2) * u * u
template <class T>
SFRON_HOST_DEVICE inline T second_moment(T m2, T u, float beta2, float one_minus_beta2) {
  return beta2 * m2 + (one_minus_beta2 * u) * u;
}

// p (1 - lr wd) - lr (m1 / b1) / (sqrt(m2 / b2) + eps), operation for operation as the reference (CUDA).
SFRON_HOST_DEVICE inline float adamw_param(float param, float m1, float m2, float decay, float lr, float bias1,
                                           float bias2, float eps) {
  return param * decay - (lr * (m1 / bias1)) / (sqrtf(m2 / bias2) + eps);
}

// The same step in torch.optim.AdamW's arrangement (CPU): step_size = lr / b1 and sqrt(b2) are formed once per
// tensor, leaving one square root and two divisions per element. It rounds differently from the reference (to
// within float32 tolerance), not differently between instruction sets.
SFRON_HOST_DEVICE inline float adamw_param_per_tensor(float param, float m1, float m2, float decay, float step_size,
                                                      float bias2_sqrt, float eps) {
  return param * decay - step_size * (m1 / (sqrtf(m2) / bias2_sqrt + eps));
}

// ---------------------------------------------------------------- Fisher, saliency, slow weights

// F + s * g^2
template <class T>
SFRON_HOST_DEVICE inline T fisher_update(T fisher, T grad, float scale) {
  return fisher + scale * (grad * grad);
}

// (F_f + eps) / (F_r + eps) >= gamma: a true float32 division, so a cut-off chosen on the reference's
// ratios selects the same elements
SFRON_HOST_DEVICE inline bool salient(float forget, float remain, float gamma) {
  return (forget + RATIO_EPS) / (remain + RATIO_EPS) >= gamma;
}

// torch.lerp's two-sided form, exact at both ends: s + a (p - s) for a < 0.5 (lerp_low),
// p - (p - s)(1 - a) otherwise (lerp_high, given 1 - a rounded from the float64 a)
template <class T>
SFRON_HOST_DEVICE inline T lerp_low(T slow, T fast, float weight) {
  return slow + weight * (fast - slow);
}
template <class T>
SFRON_HOST_DEVICE inline T lerp_high(T slow, T fast, float one_minus_weight) {
  return fast - (fast - slow) * one_minus_weight;
}

}  // namespace sfron_ops
