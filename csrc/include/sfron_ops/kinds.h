// Plain enums shared by host code, CPU tile math and CUDA kernels (no torch headers here).
#pragma once

#include <cstdint>

namespace sfron_ops {

// How a mask is stored; one per tensor, so one call may mix mask dtypes.
// Byte covers bool (one byte holding 0 or 1) and uint8 (its value is the factor).
// Packed: one bit per element, element i is bit i % 8 of byte i / 8.
enum class MaskKind : uint8_t { None = 0, Byte, Float32, Float16, BFloat16, Float64, Packed };

}  // namespace sfron_ops
