// Argument checks and scalar coefficients shared by the CPU and CUDA kernels of the fused Adam(W)
// ops (adamw_, adam_direction_). Every tensor and hyper-parameter is checked before anything is
// written, so a bad list never leaves a model half-updated.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "adamw_math.h"
#include "check.h"

namespace ftops {
namespace adamw_detail {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtype of the Adam moments for tensors of dtype t: float64 for float64, else float32.
inline at::ScalarType moment_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Defined, dense, contiguous, on `device` (the device of the list's first tensor).
inline void check_tensor(const at::Tensor& t, const char* op, const char* arg, size_t k,
                         const at::Device& device, const char* first_arg) {
  FTOPS_CHECK(t.defined(), op, ": ", arg, "[", k, "] is undefined");
  FTOPS_CHECK(t.layout() == at::kStrided, op, ": ", arg, "[", k,
              "] must be a dense (strided) tensor, got layout ", t.layout());
  FTOPS_CHECK(t.device() == device, op, ": ", arg, "[", k, "] is on ", t.device(), " but ",
              first_arg, "[0] is on ", device);
  FTOPS_CHECK(t.is_contiguous(), op, ": ", arg, "[", k, "] must be contiguous (got sizes ",
              t.sizes(), ", strides ", t.strides(), ")");
}

inline void check_same_shape(const at::Tensor& t, const char* op, const char* arg,
                             const at::Tensor& ref, const char* ref_arg, size_t k) {
  FTOPS_CHECK(t.sizes() == ref.sizes(), op, ": ", arg, "[", k, "] has shape ", t.sizes(),
              " but ", ref_arg, "[", k, "] has shape ", ref.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* arg, size_t k,
                        at::ScalarType want, const char* why) {
  FTOPS_CHECK(t.scalar_type() == want, op, ": ", arg, "[", k, "] has dtype ", t.scalar_type(),
              " but must be ", want, " (", why, ")");
}

// The tensors of the lists as check_no_overlap's arguments (in argument order, so an error names
// the earlier argument first).
inline void add_mem_args(std::vector<MemArg>& mem, at::TensorList list, const char* name,
                         bool written) {
  for (size_t k = 0; k < list.size(); ++k) mem.push_back({&list[k], name, k, written});
}

inline void check_hyper(const char* op, double beta1, double beta2, double eps, int64_t step) {
  FTOPS_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
  FTOPS_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
  FTOPS_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  FTOPS_CHECK(step >= 1, op, ": step must be >= 1 (the step count after incrementing), got ",
              step);
}

inline void check_lengths(const char* op, size_t n, const char* arg, size_t K, const char* ref) {
  FTOPS_CHECK(n == K, op, ": ", arg, " has ", n, " tensors but ", ref, " has ", K);
}

}  // namespace adamw_detail

// params[k] (float32/float64/float16/bfloat16), grads[k] of the same dtype and shape,
// exp_avgs[k] and exp_avg_sqs[k] of the same shape in moment_dtype(params[k]); all dense,
// contiguous, on one device of type device_type.
inline void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, double lr, double beta1, double beta2,
                             double eps, double weight_decay, int64_t step,
                             c10::DeviceType device_type) {
  using namespace adamw_detail;
  const char* op = "ftops.adamw_";
  const size_t K = params.size();
  check_lengths(op, grads.size(), "grads", K, "params");
  check_lengths(op, exp_avgs.size(), "exp_avgs", K, "params");
  check_lengths(op, exp_avg_sqs.size(), "exp_avg_sqs", K, "params");
  check_hyper(op, beta1, beta2, eps, step);
  FTOPS_CHECK(std::isfinite(lr), op, ": lr must be finite, got ", lr);
  FTOPS_CHECK(std::isfinite(weight_decay), op, ": weight_decay must be finite, got ",
              weight_decay);
  if (K == 0) return;
  FTOPS_CHECK(params[0].defined(), op, ": params[0] is undefined");
  const at::Device device = params[0].device();
  FTOPS_CHECK(device.type() == device_type, op, ": params[0] is on ", device,
              " but this kernel is for ", device_type);
  for (size_t k = 0; k < K; ++k) {
    const at::Tensor& p = params[k];
    check_tensor(p, op, "params", k, device, "params");
    FTOPS_CHECK(is_float_type(p.scalar_type()), op, ": params[", k, "] has dtype ",
                p.scalar_type(), "; supported: float32, float64, float16, bfloat16");
    check_tensor(grads[k], op, "grads", k, device, "params");
    check_tensor(exp_avgs[k], op, "exp_avgs", k, device, "params");
    check_tensor(exp_avg_sqs[k], op, "exp_avg_sqs", k, device, "params");
    check_same_shape(grads[k], op, "grads", p, "params", k);
    check_same_shape(exp_avgs[k], op, "exp_avgs", p, "params", k);
    check_same_shape(exp_avg_sqs[k], op, "exp_avg_sqs", p, "params", k);
    check_dtype(grads[k], op, "grads", k, p.scalar_type(), "the dtype of params[k]");
    const at::ScalarType md = moment_dtype(p.scalar_type());
    const char* why = md == at::kDouble ? "moments of float64 params are float64"
                                        : "moments are float32 unless params are float64";
    check_dtype(exp_avgs[k], op, "exp_avgs", k, md, why);
    check_dtype(exp_avg_sqs[k], op, "exp_avg_sqs", k, md, why);
  }
  // a parameter that is also its own gradient or moment (or another's), a tensor listed twice
  std::vector<MemArg> mem;
  mem.reserve(4 * K);
  add_mem_args(mem, params, "params", true);
  add_mem_args(mem, grads, "grads", false);
  add_mem_args(mem, exp_avgs, "exp_avgs", true);
  add_mem_args(mem, exp_avg_sqs, "exp_avg_sqs", true);
  check_no_overlap(op, mem);
}

// grads[k] (float32/float64/float16/bfloat16); exp_avgs[k], exp_avg_sqs[k] in
// moment_dtype(grads[k]); out[k] in grads[k]'s dtype or the moment dtype; all the same shape,
// dense, contiguous, on one device of type device_type.
inline void check_adam_direction_args(at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList out,
                                      double beta1, double beta2, double eps, int64_t step,
                                      c10::DeviceType device_type) {
  using namespace adamw_detail;
  const char* op = "ftops.adam_direction_";
  const size_t K = grads.size();
  check_lengths(op, exp_avgs.size(), "exp_avgs", K, "grads");
  check_lengths(op, exp_avg_sqs.size(), "exp_avg_sqs", K, "grads");
  check_lengths(op, out.size(), "out", K, "grads");
  check_hyper(op, beta1, beta2, eps, step);
  if (K == 0) return;
  FTOPS_CHECK(grads[0].defined(), op, ": grads[0] is undefined");
  const at::Device device = grads[0].device();
  FTOPS_CHECK(device.type() == device_type, op, ": grads[0] is on ", device,
              " but this kernel is for ", device_type);
  for (size_t k = 0; k < K; ++k) {
    const at::Tensor& g = grads[k];
    check_tensor(g, op, "grads", k, device, "grads");
    FTOPS_CHECK(is_float_type(g.scalar_type()), op, ": grads[", k, "] has dtype ",
                g.scalar_type(), "; supported: float32, float64, float16, bfloat16");
    check_tensor(exp_avgs[k], op, "exp_avgs", k, device, "grads");
    check_tensor(exp_avg_sqs[k], op, "exp_avg_sqs", k, device, "grads");
    check_tensor(out[k], op, "out", k, device, "grads");
    check_same_shape(exp_avgs[k], op, "exp_avgs", g, "grads", k);
    check_same_shape(exp_avg_sqs[k], op, "exp_avg_sqs", g, "grads", k);
    check_same_shape(out[k], op, "out", g, "grads", k);
    const at::ScalarType md = moment_dtype(g.scalar_type());
    const char* why = md == at::kDouble ? "moments of float64 grads are float64"
                                        : "moments are float32 unless grads are float64";
    check_dtype(exp_avgs[k], op, "exp_avgs", k, md, why);
    check_dtype(exp_avg_sqs[k], op, "exp_avg_sqs", k, md, why);
    FTOPS_CHECK(out[k].scalar_type() == g.scalar_type() || out[k].scalar_type() == md, op,
                ": out[", k, "] has dtype ", out[k].scalar_type(), " but must be ",
                g.scalar_type(), " (the dtype of grads[k]) or ", md, " (the moment dtype)");
  }
  std::vector<MemArg> mem;
  mem.reserve(4 * K);
  add_mem_args(mem, grads, "grads", false);
  add_mem_args(mem, exp_avgs, "exp_avgs", true);
  add_mem_args(mem, exp_avg_sqs, "exp_avg_sqs", true);
  add_mem_args(mem, out, "out", true);
  check_no_overlap(op, mem);
}

// Host-side coefficients, computed in double (as torch.optim does in Python) and rounded once.
template <typename T>
AdamwCoeffs<T> make_adamw_coeffs(double lr, double beta1, double beta2, double eps,
                                 double weight_decay, int64_t step, bool maximize,
                                 bool bias_correction) {
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, static_cast<double>(step)) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, static_cast<double>(step)) : 1.0;
  AdamwCoeffs<T> c;
  c.beta1 = static_cast<T>(beta1);
  c.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  c.beta2 = static_cast<T>(beta2);
  c.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  c.eps = static_cast<T>(eps);
  c.step_size = static_cast<T>(lr / bc1);
  c.bc2_sqrt = static_cast<T>(std::sqrt(bc2));
  c.decay = static_cast<T>(1.0 - lr * weight_decay);
  c.grad_sign = static_cast<T>(maximize ? -1.0 : 1.0);
  return c;
}

template <typename T>
AdamDirCoeffs<T> make_adam_dir_coeffs(double beta1, double beta2, double eps, int64_t step,
                                      bool bias_correction) {
  const double bc1 = bias_correction ? 1.0 - std::pow(beta1, static_cast<double>(step)) : 1.0;
  const double bc2 = bias_correction ? 1.0 - std::pow(beta2, static_cast<double>(step)) : 1.0;
  AdamDirCoeffs<T> c;
  c.beta1 = static_cast<T>(beta1);
  c.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  c.beta2 = static_cast<T>(beta2);
  c.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  c.eps = static_cast<T>(eps);
  c.bc1 = static_cast<T>(bc1);
  c.bc2_sqrt = static_cast<T>(std::sqrt(bc2));
  return c;
}

}  // namespace ftops
