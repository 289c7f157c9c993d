// Counter-based noise shared by the CPU and CUDA kernels.
//
// Noise for element i of tensor `id` in a step with seed `seed` is a pure function of
// (seed, id, i): Philox4x32-10 keyed by the seed, counter = (i / 4 as 64 bits, id, 0), output
// word i % 4. Normals come from Box-Muller on word pairs (x0, x1) and (x2, x3).
//
// Everything here uses only integer ops, +, -, *, and correctly rounded sqrt, so the same
// source gives bit-identical results on the host and on the device, provided the compilers do
// not contract a*b+c into FMAs (CPU: -ffp-contract=off; CUDA: --fmad=false for these files).
// log and sincos are our own branch-free polynomials (Cephes coefficients, ~1 ulp in the
// ranges used) so that the CPU loops vectorize and no libm difference creeps in.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FTOPS_HD __host__ __device__ __forceinline__
#else
#define FTOPS_HD inline __attribute__((always_inline))
#endif

namespace ftops {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// One Philox round with its round keys k0, k1.
FTOPS_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                           uint32_t k1) {
#if defined(__CUDA_ARCH__)
  // the same words; through a 64-bit product ptxas copies every high word into a fresh
  // register (20 extra instructions per evaluation, ~6% of a perturbation pass)
  const uint32_t hi0 = __umulhi(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
  const uint32_t hi1 = __umulhi(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
#else
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
#endif
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Philox's 10 round keys for key (k0, k1): round r uses (k0 + r W0, k1 + r W1). A CUDA kernel
// that takes them precomputed in its arguments reads them as constants, where computing them
// costs 18 instructions per evaluation (~5% of a perturbation pass).
struct PhiloxRoundKeys {
  uint32_t k0[10], k1[10];
};

FTOPS_HD PhiloxRoundKeys philox_round_keys(uint32_t k0, uint32_t k1) {
  PhiloxRoundKeys rk;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    rk.k0[round] = k0;
    rk.k1[round] = k1;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return rk;
}

// One Philox4x32-10 evaluation. c0..c3 are the counter words on input, the output on return.
FTOPS_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                            const PhiloxRoundKeys& rk) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) philox_round(c0, c1, c2, c3, rk.k0[round], rk.k1[round]);
}

FTOPS_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                            uint32_t k0, uint32_t k1) {
  philox4x32_10(c0, c1, c2, c3, philox_round_keys(k0, k1));
}

FTOPS_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

FTOPS_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// c ? x : y on bit patterns (any unsigned type); on the CPU as mask arithmetic. In the long
// loops of the undo GCC (12) threads jumps through `?:` selects (the NaN tests especially) and
// the loops, with branches inside, no longer vectorize; the mask form stays branch-free.
template <typename U>
FTOPS_HD U select_bits(bool c, U x, U y) {
#if defined(__CUDA_ARCH__)
  return c ? x : y;  // one SEL; the mask form costs three instructions on the GPU
#else
  return static_cast<U>(y ^ ((x ^ y) & static_cast<U>(U(0) - static_cast<U>(c))));
#endif
}

// The same on floats. In the noise, `?:` let GCC move the float ops that feed one side under
// a branch; FP ops may trap, so it then vectorized the loop only where AVX-512 masks can take
// the branch's place: the AVX2 and baseline x86-64 noise was scalar, 5x slower.
FTOPS_HD float select_float(bool c, float x, float y) {
  return bits_to_float(select_bits<uint32_t>(c, float_to_bits(x), float_to_bits(y)));
}

// Natural log of x in [2^-24, 1] (positive, normal). Cephes logf, branch-free.
FTOPS_HD float noise_log(float x) {
  const uint32_t bits = float_to_bits(x);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 126;  // x = m * 2^e, m in [0.5, 1)
  const float m = bits_to_float((bits & 0x7fffffu) | 0x3f000000u);
  const bool below = m < 0.707106781186547524f;
  e = below ? e - 1 : e;
  const float f = select_float(below, (m + m) - 1.0f, m - 1.0f);
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y = y + -2.12194440e-4f * fe;
  y = y + -0.5f * z;
  float r = f + y;
  r = r + 0.693359375f * fe;
  return r;
}

// sin and cos of 2*pi*k/2^24 for an integer k in [0, 2^24): the quadrant and the reduced
// angle are taken from k's bits exactly, then Cephes polynomials on [-pi/4, pi/4].
FTOPS_HD void noise_sincos_2pi(uint32_t k, float& s, float& c) {
  const uint32_t q_unwrapped = (k + (1u << 21)) >> 22;  // nearest quarter turn
  const int32_t rem = static_cast<int32_t>(k) - static_cast<int32_t>(q_unwrapped << 22);
  const uint32_t q = q_unwrapped & 3u;
  // rem in [-2^21, 2^21): angle = rem * 2^-22 * (pi/2)
  const float a = static_cast<float>(rem) * 3.74507028e-7f;  // (pi/2) / 2^22
  const float z = a * a;
  float sp = -1.9515295891e-4f;
  sp = sp * z + 8.3321608736e-3f;
  sp = sp * z - 1.6666654611e-1f;
  sp = sp * z * a + a;
  float cp = 2.443315711809948e-5f;
  cp = cp * z - 1.388731625493765e-3f;
  cp = cp * z + 4.166664568298827e-2f;
  cp = cp * z * z - 0.5f * z + 1.0f;
  // rotate by q quarter turns
  const bool swap = (q & 1u) != 0u;
  const float s0 = select_float(swap, cp, sp);
  const float c0 = select_float(swap, sp, cp);
  const bool neg_s = q >= 2u;
  const bool neg_c = (q == 1u) || (q == 2u);
  s = select_float(neg_s, -s0, s0);
  c = select_float(neg_c, -c0, c0);
}

// Correctly rounded on both sides (CUDA's sqrtf is IEEE unless -prec-sqrt=false). The CPU build
// uses -fno-math-errno so this stays a single vectorizable instruction.
FTOPS_HD float noise_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// Two standard normals from two uint32 words (Box-Muller).
FTOPS_HD void box_muller(uint32_t xa, uint32_t xb, float& n0, float& n1) {
  // u1 = (2j+1) * 2^-24 in (0, 1), exact in float; |n| <= 5.77 (converted as an int32, the
  // same value: AVX2 has no unsigned conversion)
  const float u1 =
      static_cast<float>(static_cast<int32_t>(((xa >> 9) << 1) | 1u)) * 5.9604644775390625e-8f;
  const float r = noise_sqrt(-2.0f * noise_log(u1));
  float s, c;
  noise_sincos_2pi(xb >> 8, s, c);
  n0 = r * c;
  n1 = r * s;
}

// Philox key and counter words for group g (elements 4g..4g+3) of tensor `id`.
struct NoiseKey {
  uint32_t k0, k1, id;
};

FTOPS_HD NoiseKey make_noise_key(uint64_t seed, uint64_t id) {
  return NoiseKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                  static_cast<uint32_t>(id)};
}

// The round keys of a noise key's seed (its id is not part of the Philox key).
FTOPS_HD PhiloxRoundKeys philox_round_keys(const NoiseKey& key) {
  return philox_round_keys(key.k0, key.k1);
}

// The 4 raw words of group g, from the seed's round keys (philox_round_keys(key)) and the
// tensor id.
FTOPS_HD void noise_words(const PhiloxRoundKeys& rk, uint32_t id, uint64_t g, uint32_t& w0,
                          uint32_t& w1, uint32_t& w2, uint32_t& w3) {
  w0 = static_cast<uint32_t>(g);
  w1 = static_cast<uint32_t>(g >> 32);
  w2 = id;
  w3 = 0u;
  philox4x32_10(w0, w1, w2, w3, rk);
}

FTOPS_HD void noise_words(const NoiseKey& key, uint64_t g, uint32_t& w0, uint32_t& w1,
                          uint32_t& w2, uint32_t& w3) {
  noise_words(philox_round_keys(key), key.id, g, w0, w1, w2, w3);
}

// The 4 normals of group g: elements 4g, 4g+1, 4g+2, 4g+3.
FTOPS_HD void noise_normals(const PhiloxRoundKeys& rk, uint32_t id, uint64_t g, float& n0,
                            float& n1, float& n2, float& n3) {
  uint32_t w0, w1, w2, w3;
  noise_words(rk, id, g, w0, w1, w2, w3);
  box_muller(w0, w1, n0, n1);
  box_muller(w2, w3, n2, n3);
}

FTOPS_HD void noise_normals(const NoiseKey& key, uint64_t g, float& n0, float& n1, float& n2,
                            float& n3) {
  noise_normals(philox_round_keys(key), key.id, g, n0, n1, n2, n3);
}

}  // namespace ftops
