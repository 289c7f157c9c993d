// Which hand-written x86 SIMD path the CPU kernels take (Philox, SDDMM, the undo's gathering),
// decided once at load time: the best this CPU has, or FTOPS_SIMD=avx512|avx2|scalar to force
// one (for tests; never beyond what the CPU has). A build runs on any x86-64; the loops left to
// the auto-vectorizer use target_clones instead.
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FTOPS_X86_SIMD 1
#include <immintrin.h>
#endif

namespace ftops {

// kAvx2: AVX2 and FMA; kAvx512: AVX-512F (and with it FMA).
enum class SimdIsa { kScalar, kAvx2, kAvx512 };

inline SimdIsa detect_simd_isa() {
  SimdIsa best = SimdIsa::kScalar;
#if defined(FTOPS_X86_SIMD)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = SimdIsa::kAvx2;
  if (__builtin_cpu_supports("avx512f")) best = SimdIsa::kAvx512;
#endif
  const char* force = std::getenv("FTOPS_SIMD");
  if (force == nullptr) return best;
  SimdIsa want = best;
  if (std::strcmp(force, "scalar") == 0) want = SimdIsa::kScalar;
  if (std::strcmp(force, "avx2") == 0) want = SimdIsa::kAvx2;
  if (std::strcmp(force, "avx512") == 0) want = SimdIsa::kAvx512;
  return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
}

inline const SimdIsa kSimdIsa = detect_simd_isa();

}  // namespace ftops
