// CUDA kernel of ftops::sddmm. As on the CPU (cpu/sddmm.cpp), dy (T, m) and x (T, n) are first
// copied, transposed, into acc_t (float, or double for float64) buffers A (m, T) and B (n, T), so
// that each output is a dot product of two contiguous rows. One warp computes one output: its 32
// lanes stride over T (coalesced loads of both rows), then a shuffle reduction; warps walk the
// outputs with a grid stride. Built with --fmad=false like every ftops kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.cuh"

#include <algorithm>

#include "../common/sddmm_args.h"
#include "../common/dispatch.h"

namespace ftops {
namespace {

constexpr int kWarpsPerBlock = kThreads / 32;

template <typename acc_t, typename idx_t, typename out_t>
__global__ void sddmm_kernel(const acc_t* __restrict__ A, const acc_t* __restrict__ B, int64_t T,
                             const idx_t* __restrict__ rows, const idx_t* __restrict__ cols,
                             int64_t nnz, out_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; k < nnz;
       k += stride) {
    const acc_t* a = A + static_cast<int64_t>(rows[k]) * T;
    const acc_t* b = B + static_cast<int64_t>(cols[k]) * T;
    acc_t s = acc_t(0);
    for (int64_t t = lane; t < T; t += 32) s = s + a[t] * b[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s = s + __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) out[k] = static_cast<out_t>(s);
  }
}

template <typename acc_t, typename out_t>
void launch(const at::Tensor& A, const at::Tensor& B, int64_t T, const at::Tensor& rows,
            const at::Tensor& cols, at::Tensor& out) {
  const int64_t nnz = rows.size(0);
  FTOPS_DISPATCH_INDEX_TYPES(rows.scalar_type(), "sddmm_cuda", [&] {
    sddmm_kernel<acc_t, index_t, out_t>
        <<<grid_for(nnz, 32), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            A.data_ptr<acc_t>(), B.data_ptr<acc_t>(), T, rows.data_ptr<index_t>(),
            cols.data_ptr<index_t>(), nnz, out.data_ptr<out_t>());
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
  const at::ScalarType acc_type = dy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor A = at::empty({m, T}, dy.options().dtype(acc_type));
  A.copy_(dy.t());
  at::Tensor B = at::empty({n, T}, x.options().dtype(acc_type));
  B.copy_(x.t());
  const at::Tensor rows = rows_in.contiguous(), cols = cols_in.contiguous();
  switch (dy.scalar_type()) {
    case at::kFloat: launch<float, float>(A, B, T, rows, cols, out); break;
    case at::kDouble: launch<double, double>(A, B, T, rows, cols, out); break;
    case at::kHalf: launch<float, at::Half>(A, B, T, rows, cols, out); break;
    case at::kBFloat16: launch<float, at::BFloat16>(A, B, T, rows, cols, out); break;
    default: FTOPS_CHECK(false, "ftops.sddmm: unsupported dtype ", dy.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CUDA, m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace ftops
