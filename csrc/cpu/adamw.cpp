// CPU kernels of the fused Adam(W) ops: one at::parallel_for over fixed-size chunks of all
// tensors (the CPU's multi-tensor launch). Each chunk is processed in tiles: the tile's param and
// grad values are converted to acc_t (float, or double for float64) into stack buffers, the
// update runs on plain acc_t arrays (a branch-free loop the auto-vectorizer handles), and params
// are rounded back once. Element math: csrc/common/adamw_math.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/adamw_args.h"
#include "../common/adamw_math.h"
#include "../common/dispatch.h"
#include "../common/float_bits.h"
#include "multi_tensor.h"
#include "simd_isa.h"

namespace ftops {
namespace {

constexpr int64_t kChunk = 4096;  // elements per parallel work item
constexpr int64_t kTile = 256;    // elements per stack tile inside a chunk

template <typename acc_t>
inline __attribute__((always_inline)) void adamw_tile(acc_t* __restrict p,
                                                      const acc_t* __restrict g,
                                                      acc_t* __restrict m, acc_t* __restrict v,
                                                      int64_t n, const AdamwCoeffs<acc_t>& c) {
  for (int64_t i = 0; i < n; ++i) p[i] = adamw_element(p[i], g[i], m[i], v[i], c);
}

template <typename acc_t>
inline __attribute__((always_inline)) void direction_tile(const acc_t* __restrict g,
                                                          acc_t* __restrict m,
                                                          acc_t* __restrict v,
                                                          acc_t* __restrict out, int64_t n,
                                                          const AdamDirCoeffs<acc_t>& c) {
  for (int64_t i = 0; i < n; ++i) out[i] = adam_direction_element(g[i], m[i], v[i], c);
}

template <typename T>
constexpr bool kIsHalfType = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// n values into acc_t and back. The half types go through their bits and float_bits.h's
// branch-free conversions (the same values): c10's have branches, and the loops did not
// vectorize (float16 AdamW took 4x the float32 time, 7x without AVX-512).
template <typename acc_t, typename T>
inline __attribute__((always_inline)) void to_acc(const T* __restrict src, acc_t* __restrict dst,
                                                  int64_t n) {
  if constexpr (kIsHalfType<T>) {
    const auto* b = reinterpret_cast<const typename FBits<T>::U*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = FBits<T>::to_f(b[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename acc_t, typename T>
inline __attribute__((always_inline)) void from_acc(const acc_t* __restrict src,
                                                    T* __restrict dst, int64_t n) {
  if constexpr (kIsHalfType<T>) {
    auto* b = reinterpret_cast<typename FBits<T>::U*>(dst);
    for (int64_t i = 0; i < n; ++i) b[i] = FBits<T>::from_f(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// n elements starting at p, g, m, v.
template <typename scalar_t, typename acc_t>
FTOPS_VECTOR_CLONES void adamw_range(scalar_t* p, const scalar_t* g, acc_t* m, acc_t* v,
                                    int64_t n, const AdamwCoeffs<acc_t> c) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    adamw_tile<acc_t>(p, g, m, v, n, c);
  } else {
    alignas(64) acc_t pt[kTile];
    alignas(64) acc_t gt[kTile];
    for (int64_t i0 = 0; i0 < n; i0 += kTile) {
      const int64_t len = std::min(kTile, n - i0);
      to_acc<acc_t>(p + i0, pt, len);
      to_acc<acc_t>(g + i0, gt, len);
      adamw_tile<acc_t>(pt, gt, m + i0, v + i0, len, c);
      from_acc<acc_t>(pt, p + i0, len);
    }
  }
}

template <typename grad_t, typename out_t, typename acc_t>
FTOPS_VECTOR_CLONES void direction_range(const grad_t* g, acc_t* m, acc_t* v, out_t* out,
                                        int64_t n, const AdamDirCoeffs<acc_t> c) {
  if constexpr (std::is_same_v<grad_t, acc_t> && std::is_same_v<out_t, acc_t>) {
    direction_tile<acc_t>(g, m, v, out, n, c);
  } else {
    alignas(64) acc_t gt[kTile];
    alignas(64) acc_t ot[kTile];
    for (int64_t i0 = 0; i0 < n; i0 += kTile) {
      const int64_t len = std::min(kTile, n - i0);
      to_acc<acc_t>(g + i0, gt, len);
      direction_tile<acc_t>(gt, m + i0, v + i0, ot, len, c);
      from_acc<acc_t>(ot, out + i0, len);
    }
  }
}

// The float or the double variant of a coefficient struct, by acc_t.
template <typename acc_t, typename F, typename D>
const auto& pick(const F& f, const D& d) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return d;
  } else {
    return f;
  }
}

// Calls fn(k, begin, end) for element ranges of at most kChunk elements of tensor k, over all
// tensors (numel given), in one parallel loop.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& numels, const Fn& fn) {
  std::vector<int64_t> chunks(numels.size());
  for (size_t k = 0; k < numels.size(); ++k) chunks[k] = (numels[k] + kChunk - 1) / kChunk;
  parallel_over_tensor_units(chunks, /*grain_size=*/4, [&](int64_t k, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e0 = c * kChunk;
      fn(k, e0, std::min(numels[k], e0 + kChunk));
    }
  });
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
               double weight_decay, int64_t step, bool maximize, bool bias_correction) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                   step, c10::DeviceType::CPU);
  const size_t K = params.size();
  if (K == 0) return;
  const auto cf = make_adamw_coeffs<float>(lr, beta1, beta2, eps, weight_decay, step, maximize,
                                           bias_correction);
  const auto cd = make_adamw_coeffs<double>(lr, beta1, beta2, eps, weight_decay, step, maximize,
                                            bias_correction);
  std::vector<int64_t> numels(K);
  for (size_t k = 0; k < K; ++k) numels[k] = params[k].numel();
  for_each_chunk(numels, [&](int64_t k, int64_t e0, int64_t e1) {
    const at::Tensor& p = params[k];
    const int64_t n = e1 - e0;
    FTOPS_DISPATCH_FLOAT_TYPES(p.scalar_type(), "adamw_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const AdamwCoeffs<acc_t>& c = pick<acc_t>(cf, cd);
      adamw_range<scalar_t, acc_t>(p.data_ptr<scalar_t>() + e0,
                                   grads[k].data_ptr<scalar_t>() + e0,
                                   exp_avgs[k].data_ptr<acc_t>() + e0,
                                   exp_avg_sqs[k].data_ptr<acc_t>() + e0, n, c);
    });
  });
}

void adam_direction_cpu(at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList out, double beta1,
                        double beta2, double eps, int64_t step, bool bias_correction) {
  check_adam_direction_args(grads, exp_avgs, exp_avg_sqs, out, beta1, beta2, eps, step,
                            c10::DeviceType::CPU);
  const size_t K = grads.size();
  if (K == 0) return;
  const auto cf = make_adam_dir_coeffs<float>(beta1, beta2, eps, step, bias_correction);
  const auto cd = make_adam_dir_coeffs<double>(beta1, beta2, eps, step, bias_correction);
  std::vector<int64_t> numels(K);
  for (size_t k = 0; k < K; ++k) numels[k] = grads[k].numel();
  for_each_chunk(numels, [&](int64_t k, int64_t e0, int64_t e1) {
    const at::Tensor& g = grads[k];
    const int64_t n = e1 - e0;
    const bool out_is_acc = out[k].scalar_type() != g.scalar_type();
    FTOPS_DISPATCH_FLOAT_TYPES(g.scalar_type(), "adam_direction_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const AdamDirCoeffs<acc_t>& c = pick<acc_t>(cf, cd);
      const scalar_t* gp = g.data_ptr<scalar_t>() + e0;
      acc_t* mp = exp_avgs[k].data_ptr<acc_t>() + e0;
      acc_t* vp = exp_avg_sqs[k].data_ptr<acc_t>() + e0;
      if (out_is_acc) {
        direction_range<scalar_t, acc_t, acc_t>(gp, mp, vp, out[k].data_ptr<acc_t>() + e0, n, c);
      } else {
        direction_range<scalar_t, scalar_t, acc_t>(gp, mp, vp, out[k].data_ptr<scalar_t>() + e0,
                                                   n, c);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CPU, m) {
  m.impl("adamw_", &adamw_cpu);
  m.impl("adam_direction_", &adam_direction_cpu);
}

}  // namespace ftops
