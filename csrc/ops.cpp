// Every ftops op schema, in one place. Kernels live in cpu/*.cpp and cuda/*.cu; fake (meta)
// implementations and typed Python wrappers live in ftops/_ops.py. Ops that mutate their
// arguments are marked (a!) and return nothing.
#include <torch/library.h>

TORCH_LIBRARY(ftops, m) {
  // --- zeroth-order (MeZO) -------------------------------------------------------------------
  // params[k] += sum_s coeffs[s*K + k] * z(seeds[s], ids[k]) - decay[k] * params[k], in place,
  // over all tensors in one pass; z(seed, id) is the counter-based normal noise of
  // csrc/common/philox.h. 1 to 8 seeds per call.
  m.def("zo_axpby_(Tensor(a!)[] params, int[] seeds, int[] ids, float[] coeffs, float[] decay) -> ()");
  // The float32 noise z(seed, index) shaped like `like` (on like's device).
  m.def("zo_noise(Tensor like, int seed, int index) -> Tensor");
  // The raw Philox uint32 words behind it, as int64, flattened (for cross-device checks).
  m.def("zo_noise_bits(Tensor like, int seed, int index) -> Tensor");
}
