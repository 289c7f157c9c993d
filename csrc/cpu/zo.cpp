// CPU kernels of the zeroth-order ops: in-place multi-tensor perturbation/update with
// counter-based noise, and the noise itself (for tests and ftops.mezo.noise_like).
//
// Noise is produced in blocks of 64 elements aligned to multiples of 64 of each element's
// global index (its index in the tensor plus the tensor's element offset, see Span); every block
// (a tensor's head and tail too) generates all 64 values with the same instruction sequence, and
// the element updates are IEEE ops without contraction, so the value for an element never
// depends on threads, chunking or where a shard starts. The block loops are written
// for the auto-vectorizer (fixed trip counts, no branches, selects on bits); they are compiled
// for AVX-512, AVX2 and baseline x86-64, picked at load time (simd_isa.h). This file is compiled with
// -ffp-contract=off so all clones (and the CUDA kernel) round identically.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/philox.h"
#include "../common/dispatch.h"
#include "../common/zo_args.h"
#include "multi_tensor.h"
#include "philox_simd.h"
#include "simd_isa.h"
#include "../common/zo_undo.h"


namespace ftops {
namespace {

constexpr int64_t kGroups = 16;               // Philox evaluations per block
constexpr int64_t kBlock = 4 * kGroups;       // elements per block

inline __attribute__((always_inline)) void block_words(const NoiseKey& key, int64_t b,
                                                       uint32_t* __restrict out) {
  alignas(64) uint32_t w[4][kGroups];
  philox_blocks(key, static_cast<uint64_t>(b) * kGroups, 1, &w[0][0]);
  for (int64_t j = 0; j < kGroups; ++j) {
    out[4 * j] = w[0][j];
    out[4 * j + 1] = w[1][j];
    out[4 * j + 2] = w[2][j];
    out[4 * j + 3] = w[3][j];
  }
}

// A tensor of `numel` elements holding elements [offset, offset + numel) of a (possibly larger,
// e.g. sharded) tensor: its noise blocks are the global blocks [first, first + count), aligned
// to multiples of 64 of the global element index, so a shard at any offset gets exactly the
// noise (and the rounding) of the same elements of the whole tensor.
struct Span {
  int64_t offset, numel;
  int64_t first_block() const { return offset / kBlock; }
  int64_t blocks() const {
    return numel == 0 ? 0 : (offset + numel + kBlock - 1) / kBlock - first_block();
  }
  // The elements of global block b that this tensor holds: block positions [lo, hi); position
  // j is local element b * 64 + j - offset.
  int64_t lo(int64_t b) const { return std::max<int64_t>(0, offset - b * kBlock); }
  int64_t hi(int64_t b) const { return std::min<int64_t>(kBlock, offset + numel - b * kBlock); }
  int64_t local(int64_t b, int64_t j) const { return b * kBlock + j - offset; }
};

// Blocks processed together. Their noise is generated in batches of kBatch blocks (Philox for
// each, then Box-Muller over all: more independent work in flight than block by block, ~10%
// faster), and the undo's shortcut gathers the elements it leaves to the exact path over a
// whole run (~17% of fp32 weights ~ N(0, 0.02) under 1e-3 z: nearly every vector of 16
// neighbours has one, so a per-vector branch would save nothing).
constexpr int64_t kRunBlocks = 16;
constexpr int64_t kRun = kRunBlocks * kBlock;
constexpr int64_t kBatch = 4;

// The normals of global blocks [b, b + nb) (nb <= kRunBlocks) of the tensor keyed by `key`,
// in element order: out[64 i + j] is element 64 (b + i) + j.
inline __attribute__((always_inline)) void run_normals(const NoiseKey& key, int64_t b,
                                                       int64_t nb, float* __restrict out) {
  for (int64_t i0 = 0; i0 < nb; i0 += kBatch) {
    const int64_t m = std::min(kBatch, nb - i0);
    alignas(64) uint32_t w[kBatch][4][kGroups];
    alignas(64) float n[kBatch][4][kGroups];
    for (int64_t i = 0; i < m; i += 2)
      philox_blocks(key, static_cast<uint64_t>(b + i0 + i) * kGroups, std::min<int>(2, m - i),
                    &w[i][0][0]);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < kGroups; ++j) {
        box_muller(w[i][0][j], w[i][1][j], n[i][0][j], n[i][1][j]);
        box_muller(w[i][2][j], w[i][3][j], n[i][2][j], n[i][3][j]);
      }
    }
    for (int64_t i = 0; i < m; ++i)
      interleave4x16(n[i][0], n[i][1], n[i][2], n[i][3], out + (i0 + i) * kBlock);
  }
}

// The run of blocks that starts at global block b, within [b, b1): nb blocks, whose elements
// in the span are run positions [lo, lo + n) (contiguous in the tensor from local element
// sp.local(b, lo), and in the run's buffers).
struct Run {
  int64_t nb, lo, n;
};

inline Run run_at(const Span& sp, int64_t b, int64_t b1) {
  const int64_t nb = std::min(kRunBlocks, b1 - b);
  const int64_t lo = sp.lo(b);
  return Run{nb, lo, (nb - 1) * kBlock + sp.hi(b + nb - 1) - lo};
}

// Float noise for global blocks [b0, b1) of a span into out (out[0] is local element 0).
FTOPS_VECTOR_CLONES void fill_normals(NoiseKey key, Span sp, int64_t b0, int64_t b1, float* out) {
  alignas(64) float z[kRun];
  for (int64_t b = b0; b < b1; b += kRunBlocks) {
    const Run r = run_at(sp, b, b1);
    run_normals(key, b, r.nb, z);
    std::copy(z + r.lo, z + r.lo + r.n, out + sp.local(b, r.lo));
  }
}

FTOPS_VECTOR_CLONES void fill_words(NoiseKey key, Span sp, int64_t b0, int64_t b1, int64_t* out) {
  alignas(64) uint32_t w[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    block_words(key, b, w);
    const int64_t lo = sp.lo(b), hi = sp.hi(b);
    int64_t* dst = out + sp.local(b, lo);
    for (int64_t j = 0; j < hi - lo; ++j) dst[j] = w[lo + j];
  }
}

// Sum over seeds of coeff_s * z_s for the run of nb blocks at global block b, in acc_t. Seed
// number `shared` (if >= 0) takes its noise from z_shared instead of generating it again.
template <typename acc_t>
inline __attribute__((always_inline)) void run_noise_sum(const NoiseKey* keys,
                                                         const acc_t* coeffs, int64_t n_seeds,
                                                         int64_t b, int64_t nb,
                                                         acc_t* __restrict acc,
                                                         int64_t shared = -1,
                                                         const float* z_shared = nullptr) {
  alignas(64) float z[kRun];
  for (int64_t j = 0; j < nb * kBlock; ++j) acc[j] = acc_t(0);
  for (int64_t s = 0; s < n_seeds; ++s) {
    const float* zs = z_shared;
    if (s != shared) {
      run_normals(keys[s], b, nb, z);
      zs = z;
    }
    const acc_t c = coeffs[s];
    for (int64_t j = 0; j < nb * kBlock; ++j) acc[j] = acc[j] + c * static_cast<acc_t>(zs[j]);
  }
}

// p = p + (sum_s c_s z_s - d p), computed in acc_t (float32 for half types), rounded once,
// on global blocks [b0, b1) of the span.
template <typename scalar_t, typename acc_t>
FTOPS_VECTOR_CLONES void axpby_blocks(scalar_t* p, Span sp, const NoiseKey* keys,
                                      const acc_t* coeffs, int64_t n_seeds, acc_t d, int64_t b0,
                                      int64_t b1) {
  alignas(64) acc_t acc_run[kRun];
  for (int64_t b = b0; b < b1; b += kRunBlocks) {
    const Run r = run_at(sp, b, b1);
    run_noise_sum<acc_t>(keys, coeffs, n_seeds, b, r.nb, acc_run);
    const acc_t* acc = acc_run + r.lo;
    // on the bit patterns, with the branch-free conversions of float_bits.h (c10's Half
    // conversions do not vectorize); the same values as static_cast
    using B = FBits<scalar_t>;
    auto* q = reinterpret_cast<typename B::U*>(p + sp.local(b, r.lo));
    for (int64_t j = 0; j < r.n; ++j) {
      const acc_t v = B::to_f(q[j]);
      q[j] = B::from_f(v + (acc[j] - decay_term<acc_t>(d, v)));
    }
  }
}

// Undo offsets a[j] = 0 + u zu[j] (kUndo) and apply sums acc[j] = sum_s c_s z_s[j] for the
// run of nb blocks at global block b. The undo noise is generated once and reused for apply
// seed number `shared`.
template <typename acc_t, bool kUndo>
inline __attribute__((always_inline)) void run_undo_terms(
    NoiseKey ukey, acc_t u, const NoiseKey* keys, const acc_t* coeffs, int64_t n_seeds,
    int64_t shared, int64_t b, int64_t nb, acc_t* __restrict a, acc_t* __restrict acc) {
  alignas(64) float zu[kRun];
  if (kUndo || shared >= 0) run_normals(ukey, b, nb, zu);
  if constexpr (kUndo) {
    for (int64_t j = 0; j < nb * kBlock; ++j) a[j] = undo_offset<acc_t>(u, zu[j]);
  }
  run_noise_sum<acc_t>(keys, coeffs, n_seeds, b, nb, acc, shared, zu);
}

// list_failures from position j on, with m positions listed so far: branch-free scalar.
inline int64_t list_failures_from(const uint8_t* fails, int64_t j, int64_t n, int32_t* idx,
                                  int64_t m) {
  for (; j < n; ++j) {
    idx[m] = static_cast<int32_t>(j);
    m += fails[j];
  }
  return m;
}

#if defined(FTOPS_X86_SIMD)
// (GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own placeholders)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) int64_t list_failures_avx512(const uint8_t* fails, int64_t n,
                                                                int32_t* idx) {
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t m = 0, j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i f =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(fails + j)));
    const __mmask16 k = _mm512_test_epi32_mask(f, f);
    _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(k, pos));
    m += __builtin_popcount(k);
    pos = _mm512_add_epi32(pos, step);
  }
  return list_failures_from(fails, j, n, idx, m);
}
#pragma GCC diagnostic pop

// AVX2 has no compress: a permutation per 8-bit mask (the positions of its set bits, in
// order) from a 2 KB table, then vpermd.
struct CompressTable {
  uint8_t perm[256][8];
};

constexpr CompressTable make_compress_table() {
  CompressTable t{};
  for (int mask = 0; mask < 256; ++mask) {
    int k = 0;
    for (int bit = 0; bit < 8; ++bit)
      if ((mask >> bit) & 1) t.perm[mask][k++] = static_cast<uint8_t>(bit);
  }
  return t;
}

alignas(64) constexpr CompressTable kCompress8 = make_compress_table();

__attribute__((target("avx2"))) int64_t list_failures_avx2(const uint8_t* fails, int64_t n,
                                                           int32_t* idx) {
  __m256i pos = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i f = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(fails + j));
    const int mask = _mm_movemask_epi8(_mm_cmpgt_epi8(f, _mm_setzero_si128())) & 0xff;
    const __m256i perm = _mm256_cvtepu8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress8.perm[mask])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m),
                        _mm256_permutevar8x32_epi32(pos, perm));
    m += __builtin_popcount(mask);
    pos = _mm256_add_epi32(pos, step);
  }
  return list_failures_from(fails, j, n, idx, m);
}
#endif

// The positions j < n where fails[j] != 0 (each 0 or 1), in order, into idx (room for n + 16
// entries); returns their count. With a SIMD compress of 16 (AVX-512) or 8 (AVX2) positions
// per step: 3x faster than the scalar loop, which GCC cannot vectorize.
int64_t list_failures(const uint8_t* fails, int64_t n, int32_t* idx) {
#if defined(FTOPS_X86_SIMD)
  if (kSimdIsa == SimdIsa::kAvx512) return list_failures_avx512(fails, n, idx);
  if (kSimdIsa == SimdIsa::kAvx2) return list_failures_avx2(fails, n, idx);
#endif
  return list_failures_from(fails, 0, n, idx, 0);
}

constexpr int64_t kLanes = 16;  // gathered elements per exact-path vector

// The undo of n <= kRun elements (bits q, offsets a) into out: the shortcut on all of them,
// then the exact path on those where it does not hold, gathered kLanes at a time (the last
// vector padded with repeats of the last one). The same results as zo_undo_bits everywhere.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void undo_with_shortcut(
    const typename FBits<scalar_t>::U* __restrict q, const acc_t* __restrict a, int64_t n,
    typename FBits<scalar_t>::U* __restrict out) {
  using U = typename FBits<scalar_t>::U;
  alignas(64) uint8_t fails[kRun];
  int32_t idx[kRun + kLanes];
  for (int64_t j = 0; j < n; ++j) {
    bool ok = false;
    out[j] = zo_undo_shortcut_bits<scalar_t, acc_t>(q[j], a[j], ok);
    fails[j] = !ok;
  }
  const int64_t m = list_failures(fails, n, idx);
  if (m == 0) return;
  for (int64_t j = m; j % kLanes != 0; ++j) idx[j] = idx[m - 1];
  for (int64_t c = 0; c < m; c += kLanes) {
    alignas(64) U qv[kLanes];
    alignas(64) acc_t av[kLanes];
    alignas(64) U r[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      qv[l] = q[idx[c + l]];
      av[l] = a[idx[c + l]];
    }
    for (int64_t l = 0; l < kLanes; ++l) r[l] = zo_undo_bits<scalar_t, acc_t>(qv[l], av[l]);
    for (int64_t l = 0; l < kLanes; ++l) out[idx[c + l]] = r[l];
  }
}

// zo_undo_axpby_ on blocks [b0, b1) of one tensor: recover t from p = F(t) (F: + u*z_undo,
// rounded with ties up; csrc/common/zo_undo.h), then p = round(t + (sum_s c_s z_s - d t)).
template <typename scalar_t, typename acc_t, bool kInvertible, bool kUndo>
FTOPS_VECTOR_CLONES void undo_axpby_blocks(scalar_t* p, Span sp, NoiseKey ukey, acc_t u,
                                    const NoiseKey* keys, const acc_t* coeffs, int64_t n_seeds,
                                    int64_t shared, acc_t d, int64_t b0, int64_t b1) {
  using U = typename FBits<scalar_t>::U;
  constexpr bool kHasShortcut = kUndo && !std::is_same_v<scalar_t, double>;
  const bool shortcut = kHasShortcut && zo_undo_shortcut_enabled();
  alignas(64) acc_t a_run[kRun];
  alignas(64) acc_t acc_run[kRun];
  alignas(64) U bits[kRun];
  for (int64_t b = b0; b < b1; b += kRunBlocks) {
    const Run r = run_at(sp, b, b1);
    run_undo_terms<acc_t, kUndo>(ukey, u, keys, coeffs, n_seeds, shared, b, r.nb, a_run, acc_run);
    const int64_t lo = r.lo, n = r.n;
    const acc_t* a = a_run + lo;
    const acc_t* acc = acc_run + lo;
    // Work on the bit patterns (a load of c10::Half/BFloat16 as a struct does not vectorize).
    U* q = reinterpret_cast<U*>(p + sp.local(b, lo));
    if constexpr (kUndo) {
      if constexpr (kHasShortcut) {
        if (shortcut) {
          undo_with_shortcut<scalar_t, acc_t>(q, a, n, bits);
        } else {
          for (int64_t j = 0; j < n; ++j) bits[j] = zo_undo_bits<scalar_t, acc_t>(q[j], a[j]);
        }
      } else {
        for (int64_t j = 0; j < n; ++j) bits[j] = zo_undo_bits<scalar_t, acc_t>(q[j], a[j]);
      }
    } else {  // undo coefficient 0: nothing to undo
      for (int64_t j = 0; j < n; ++j) bits[j] = q[j];
    }
    for (int64_t j = 0; j < n; ++j) {
      q[j] = zo_apply_bits<scalar_t, acc_t, kInvertible>(FBits<scalar_t>::to_f(bits[j]), acc[j], d);
    }
  }
}

// The spans of a tensor list: element offsets[k] (none given: 0) and numel of each tensor.
std::vector<Span> spans_of(at::TensorList params, at::IntArrayRef offsets) {
  std::vector<Span> spans(params.size());
  for (size_t k = 0; k < params.size(); ++k)
    spans[k] = Span{offsets.empty() ? 0 : offsets[k], params[k].numel()};
  return spans;
}

std::vector<int64_t> blocks_of(const std::vector<Span>& spans) {
  std::vector<int64_t> blocks(spans.size());
  for (size_t k = 0; k < spans.size(); ++k) blocks[k] = spans[k].blocks();
  return blocks;
}

template <typename acc_t>
const acc_t* pick(const std::vector<float>& f, const std::vector<double>& d) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return d.data();
  } else {
    return f.data();
  }
}

void zo_undo_axpby_cpu(at::TensorList params, int64_t undo_seed, at::ArrayRef<double> undo_coeffs,
                       at::IntArrayRef seeds, at::IntArrayRef ids, at::ArrayRef<double> coeffs,
                       at::ArrayRef<double> decay, bool invertible, at::IntArrayRef offsets) {
  check_zo_undo_axpby_args(params, undo_coeffs, seeds, ids, coeffs, decay, offsets,
                           c10::DeviceType::CPU);
  const int64_t K = static_cast<int64_t>(params.size());
  const int64_t S = static_cast<int64_t>(seeds.size());
  if (K == 0) return;
  int64_t shared = -1;  // the apply seed whose noise is the undo noise, if any
  for (int64_t s = 0; s < S && shared < 0; ++s)
    if (seeds[s] == undo_seed) shared = s;

  const std::vector<Span> spans = spans_of(params, offsets);
  std::vector<NoiseKey> keys(std::max<int64_t>(S * K, 1));
  std::vector<NoiseKey> ukeys(K);
  for (int64_t k = 0; k < K; ++k) {
    ukeys[k] = make_noise_key(static_cast<uint64_t>(undo_seed), static_cast<uint64_t>(ids[k]));
    for (int64_t s = 0; s < S; ++s)
      keys[k * S + s] = make_noise_key(static_cast<uint64_t>(seeds[s]), static_cast<uint64_t>(ids[k]));
  }
  std::vector<float> coeffs_f(std::max<int64_t>(S * K, 1));
  std::vector<double> coeffs_d(std::max<int64_t>(S * K, 1));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t k = 0; k < K; ++k) {
      coeffs_d[k * S + s] = coeffs[s * K + k];
      coeffs_f[k * S + s] = static_cast<float>(coeffs[s * K + k]);
    }

  parallel_over_tensor_units(blocks_of(spans), /*grain_size=*/32, [&](int64_t k, int64_t lb0, int64_t lb1) {
      const at::Tensor& p = params[k];
      const Span sp = spans[k];
      const int64_t b0 = sp.first_block() + lb0, b1 = sp.first_block() + lb1;
      FTOPS_DISPATCH_FLOAT_TYPES(p.scalar_type(), "zo_undo_axpby_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const acc_t* cs = pick<acc_t>(coeffs_f, coeffs_d) + k * S;
        const acc_t u = static_cast<acc_t>(undo_coeffs[k]);
        const acc_t d = static_cast<acc_t>(decay[k]);
        scalar_t* ptr = p.data_ptr<scalar_t>();
        const NoiseKey* ks = keys.data() + k * S;
        if (invertible && u != acc_t(0)) {
          undo_axpby_blocks<scalar_t, acc_t, true, true>(ptr, sp, ukeys[k], u, ks, cs, S, shared,
                                                         d, b0, b1);
        } else if (invertible) {
          undo_axpby_blocks<scalar_t, acc_t, true, false>(ptr, sp, ukeys[k], u, ks, cs, S, shared,
                                                          d, b0, b1);
        } else if (u != acc_t(0)) {
          undo_axpby_blocks<scalar_t, acc_t, false, true>(ptr, sp, ukeys[k], u, ks, cs, S, shared,
                                                          d, b0, b1);
        } else {
          undo_axpby_blocks<scalar_t, acc_t, false, false>(ptr, sp, ukeys[k], u, ks, cs, S,
                                                           shared, d, b0, b1);
        }
      });
  });
}

void zo_axpby_cpu(at::TensorList params, at::IntArrayRef seeds, at::IntArrayRef ids,
                  at::ArrayRef<double> coeffs, at::ArrayRef<double> decay,
                  at::IntArrayRef offsets) {
  check_zo_axpby_args(params, seeds, ids, coeffs, decay, offsets, c10::DeviceType::CPU);
  const int64_t K = static_cast<int64_t>(params.size());
  const int64_t S = static_cast<int64_t>(seeds.size());
  if (K == 0) return;

  // One parallel loop over the blocks of all tensors (the CPU's multi-tensor launch).
  const std::vector<Span> spans = spans_of(params, offsets);
  std::vector<NoiseKey> keys(S * K);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t k = 0; k < K; ++k)
      keys[k * S + s] = make_noise_key(static_cast<uint64_t>(seeds[s]), static_cast<uint64_t>(ids[k]));
  std::vector<float> coeffs_f(S * K);
  std::vector<double> coeffs_d(S * K);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t k = 0; k < K; ++k) {
      coeffs_d[k * S + s] = coeffs[s * K + k];
      coeffs_f[k * S + s] = static_cast<float>(coeffs[s * K + k]);
    }

  parallel_over_tensor_units(blocks_of(spans), /*grain_size=*/32, [&](int64_t k, int64_t lb0, int64_t lb1) {
      const at::Tensor& p = params[k];
      const Span sp = spans[k];
      const int64_t b0 = sp.first_block() + lb0, b1 = sp.first_block() + lb1;
      FTOPS_DISPATCH_FLOAT_TYPES(p.scalar_type(), "zo_axpby_cpu", [&] {
        if constexpr (std::is_same_v<scalar_t, double>) {
          axpby_blocks<double, double>(p.data_ptr<double>(), sp, &keys[k * S], &coeffs_d[k * S],
                                       S, decay[k], b0, b1);
        } else {
          axpby_blocks<scalar_t, float>(p.data_ptr<scalar_t>(), sp, &keys[k * S],
                                        &coeffs_f[k * S], S, static_cast<float>(decay[k]), b0, b1);
        }
      });
  });
}

at::Tensor zo_noise_cpu(const at::Tensor& like, int64_t seed, int64_t index, int64_t offset) {
  check_zo_noise_args("ftops.zo_noise", index, offset);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat).layout(at::kStrided)
                                               .memory_format(at::MemoryFormat::Contiguous));
  const NoiseKey key = make_noise_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(index));
  const Span sp{offset, out.numel()};
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, sp.blocks(), 32, [&](int64_t lb0, int64_t lb1) {
    fill_normals(key, sp, sp.first_block() + lb0, sp.first_block() + lb1, dst);
  });
  return out;
}

at::Tensor zo_noise_bits_cpu(const at::Tensor& like, int64_t seed, int64_t index, int64_t offset) {
  check_zo_noise_args("ftops.zo_noise_bits", index, offset);
  at::Tensor out = at::empty({like.numel()}, like.options().dtype(at::kLong).layout(at::kStrided));
  const NoiseKey key = make_noise_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(index));
  const Span sp{offset, out.numel()};
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, sp.blocks(), 32, [&](int64_t lb0, int64_t lb1) {
    fill_words(key, sp, sp.first_block() + lb0, sp.first_block() + lb1, dst);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CPU, m) {
  m.impl("zo_axpby_", &zo_axpby_cpu);
  m.impl("zo_undo_axpby_", &zo_undo_axpby_cpu);
  m.impl("zo_noise", &zo_noise_cpu);
  m.impl("zo_noise_bits", &zo_noise_bits_cpu);
}

}  // namespace ftops
