// The CPU noise's SIMD pieces, with x86 intrinsics: Philox4x32-10 for blocks of 16 consecutive
// counters (bit-identical to philox4x32_10), and the interleave of Box-Muller's outputs into
// element order.
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

// Words of 16 * N consecutive groups from g0 (a multiple of 16) as N independent chains of
// 16 lanes, interleaved: one chain alone waits on its multiplies (~8 cycles a round), two keep
// the multiplier busy (Philox 25% faster). Word k of group g0 + 16 c + j goes to
// w[64 c + 16 k + j].
template <int N>
__attribute__((target("avx512f"))) inline void philox_avx512(const NoiseKey& key, uint64_t g0,
                                                             uint32_t* w) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i c0[N], c1[N], c2[N], c3[N];
  for (int c = 0; c < N; ++c) {
    const uint64_t g = g0 + 16 * c;  // a multiple of 16: no carry into the high word
    c0[c] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    c1[c] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    c2[c] = _mm512_set1_epi32(static_cast<int>(key.id));
    c3[c] = _mm512_setzero_si512();
  }
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int c = 0; c < N; ++c) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0[c], m0, hi0, lo0);
      mulhilo16(c2[c], m1, hi1, lo1);
      c0[c] = _mm512_ternarylogic_epi32(hi1, c1[c], key0, 0x96);  // 0x96: a ^ b ^ c
      c1[c] = lo1;
      c2[c] = _mm512_ternarylogic_epi32(hi0, c3[c], key1, 0x96);
      c3[c] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int c = 0; c < N; ++c) {
    _mm512_storeu_si512(w + 64 * c, c0[c]);
    _mm512_storeu_si512(w + 64 * c + 16, c1[c]);
    _mm512_storeu_si512(w + 64 * c + 32, c2[c]);
    _mm512_storeu_si512(w + 64 * c + 48, c3[c]);
  }
}

// The same with AVX2, N chains of 8 groups (two per 16): word k of group g0 + 8 c + j goes to
// w[64 (c / 2) + 16 k + 8 (c % 2) + j].
template <int N>
__attribute__((target("avx2"))) inline void philox_avx2(const NoiseKey& key, uint64_t g0,
                                                        uint32_t* w) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  __m256i c0[N], c1[N], c2[N], c3[N];
  for (int c = 0; c < N; ++c) {
    const uint64_t g = g0 + 8 * c;  // a multiple of 8: no carry into the high word
    c0[c] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    c1[c] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    c2[c] = _mm256_set1_epi32(static_cast<int>(key.id));
    c3[c] = _mm256_setzero_si256();
  }
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int c = 0; c < N; ++c) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0[c], m0, hi0, lo0);
      mulhilo8(c2[c], m1, hi1, lo1);
      c0[c] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[c]), key0);
      c1[c] = lo1;
      c2[c] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[c]), key1);
      c3[c] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int c = 0; c < N; ++c) {
    uint32_t* base = w + 64 * (c / 2) + 8 * (c % 2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(base), c0[c]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(base + 16), c1[c]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(base + 32), c2[c]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(base + 48), c3[c]);
  }
}

// out[4j + k] = n_k[j] for j < 16: the normals of 16 groups (Box-Muller's four outputs, each a
// vector over the groups) in element order. GCC's own code for this loop is dozens of 128-bit
// shuffles (a third of the noise's time with AVX-512); unpacks within 128-bit lanes, then a
// 4x4 transpose of the lanes, are 12 shuffles.
__attribute__((target("avx512f"))) inline void interleave4x16_avx512(const float* n0,
                                                                     const float* n1,
                                                                     const float* n2,
                                                                     const float* n3, float* out) {
  const __m512 a = _mm512_loadu_ps(n0), b = _mm512_loadu_ps(n1);
  const __m512 c = _mm512_loadu_ps(n2), d = _mm512_loadu_ps(n3);
  const __m512 ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
  const __m512 cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
  // groups (4 floats each) 0,4,8,12 / 1,5,9,13 / 2,6,10,14 / 3,7,11,15, one per 128-bit lane
  const __m512 g0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo)));
  const __m512 g1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_lo), _mm512_castps_pd(cd_lo)));
  const __m512 g2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi)));
  const __m512 g3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab_hi), _mm512_castps_pd(cd_hi)));
  const __m512 v0 = _mm512_shuffle_f32x4(g0, g1, 0x44);  // groups 0, 4, 1, 5
  const __m512 v1 = _mm512_shuffle_f32x4(g2, g3, 0x44);  // 2, 6, 3, 7
  const __m512 v2 = _mm512_shuffle_f32x4(g0, g1, 0xEE);  // 8, 12, 9, 13
  const __m512 v3 = _mm512_shuffle_f32x4(g2, g3, 0xEE);  // 10, 14, 11, 15
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(v0, v1, 0x88));       // 0, 1, 2, 3
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(v0, v1, 0xDD));  // 4, 5, 6, 7
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(v2, v3, 0x88));  // 8, 9, 10, 11
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(v2, v3, 0xDD));  // 12, 13, 14, 15
}

// The same for 8 groups with AVX2 (called twice for 16).
__attribute__((target("avx2"))) inline void interleave4x8_avx2(const float* n0, const float* n1,
                                                               const float* n2, const float* n3,
                                                               float* out) {
  const __m256 a = _mm256_loadu_ps(n0), b = _mm256_loadu_ps(n1);
  const __m256 c = _mm256_loadu_ps(n2), d = _mm256_loadu_ps(n3);
  const __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
  const __m256 cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
  // groups 0,4 / 1,5 / 2,6 / 3,7, one per 128-bit lane
  const __m256 g0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
  const __m256 g1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
  const __m256 g2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
  const __m256 g3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(g0, g1, 0x20));       // 0, 1
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(g2, g3, 0x20));   // 2, 3
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(g0, g1, 0x31));  // 4, 5
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(g2, g3, 0x31));  // 6, 7
}
#pragma GCC diagnostic pop
#endif

// The words of nb <= 2 blocks of 16 groups from g0 (a multiple of 16): word k of group
// g0 + 16 i + j goes to w[64 i + 16 k + j].
inline void philox_blocks(const NoiseKey& key, uint64_t g0, int nb, uint32_t* w) {
#if defined(FTOPS_X86_SIMD)
  if (kSimdIsa == SimdIsa::kAvx512) {
    if (nb == 2) {
      philox_avx512<2>(key, g0, w);
    } else {
      philox_avx512<1>(key, g0, w);
    }
    return;
  }
  if (kSimdIsa == SimdIsa::kAvx2) {
    if (nb == 2) {
      philox_avx2<4>(key, g0, w);
    } else {
      philox_avx2<2>(key, g0, w);
    }
    return;
  }
#endif
  for (int i = 0; i < nb; ++i) {
    for (int j = 0; j < 16; ++j) {
      uint32_t* wi = w + 64 * i + j;
      noise_words(key, g0 + 16 * i + j, wi[0], wi[16], wi[32], wi[48]);
    }
  }
}

// out[4j + k] = n_k[j] for j < 16 (64 normals in element order).
inline void interleave4x16(const float* n0, const float* n1, const float* n2, const float* n3,
                           float* out) {
#if defined(FTOPS_X86_SIMD)
  if (kSimdIsa == SimdIsa::kAvx512) {
    interleave4x16_avx512(n0, n1, n2, n3, out);
    return;
  }
  if (kSimdIsa == SimdIsa::kAvx2) {
    interleave4x8_avx2(n0, n1, n2, n3, out);
    interleave4x8_avx2(n0 + 8, n1 + 8, n2 + 8, n3 + 8, out + 32);
    return;
  }
#endif
  for (int j = 0; j < 16; ++j) {
    out[4 * j + 0] = n0[j];
    out[4 * j + 1] = n1[j];
    out[4 * j + 2] = n2[j];
    out[4 * j + 3] = n3[j];
  }
}

}  // namespace ftops
