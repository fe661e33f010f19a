// The tile math compiled for AVX-512 (F, BW, VL, DQ; no FMA: products and sums round separately, as in the
// reference). tile_kernels() uses it only on CPUs that report these extensions.
#define SFRON_TILE_TABLE tile_kernels_avx512
#define SFRON_TILE_NAME "avx512"
#define SFRON_TILE_TARGET "avx512f,avx512bw,avx512vl,avx512dq"
#define SFRON_TILE_VECTOR_BYTES 64
#include "tile_target.h"
