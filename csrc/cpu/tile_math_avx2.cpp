// The tile math compiled for AVX2 (no FMA: products and sums round separately, as in the reference).
// tile_kernels() uses it only on CPUs that report AVX2.
#include "tile_abi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif

#define SFRON_TILE_TABLE tile_kernels_avx2
#define SFRON_TILE_NAME "avx2"
#define SFRON_TILE_VECTOR_BYTES 32
#include "tile_math.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace sfron_ops::cpu {
const TileKernels* const tile_kernels_avx2 = nullptr;
}
#endif
