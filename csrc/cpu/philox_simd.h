// Philox4x32-10 for 16 consecutive counters at once, with x86 SIMD intrinsics: the words of
// groups g0 .. g0 + 15 (g0 a multiple of 16) of one key, bit-identical to philox4x32_10.
//
// Why intrinsics: the rounds need 32x32 -> 64-bit products. GCC vectorizes the scalar loop
// with zero-extension to 64-bit lanes and vpmullq (a slow 64x64 multiply) plus many lane
// extractions, which made Philox about 60% of the noise time; vpmuludq on the even and odd
// lanes, with blends, is the direct form. The ISA is picked at run time (simd_isa.h).
#pragma once
#include <cstdint>

#include "../common/philox.h"
#include "simd_isa.h"

namespace ftops {

#if defined(FTOPS_X86_SIMD)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined placeholders
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// hi and lo words of a * m in every 32-bit lane: even lanes from one vpmuludq, odd lanes
// (shifted down) from another
__attribute__((target("avx512f"), always_inline)) inline void mulhilo16(__m512i a, __m512i m,
                                                                       __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx2"), always_inline)) inline void mulhilo8(__m256i a, __m256i m,
                                                                    __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx512f"))) inline void philox16_avx512(const NoiseKey& key, uint64_t g0,
                                                               uint32_t* w0, uint32_t* w1,
                                                               uint32_t* w2, uint32_t* w3) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // no carry into the high word inside the block: g0 is a multiple of 16
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0))), lane);
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0 >> 32)));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(key.id));
  __m512i c3 = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(c0, m0, hi0, lo0);
    mulhilo16(c2, m1, hi1, lo1);
    // 0x96: a ^ b ^ c
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
    c1 = lo1;
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm512_storeu_si512(w0, c0);
  _mm512_storeu_si512(w1, c1);
  _mm512_storeu_si512(w2, c2);
  _mm512_storeu_si512(w3, c3);
}

__attribute__((target("avx2"))) inline void philox8_avx2(const NoiseKey& key, uint64_t g0,
                                                         uint32_t* w0, uint32_t* w1,
                                                         uint32_t* w2, uint32_t* w3) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // no carry into the high word inside the 8 groups: g0 is a multiple of 8
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0))), lane);
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0 >> 32)));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(key.id));
  __m256i c3 = _mm256_setzero_si256();
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3), c3);
}
#pragma GCC diagnostic pop
#endif

// The words of groups g0 .. g0 + 15 (g0 a multiple of 16): w_k[j] is word k of group g0 + j.
inline void philox_block16(const NoiseKey& key, uint64_t g0, uint32_t* w0, uint32_t* w1,
                           uint32_t* w2, uint32_t* w3) {
#if defined(FTOPS_X86_SIMD)
  if (kSimdIsa == SimdIsa::kAvx512) {
    philox16_avx512(key, g0, w0, w1, w2, w3);
    return;
  }
  if (kSimdIsa == SimdIsa::kAvx2) {
    philox8_avx2(key, g0, w0, w1, w2, w3);
    philox8_avx2(key, g0 + 8, w0 + 8, w1 + 8, w2 + 8, w3 + 8);
    return;
  }
#endif
  for (int j = 0; j < 16; ++j) noise_words(key, g0 + j, w0[j], w1[j], w2[j], w3[j]);
}

}  // namespace ftops
