// CPU kernels of ftops::sddmm and ftops::sddmm_csr (sampled dense-dense matmul, the sparse weight
// gradient of SaRA): out[k] = sum_t dy[t, r_k] * x[t, c_k], dy (T, m), x (T, n).
//
// Both ops share one kernel that works on a row-compressed (CSR) layout: row_ptr (m + 1, int64)
// and the column of each output (int16, int32 or int64). sddmm_csr takes that layout directly
// (SaRA keeps its trainable set in it); sddmm takes any (rows, cols) list: when rows are not
// sorted, a counting sort by row (O(nnz + m)) gives the CSR order and the results are scattered
// back.
//
// The kernel (csrc/cpu/sddmm_body.h): x is copied once, transposed, into an acc_t (float, or
// double for float64) buffer B (n, Tp), T padded with zeros to a multiple of 16 and each row
// aligned to a cache line, so that every output is a dot product of two aligned, contiguous
// vectors of whole registers. Rows of dy are processed in bands (one parallel loop); per block of
// time steps (sized so that the block of B stays in L2) a band's columns of dy are transposed into a task buffer, and the outputs of
// each row are computed 8 at a time, the dy row loaded once per 8 B rows. The dots use fused
// multiply-adds (explicit intrinsics, so this does not depend on -ffp-contract) and a fixed
// summation order, independent of the thread count; the AVX-512 / AVX2+FMA / generic variant is
// chosen at run time. Temporaries: B (n * Tp values), one band buffer per task, and for unsorted
// rows of sddmm a permutation (nnz int64) and the CSR copy of the columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/dispatch.h"
#include "../common/sddmm_args.h"

#include "simd_isa.h"

namespace ftops {
namespace {

constexpr int64_t kPad = 16;       // T is padded to a multiple of this (every register width)
constexpr int64_t kMinTBlock = 64;   // time steps per block of a band: between these, chosen
constexpr int64_t kMaxTBlock = 512;  // so that the block of B (n x TB) takes about kL2Bytes
constexpr size_t kL2Bytes = size_t(1) << 20;
constexpr int64_t kMaxBand = 64;   // rows per band

inline int64_t round_up(int64_t v, int64_t k) { return (v + k - 1) / k * k; }

namespace isa_generic {
template <typename T>
struct Vs {
  using acc = T;
  using R = T;
  static constexpr int W = 1;
  static constexpr bool kT16 = false;
  static R zero() { return T(0); }
  static R load(const T* p) { return *p; }
  static R fma(R a, R b, R c) { return c + a * b; }
  static T sum(R v) { return v; }
  static void t16(const T*, int64_t, T*, int64_t) {}
};
using Vf = Vs<float>;
using Vd = Vs<double>;
#include "sddmm_body.h"
}  // namespace isa_generic

#ifdef FTOPS_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
struct Vf {
  using acc = float;
  using R = __m256;
  static constexpr int W = 8;
  static constexpr bool kT16 = false;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void t16(const float*, int64_t, float*, int64_t) {}
};
struct Vd {
  using acc = double;
  using R = __m256d;
  static constexpr int W = 4;
  static constexpr bool kT16 = false;
  static R zero() { return _mm256_setzero_pd(); }
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static double sum(R v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  static void t16(const double*, int64_t, double*, int64_t) {}
};
#include "sddmm_body.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace isa_avx512 {
struct Vf {
  using acc = float;
  using R = __m512;
  static constexpr int W = 16;
  static constexpr bool kT16 = true;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(R v) { return _mm512_reduce_add_ps(v); }
  // dst[c * ld + r] = src[r * ls + c], r, c < 16: unpack / shuffle / lane-permute network.
  static void t16(const float* src, int64_t ls, float* dst, int64_t ld) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ls);
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
        t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
      }
    for (int j = 0; j < 8; ++j) {
      r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
      r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ld, r[i]);
  }
};
struct Vd {
  using acc = double;
  using R = __m512d;
  static constexpr int W = 8;
  static constexpr bool kT16 = false;
  static R zero() { return _mm512_setzero_pd(); }
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static double sum(R v) { return _mm512_reduce_add_pd(v); }
  static void t16(const double*, int64_t, double*, int64_t) {}
};
#include "sddmm_body.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

// out (nnz, dy's dtype) for a validated CSR layout: rp (m + 1) and contiguous cols.
at::Tensor csr_kernel(const at::Tensor& dy, const at::Tensor& x, const int64_t* rp,
                      const at::Tensor& cols) {
  const int64_t T = dy.size(0), m = dy.size(1), n = x.size(1), nnz = cols.size(0);
  at::Tensor out = at::empty({nnz}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  if (nnz == 0) return out;
  if (T == 0) return out.zero_();
  const at::ScalarType acc_type = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor acc = acc_type == dy.scalar_type() ? out : at::empty({nnz}, out.options().dtype(acc_type));
  at::Tensor B = at::empty({n, round_up(T, kPad)}, dy.options().dtype(acc_type));
  // Bands: at most kMaxBand rows, and about 4 per thread so that uneven bands even out (the band
  // size does not change any result).
  const int64_t per = (m + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  const int64_t R = std::clamp<int64_t>(per, 1, kMaxBand);
  auto run_cols = [&](auto col_tag) {
    using col_t = decltype(col_tag);
    const col_t* cp = cols.data_ptr<col_t>();
    FTOPS_DISPATCH_FLOAT_TYPES(dy.scalar_type(), "sddmm_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const scalar_t* dyp = dy.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>();
      acc_t* op = acc.data_ptr<acc_t>();
      acc_t* bp = B.data_ptr<acc_t>();
      const int64_t a0 = dy.stride(0), a1 = dy.stride(1), b0 = x.stride(0), b1 = x.stride(1);
      switch (kSimdIsa) {
#ifdef FTOPS_X86_SIMD
        case SimdIsa::kAvx512:
          isa_avx512::sddmm_run<scalar_t, col_t>(dyp, a0, a1, xp, b0, b1, T, m, n, rp, cp, op, bp, R);
          break;
        case SimdIsa::kAvx2:
          isa_avx2::sddmm_run<scalar_t, col_t>(dyp, a0, a1, xp, b0, b1, T, m, n, rp, cp, op, bp, R);
          break;
#endif
        default:
          isa_generic::sddmm_run<scalar_t, col_t>(dyp, a0, a1, xp, b0, b1, T, m, n, rp, cp, op, bp, R);
      }
    });
  };
  switch (cols.scalar_type()) {
    case at::kShort: run_cols(int16_t{}); break;
    case at::kInt: run_cols(int32_t{}); break;
    default: run_cols(int64_t{}); break;
  }
  if (!acc.is_same(out)) out.copy_(acc);
  return out;
}

template <typename col_t>
void check_cols_range(const col_t* cp, int64_t nnz, int64_t n) {
  if (nnz == 0) return;
  col_t lo = cp[0], hi = cp[0];
  for (int64_t k = 1; k < nnz; ++k) {
    lo = std::min(lo, cp[k]);
    hi = std::max(hi, cp[k]);
  }
  FTOPS_CHECK(lo >= 0 && hi < n, "ftops.sddmm: cols must lie in [0, n) = [0, ", n,
              ") (n = x.size(1)) but range over [", static_cast<int64_t>(lo), ", ",
              static_cast<int64_t>(hi), "]");
}

at::Tensor sddmm_csr_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                         const at::Tensor& cols_in) {
  check_sddmm_csr_args(dy, x, row_ptr, cols_in, c10::DeviceType::CPU);
  const int64_t m = dy.size(1), n = x.size(1), nnz = cols_in.size(0);
  const at::Tensor rp = row_ptr.contiguous(), cols = cols_in.contiguous();
  const int64_t* r = rp.data_ptr<int64_t>();
  FTOPS_CHECK(r[0] == 0 && r[m] == nnz, "ftops.sddmm_csr: row_ptr must start at 0 and end at "
              "nnz = cols.size(0) = ", nnz, ", got row_ptr[0] = ", r[0], ", row_ptr[m] = ", r[m]);
  for (int64_t i = 0; i < m; ++i)
    FTOPS_CHECK(r[i] <= r[i + 1], "ftops.sddmm_csr: row_ptr must be non-decreasing, but "
                "row_ptr[", i, "] = ", r[i], " > row_ptr[", i + 1, "] = ", r[i + 1]);
  switch (cols.scalar_type()) {
    case at::kShort: check_cols_range(cols.data_ptr<int16_t>(), nnz, n); break;
    case at::kInt: check_cols_range(cols.data_ptr<int32_t>(), nnz, n); break;
    default: check_cols_range(cols.data_ptr<int64_t>(), nnz, n); break;
  }
  return csr_kernel(dy, x, r, cols);
}

at::Tensor sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows_in,
                     const at::Tensor& cols_in) {
  check_sddmm_args(dy, x, rows_in, cols_in, c10::DeviceType::CPU);
  const int64_t m = dy.size(1), n = x.size(1), nnz = rows_in.size(0);
  if (nnz == 0) return at::empty({0}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  // Bounds and row order, serially (O(nnz), small next to the O(nnz * T) dots).
  std::vector<int64_t> rp(static_cast<size_t>(m) + 1, 0);
  bool sorted = true;
  FTOPS_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sddmm_cpu", [&] {
    const index_t* ri = rows.data_ptr<index_t>();
    index_t rmin = ri[0], rmax = ri[0];
    for (int64_t k = 1; k < nnz; ++k) {
      sorted = sorted && ri[k] >= ri[k - 1];
      rmin = std::min(rmin, ri[k]);
      rmax = std::max(rmax, ri[k]);
    }
    FTOPS_CHECK(rmin >= 0 && rmax < m, "ftops.sddmm: rows must lie in [0, m) = [0, ", m,
                ") (m = dy.size(1)) but range over [", rmin, ", ", rmax, "]");
    check_cols_range(cols.data_ptr<index_t>(), nnz, n);
    for (int64_t k = 0; k < nnz; ++k) ++rp[static_cast<size_t>(ri[k]) + 1];
  });
  for (int64_t i = 0; i < m; ++i) rp[i + 1] += rp[i];
  if (sorted) return csr_kernel(dy, x, rp.data(), cols);
  // Counting sort by row (stable): perm[j] = the input position of the j-th output in CSR order.
  at::Tensor perm = at::empty({nnz}, rows.options().dtype(at::kLong));
  int64_t* pp = perm.data_ptr<int64_t>();
  FTOPS_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sddmm_cpu", [&] {
    const index_t* ri = rows.data_ptr<index_t>();
    std::vector<int64_t> next(rp.begin(), rp.end() - 1);
    for (int64_t k = 0; k < nnz; ++k) pp[next[static_cast<size_t>(ri[k])]++] = k;
  });
  const at::Tensor res = csr_kernel(dy, x, rp.data(), cols.index_select(0, perm));
  return at::empty_like(res).index_copy_(0, perm, res);
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CPU, m) {
  m.impl("sddmm", &sddmm_cpu);
  m.impl("sddmm_csr", &sddmm_csr_cpu);
}

}  // namespace ftops
