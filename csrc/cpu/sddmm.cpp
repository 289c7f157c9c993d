// CPU kernel of ftops::sddmm (sampled dense-dense matmul, the sparse weight gradient of SaRA).
//
// dy (T, m) and x (T, n) are copied once, transposed, into acc_t (float, or double for float64)
// buffers A (m, T) and B (n, T), so every output is a contiguous dot product of length T:
// out[k] = <A[rows[k]], B[cols[k]]>. The transposes cost (m + n) * T (temporaries as large as dy
// and x), the dots nnz * T.
// Outputs are processed by at::parallel_for in index order; runs of consecutive outputs that share
// a row (SaRA's indices are sorted row-major, so most do) are computed 4 at a time, loading the
// A row once for 4 B rows. Each dot uses kLanes independent partial sums (a fixed, thread-count
// independent summation order) in a branch-free loop the auto-vectorizer turns into SIMD code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/sddmm_args.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FTOPS_SDDMM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FTOPS_SDDMM_CLONES
#endif

namespace ftops {
namespace {

template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);  // 16 floats or 8 doubles: one 512-bit vector

template <typename acc_t>
inline __attribute__((always_inline)) acc_t reduce_lanes(const acc_t* s) {
  acc_t t[kLanes<acc_t>];
  for (int j = 0; j < kLanes<acc_t>; ++j) t[j] = s[j];
  for (int w = kLanes<acc_t> / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) t[j] = t[j] + t[j + w];
  return t[0];
}

// <a, b> over T elements.
template <typename acc_t>
inline __attribute__((always_inline)) acc_t dot1(const acc_t* __restrict a,
                                                 const acc_t* __restrict b, int64_t T) {
  constexpr int L = kLanes<acc_t>;
  acc_t s[L] = {};
  int64_t t = 0;
  for (; t + L <= T; t += L)
    for (int j = 0; j < L; ++j) s[j] = s[j] + a[t + j] * b[t + j];
  for (int j = 0; t + j < T; ++j) s[j] = s[j] + a[t + j] * b[t + j];
  return reduce_lanes<acc_t>(s);
}

// <a, b0..b3> over T elements, a loaded once: the same summation order as dot1.
template <typename acc_t>
inline __attribute__((always_inline)) void dot4(const acc_t* __restrict a,
                                                const acc_t* __restrict b0,
                                                const acc_t* __restrict b1,
                                                const acc_t* __restrict b2,
                                                const acc_t* __restrict b3, int64_t T,
                                                acc_t* res) {
  constexpr int L = kLanes<acc_t>;
  acc_t s0[L] = {}, s1[L] = {}, s2[L] = {}, s3[L] = {};
  int64_t t = 0;
  for (; t + L <= T; t += L) {
    for (int j = 0; j < L; ++j) {
      const acc_t av = a[t + j];
      s0[j] = s0[j] + av * b0[t + j];
      s1[j] = s1[j] + av * b1[t + j];
      s2[j] = s2[j] + av * b2[t + j];
      s3[j] = s3[j] + av * b3[t + j];
    }
  }
  for (int j = 0; t + j < T; ++j) {
    const acc_t av = a[t + j];
    s0[j] = s0[j] + av * b0[t + j];
    s1[j] = s1[j] + av * b1[t + j];
    s2[j] = s2[j] + av * b2[t + j];
    s3[j] = s3[j] + av * b3[t + j];
  }
  res[0] = reduce_lanes<acc_t>(s0);
  res[1] = reduce_lanes<acc_t>(s1);
  res[2] = reduce_lanes<acc_t>(s2);
  res[3] = reduce_lanes<acc_t>(s3);
}

// Rows of T per block inside a task: a task's outputs sweep one block of their B rows (and the
// few A rows of the task) before moving on, so the B block (n * kTBlock values) stays in L2 even
// when the whole B does not.
constexpr int64_t kTBlock = 512;

// Outputs k0..k1 (exclusive): out[k] = <A[rows[k]], B[cols[k]]>, rows of length T.
template <typename acc_t, typename idx_t>
FTOPS_SDDMM_CLONES void sddmm_range(const acc_t* A, const acc_t* B, int64_t T, const idx_t* rows,
                                    const idx_t* cols, int64_t k0, int64_t k1, acc_t* out) {
  for (int64_t k = k0; k < k1; ++k) out[k] = acc_t(0);
  for (int64_t t0 = 0; t0 < T; t0 += kTBlock) {
    const int64_t tb = std::min(kTBlock, T - t0);
    int64_t k = k0;
    while (k < k1) {
      const idx_t r = rows[k];
      const acc_t* a = A + static_cast<int64_t>(r) * T + t0;
      if (k + 4 <= k1 && rows[k + 1] == r && rows[k + 2] == r && rows[k + 3] == r) {
        acc_t res[4];
        dot4<acc_t>(a, B + static_cast<int64_t>(cols[k]) * T + t0,
                    B + static_cast<int64_t>(cols[k + 1]) * T + t0,
                    B + static_cast<int64_t>(cols[k + 2]) * T + t0,
                    B + static_cast<int64_t>(cols[k + 3]) * T + t0, tb, res);
        for (int j = 0; j < 4; ++j) out[k + j] = out[k + j] + res[j];
        k += 4;
      } else {
        out[k] = out[k] + dot1<acc_t>(a, B + static_cast<int64_t>(cols[k]) * T + t0, tb);
        k += 1;
      }
    }
  }
}

// A (m, T) = dy^T and B (n, T) = x^T in acc_t, in one parallel loop over strips of kTileC
// columns of either source. A strip is transposed in kTileC x kTileC blocks: the block's source
// rows are read in short runs, and each destination row gets kTileC contiguous values (one cache
// line for floats), avoiding the set conflicts of writing kTileC rows T apart element by element.
constexpr int64_t kTileC = 16;

template <typename scalar_t, typename acc_t>
inline void transpose_tile(const scalar_t* src, int64_t s0, int64_t s1, int64_t T, int64_t cb,
                           int64_t ce, acc_t* dst) {
  for (int64_t t0 = 0; t0 < T; t0 += kTileC) {
    const int64_t te = std::min(T, t0 + kTileC);
    for (int64_t c = cb; c < ce; ++c) {
      acc_t* drow = dst + c * T;
      const scalar_t* scol = src + c * s1;
      for (int64_t t = t0; t < te; ++t) drow[t] = static_cast<acc_t>(scol[t * s0]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void transpose_both(const at::Tensor& dy, const at::Tensor& x, acc_t* A, acc_t* B) {
  const int64_t T = dy.size(0), m = dy.size(1), n = x.size(1);
  const int64_t tiles_a = (m + kTileC - 1) / kTileC, tiles_b = (n + kTileC - 1) / kTileC;
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sa0 = dy.stride(0), sa1 = dy.stride(1), sb0 = x.stride(0), sb1 = x.stride(1);
  at::parallel_for(0, tiles_a + tiles_b, std::max<int64_t>(1, 16384 / (kTileC * T)),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i < tiles_a) {
        transpose_tile<scalar_t, acc_t>(dyp, sa0, sa1, T, i * kTileC,
                                        std::min(m, (i + 1) * kTileC), A);
      } else {
        const int64_t j = i - tiles_a;
        transpose_tile<scalar_t, acc_t>(xp, sb0, sb1, T, j * kTileC,
                                        std::min(n, (j + 1) * kTileC), B);
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
  // Two parallel loops in all (the transposes, then the dots): each parallel region costs a
  // fork/join, which is expensive on a busy machine.
  at::Tensor A = at::empty({m, T}, dy.options().dtype(acc_type));
  at::Tensor B = at::empty({n, T}, dy.options().dtype(acc_type));
  AT_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sddmm_cpu", [&] {
    const index_t* rp = rows.data_ptr<index_t>();
    const index_t* cp = cols.data_ptr<index_t>();
    // Bounds, serially (O(nnz), small next to the O(nnz * T) dots; an exception must not be
    // thrown from inside a parallel region).
    index_t rmin = rp[0], rmax = rp[0], cmin = cp[0], cmax = cp[0];
    for (int64_t k = 1; k < nnz; ++k) {
      rmin = std::min(rmin, rp[k]);
      rmax = std::max(rmax, rp[k]);
      cmin = std::min(cmin, cp[k]);
      cmax = std::max(cmax, cp[k]);
    }
    TORCH_CHECK(rmin >= 0 && rmax < m, "ftops.sddmm: rows must lie in [0, m) = [0, ", m,
                ") (m = dy.size(1)) but range over [", rmin, ", ", rmax, "]");
    TORCH_CHECK(cmin >= 0 && cmax < n, "ftops.sddmm: cols must lie in [0, n) = [0, ", n,
                ") (n = x.size(1)) but range over [", cmin, ", ", cmax, "]");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sddmm_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      acc_t* Ap = A.data_ptr<acc_t>();
      acc_t* Bp = B.data_ptr<acc_t>();
      acc_t* op = acc.data_ptr<acc_t>();
      transpose_both<scalar_t, acc_t>(dy, x, Ap, Bp);
      // Grain: about 2^16 multiply-adds per task.
      const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / T);
      at::parallel_for(0, nnz, grain, [&](int64_t k0, int64_t k1) {
        sddmm_range<acc_t, index_t>(Ap, Bp, T, rp, cp, k0, k1, op);
      });
    });
  });
  if (!acc.is_same(out)) out.copy_(acc);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace ftops
