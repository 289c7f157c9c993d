// The per-element math of the fused Adam(W) ops, shared by the CPU and CUDA kernels.
//
// acc_t is float for float32/float16/bfloat16 tensors and double for float64 tensors. Every
// scalar coefficient is computed once on the host in double and rounded to acc_t. Only +, -, *,
// / and sqrt are used (all correctly rounded on both sides; the CPU build uses -ffp-contract=off
// and the CUDA build --fmad=false), so the CPU and CUDA kernels give bit-identical results.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define FTOPS_ADAMW_HD __host__ __device__ __forceinline__
#else
#define FTOPS_ADAMW_HD inline __attribute__((always_inline))
#endif

namespace ftops {

// torch.optim.AdamW, one element:
//   g = maximize ? -g : g
//   p = p * (1 - lr*wd)
//   m = beta1*m + (1-beta1)*g ;  v = beta2*v + (1-beta2)*g*g
//   p = p - (lr/bc1) * (m / (sqrt(v)/sqrt(bc2) + eps))
// with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step (both 1 without bias correction).
template <typename T>
struct AdamwCoeffs {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  T step_size;  // lr / bc1
  T bc2_sqrt;   // sqrt(bc2)
  T decay;      // 1 - lr * weight_decay
  T grad_sign;  // -1 when maximizing, else 1
};

// The normalized Adam direction written by adam_direction_:
//   m = beta1*m + (1-beta1)*g ;  v = beta2*v + (1-beta2)*g*g
//   out = (m / (sqrt(v)/sqrt(bc2) + eps)) / bc1
// Without bias correction (bc1 = bc2 = 1) this is exactly galore_torch's N = m / (sqrt(v) + eps).
template <typename T>
struct AdamDirCoeffs {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  T bc1;       // 1 - beta1^step, or 1
  T bc2_sqrt;  // sqrt(1 - beta2^step), or 1
};

FTOPS_ADAMW_HD float adamw_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

FTOPS_ADAMW_HD double adamw_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Updates m and v in place and returns the new parameter value.
template <typename T>
FTOPS_ADAMW_HD T adamw_element(T p, T g, T& m, T& v, const AdamwCoeffs<T>& c) {
  g = g * c.grad_sign;
  p = p * c.decay;
  const T m1 = c.beta1 * m + c.one_minus_beta1 * g;
  const T v1 = c.beta2 * v + c.one_minus_beta2 * (g * g);
  m = m1;
  v = v1;
  const T denom = adamw_sqrt(v1) / c.bc2_sqrt + c.eps;
  return p - c.step_size * (m1 / denom);
}

// Updates m and v in place and returns the direction.
template <typename T>
FTOPS_ADAMW_HD T adam_direction_element(T g, T& m, T& v, const AdamDirCoeffs<T>& c) {
  const T m1 = c.beta1 * m + c.one_minus_beta1 * g;
  const T v1 = c.beta2 * v + c.one_minus_beta2 * (g * g);
  m = m1;
  v = v1;
  const T denom = adamw_sqrt(v1) / c.bc2_sqrt + c.eps;
  return (m1 / denom) / c.bc1;
}

}  // namespace ftops
