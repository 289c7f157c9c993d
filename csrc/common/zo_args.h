// Argument checks shared by the CPU and CUDA kernels of the zeroth-order (MeZO) ops.
// Every tensor is checked before any is written, so a bad list never leaves a model half-updated.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "check.h"

namespace ftops {

// At most this many seeds per zo_axpby_ call (the Python layer splits longer lists), so the
// CUDA launch metadata has a fixed size and CPU and CUDA round identically.
constexpr int64_t kMaxSeedsPerCall = 8;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_param(const at::Tensor& p, const char* op, const char* arg, size_t k,
                        c10::DeviceType device_type) {
  FTOPS_CHECK(p.defined(), op, ": ", arg, "[", k, "] is undefined");
  FTOPS_CHECK(p.layout() == at::kStrided, op, ": ", arg, "[", k,
              "] must be a dense (strided) tensor, got layout ", p.layout());
  FTOPS_CHECK(p.device().type() == device_type, op, ": ", arg, "[", k, "] is on ", p.device(),
              " but the other tensors are on ", device_type);
  FTOPS_CHECK(is_supported_float(p.scalar_type()), op, ": ", arg, "[", k,
              "] has dtype ", p.scalar_type(),
              "; supported: float32, float64, float16, bfloat16");
  FTOPS_CHECK(p.is_contiguous(), op, ": ", arg, "[", k,
              "] must be contiguous (got strides ", p.strides(), ")");
}

// Every params[k] a valid tensor on one device, with an id in range, and no two of them
// overlapping in memory (each would get the other's noise as well).
inline void check_params(at::TensorList params, at::IntArrayRef ids, const char* op,
                         c10::DeviceType device_type) {
  std::vector<MemArg> mem;
  mem.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    check_param(params[k], op, "params", k, device_type);
    FTOPS_CHECK(params[k].device() == params[0].device(), op, ": params[", k, "] is on ",
                params[k].device(), " but params[0] is on ", params[0].device());
    FTOPS_CHECK(ids[k] >= 0 && ids[k] <= static_cast<int64_t>(UINT32_MAX), op, ": ids[", k,
                "] = ", ids[k], " is outside [0, 2^32)");
    mem.push_back({&params[k], "params", k, true});
  }
  check_no_overlap(op, mem);
}

// Element offsets: params[k] holds elements [offsets[k], offsets[k] + numel) of a larger
// (sharded) tensor; empty means all 0. Kept below 2^62 so offset + numel cannot overflow.
constexpr int64_t kMaxOffset = int64_t(1) << 62;

inline void check_offsets(at::TensorList params, at::IntArrayRef offsets, const char* op) {
  FTOPS_CHECK(offsets.empty() || offsets.size() == params.size(), op, ": offsets has ",
              offsets.size(), " entries but params has ", params.size(),
              " (give one per tensor, or none for all 0)");
  for (size_t k = 0; k < offsets.size(); ++k) {
    FTOPS_CHECK(offsets[k] >= 0 && offsets[k] < kMaxOffset, op, ": offsets[", k, "] = ",
                offsets[k], " is outside [0, 2^62)");
  }
}

inline void check_zo_noise_args(const char* op, int64_t index, int64_t offset) {
  FTOPS_CHECK(index >= 0 && index <= static_cast<int64_t>(UINT32_MAX), op, ": index = ", index,
              " is outside [0, 2^32)");
  FTOPS_CHECK(offset >= 0 && offset < kMaxOffset, op, ": offset = ", offset,
              " is outside [0, 2^62)");
}

// params[k] += sum_s coeffs[s * K + k] * z(seeds[s], ids[k]) - decay[k] * params[k]
inline void check_zo_axpby_args(at::TensorList params, at::IntArrayRef seeds, at::IntArrayRef ids,
                                at::ArrayRef<double> coeffs, at::ArrayRef<double> decay,
                                at::IntArrayRef offsets, c10::DeviceType device_type) {
  const char* op = "ftops.zo_axpby_";
  const size_t K = params.size();
  FTOPS_CHECK(ids.size() == K, op, ": ids has ", ids.size(), " entries but params has ", K);
  FTOPS_CHECK(decay.size() == K, op, ": decay has ", decay.size(), " entries but params has ",
              K);
  FTOPS_CHECK(!seeds.empty() && static_cast<int64_t>(seeds.size()) <= kMaxSeedsPerCall, op,
              ": seeds must have 1 to ", kMaxSeedsPerCall, " entries, got ", seeds.size());
  FTOPS_CHECK(coeffs.size() == seeds.size() * K, op, ": coeffs must have len(seeds) * len(params) = ",
              seeds.size() * K, " entries, got ", coeffs.size());
  check_offsets(params, offsets, op);
  check_finite(op, "coeffs", coeffs);
  check_finite(op, "decay", decay);
  check_params(params, ids, op, device_type);
}

// zo_undo_axpby_: params[k] = apply(undo(params[k], undo_coeffs[k] * z(undo_seed, ids[k])))
// with 0 to 8 apply seeds (see csrc/common/zo_undo.h).
inline void check_zo_undo_axpby_args(at::TensorList params, at::ArrayRef<double> undo_coeffs,
                                     at::IntArrayRef seeds, at::IntArrayRef ids,
                                     at::ArrayRef<double> coeffs, at::ArrayRef<double> decay,
                                     at::IntArrayRef offsets, c10::DeviceType device_type) {
  const char* op = "ftops.zo_undo_axpby_";
  const size_t K = params.size();
  FTOPS_CHECK(undo_coeffs.size() == K, op, ": undo_coeffs has ", undo_coeffs.size(),
              " entries but params has ", K);
  FTOPS_CHECK(ids.size() == K, op, ": ids has ", ids.size(), " entries but params has ", K);
  FTOPS_CHECK(decay.size() == K, op, ": decay has ", decay.size(), " entries but params has ",
              K);
  FTOPS_CHECK(static_cast<int64_t>(seeds.size()) <= kMaxSeedsPerCall, op,
              ": seeds must have 0 to ", kMaxSeedsPerCall, " entries, got ", seeds.size());
  FTOPS_CHECK(coeffs.size() == seeds.size() * K, op,
              ": coeffs must have len(seeds) * len(params) = ", seeds.size() * K,
              " entries, got ", coeffs.size());
  check_offsets(params, offsets, op);
  check_finite(op, "undo_coeffs", undo_coeffs);
  check_finite(op, "coeffs", coeffs);
  check_finite(op, "decay", decay);
  check_params(params, ids, op, device_type);
}

}  // namespace ftops
