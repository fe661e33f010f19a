// The float32 tile math of the CPU kernels, as a table of functions.
//
// tile_math.h is compiled once per instruction set (tile_math_default.cpp,
// tile_math_avx2.cpp, tile_math_avx512.cpp) and tile_kernels() picks the best
// table the running CPU supports, so wheels need no -march flag. This header
// is free of torch includes because the ISA files compile it under a target
// pragma. Every table rounds identically: the loops never reassociate and the
// build forbids contraction into FMAs, so the choice changes speed only.
#pragma once

#include <sfron_ops/kinds.h>
// before any target pragma: the inline formulas must compile for the baseline instruction set in every file
#include <sfron_ops/math.h>

#include <cstdint>

namespace sfron_ops::cpu {

constexpr int64_t TILE = 512;     // elements of one tile (a few tiles of floats stay in L1)
constexpr int64_t CHUNK = 16384;  // elements of one unit of parallel work and of one partial sum
constexpr int64_t LANES = 16;     // accumulators of a reduction, in a fixed element -> lane order

// Storage dtypes the tables convert (float16 goes through c10::Half in tiles.h).
enum class Storage : uint8_t { Float32, BFloat16, Float64 };

struct SgdScalars {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool use_momentum, use_weight_decay, nesterov;
};

struct AdamScalars {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay;
};

struct TileKernels {
  const char* name;
  // n elements of `src` (already offset) to float32, and back with round-to-nearest-even
  void (*to_float)(const void* src, Storage storage, int64_t n, float* dst);
  void (*from_float)(const float* src, int64_t n, void* dst, Storage storage);
  // mask elements [begin, begin + n) as float factors (Float16 masks are converted in tiles.h)
  void (*mask_to_float)(const void* mask, MaskKind kind, int64_t begin, int64_t n, float* dst);
  // u = (g * m) * alpha; squares[l] += sum of u^2 over lane l; probe[l] += u * 0 (NaN once u is not finite)
  void (*norm)(int64_t n, const float* grad, const float* mask, float alpha, double* squares, float* probe);
  // SGD on one tile; `scratch` holds TILE floats
  void (*sgd)(int64_t n, float* param, const float* grad, const float* mask, float* buf, bool first_step,
              float coef, const SgdScalars& s, float* scratch);
  // AdamW on one tile; `scratch` holds TILE floats
  void (*adamw)(int64_t n, float* param, const float* grad, const float* mask, float* exp_avg, float* exp_avg_sq,
                float coef, float bias1, float bias2, const AdamScalars& s, float* scratch);
  // F = F + scale * g^2
  void (*fisher)(int64_t n, float* fisher, const float* grad, float scale);
  // mask = ((F_f + eps) / (F_r + eps) >= gamma); returns the number of ones
  int64_t (*saliency)(int64_t n, const float* forget, const float* remain, uint8_t* mask, float gamma);
  // slow = slow + w * (p - slow) if from_slow, else p - (p - slow) * (1 - w)
  void (*lerp)(int64_t n, float* slow, const float* param, float weight, float one_minus_weight, bool from_slow);
};

// nullptr where the build or the architecture lacks the instruction set
extern const TileKernels* const tile_kernels_default;
extern const TileKernels* const tile_kernels_avx2;
extern const TileKernels* const tile_kernels_avx512;

// The table for this CPU; SFRON_OPS_CPU_ISA=default|avx2|avx512 narrows the choice (for tests).
const TileKernels& tile_kernels();

}  // namespace sfron_ops::cpu
