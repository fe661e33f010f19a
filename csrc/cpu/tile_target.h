// tile_math.h compiled for the x86-64 instruction set SFRON_TILE_TARGET (a GCC/clang target string) by
// tile_math_<isa>.cpp, which defines it with SFRON_TILE_TABLE, SFRON_TILE_NAME and SFRON_TILE_VECTOR_BYTES.
// Only the table's own functions get the target: everything included before it (tile_abi.h, math.h)
// compiles for the baseline, so no inline function exists in two instruction sets. Elsewhere than on
// x86-64 with GCC or clang, the table is nullptr.
#include "tile_abi.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define SFRON_PRAGMA(text) _Pragma(#text)
#define SFRON_EXPANDED_PRAGMA(text) SFRON_PRAGMA(text)
#if defined(__clang__)
SFRON_EXPANDED_PRAGMA(clang attribute push(__attribute__((target(SFRON_TILE_TARGET))), apply_to = function))
#else
#pragma GCC push_options
SFRON_EXPANDED_PRAGMA(GCC target(SFRON_TILE_TARGET))
#endif

#include "tile_math.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
namespace sfron_ops::cpu {
const TileKernels* const SFRON_TILE_TABLE = nullptr;
}
#endif
