// The tile math compiled for AVX-512 (F, BW, VL, DQ; no FMA: products and sums round separately, as in the
// reference). tile_kernels() uses it only on CPUs that report these extensions.
#include "tile_abi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#endif

#define SFRON_TILE_TABLE tile_kernels_avx512
#define SFRON_TILE_NAME "avx512"
#define SFRON_TILE_VECTOR_BYTES 64
#include "tile_math.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace sfron_ops::cpu {
const TileKernels* const tile_kernels_avx512 = nullptr;
}
#endif
