// Launch shape shared by every ftops CUDA kernel: grid-stride loops over work items, with the
// grid capped at a few blocks per SM so one launch covers any number of items.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace ftops {

constexpr int kThreads = 256;

// Blocks for `items` work items of one thread each: enough to cover them, at most
// `blocks_per_sm` per multiprocessor of the current device (the rest is done by grid-stride).
inline int grid_for(int64_t items, int blocks_per_sm = 16) {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * blocks_per_sm)));
}

}  // namespace ftops
