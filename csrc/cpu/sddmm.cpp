// CPU kernel of ftops::sddmm (sampled dense-dense matmul, the sparse weight gradient of SaRA):
// out[k] = sum_t dy[t, rows[k]] * x[t, cols[k]], dy (T, m), x (T, n).
//
// x is copied once, transposed, into an acc_t (float, or double for float64) buffer B (n, T), so
// that each column of x is a contiguous row. Outputs are then processed by one at::parallel_for
// in index order. Each task walks T in blocks of kTBlock; for the output's row r it keeps the
// columns dy[t0:t0+tb, r'] of r's group of kRowGroup rows transposed in a task-local buffer
// (refilled when the row leaves the group: SaRA's indices are sorted row-major, so each group is
// filled once per T block), and computes the dot products with the
// B rows of the outputs' columns, 4 outputs at a time so the dy column is loaded once per 4 B rows.
// The dots keep 2 x 4 independent SIMD accumulators (a fixed summation order, independent of the
// thread count) and use fused multiply-adds where the CPU has them (explicit fma, so this does not
// depend on -ffp-contract); the AVX-512 / AVX2+FMA / generic variant is chosen at run time.
// Temporaries: B (n * T values) and kRowGroup * kTBlock values per task; dy is never copied whole.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/sddmm_args.h"
#include "../common/dispatch.h"

namespace ftops {
namespace {

template <typename acc_t, bool kFma>
inline __attribute__((always_inline)) acc_t madd(acc_t a, acc_t b, acc_t c) {
  if constexpr (kFma) {
    if constexpr (std::is_same_v<acc_t, double>) {
      return __builtin_fma(a, b, c);
    } else {
      return __builtin_fmaf(a, b, c);
    }
  } else {
    return c + a * b;
  }
}

template <typename acc_t, int L>
inline __attribute__((always_inline)) acc_t reduce_lanes(const acc_t* s) {
  acc_t t[L];
  for (int j = 0; j < L; ++j) t[j] = s[j];
  for (int w = L / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) t[j] = t[j] + t[j + w];
  return t[0];
}

// <a, b> over T elements, L lanes.
template <typename acc_t, int L, bool kFma>
inline __attribute__((always_inline)) acc_t dot1(const acc_t* __restrict a,
                                                 const acc_t* __restrict b, int64_t T) {
  acc_t s[L] = {};
  int64_t t = 0;
  for (; t + L <= T; t += L)
    for (int j = 0; j < L; ++j) s[j] = madd<acc_t, kFma>(a[t + j], b[t + j], s[j]);
  for (int j = 0; t + j < T; ++j) s[j] = madd<acc_t, kFma>(a[t + j], b[t + j], s[j]);
  return reduce_lanes<acc_t, L>(s);
}

// <a, b0..b3> over T elements, a loaded once; the same summation order as dot1.
template <typename acc_t, int L, bool kFma>
inline __attribute__((always_inline)) void dot4(const acc_t* __restrict a,
                                                const acc_t* __restrict b0,
                                                const acc_t* __restrict b1,
                                                const acc_t* __restrict b2,
                                                const acc_t* __restrict b3, int64_t T,
                                                acc_t* res) {
  acc_t s0[L] = {}, s1[L] = {}, s2[L] = {}, s3[L] = {};
  int64_t t = 0;
  for (; t + L <= T; t += L) {
    for (int j = 0; j < L; ++j) {
      const acc_t av = a[t + j];
      s0[j] = madd<acc_t, kFma>(av, b0[t + j], s0[j]);
      s1[j] = madd<acc_t, kFma>(av, b1[t + j], s1[j]);
      s2[j] = madd<acc_t, kFma>(av, b2[t + j], s2[j]);
      s3[j] = madd<acc_t, kFma>(av, b3[t + j], s3[j]);
    }
  }
  for (int j = 0; t + j < T; ++j) {
    const acc_t av = a[t + j];
    s0[j] = madd<acc_t, kFma>(av, b0[t + j], s0[j]);
    s1[j] = madd<acc_t, kFma>(av, b1[t + j], s1[j]);
    s2[j] = madd<acc_t, kFma>(av, b2[t + j], s2[j]);
    s3[j] = madd<acc_t, kFma>(av, b3[t + j], s3[j]);
  }
  res[0] = reduce_lanes<acc_t, L>(s0);
  res[1] = reduce_lanes<acc_t, L>(s1);
  res[2] = reduce_lanes<acc_t, L>(s2);
  res[3] = reduce_lanes<acc_t, L>(s3);
}

constexpr int64_t kTBlock = 512;  // rows of T per block inside a task (B block stays in L2)

constexpr int64_t kRowGroup = 16;  // dy columns transposed together into the task buffer

// Outputs k0..k1 (exclusive) of one task. abuf holds kRowGroup * kTBlock values: the columns
// dy[t0:t0+tb, g*kRowGroup : (g+1)*kRowGroup] of the current row group g, transposed in
// kRowGroup x kRowGroup blocks (each source cache line is read once per group, each destination
// row written in contiguous runs), refilled when the outputs' row leaves the group.
template <typename scalar_t, typename acc_t, typename idx_t, int L, bool kFma>
inline __attribute__((always_inline)) void range_body(const scalar_t* dy, int64_t s0, int64_t s1,
                                                      int64_t m, int64_t G, const acc_t* B,
                                                      int64_t T, const idx_t* rows,
                                                      const idx_t* cols, int64_t k0, int64_t k1,
                                                      acc_t* out, acc_t* abuf) {
  for (int64_t k = k0; k < k1; ++k) out[k] = acc_t(0);
  for (int64_t t0 = 0; t0 < T; t0 += kTBlock) {
    const int64_t tb = std::min(kTBlock, T - t0);
    const scalar_t* dyb = dy + t0 * s0;
    const acc_t* Bb = B + t0;
    int64_t cur_group = -1;
    int64_t k = k0;
    while (k < k1) {
      const idx_t r = rows[k];
      const int64_t g = static_cast<int64_t>(r) / G;
      if (g != cur_group) {
        const int64_t rb = g * G, re = std::min(m, rb + G);
        for (int64_t tt = 0; tt < tb; tt += kRowGroup) {
          const int64_t te = std::min(tb, tt + kRowGroup);
          for (int64_t rr = rb; rr < re; ++rr) {
            acc_t* drow = abuf + (rr - rb) * tb;
            const scalar_t* scol = dyb + rr * s1;
            for (int64_t t = tt; t < te; ++t) drow[t] = static_cast<acc_t>(scol[t * s0]);
          }
        }
        cur_group = g;
      }
      const acc_t* a = abuf + (static_cast<int64_t>(r) - g * G) * tb;
      if (k + 4 <= k1 && rows[k + 1] == r && rows[k + 2] == r && rows[k + 3] == r) {
        acc_t res[4];
        dot4<acc_t, L, kFma>(a, Bb + static_cast<int64_t>(cols[k]) * T,
                             Bb + static_cast<int64_t>(cols[k + 1]) * T,
                             Bb + static_cast<int64_t>(cols[k + 2]) * T,
                             Bb + static_cast<int64_t>(cols[k + 3]) * T, tb, res);
        for (int j = 0; j < 4; ++j) out[k + j] = out[k + j] + res[j];
        k += 4;
      } else {
        out[k] = out[k] + dot1<acc_t, L, kFma>(a, Bb + static_cast<int64_t>(cols[k]) * T, tb);
        k += 1;
      }
    }
  }
}

// Lanes: 2 vectors per accumulator (8 independent chains in dot4) where registers allow.
template <typename acc_t>
constexpr int kLanes512 = 128 / sizeof(acc_t);  // AVX-512: 2 zmm per accumulator
template <typename acc_t>
constexpr int kLanes256 = 32 / sizeof(acc_t);   // AVX2: 1 ymm (16 ymm registers in all)
template <typename acc_t>
constexpr int kLanesGeneric = 32 / sizeof(acc_t);

#define FTOPS_SDDMM_VARIANT(NAME, ATTR, LANES, FMA)                                            \
  template <typename scalar_t, typename acc_t, typename idx_t>                                   \
  ATTR void range_##NAME(const scalar_t* dy, int64_t s0, int64_t s1, int64_t m, int64_t G,       \
                         const acc_t* B, int64_t T, const idx_t* rows, const idx_t* cols,        \
                         int64_t k0, int64_t k1, acc_t* out, acc_t* abuf) {                      \
    range_body<scalar_t, acc_t, idx_t, LANES<acc_t>, FMA>(dy, s0, s1, m, G, B, T, rows, cols,    \
                                                          k0, k1, out, abuf);                    \
  }

#if defined(__x86_64__) && defined(__GNUC__)
#define FTOPS_X86_DISPATCH 1
FTOPS_SDDMM_VARIANT(avx512, __attribute__((target("avx512f,fma"))), kLanes512, true)
FTOPS_SDDMM_VARIANT(avx2, __attribute__((target("avx2,fma"))), kLanes256, true)
#endif
FTOPS_SDDMM_VARIANT(generic, , kLanesGeneric, false)

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa detect_isa() {
#ifdef FTOPS_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return isa;
#else
  return Isa::kGeneric;
#endif
}

// B (n, T) = x^T in acc_t, in one parallel loop over strips of kTileC columns of x. A strip is
// transposed in kTileC x kTileC blocks: each destination row gets kTileC contiguous values (one
// cache line for floats), avoiding the set conflicts of writing rows T apart element by element.
constexpr int64_t kTileC = 16;

template <typename scalar_t, typename acc_t>
void transpose_x(const at::Tensor& x, acc_t* B) {
  const int64_t T = x.size(0), n = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const int64_t strips = (n + kTileC - 1) / kTileC;
  at::parallel_for(0, strips, std::max<int64_t>(1, 16384 / (kTileC * T)),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t cb = i * kTileC, ce = std::min(n, cb + kTileC);
      for (int64_t t0 = 0; t0 < T; t0 += kTileC) {
        const int64_t te = std::min(T, t0 + kTileC);
        for (int64_t c = cb; c < ce; ++c) {
          acc_t* drow = B + c * T;
          const scalar_t* scol = xp + c * s1;
          for (int64_t t = t0; t < te; ++t) drow[t] = static_cast<acc_t>(scol[t * s0]);
        }
      }
    }
  });
}

at::Tensor sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows_in,
                     const at::Tensor& cols_in) {
  check_sddmm_args(dy, x, rows_in, cols_in, c10::DeviceType::CPU);
  const int64_t T = dy.size(0), m = dy.size(1), n = x.size(1);
  const int64_t nnz = rows_in.size(0);
  at::Tensor out = at::empty({nnz}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  if (nnz == 0) return out;
  if (T == 0) {
    check_sddmm_bounds(rows_in, cols_in, m, n);
    return out.zero_();
  }
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const at::ScalarType acc_type = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor acc = acc_type == dy.scalar_type() ? out : at::empty({nnz}, out.options().dtype(acc_type));
  at::Tensor B = at::empty({n, T}, dy.options().dtype(acc_type));
  const Isa isa = detect_isa();
  FTOPS_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sddmm_cpu", [&] {
    const index_t* rp = rows.data_ptr<index_t>();
    const index_t* cp = cols.data_ptr<index_t>();
    // Bounds, serially (O(nnz), small next to the O(nnz * T) dots; an exception must not be
    // thrown from inside a parallel region).
    index_t rmin = rp[0], rmax = rp[0], cmin = cp[0], cmax = cp[0];
    bool rows_sorted = true;
    for (int64_t k = 1; k < nnz; ++k) {
      rows_sorted = rows_sorted && rp[k] >= rp[k - 1];
      rmin = std::min(rmin, rp[k]);
      rmax = std::max(rmax, rp[k]);
      cmin = std::min(cmin, cp[k]);
      cmax = std::max(cmax, cp[k]);
    }
    FTOPS_CHECK(rmin >= 0 && rmax < m, "ftops.sddmm: rows must lie in [0, m) = [0, ", m,
                ") (m = dy.size(1)) but range over [", rmin, ", ", rmax, "]");
    FTOPS_CHECK(cmin >= 0 && cmax < n, "ftops.sddmm: cols must lie in [0, n) = [0, ", n,
                ") (n = x.size(1)) but range over [", cmin, ", ", cmax, "]");
    FTOPS_DISPATCH_FLOAT_TYPES(dy.scalar_type(), "sddmm_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      acc_t* Bp = B.data_ptr<acc_t>();
      acc_t* op = acc.data_ptr<acc_t>();
      const scalar_t* dyp = dy.data_ptr<scalar_t>();
      const int64_t s0 = dy.stride(0), s1 = dy.stride(1);
      transpose_x<scalar_t, acc_t>(x, Bp);
      // Grain: about 2^16 multiply-adds per task.
      const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / T);
      // Row groups pay off when rows come in order; otherwise each output gathers its own column.
      const int64_t G = rows_sorted ? kRowGroup : 1;
      at::parallel_for(0, nnz, grain, [&](int64_t k0, int64_t k1) {
        std::vector<acc_t> abuf(static_cast<size_t>(G * std::min(T, kTBlock)));
        switch (isa) {
#ifdef FTOPS_X86_DISPATCH
          case Isa::kAvx512:
            range_avx512<scalar_t, acc_t, index_t>(dyp, s0, s1, m, G, Bp, T, rp, cp, k0, k1, op,
                                                   abuf.data());
            break;
          case Isa::kAvx2:
            range_avx2<scalar_t, acc_t, index_t>(dyp, s0, s1, m, G, Bp, T, rp, cp, k0, k1, op,
                                                 abuf.data());
            break;
#endif
          default:
            range_generic<scalar_t, acc_t, index_t>(dyp, s0, s1, m, G, Bp, T, rp, cp, k0, k1, op,
                                                    abuf.data());
        }
      });
    });
  });
  if (!acc.is_same(out)) out.copy_(acc);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace ftops
