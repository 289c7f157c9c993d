// CUDA kernels of the fused Adam(W) ops. Same element math as cpu/adamw.cpp
// (csrc/common/adamw_math.h), built with --fmad=false, so results match the CPU bit for bit.
//
// Multi-tensor launch: the tensors of one dtype (combination) are packed, up to kMaxTensors at a
// time, into a by-value argument struct; one grid-stride kernel walks groups of 4 elements of all
// of them (16-byte vector loads where every pointer of the tensor is aligned). A model with
// hundreds of parameters costs a handful of launches, not hundreds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.cuh"

#include <map>
#include <utility>
#include <vector>

#include "../common/adamw_args.h"
#include "../common/adamw_math.h"
#include "../common/check.h"

namespace ftops {
namespace {

constexpr int kMaxTensors = 40;  // keeps the argument struct well under the 4 KiB param limit

// Pointers of up to kMaxTensors tensors; a[0] param/grad, a[1] grad/m, ... per op (see below).
struct MultiTensor {
  void* ptr[4][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_group[kMaxTensors + 1];  // prefix sum of ceil(numel / 4)
  bool aligned[kMaxTensors];             // every pointer allows 4-wide vector access
  int n_tensors;
};

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ Vec4<T> load4(const void* base, int64_t i) {
  return reinterpret_cast<const Vec4<T>*>(static_cast<const T*>(base) + i)[0];
}

template <typename T>
__device__ __forceinline__ void store4(void* base, int64_t i, const Vec4<T>& x) {
  reinterpret_cast<Vec4<T>*>(static_cast<T*>(base) + i)[0] = x;
}

// ptr[0] params (scalar_t), ptr[1] grads (scalar_t), ptr[2] exp_avgs, ptr[3] exp_avg_sqs (acc_t).
template <typename scalar_t, typename acc_t>
__global__ void adamw_kernel(const MultiTensor mt, const AdamwCoeffs<acc_t> c) {
  const int64_t total = mt.first_group[mt.n_tensors];
  int k = 0;
  for (int64_t gi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < total;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    while (mt.first_group[k + 1] <= gi) ++k;  // gi only grows: k never moves back
    const int64_t i0 = 4 * (gi - mt.first_group[k]);
    const int64_t n = mt.numel[k] - i0;
    if (n >= 4 && mt.aligned[k]) {
      Vec4<scalar_t> p = load4<scalar_t>(mt.ptr[0][k], i0);
      const Vec4<scalar_t> g = load4<scalar_t>(mt.ptr[1][k], i0);
      Vec4<acc_t> m = load4<acc_t>(mt.ptr[2][k], i0);
      Vec4<acc_t> v = load4<acc_t>(mt.ptr[3][k], i0);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        p.v[j] = static_cast<scalar_t>(adamw_element<acc_t>(
            static_cast<acc_t>(p.v[j]), static_cast<acc_t>(g.v[j]), m.v[j], v.v[j], c));
      }
      store4(mt.ptr[0][k], i0, p);
      store4(mt.ptr[2][k], i0, m);
      store4(mt.ptr[3][k], i0, v);
    } else {
      scalar_t* p = static_cast<scalar_t*>(mt.ptr[0][k]) + i0;
      const scalar_t* g = static_cast<const scalar_t*>(mt.ptr[1][k]) + i0;
      acc_t* m = static_cast<acc_t*>(mt.ptr[2][k]) + i0;
      acc_t* v = static_cast<acc_t*>(mt.ptr[3][k]) + i0;
      for (int j = 0; j < 4 && j < n; ++j) {
        acc_t mj = m[j], vj = v[j];
        p[j] = static_cast<scalar_t>(adamw_element<acc_t>(
            static_cast<acc_t>(p[j]), static_cast<acc_t>(g[j]), mj, vj, c));
        m[j] = mj;
        v[j] = vj;
      }
    }
  }
}

// ptr[0] grads (grad_t), ptr[1] exp_avgs, ptr[2] exp_avg_sqs (acc_t), ptr[3] out (out_t).
template <typename grad_t, typename out_t, typename acc_t>
__global__ void adam_direction_kernel(const MultiTensor mt, const AdamDirCoeffs<acc_t> c) {
  const int64_t total = mt.first_group[mt.n_tensors];
  int k = 0;
  for (int64_t gi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; gi < total;
       gi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    while (mt.first_group[k + 1] <= gi) ++k;
    const int64_t i0 = 4 * (gi - mt.first_group[k]);
    const int64_t n = mt.numel[k] - i0;
    if (n >= 4 && mt.aligned[k]) {
      const Vec4<grad_t> g = load4<grad_t>(mt.ptr[0][k], i0);
      Vec4<acc_t> m = load4<acc_t>(mt.ptr[1][k], i0);
      Vec4<acc_t> v = load4<acc_t>(mt.ptr[2][k], i0);
      Vec4<out_t> o;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        o.v[j] = static_cast<out_t>(
            adam_direction_element<acc_t>(static_cast<acc_t>(g.v[j]), m.v[j], v.v[j], c));
      }
      store4(mt.ptr[1][k], i0, m);
      store4(mt.ptr[2][k], i0, v);
      store4(mt.ptr[3][k], i0, o);
    } else {
      const grad_t* g = static_cast<const grad_t*>(mt.ptr[0][k]) + i0;
      acc_t* m = static_cast<acc_t*>(mt.ptr[1][k]) + i0;
      acc_t* v = static_cast<acc_t*>(mt.ptr[2][k]) + i0;
      out_t* o = static_cast<out_t*>(mt.ptr[3][k]) + i0;
      for (int j = 0; j < 4 && j < n; ++j) {
        acc_t mj = m[j], vj = v[j];
        o[j] = static_cast<out_t>(adam_direction_element<acc_t>(static_cast<acc_t>(g[j]), mj, vj, c));
        m[j] = mj;
        v[j] = vj;
      }
    }
  }
}

// Packs tensors `members` (indices into the lists) kMaxTensors at a time and calls
// launch(MultiTensor) for each pack. lists[j][k] is the j-th pointer of tensor k; elem_size[j][k]
// its element size (for the alignment test).
template <typename Launch>
void for_each_pack(const std::vector<int64_t>& members, const at::TensorList* lists,
                   const Launch& launch) {
  for (size_t start = 0; start < members.size(); start += kMaxTensors) {
    MultiTensor mt{};
    const size_t stop = std::min(members.size(), start + kMaxTensors);
    mt.n_tensors = static_cast<int>(stop - start);
    mt.first_group[0] = 0;
    for (size_t j = 0; j < stop - start; ++j) {
      const int64_t k = members[start + j];
      bool aligned = true;
      for (int a = 0; a < 4; ++a) {
        const at::Tensor& t = lists[a][k];
        mt.ptr[a][j] = t.data_ptr();
        aligned = aligned && reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0;
      }
      mt.aligned[j] = aligned;
      mt.numel[j] = lists[0][k].numel();
      mt.first_group[j + 1] = mt.first_group[j] + (mt.numel[j] + 3) / 4;
    }
    if (mt.first_group[mt.n_tensors] > 0) launch(mt);
  }
}

template <typename scalar_t, typename acc_t>
void launch_adamw(const MultiTensor& mt, const AdamwCoeffs<acc_t>& c) {
  adamw_kernel<scalar_t, acc_t><<<grid_for(mt.first_group[mt.n_tensors]), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(mt, c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename grad_t, typename out_t, typename acc_t>
void launch_direction(const MultiTensor& mt, const AdamDirCoeffs<acc_t>& c) {
  adam_direction_kernel<grad_t, out_t, acc_t><<<grid_for(mt.first_group[mt.n_tensors]), kThreads,
                                                0, c10::cuda::getCurrentCUDAStream()>>>(mt, c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step, bool maximize, bool bias_correction) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                   step, c10::DeviceType::CUDA);
  const int64_t K = static_cast<int64_t>(params.size());
  if (K == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto cf = make_adamw_coeffs<float>(lr, beta1, beta2, eps, weight_decay, step, maximize,
                                           bias_correction);
  const auto cd = make_adamw_coeffs<double>(lr, beta1, beta2, eps, weight_decay, step, maximize,
                                            bias_correction);
  std::map<at::ScalarType, std::vector<int64_t>> by_dtype;
  for (int64_t k = 0; k < K; ++k) {
    if (params[k].numel() > 0) by_dtype[params[k].scalar_type()].push_back(k);
  }
  const at::TensorList lists[4] = {params, grads, exp_avgs, exp_avg_sqs};
  for (const auto& [dtype, members] : by_dtype) {
    for_each_pack(members, lists, [&](const MultiTensor& mt) {
      switch (dtype) {
        case at::kFloat: launch_adamw<float, float>(mt, cf); break;
        case at::kDouble: launch_adamw<double, double>(mt, cd); break;
        case at::kHalf: launch_adamw<at::Half, float>(mt, cf); break;
        case at::kBFloat16: launch_adamw<at::BFloat16, float>(mt, cf); break;
        default: FTOPS_CHECK(false, "ftops.adamw_: unsupported dtype ", dtype);
      }
    });
  }
}

void adam_direction_cuda(at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList out, double beta1,
                         double beta2, double eps, int64_t step, bool bias_correction) {
  check_adam_direction_args(grads, exp_avgs, exp_avg_sqs, out, beta1, beta2, eps, step,
                            c10::DeviceType::CUDA);
  const int64_t K = static_cast<int64_t>(grads.size());
  if (K == 0) return;
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto cf = make_adam_dir_coeffs<float>(beta1, beta2, eps, step, bias_correction);
  const auto cd = make_adam_dir_coeffs<double>(beta1, beta2, eps, step, bias_correction);
  std::map<std::pair<at::ScalarType, at::ScalarType>, std::vector<int64_t>> by_dtype;
  for (int64_t k = 0; k < K; ++k) {
    if (grads[k].numel() > 0) by_dtype[{grads[k].scalar_type(), out[k].scalar_type()}].push_back(k);
  }
  const at::TensorList lists[4] = {grads, exp_avgs, exp_avg_sqs, out};
  for (const auto& [dtypes, members] : by_dtype) {
    const auto [gt, ot] = dtypes;
    for_each_pack(members, lists, [&](const MultiTensor& mt) {
      if (gt == at::kFloat) {
        launch_direction<float, float, float>(mt, cf);
      } else if (gt == at::kDouble) {
        launch_direction<double, double, double>(mt, cd);
      } else if (gt == at::kHalf && ot == at::kHalf) {
        launch_direction<at::Half, at::Half, float>(mt, cf);
      } else if (gt == at::kHalf) {
        launch_direction<at::Half, float, float>(mt, cf);
      } else if (gt == at::kBFloat16 && ot == at::kBFloat16) {
        launch_direction<at::BFloat16, at::BFloat16, float>(mt, cf);
      } else if (gt == at::kBFloat16) {
        launch_direction<at::BFloat16, float, float>(mt, cf);
      } else {
        FTOPS_CHECK(false, "ftops.adam_direction_: unsupported dtypes ", gt, ", ", ot);
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CUDA, m) {
  m.impl("adamw_", &adamw_cuda);
  m.impl("adam_direction_", &adam_direction_cuda);
}

}  // namespace ftops
