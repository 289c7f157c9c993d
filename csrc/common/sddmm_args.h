// Argument checks shared by the CPU and CUDA kernels of ftops::sddmm.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "check.h"

namespace ftops {

// dy (T, m) and x (T, n): 2-D, same float dtype, same device of type device_type. Any strides.
inline void check_sddmm_dense(const at::Tensor& dy, const at::Tensor& x,
                              c10::DeviceType device_type, const char* op) {
  FTOPS_CHECK(dy.defined() && x.defined(), op, ": undefined tensor argument");
  FTOPS_CHECK(dy.layout() == at::kStrided && x.layout() == at::kStrided, op,
              ": dy and x must be dense (strided) tensors");
  FTOPS_CHECK(dy.dim() == 2, op, ": dy must be 2-D (T, m), got shape ", dy.sizes());
  FTOPS_CHECK(x.dim() == 2, op, ": x must be 2-D (T, n), got shape ", x.sizes());
  FTOPS_CHECK(dy.size(0) == x.size(0), op, ": dy (", dy.sizes(), ") and x (", x.sizes(),
              ") must have the same number of rows T");
  const at::ScalarType t = dy.scalar_type();
  FTOPS_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": dy has dtype ", t, "; supported: float32, float64, float16, bfloat16");
  FTOPS_CHECK(x.scalar_type() == t, op, ": x has dtype ", x.scalar_type(), " but dy has ", t,
              "; they must match");
  FTOPS_CHECK(dy.device().type() == device_type, op, ": dy is on ", dy.device(),
              " but this kernel is for ", device_type);
  FTOPS_CHECK(x.device() == dy.device(), op, ": x is on ", x.device(), " but dy is on ",
              dy.device());
}

// dy and x as above; rows and cols:
// 1-D, same length, same dtype int32 or int64, on the same device. Any strides.
inline void check_sddmm_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rows,
                             const at::Tensor& cols, c10::DeviceType device_type) {
  const char* op = "ftops.sddmm";
  FTOPS_CHECK(dy.defined() && x.defined() && rows.defined() && cols.defined(), op,
              ": undefined tensor argument");
  FTOPS_CHECK(dy.layout() == at::kStrided && x.layout() == at::kStrided &&
                  rows.layout() == at::kStrided && cols.layout() == at::kStrided,
              op, ": all arguments must be dense (strided) tensors");
  check_sddmm_dense(dy, x, device_type, op);
  FTOPS_CHECK(rows.dim() == 1, op, ": rows must be 1-D, got shape ", rows.sizes());
  FTOPS_CHECK(cols.dim() == 1, op, ": cols must be 1-D, got shape ", cols.sizes());
  FTOPS_CHECK(rows.size(0) == cols.size(0), op, ": rows has ", rows.size(0), " entries but cols has ",
              cols.size(0));
  const at::ScalarType it = rows.scalar_type();
  FTOPS_CHECK(it == at::kInt || it == at::kLong, op, ": rows has dtype ", it,
              "; indices must be int32 or int64");
  FTOPS_CHECK(cols.scalar_type() == it, op, ": cols has dtype ", cols.scalar_type(),
              " but rows has ", it, "; they must match");
  FTOPS_CHECK(rows.device() == dy.device(), op, ": rows is on ", rows.device(),
              " but dy is on ", dy.device());
  FTOPS_CHECK(cols.device() == dy.device(), op, ": cols is on ", cols.device(),
              " but dy is on ", dy.device());
}

// Every rows[k] in [0, m) and cols[k] in [0, n). One reduction per vector and, on a GPU, one
// device-to-host copy (a synchronization).
inline void check_sddmm_bounds(const at::Tensor& rows, const at::Tensor& cols, int64_t m,
                               int64_t n) {
  if (rows.numel() == 0) return;
  auto [rmin, rmax] = at::aminmax(rows);
  auto [cmin, cmax] = at::aminmax(cols);
  const at::Tensor mm = at::stack({rmin, rmax, cmin, cmax}).to(at::kLong).cpu();
  const int64_t* v = mm.data_ptr<int64_t>();
  FTOPS_CHECK(v[0] >= 0 && v[1] < m, "ftops.sddmm: rows must lie in [0, m) = [0, ", m,
              ") (m = dy.size(1)) but range over [", v[0], ", ", v[1], "]");
  FTOPS_CHECK(v[2] >= 0 && v[3] < n, "ftops.sddmm: cols must lie in [0, n) = [0, ", n,
              ") (n = x.size(1)) but range over [", v[2], ", ", v[3], "]");
}

// sddmm_csr: dy and x as for sddmm; row_ptr 1-D int64 of length m + 1 (m = dy.size(1)); cols 1-D
// int16, int32 or int64; all on one device. The values of row_ptr and cols are checked by the
// CPU kernel (and trusted by the CUDA kernel, which reads no index outside [0, nnz) and writes NaN
// for an output whose column is out of range, without a synchronization).
inline void check_sddmm_csr_args(const at::Tensor& dy, const at::Tensor& x,
                                 const at::Tensor& row_ptr, const at::Tensor& cols,
                                 c10::DeviceType device_type) {
  const char* op = "ftops.sddmm_csr";
  FTOPS_CHECK(row_ptr.defined() && cols.defined(), op, ": undefined tensor argument");
  FTOPS_CHECK(row_ptr.layout() == at::kStrided && cols.layout() == at::kStrided, op,
              ": row_ptr and cols must be dense (strided) tensors");
  FTOPS_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong, op,
              ": row_ptr must be a 1-D int64 tensor, got ", row_ptr.scalar_type(), " of shape ",
              row_ptr.sizes());
  const at::ScalarType ct = cols.scalar_type();
  FTOPS_CHECK(cols.dim() == 1 && (ct == at::kShort || ct == at::kInt || ct == at::kLong), op,
              ": cols must be a 1-D int16, int32 or int64 tensor, got ", ct, " of shape ",
              cols.sizes());
  check_sddmm_dense(dy, x, device_type, op);
  FTOPS_CHECK(cols.device() == dy.device(), op, ": cols is on ", cols.device(), " but dy is on ",
              dy.device());
  FTOPS_CHECK(row_ptr.size(0) == dy.size(1) + 1, op, ": row_ptr has ", row_ptr.size(0),
              " entries but must have m + 1 = ", dy.size(1) + 1, " (m = dy.size(1))");
  FTOPS_CHECK(row_ptr.device() == dy.device(), op, ": row_ptr is on ", row_ptr.device(),
              " but dy is on ", dy.device());
}

}  // namespace ftops
