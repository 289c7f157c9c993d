// CUDA kernels of the zeroth-order ops. Same math as cpu/zo.cpp (csrc/common/philox.h), built
// with --fmad=false so every value matches the CPU kernel bit for bit.
//
// Multi-tensor launch: the tensors of one dtype are packed, up to kMaxTensors at a time, into a
// by-value argument struct; one grid-stride kernel walks the Philox groups (4 elements each) of
// all of them. A model with hundreds of parameters costs a handful of launches, not hundreds.
// A tensor with element offset o (a shard of a larger tensor) covers the global groups
// floor(o / 4) .. ceil((o + numel) / 4); a group straddling its start or end updates only the
// elements the tensor holds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.cuh"

#include <map>
#include <vector>

#include "../common/philox.h"
#include "../common/check.h"
#include "../common/zo_args.h"
#include "../common/zo_undo.h"

namespace ftops {
namespace {

constexpr int kMaxTensors = 24;

struct ZoLaunch {
  void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t offset[kMaxTensors];  // element offset of the tensor in the global one
  int64_t first_group[kMaxTensors + 1];
  uint32_t id[kMaxTensors];
  double decay[kMaxTensors];
  double coeff[kMaxSeedsPerCall][kMaxTensors];
  uint64_t seed[kMaxSeedsPerCall];
  int n_tensors;
  int n_seeds;
};

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Philox groups of a tensor of `numel` elements at element offset `offset` (0 if empty).
FTOPS_HD int64_t span_groups(int64_t offset, int64_t numel) {
  return numel == 0 ? 0 : (offset + numel + 3) / 4 - offset / 4;
}

// Work item g of a launch: tensor k, its global Philox group, and the local index of the
// group's first element (negative when the group starts before the tensor).
struct GroupAt {
  int k;
  int64_t group, first;
};

// `k` carries the tensor of the thread's previous item: g only grows along a grid-stride loop,
// so the scan moves forward only and costs at most n_tensors steps per thread in all (from 0 at
// every item it cost ~n_tensors / 2 steps per group, a large share of a pass's instructions).
__device__ __forceinline__ GroupAt group_at(const ZoLaunch& args, int64_t g, int& k) {
  while (args.first_group[k + 1] <= g) ++k;
  const int64_t group = args.offset[k] / 4 + (g - args.first_group[k]);
  return GroupAt{k, group, 4 * group - args.offset[k]};
}

// The elements of group `at` that the tensor holds, as bit patterns (the others read as 0, not
// valid): one 4-wide load when the whole group is there and aligned. store_group writes back the
// valid ones.
template <typename U>
struct GroupBits {
  U* p;
  int64_t first;
  bool whole;
  bool valid[4];
  U x[4];
};

template <typename U>
__device__ __forceinline__ GroupBits<U> load_group(const ZoLaunch& args, const GroupAt& at) {
  GroupBits<U> gb;
  gb.p = static_cast<U*>(args.ptr[at.k]);
  gb.first = at.first;
  const int64_t numel = args.numel[at.k];
  gb.whole = at.first >= 0 && at.first + 4 <= numel &&
             reinterpret_cast<uintptr_t>(gb.p + at.first) % sizeof(Vec4<U>) == 0;
  if (gb.whole) {
    const Vec4<U> x = *reinterpret_cast<const Vec4<U>*>(gb.p + at.first);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      gb.x[j] = x.v[j];
      gb.valid[j] = true;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = at.first + j;
      gb.valid[j] = i >= 0 && i < numel;
      gb.x[j] = gb.valid[j] ? gb.p[i] : U(0);
    }
  }
  return gb;
}

template <typename U>
__device__ __forceinline__ void store_group(const GroupBits<U>& gb, const U out[4]) {
  if (gb.whole) {
    Vec4<U> x;
#pragma unroll
    for (int j = 0; j < 4; ++j) x.v[j] = out[j];
    *reinterpret_cast<Vec4<U>*>(gb.p + gb.first) = x;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (gb.valid[j]) gb.p[gb.first + j] = out[j];
  }
}

// zo_apply_bits (csrc/common/zo_undo.h) for a lane's 4 elements (recovered values tb), the same
// results with less work:
//  * without weight decay (every pass of a step but the last) the decay term, +0, is skipped;
//  * bfloat16 with ties up (a perturbation to undo later): the TwoSum error of the float32 sum
//    v + t decides only where that sum lies exactly on a bfloat16 midpoint (about 1 sum in 2^16;
//    elsewhere bf16_round_up_ties ignores it), so it is computed only when one of the 4 sums does.
// Both are branches over blocks that warps almost never run (the TwoSums: 24 SASS instructions
// per group on sm_90, the decay: predicated off).
template <typename scalar_t, typename acc_t, bool kInvertible>
__device__ __forceinline__ void apply_group(const typename FBits<scalar_t>::U tb[4],
                                            const acc_t acc[4], acc_t d,
                                            typename FBits<scalar_t>::U out[4]) {
  acc_t v[4], t[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[j] = FBits<scalar_t>::to_f(tb[j]);
    t[j] = acc[j];  // acc - (+0) is acc, bit for bit (-0 included)
  }
  if (d != acc_t(0)) {
#pragma unroll
    for (int j = 0; j < 4; ++j) t[j] = acc[j] - decay_term<acc_t>(d, v[j]);
  }
  if constexpr (kInvertible && std::is_same_v<scalar_t, c10::BFloat16>) {
    float s[4];
    bool midpoint = false;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s[j] = v[j] + t[j];
      midpoint = midpoint || (float_to_bits(s[j]) & 0xffffu) == 0x8000u;
    }
    float err[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // ignored off a midpoint
    if (midpoint) {
#pragma unroll
      for (int j = 0; j < 4; ++j) err[j] = two_sum_err<float>(v[j], t[j], s[j]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = bf16_round_up_ties(s[j], err[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = zo_round_bits<scalar_t, acc_t, kInvertible>(v[j], t[j]);
  }
}

// The plain kernels need 35-40 registers for float/half types (no spills) when held to 6 blocks
// of 256 threads per SM; left free, ptxas took 45 (5 blocks). float64 needs more: no bound.
template <typename acc_t>
constexpr int kMinBlocks = sizeof(acc_t) == 4 ? 6 : 1;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t>) zo_axpby_kernel(const ZoLaunch args) {
  const int64_t total = args.first_group[args.n_tensors];
  int k = 0;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const GroupAt at = group_at(args, g, k);
    acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int s = 0; s < args.n_seeds; ++s) {
      const NoiseKey key = make_noise_key(args.seed[s], args.id[at.k]);
      float z[4];
      noise_normals(key, static_cast<uint64_t>(at.group), z[0], z[1], z[2], z[3]);
      const acc_t c = static_cast<acc_t>(args.coeff[s][at.k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] = acc[j] + c * static_cast<acc_t>(z[j]);
    }
    const acc_t d = static_cast<acc_t>(args.decay[at.k]);
    using U = typename FBits<scalar_t>::U;
    const GroupBits<U> gb = load_group<U>(args, at);
    U out[4];
    apply_group<scalar_t, acc_t, false>(gb.x, acc, d, out);  // as the CPU's axpby_blocks
    store_group<U>(gb, out);
  }
}

// zo_undo_axpby_: the ZoLaunch fields (coeff/seed may hold 0 seeds) plus the undo.
struct ZoUndoLaunch {
  ZoLaunch base;
  double undo_coeff[kMaxTensors];
  PhiloxRoundKeys undo_keys;  // of the undo seed: every pass of a MeZO step draws its noise here
  int shared;  // the apply seed whose noise is the undo noise, or -1
};

// The noise of group `at` for zo_undo_axpby_: the undo offsets a = 0 + u z_undo (u: the
// tensor's undo coefficient; 0 means nothing to undo) and the apply sum acc = sum_s c_s z_s.
// The undo noise is generated once and reused for apply seed number `shared`.
template <typename acc_t>
__device__ __forceinline__ bool undo_axpby_noise(const ZoUndoLaunch& args, const GroupAt& at,
                                                 acc_t a[4], acc_t acc[4]) {
  const ZoLaunch& b = args.base;
  const acc_t u = static_cast<acc_t>(args.undo_coeff[at.k]);
  const bool undo = u != acc_t(0);
  float zu[4] = {0.f, 0.f, 0.f, 0.f};
  if (undo || args.shared >= 0) {
    noise_normals(args.undo_keys, b.id[at.k], static_cast<uint64_t>(at.group), zu[0], zu[1],
                  zu[2], zu[3]);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    a[j] = undo_offset<acc_t>(u, zu[j]);
    acc[j] = acc_t(0);
  }
  if (b.n_seeds == 1 && args.shared == 0) {  // a MeZO step's passes (one sample): no loop
    const acc_t c = static_cast<acc_t>(b.coeff[0][at.k]);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = acc[j] + c * static_cast<acc_t>(zu[j]);
    return undo;
  }
  for (int s = 0; s < b.n_seeds; ++s) {
    float z[4] = {zu[0], zu[1], zu[2], zu[3]};
    if (s != args.shared) {
      noise_normals(make_noise_key(b.seed[s], b.id[at.k]), static_cast<uint64_t>(at.group),
                    z[0], z[1], z[2], z[3]);
    }
    const acc_t c = static_cast<acc_t>(b.coeff[s][at.k]);
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = acc[j] + c * static_cast<acc_t>(z[j]);
  }
  return undo;
}

template <typename scalar_t, typename acc_t, bool kInvertible>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t>) zo_undo_axpby_kernel(const ZoUndoLaunch args) {
  const ZoLaunch& b = args.base;
  const int64_t total = b.first_group[b.n_tensors];
  int k = 0;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const GroupAt at = group_at(b, g, k);
    acc_t a[4], acc[4];
    const bool undo = undo_axpby_noise<acc_t>(args, at, a, acc);
    const acc_t d = static_cast<acc_t>(b.decay[at.k]);
    using U = typename FBits<scalar_t>::U;
    const GroupBits<U> gb = load_group<U>(b, at);
    U tb[4], out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) tb[j] = undo ? zo_undo_bits<scalar_t, acc_t>(gb.x[j], a[j]) : gb.x[j];
    apply_group<scalar_t, acc_t, kInvertible>(tb, acc, d, out);
    store_group<U>(gb, out);
  }
}

// zo_undo_axpby_kernel with the undo's shortcut (the default; not float64): each
// lane takes the shortcut for its 4 elements, and the elements where it does not hold (those
// whose preimage may lie in another binade, ~1 in 6 for typical weights) are gathered in shared
// memory and shared out over the warp's 32 lanes for the exact path. With a branch instead,
// nearly every warp would run the exact path for 4 elements per lane. The grid-stride loop
// runs per warp (all lanes iterate together, for the warp-wide ballots); lanes past the end
// redo the last group and store nothing.
template <typename scalar_t, typename acc_t, bool kInvertible>
__global__ void zo_undo_axpby_shortcut_kernel(const ZoUndoLaunch args) {
  using U = typename FBits<scalar_t>::U;
  constexpr unsigned kFull = 0xffffffffu;
  __shared__ U slow_p[kThreads * 4];
  __shared__ acc_t slow_a[kThreads * 4];
  const int lane = threadIdx.x & 31;
  U* wp = slow_p + (threadIdx.x - lane) * 4;  // this warp's 128 slots
  acc_t* wa = slow_a + (threadIdx.x - lane) * 4;
  const ZoLaunch& b = args.base;
  const int64_t total = b.first_group[b.n_tensors];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int k = 0;
  for (int64_t g0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + (threadIdx.x - lane); g0 < total;
       g0 += stride) {
    // Lanes past the end redo the last group but store nothing: every lane runs the same code
    // (zeroing their state instead cost ~19 instructions an iteration on every lane).
    const bool active = g0 + lane < total;
    const GroupAt at = group_at(b, active ? g0 + lane : total - 1, k);
    acc_t a[4], acc[4];
    const bool undo = undo_axpby_noise<acc_t>(args, at, a, acc);
    const acc_t d = static_cast<acc_t>(b.decay[at.k]);
    GroupBits<U> gb = load_group<U>(b, at);
#pragma unroll
    for (int j = 0; j < 4; ++j) gb.valid[j] = gb.valid[j] && active;
    // the shortcut, and the elements it leaves to the exact path
    U tb[4];
    bool slow[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      bool ok = false;
      const U t = zo_undo_shortcut_bits<scalar_t, acc_t>(gb.x[j], a[j], ok);
      tb[j] = undo ? t : gb.x[j];
      slow[j] = gb.valid[j] && undo && !ok;
    }
    unsigned mask[4];
    int pos[4];
    int n_slow = 0;
    const unsigned below = (1u << lane) - 1u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      mask[j] = __ballot_sync(kFull, slow[j]);
      pos[j] = n_slow + __popc(mask[j] & below);
      n_slow += __popc(mask[j]);
    }
    if (n_slow > 0) {  // warp-uniform
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (slow[j]) {
          wp[pos[j]] = gb.x[j];
          wa[pos[j]] = a[j];
        }
      }
      __syncwarp();
      for (int i = lane; i < n_slow; i += 32) wp[i] = zo_undo_bits<scalar_t, acc_t>(wp[i], wa[i]);
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (slow[j]) tb[j] = wp[pos[j]];
      __syncwarp();  // the next iteration writes the slots again
    }
    if (active) {
      U out[4];
      apply_group<scalar_t, acc_t, kInvertible>(tb, acc, d, out);
      store_group<U>(gb, out);
    }
  }
}

template <typename scalar_t, typename acc_t>
void launch_axpby(const ZoLaunch& args) {
  const int64_t groups = args.first_group[args.n_tensors];
  if (groups == 0) return;
  zo_axpby_kernel<scalar_t, acc_t><<<grid_for(groups), kThreads, 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void zo_axpby_cuda(at::TensorList params, at::IntArrayRef seeds, at::IntArrayRef ids,
                   at::ArrayRef<double> coeffs, at::ArrayRef<double> decay,
                   at::IntArrayRef offsets) {
  check_zo_axpby_args(params, seeds, ids, coeffs, decay, offsets, c10::DeviceType::CUDA);
  const int64_t K = static_cast<int64_t>(params.size());
  if (K == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());

  // One launch per dtype per kMaxTensors tensors.
  std::map<at::ScalarType, std::vector<int64_t>> by_dtype;
  for (int64_t k = 0; k < K; ++k) {
    if (params[k].numel() > 0) by_dtype[params[k].scalar_type()].push_back(k);
  }
  for (const auto& [dtype, members] : by_dtype) {
    for (size_t start = 0; start < members.size(); start += kMaxTensors) {
      ZoLaunch args{};
      args.n_seeds = static_cast<int>(seeds.size());
      for (size_t s = 0; s < seeds.size(); ++s) args.seed[s] = static_cast<uint64_t>(seeds[s]);
      const size_t stop = std::min(members.size(), start + kMaxTensors);
      args.n_tensors = static_cast<int>(stop - start);
      args.first_group[0] = 0;
      for (size_t j = 0; j < stop - start; ++j) {
        const int64_t k = members[start + j];
        args.ptr[j] = params[k].data_ptr();
        args.numel[j] = params[k].numel();
        args.offset[j] = offsets.empty() ? 0 : offsets[k];
        args.first_group[j + 1] = args.first_group[j] + span_groups(args.offset[j], args.numel[j]);
        args.id[j] = static_cast<uint32_t>(ids[k]);
        args.decay[j] = decay[k];
        for (size_t s = 0; s < seeds.size(); ++s) args.coeff[s][j] = coeffs[s * K + k];
      }
      switch (dtype) {
        case at::kFloat: launch_axpby<float, float>(args); break;
        case at::kDouble: launch_axpby<double, double>(args); break;
        case at::kHalf: launch_axpby<at::Half, float>(args); break;
        case at::kBFloat16: launch_axpby<at::BFloat16, float>(args); break;
        default: FTOPS_CHECK(false, "ftops.zo_axpby_: unsupported dtype ", dtype);
      }
    }
  }
}

// The shortcut kernel only for launches with something to undo: without, it only adds the warp
// gathering to the plain kernel's work (H100, 67M fp32, a perturbation: 0.44 ms vs 0.29 ms).
template <typename scalar_t, typename acc_t>
void launch_undo_axpby(const ZoUndoLaunch& args, bool invertible, bool any_undo) {
  const int64_t groups = args.base.first_group[args.base.n_tensors];
  if (groups == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (any_undo && zo_undo_shortcut_enabled()) {
      if (invertible) {
        zo_undo_axpby_shortcut_kernel<scalar_t, acc_t, true>
            <<<grid_for(groups), kThreads, 0, stream>>>(args);
      } else {
        zo_undo_axpby_shortcut_kernel<scalar_t, acc_t, false>
            <<<grid_for(groups), kThreads, 0, stream>>>(args);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  if (invertible) {
    zo_undo_axpby_kernel<scalar_t, acc_t, true><<<grid_for(groups), kThreads, 0, stream>>>(args);
  } else {
    zo_undo_axpby_kernel<scalar_t, acc_t, false><<<grid_for(groups), kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void zo_undo_axpby_cuda(at::TensorList params, int64_t undo_seed, at::ArrayRef<double> undo_coeffs,
                        at::IntArrayRef seeds, at::IntArrayRef ids, at::ArrayRef<double> coeffs,
                        at::ArrayRef<double> decay, bool invertible, at::IntArrayRef offsets) {
  check_zo_undo_axpby_args(params, undo_coeffs, seeds, ids, coeffs, decay, offsets,
                           c10::DeviceType::CUDA);
  const int64_t K = static_cast<int64_t>(params.size());
  if (K == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  int shared = -1;
  for (size_t s = 0; s < seeds.size() && shared < 0; ++s)
    if (seeds[s] == undo_seed) shared = static_cast<int>(s);

  std::map<at::ScalarType, std::vector<int64_t>> by_dtype;
  for (int64_t k = 0; k < K; ++k) {
    if (params[k].numel() > 0) by_dtype[params[k].scalar_type()].push_back(k);
  }
  for (const auto& [dtype, members] : by_dtype) {
    for (size_t start = 0; start < members.size(); start += kMaxTensors) {
      ZoUndoLaunch args{};
      args.undo_keys = philox_round_keys(make_noise_key(static_cast<uint64_t>(undo_seed), 0));
      args.shared = shared;
      ZoLaunch& b = args.base;
      b.n_seeds = static_cast<int>(seeds.size());
      for (size_t s = 0; s < seeds.size(); ++s) b.seed[s] = static_cast<uint64_t>(seeds[s]);
      const size_t stop = std::min(members.size(), start + kMaxTensors);
      b.n_tensors = static_cast<int>(stop - start);
      b.first_group[0] = 0;
      bool any_undo = false;
      for (size_t j = 0; j < stop - start; ++j) {
        const int64_t k = members[start + j];
        b.ptr[j] = params[k].data_ptr();
        b.numel[j] = params[k].numel();
        b.offset[j] = offsets.empty() ? 0 : offsets[k];
        b.first_group[j + 1] = b.first_group[j] + span_groups(b.offset[j], b.numel[j]);
        b.id[j] = static_cast<uint32_t>(ids[k]);
        b.decay[j] = decay[k];
        args.undo_coeff[j] = undo_coeffs[k];
        any_undo = any_undo || undo_coeffs[k] != 0.0;
        for (size_t s = 0; s < seeds.size(); ++s) b.coeff[s][j] = coeffs[s * K + k];
      }
      switch (dtype) {
        case at::kFloat: launch_undo_axpby<float, float>(args, invertible, any_undo); break;
        case at::kDouble: launch_undo_axpby<double, double>(args, invertible, any_undo); break;
        case at::kHalf: launch_undo_axpby<at::Half, float>(args, invertible, any_undo); break;
        case at::kBFloat16: launch_undo_axpby<at::BFloat16, float>(args, invertible, any_undo); break;
        default: FTOPS_CHECK(false, "ftops.zo_undo_axpby_: unsupported dtype ", dtype);
      }
    }
  }
}

// Noise of elements [offset, offset + numel) into out[0, numel).
__global__ void zo_noise_kernel(PhiloxRoundKeys rk, uint32_t id, int64_t offset, int64_t numel,
                                float* out) {
  const int64_t groups = span_groups(offset, numel);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t group = offset / 4 + g, first = 4 * group - offset;
    float z[4];
    noise_normals(rk, id, static_cast<uint64_t>(group), z[0], z[1], z[2], z[3]);
    for (int j = 0; j < 4; ++j)
      if (first + j >= 0 && first + j < numel) out[first + j] = z[j];
  }
}

__global__ void zo_noise_bits_kernel(PhiloxRoundKeys rk, uint32_t id, int64_t offset,
                                     int64_t numel, int64_t* out) {
  const int64_t groups = span_groups(offset, numel);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t group = offset / 4 + g, first = 4 * group - offset;
    uint32_t w[4];
    noise_words(rk, id, static_cast<uint64_t>(group), w[0], w[1], w[2], w[3]);
    for (int j = 0; j < 4; ++j)
      if (first + j >= 0 && first + j < numel) out[first + j] = w[j];
  }
}

at::Tensor zo_noise_cuda(const at::Tensor& like, int64_t seed, int64_t index, int64_t offset) {
  check_zo_noise_args("ftops.zo_noise", index, offset);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(at::kFloat).layout(at::kStrided)
                                               .memory_format(at::MemoryFormat::Contiguous));
  const int64_t groups = span_groups(offset, out.numel());
  if (groups > 0) {
    const NoiseKey key = make_noise_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(index));
    zo_noise_kernel<<<grid_for(groups), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        philox_round_keys(key), key.id, offset, out.numel(), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor zo_noise_bits_cuda(const at::Tensor& like, int64_t seed, int64_t index, int64_t offset) {
  check_zo_noise_args("ftops.zo_noise_bits", index, offset);
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty({like.numel()}, like.options().dtype(at::kLong).layout(at::kStrided));
  const int64_t groups = span_groups(offset, out.numel());
  if (groups > 0) {
    const NoiseKey key = make_noise_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(index));
    zo_noise_bits_kernel<<<grid_for(groups), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        philox_round_keys(key), key.id, offset, out.numel(), out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ftops, CUDA, m) {
  m.impl("zo_axpby_", &zo_axpby_cuda);
  m.impl("zo_undo_axpby_", &zo_undo_axpby_cuda);
  m.impl("zo_noise", &zo_noise_cuda);
  m.impl("zo_noise_bits", &zo_noise_bits_cuda);
}

}  // namespace ftops
