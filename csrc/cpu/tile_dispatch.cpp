// Picks the tile math for the running CPU once (see tile_abi.h).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "tile_abi.h"

namespace sfron_ops::cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2");
  if (std::strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return std::strcmp(isa, "default") == 0;
}

const TileKernels* pick() {
  const char* requested = std::getenv("SFRON_OPS_CPU_ISA");
  const std::string limit = requested && *requested ? requested : "avx512";
  if (limit != "default" && limit != "avx2" && limit != "avx512") {
    throw std::invalid_argument("SFRON_OPS_CPU_ISA=" + limit + " is not one of default, avx2, avx512");
  }
  if (limit == "avx512" && tile_kernels_avx512 && cpu_has("avx512")) return tile_kernels_avx512;
  if (limit != "default" && tile_kernels_avx2 && cpu_has("avx2")) return tile_kernels_avx2;
  return tile_kernels_default;
}

}  // namespace

const TileKernels& tile_kernels() {
  static const TileKernels* const chosen = pick();
  return *chosen;
}

}  // namespace sfron_ops::cpu
