// The CPU's multi-tensor launch: one at::parallel_for over the work units (blocks, chunks) of
// all tensors of a list, so a model with hundreds of parameters is one parallel region, not
// hundreds. Every CPU kernel that walks a tensor list uses it.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ftops {

// units[k] = number of work units of tensor k. Calls fn(k, u0, u1) for runs [u0, u1) of tensor
// k's units (local indices); a thread's share may span several tensors, empty ones are skipped.
template <typename Fn>
void parallel_over_tensor_units(const std::vector<int64_t>& units, int64_t grain_size,
                                const Fn& fn) {
  const int64_t K = static_cast<int64_t>(units.size());
  std::vector<int64_t> first(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) first[k + 1] = first[k] + units[k];
  at::parallel_for(0, first[K], grain_size, [&](int64_t begin, int64_t end) {
    int64_t k = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t u = begin; u < end;) {
      while (first[k + 1] <= u) ++k;  // also skips empty tensors
      const int64_t stop = std::min(end, first[k + 1]);
      fn(k, u - first[k], stop - first[k]);
      u = stop;
    }
  });
}

}  // namespace ftops
