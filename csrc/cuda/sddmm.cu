// CUDA kernels of ftops::sddmm and ftops::sddmm_csr. As on the CPU (cpu/sddmm.cpp), dy (T, m)
// and x (T, n) are first copied, transposed, into acc_t (float, or double for float64) buffers
// A (m, Tp) and B (n, Tp), T zero padded to Tp (a multiple of 4) so that each output is a dot
// product of two contiguous rows read with 16-byte vector loads (float4 / double2).
//
// Decomposition: one warp computes 4 consecutive outputs (SaRA's outputs come in row order, so
// the 4 usually share their dy row, which then comes from L1 after the first load); its 32 lanes
// stride over T with vector loads (each warp-wide load is 512 contiguous bytes of a row), 4
// independent accumulators per lane, then one shuffle reduction per output. Warps walk the output
// groups with a grid stride. The row of an output is rows[k] (sddmm) or found by binary search in
// row_ptr (sddmm_csr), so neither op needs a sorted or per-row launch shape.
//
// Index checks: sddmm validates rows/cols against (m, n) before the launch (one reduction and a
// device-to-host copy, i.e. a synchronization: the public op keeps its clear error). sddmm_csr
// never synchronizes: its layout is validated when it is built (ftops.SaRA builds it from the
// weight itself); the kernel reads no index outside [0, nnz), clamps the row search to [0, m),
// and writes NaN for an output whose column is outside [0, n) instead of reading out of bounds.
// Built with --fmad=false like every ftops kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.cuh"

#include <algorithm>
#include <limits>

#include "../common/dispatch.h"
#include "../common/sddmm_args.h"

namespace ftops {
namespace {

constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kOutsPerWarp = 4;
constexpr int64_t kPad = 4;  // T padded to a multiple of 4 (one float4, two double2)

template <typename acc_t>
struct Vec16;
template <>
struct Vec16<float> {
  using T = float4;
  static constexpr int kN = 4;
  __device__ static float dot(const float4& a, const float4& b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
  }
};
template <>
struct Vec16<double> {
  using T = double2;
  static constexpr int kN = 2;
  __device__ static double dot(const double2& a, const double2& b) { return a.x * b.x + a.y * b.y; }
};

template <typename idx_t>
struct RowFromList {
  const idx_t* rows;
  __device__ int64_t operator()(int64_t k) const { return static_cast<int64_t>(rows[k]); }
};

// The row r with row_ptr[r] <= k < row_ptr[r + 1] (the last such r for empty rows), in [0, m).
struct RowFromPtr {
  const int64_t* row_ptr;
  int64_t m;
  __device__ int64_t operator()(int64_t k) const {
    int64_t lo = 0, hi = m - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (row_ptr[mid] <= k) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

template <typename acc_t, typename RowOf, typename col_t, typename out_t>
__global__ void sddmm_kernel(const acc_t* __restrict__ A, const acc_t* __restrict__ B, int64_t Tp,
                             RowOf row_of, const col_t* __restrict__ cols, int64_t nnz, int64_t n,
                             out_t* __restrict__ out) {
  using V = Vec16<acc_t>;
  using vec_t = typename V::T;
  const int lane = threadIdx.x & 31;
  const int64_t groups = (nnz + kOutsPerWarp - 1) / kOutsPerWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t tv = Tp / V::kN;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; g < groups;
       g += stride) {
    const int64_t k0 = g * kOutsPerWarp;
    const vec_t* a[kOutsPerWarp];
    const vec_t* b[kOutsPerWarp];
    bool ok[kOutsPerWarp];
#pragma unroll
    for (int j = 0; j < kOutsPerWarp; ++j) {
      const int64_t k = k0 + j < nnz ? k0 + j : k0;  // a tail group repeats its first output
      const int64_t c = static_cast<int64_t>(cols[k]);
      ok[j] = c >= 0 && c < n;
      a[j] = reinterpret_cast<const vec_t*>(A + row_of(k) * Tp);
      b[j] = reinterpret_cast<const vec_t*>(B + (ok[j] ? c : 0) * Tp);
    }
    acc_t s[kOutsPerWarp] = {};
    for (int64_t t = lane; t < tv; t += 32) {
#pragma unroll
      for (int j = 0; j < kOutsPerWarp; ++j) s[j] = s[j] + V::dot(a[j][t], b[j][t]);
    }
#pragma unroll
    for (int j = 0; j < kOutsPerWarp; ++j) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s[j] = s[j] + __shfl_down_sync(0xffffffffu, s[j], o);
    }
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kOutsPerWarp; ++j)
        if (k0 + j < nnz)
          out[k0 + j] = ok[j] ? static_cast<out_t>(s[j])
                              : static_cast<out_t>(std::numeric_limits<acc_t>::quiet_NaN());
    }
  }
}

// A (rows, Tp) = src^T in acc_type, zero padded.
at::Tensor transposed_padded(const at::Tensor& src, at::ScalarType acc_type) {
  const int64_t T = src.size(0), Tp = (T + kPad - 1) / kPad * kPad;
  at::Tensor out = Tp == T ? at::empty({src.size(1), Tp}, src.options().dtype(acc_type))
                           : at::zeros({src.size(1), Tp}, src.options().dtype(acc_type));
  out.narrow(1, 0, T).copy_(src.t());
  return out;
}

template <typename RowOf, typename col_t>
void launch(const at::Tensor& dy, const at::Tensor& x, RowOf row_of, const col_t* cols,
            int64_t nnz, at::Tensor& out) {
  const at::ScalarType acc_type = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor A = transposed_padded(dy, acc_type), B = transposed_padded(x, acc_type);
  const int64_t Tp = A.size(1), n = x.size(1);
  const int64_t threads = (nnz + kOutsPerWarp - 1) / kOutsPerWarp * 32;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FTOPS_DISPATCH_FLOAT_TYPES(dy.scalar_type(), "sddmm_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    sddmm_kernel<acc_t, RowOf, col_t, scalar_t><<<grid_for(threads), kThreads, 0, stream>>>(
        A.data_ptr<acc_t>(), B.data_ptr<acc_t>(), Tp, row_of, cols, nnz, n,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor sddmm_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows_in,
                      const at::Tensor& cols_in) {
  check_sddmm_args(dy, x, rows_in, cols_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t T = dy.size(0), m = dy.size(1), n = x.size(1);
  const int64_t nnz = rows_in.size(0);
  check_sddmm_bounds(rows_in, cols_in, m, n);
  at::Tensor out = at::empty({nnz}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  if (nnz == 0) return out;
  if (T == 0) return out.zero_();
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  FTOPS_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sddmm_cuda", [&] {
    launch(dy, x, RowFromList<index_t>{rows.data_ptr<index_t>()}, cols.data_ptr<index_t>(), nnz,
           out);
  });
  return out;
}

at::Tensor sddmm_csr_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                          const at::Tensor& cols_in) {
  check_sddmm_csr_args(dy, x, row_ptr, cols_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t T = dy.size(0), m = dy.size(1);
  const int64_t nnz = cols_in.size(0);
  at::Tensor out = at::empty({nnz}, dy.options().memory_format(at::MemoryFormat::Contiguous));
  if (nnz == 0) return out;
  FTOPS_CHECK(m > 0, "ftops.sddmm_csr: dy has no columns (m = 0) but cols has ", nnz,
              " entries");
  if (T == 0) return out.zero_();
  const at::Tensor rp = row_ptr.contiguous(), cols = cols_in.contiguous();
  const RowFromPtr row_of{rp.data_ptr<int64_t>(), m};
  switch (cols.scalar_type()) {
    case at::kShort: launch(dy, x, row_of, cols.data_ptr<int16_t>(), nnz, out); break;
    case at::kInt: launch(dy, x, row_of, cols.data_ptr<int32_t>(), nnz, out); break;
    default: launch(dy, x, row_of, cols.data_ptr<int64_t>(), nnz, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CUDA, m) {
  m.impl("sddmm", &sddmm_cuda);
  m.impl("sddmm_csr", &sddmm_csr_cuda);
}

}  // namespace ftops
