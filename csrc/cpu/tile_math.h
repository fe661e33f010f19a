// The float32 tile math of the CPU kernels (see tile_abi.h). Included once per
// instruction set by tile_math_<isa>.cpp, which defines SFRON_TILE_TABLE (the
// name of the table) and compiles this file under a target pragma; everything
// here has internal linkage so the copies never mix.
//
// The per-element formulas are those of sfron_ops/math.h (shared with the CUDA
// kernels), each rounding once in the reference's order. They run in plain loops
// the compiler vectorises at the width of the instruction set; the norm keeps
// LANES explicit accumulators so its summation order is the same at every width.
#ifndef SFRON_TILE_TABLE
#error "define SFRON_TILE_TABLE before including tile_math.h"
#endif

namespace sfron_ops::cpu {
namespace {

void to_float(const void* src, Storage storage, int64_t n, float* __restrict dst) {
  switch (storage) {
    case Storage::Float32: {
      const float* in = static_cast<const float*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = in[j];
      return;
    }
    case Storage::BFloat16: {
      const uint16_t* in = static_cast<const uint16_t*>(src);
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t bits = static_cast<uint32_t>(in[j]) << 16;
        __builtin_memcpy(dst + j, &bits, sizeof(float));
      }
      return;
    }
    case Storage::Float64: {
      const double* in = static_cast<const double*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(in[j]);
      return;
    }
  }
}

void from_float(const float* __restrict src, int64_t n, void* dst, Storage storage) {
  switch (storage) {
    case Storage::Float32: {
      float* out = static_cast<float*>(dst);
      for (int64_t j = 0; j < n; ++j) out[j] = src[j];
      return;
    }
    case Storage::BFloat16: {
      // round to nearest even, quiet NaN for NaN: c10::BFloat16's rounding
      uint16_t* out = static_cast<uint16_t*>(dst);
      for (int64_t j = 0; j < n; ++j) {
        uint32_t bits;
        __builtin_memcpy(&bits, src + j, sizeof(bits));
        const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
        out[j] = src[j] != src[j] ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
      }
      return;
    }
    case Storage::Float64: {
      double* out = static_cast<double*>(dst);
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<double>(src[j]);
      return;
    }
  }
}

// The eight bits of every byte value as floats (0 or 1), least significant bit first.
struct BitFloats {
  float row[256][8];
  constexpr BitFloats() : row{} {
    for (int value = 0; value < 256; ++value) {
      for (int bit = 0; bit < 8; ++bit) row[value][bit] = static_cast<float>((value >> bit) & 1);
    }
  }
};
constexpr BitFloats BIT_FLOATS{};

void mask_to_float(const void* mask, MaskKind kind, int64_t begin, int64_t n, float* __restrict dst) {
  switch (kind) {
    case MaskKind::Byte: {
      const uint8_t* in = static_cast<const uint8_t*>(mask) + begin;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(in[j]);
      return;
    }
    case MaskKind::Packed: {
      const uint8_t* bytes = static_cast<const uint8_t*>(mask);
      int64_t j = 0;
      // leading bits up to a byte boundary, then whole bytes, then the trailing bits
      for (; j < n && ((begin + j) & 7) != 0; ++j) {
        dst[j] = static_cast<float>((bytes[(begin + j) >> 3] >> ((begin + j) & 7)) & 1);
      }
      for (; j + 8 <= n; j += 8) __builtin_memcpy(dst + j, BIT_FLOATS.row[bytes[(begin + j) >> 3]], 8 * sizeof(float));
      for (; j < n; ++j) dst[j] = static_cast<float>((bytes[(begin + j) >> 3] >> ((begin + j) & 7)) & 1);
      return;
    }
    case MaskKind::Float32: to_float(static_cast<const float*>(mask) + begin, Storage::Float32, n, dst); return;
    case MaskKind::BFloat16:
      to_float(static_cast<const uint16_t*>(mask) + begin, Storage::BFloat16, n, dst);
      return;
    case MaskKind::Float64: to_float(static_cast<const double*>(mask) + begin, Storage::Float64, n, dst); return;
    case MaskKind::Float16:
    case MaskKind::None: return;
  }
}

// u = (g * m) * coef, or g * coef without a mask
inline void directions(int64_t n, const float* __restrict grad, const float* __restrict mask, float coef,
                       float* __restrict out) {
  if (mask != nullptr) {
    for (int64_t j = 0; j < n; ++j) out[j] = direction(grad[j], mask[j], coef);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = direction(grad[j], coef);
  }
}

// SFRON_TILE_VECTOR_BYTES (set per instruction set) wide vectors; LANES / VL of them make the LANES
// accumulators, so element j + l of every LANES-block always lands in lane l.
typedef float Vec __attribute__((vector_size(SFRON_TILE_VECTOR_BYTES)));
constexpr int64_t VL = SFRON_TILE_VECTOR_BYTES / sizeof(float);
constexpr int64_t NVEC = LANES / VL;
static_assert(LANES % VL == 0, "LANES must be a multiple of the vector width");

void norm(int64_t n, const float* __restrict grad, const float* __restrict mask, float alpha,
          double* __restrict squares, float* __restrict probe) {
  Vec sq[NVEC] = {};
  Vec nan_probe[NVEC] = {};
  int64_t j = 0;
  for (; j + LANES <= n; j += LANES) {
    float u[LANES];
    if (mask != nullptr) {
      for (int64_t l = 0; l < LANES; ++l) u[l] = direction(grad[j + l], mask[j + l], alpha);
    } else {
      for (int64_t l = 0; l < LANES; ++l) u[l] = direction(grad[j + l], alpha);
    }
    for (int64_t v = 0; v < NVEC; ++v) {
      Vec uv;
      __builtin_memcpy(&uv, u + v * VL, sizeof(uv));
      sq[v] += uv * uv;
      nan_probe[v] += uv * 0.0f;
    }
  }
  for (int64_t l = 0; j + l < n; ++l) {
    const float u = mask != nullptr ? direction(grad[j + l], mask[j + l], alpha) : direction(grad[j + l], alpha);
    sq[l / VL][l % VL] += u * u;
    nan_probe[l / VL][l % VL] += u * 0.0f;
  }
  for (int64_t l = 0; l < LANES; ++l) {
    squares[l] += static_cast<double>(sq[l / VL][l % VL]);
    probe[l] += nan_probe[l / VL][l % VL];
  }
}

// Each loop applies one formula of math.h to the whole tile (the choices are made once per tile, so every
// loop vectorises).
void sgd(int64_t n, float* __restrict param, const float* __restrict grad, const float* __restrict mask,
         float* __restrict buf, bool first_step, float coef, const SgdScalars& s, float* __restrict d) {
  directions(n, grad, mask, coef, d);
  if (s.use_weight_decay) {
    for (int64_t j = 0; j < n; ++j) d[j] = with_weight_decay(d[j], param[j], s.weight_decay);
  }
  const float lr = s.lr;
  if (!s.use_momentum) {
    for (int64_t j = 0; j < n; ++j) param[j] = descend(param[j], d[j], lr);
    return;
  }
  const float mu = s.momentum;
  if (first_step) {
    for (int64_t j = 0; j < n; ++j) buf[j] = d[j];  // the buffer starts as d (torch.optim.SGD)
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = momentum_buffer(buf[j], d[j], mu, s.one_minus_dampening);
  }
  if (s.nesterov) {
    for (int64_t j = 0; j < n; ++j) param[j] = descend(param[j], nesterov(d[j], buf[j], mu), lr);
  } else {
    for (int64_t j = 0; j < n; ++j) param[j] = descend(param[j], buf[j], lr);
  }
}

void adamw(int64_t n, float* __restrict param, const float* __restrict grad, const float* __restrict mask,
           float* __restrict exp_avg, float* __restrict exp_avg_sq, float coef, float bias1, float bias2,
           const AdamScalars& s, float* __restrict u) {
  directions(n, grad, mask, coef, u);
  const float b1 = s.beta1, b2 = s.beta2, omb1 = s.one_minus_beta1, omb2 = s.one_minus_beta2;
  const float eps = s.eps, decay = s.decay;
  const float step_size = s.lr / bias1, bias2_sqrt = sqrtf(bias2);
  for (int64_t j = 0; j < n; ++j) {
    const float m1 = first_moment(exp_avg[j], u[j], b1, omb1);
    const float m2 = second_moment(exp_avg_sq[j], u[j], b2, omb2);
    param[j] = adamw_param_per_tensor(param[j], m1, m2, decay, step_size, bias2_sqrt, eps);
    exp_avg[j] = m1;
    exp_avg_sq[j] = m2;
  }
}

void fisher(int64_t n, float* __restrict f, const float* __restrict grad, float scale) {
  for (int64_t j = 0; j < n; ++j) f[j] = fisher_update(f[j], grad[j], scale);
}

int64_t saliency(int64_t n, const float* __restrict forget, const float* __restrict remain, uint8_t* __restrict mask,
                 float gamma) {
  int32_t ones = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = salient(forget[j], remain[j], gamma);
    mask[j] = keep;
    ones += keep;
  }
  return ones;
}

void lerp(int64_t n, float* __restrict slow, const float* __restrict param, float weight, float one_minus_weight,
          bool from_slow) {
  if (from_slow) {
    for (int64_t j = 0; j < n; ++j) slow[j] = lerp_low(slow[j], param[j], weight);
  } else {
    for (int64_t j = 0; j < n; ++j) slow[j] = lerp_high(slow[j], param[j], one_minus_weight);
  }
}

const TileKernels table = {
    SFRON_TILE_NAME, to_float, from_float, mask_to_float, norm, sgd, adamw, fisher, saliency, lerp,
};

}  // namespace

const TileKernels* const SFRON_TILE_TABLE = &table;

}  // namespace sfron_ops::cpu
