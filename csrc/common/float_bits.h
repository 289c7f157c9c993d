// Bit access and branch-free conversions for the four parameter dtypes, shared by the CPU and
// CUDA kernels (the MeZO undo and updates, AdamW's half-type tiles).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "philox.h"  // FTOPS_HD, float_to_bits, bits_to_float, select_bits

namespace ftops {

// Bit access for the four parameter dtypes.
template <typename T>
struct FBits;

template <>
struct FBits<float> {
  using U = uint32_t;
  static constexpr U kSign = 0x80000000u;
  static constexpr U kInf = 0x7f800000u;
  FTOPS_HD static U get(float x) { return float_to_bits(x); }
  FTOPS_HD static float make(U b) { return bits_to_float(b); }
  FTOPS_HD static float to_f(U b) { return bits_to_float(b); }
  FTOPS_HD static U from_f(float f) { return float_to_bits(f); }
};

template <>
struct FBits<double> {
  using U = uint64_t;
  static constexpr U kSign = 0x8000000000000000ull;
  static constexpr U kInf = 0x7ff0000000000000ull;
  FTOPS_HD static U get(double x) {
#if defined(__CUDA_ARCH__)
    return static_cast<U>(__double_as_longlong(x));
#else
    U b;
    std::memcpy(&b, &x, sizeof b);
    return b;
#endif
  }
  FTOPS_HD static double make(U b) {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(static_cast<long long>(b));
#else
    double x;
    std::memcpy(&x, &b, sizeof x);
    return x;
#endif
  }
  FTOPS_HD static double to_f(U b) { return make(b); }
  FTOPS_HD static U from_f(double f) { return get(f); }
};

// Conversions between the half types' bits and float32, branch-free (so that the CPU loops
// vectorize, which c10's conversions with their NaN branches do not) and bit-identical to
// c10's (IEEE round to nearest even; exact widening). fp16 ones: on the CPU the FP16 library's
// algorithms that c10 itself falls back to (they need no denormal flushing, which the CPU build
// does not enable), on the GPU the hardware conversions (the same values; the undo and the
// perturbation of fp16 took ~35% fewer instructions).
FTOPS_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

FTOPS_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select_bits<uint32_t>(f != f, 0x7fc0u, r));
}

FTOPS_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  // The GPU has the conversion in hardware (exact; no flushing without .ftz): one instruction
  // instead of ~12. A NaN may come out with another payload than below, but every use of a NaN
  // here either returns the input pattern or goes through float arithmetic, whose NaN result
  // the GPU makes canonical anyway.
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = select_bits<uint32_t>(two_w < (1u << 27), float_to_bits(denormalized),
                                             float_to_bits(normalized));
  return bits_to_float(sign | mag);
#endif
}

FTOPS_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  // hardware round to nearest even (subnormals kept, overflow to inf, as below); NaN as below
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  const uint16_t nan = static_cast<uint16_t>(((float_to_bits(f) >> 16) & 0x8000u) | 0x7e00u);
  return select_bits<uint16_t>(f != f, nan, h);
#else
  const uint32_t w = float_to_bits(f);
  float base = (bits_to_float(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = select_bits<uint32_t>(bias < 0x71000000u, 0x71000000u, bias);
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) |
                               select_bits<uint32_t>(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
#endif
}

template <>
struct FBits<c10::Half> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  static constexpr U kInf = 0x7c00u;
  FTOPS_HD static U get(c10::Half x) { return x.x; }
  FTOPS_HD static c10::Half make(U b) { return c10::Half(b, c10::Half::from_bits()); }
  FTOPS_HD static float to_f(U b) { return half_bits_to_float(b); }
  FTOPS_HD static U from_f(float f) { return float_to_half_bits(f); }
};

template <>
struct FBits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  static constexpr U kInf = 0x7f80u;
  FTOPS_HD static U get(c10::BFloat16 x) { return x.x; }
  FTOPS_HD static c10::BFloat16 make(U b) { return c10::BFloat16(b, c10::BFloat16::from_bits()); }
  FTOPS_HD static float to_f(U b) { return bf16_bits_to_float(b); }
  FTOPS_HD static U from_f(float f) { return float_to_bf16_bits(f); }
};

}  // namespace ftops
