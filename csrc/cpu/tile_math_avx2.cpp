// The tile math compiled for AVX2 (no FMA: products and sums round separately, as in the reference).
// tile_kernels() uses it only on CPUs that report AVX2.
#define SFRON_TILE_TABLE tile_kernels_avx2
#define SFRON_TILE_NAME "avx2"
#define SFRON_TILE_TARGET "avx2"
#define SFRON_TILE_VECTOR_BYTES 32
#include "tile_target.h"
