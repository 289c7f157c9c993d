// The CPU's instruction sets. A build runs on any x86-64:
//  * the loops left to the auto-vectorizer are compiled per ISA (FTOPS_VECTOR_CLONES) and the
//    loader picks the best the CPU has;
//  * the hand-written SIMD paths (Philox, SDDMM, the undo's gathering) follow kSimdIsa, decided
//    once at load time: the best this CPU has, or FTOPS_SIMD=avx512|avx2|scalar to force one
//    (for tests; never beyond what the CPU has).
#pragma once
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FTOPS_X86_SIMD 1
#include <immintrin.h>
#endif

// x86-64-v4 (AVX-512 F/BW/DQ/VL), not plain avx512f: the half-type loops mix 16- and 32-bit
// lanes, and without AVX512BW GCC only vectorizes them 256 bits wide. The build option
// FTOPS_CPU_TARGET (CMakeLists.txt) compiles them for one target instead, to test its code.
#if defined(FTOPS_CPU_TARGET)
#define FTOPS_VECTOR_CLONES __attribute__((target(FTOPS_CPU_TARGET)))
#elif defined(FTOPS_X86_SIMD)
#define FTOPS_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FTOPS_VECTOR_CLONES
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
