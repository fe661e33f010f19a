// The tile math for the baseline instruction set of the build (SSE2 on x86-64).
#include "tile_abi.h"

#define SFRON_TILE_TABLE tile_kernels_default
#define SFRON_TILE_NAME "default"
#define SFRON_TILE_VECTOR_BYTES 16
#include "tile_math.h"
