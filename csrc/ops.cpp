// Every ftops op schema, in one place. Kernels live in cpu/*.cpp and cuda/*.cu; fake (meta)
// implementations and typed Python wrappers live in ftops/_ops.py. Ops that mutate their
// arguments are marked (a!) and return nothing.
#include <torch/library.h>

TORCH_LIBRARY(ftops, m) {
  // --- zeroth-order (MeZO) -------------------------------------------------------------------
  // params[k] += sum_s coeffs[s*K + k] * z(seeds[s], ids[k]) - decay[k] * params[k], in place,
  // over all tensors in one pass; z(seed, id) is the counter-based normal noise of
  // csrc/common/philox.h. 1 to 8 seeds per call.
  // offsets[k] (optional, default all 0): params[k] holds elements [offsets[k], offsets[k] +
  // numel) of a larger tensor (a shard), and gets exactly their noise and rounding.
  m.def("zo_axpby_(Tensor(a!)[] params, int[] seeds, int[] ids, float[] coeffs, float[] decay, "
        "int[] offsets=[]) -> ()");
  // The same pass preceded by an exact undo of the previous perturbation pass, in one pass:
  // t_k = the value that a perturbation pass `round_up_ties(t + undo_coeffs[k] * z(undo_seed,
  // ids[k]))` maps to params[k] (bit-exact wherever that map is injective; see
  // csrc/common/zo_undo.h), then params[k] = round(t_k + sum_s coeffs[s*K + k] * z(seeds[s],
  // ids[k]) - decay[k] * t_k), rounded to nearest even, or with ties toward +inf when
  // `invertible` (so that a later zo_undo_axpby_ can undo it exactly). undo_coeffs[k] = 0:
  // t_k = params[k] (nothing to undo). 0 to 8 seeds; an apply
  // seed equal to undo_seed reuses the undo noise (no extra noise generation).
  m.def("zo_undo_axpby_(Tensor(a!)[] params, int undo_seed, float[] undo_coeffs, int[] seeds, "
        "int[] ids, float[] coeffs, float[] decay, bool invertible=False, int[] offsets=[]) -> ()");
  // The float32 noise z(seed, index) of elements [offset, offset + like.numel()), shaped like
  // `like` (on like's device).
  m.def("zo_noise(Tensor like, int seed, int index, int offset=0) -> Tensor");
  // The raw Philox uint32 words behind it, as int64, flattened (for cross-device checks).
  m.def("zo_noise_bits(Tensor like, int seed, int index, int offset=0) -> Tensor");

  // --- fused AdamW -----------------------------------------------------------------------------
  // torch.optim.AdamW on lists, in place, one pass over all tensors, one hyper-parameter set per
  // call (csrc/common/adamw_math.h): p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  // p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), bc_i = 1 - b_i^step (1 without bias correction).
  // `step` is the count after incrementing (>= 1). params float32/float64/float16/bfloat16,
  // grads in the param dtype, moments float32 (float64 for float64 params); math in float32
  // (double for float64), params rounded once.
  m.def("adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, int step, bool maximize=False, bool bias_correction=True) -> ()");
  // Adam moments updated in place from grads, and the normalized direction written to out:
  // out = (m / (sqrt(v)/sqrt(bc2) + eps)) / bc1. With bias_correction=False this is exactly
  // galore_torch's N = m / (sqrt(v) + eps) (GaLore then applies lr*sqrt(bc2)/bc1 itself).
  // out is in the grad dtype or the moment dtype.
  m.def("adam_direction_(Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, "
        "Tensor(c!)[] out, float beta1, float beta2, float eps, int step, "
        "bool bias_correction=True) -> ()");

  // --- SaRA ------------------------------------------------------------------------------------
  // Sampled dense-dense matmul: out[k] = sum_t dy[t, rows[k]] * x[t, cols[k]] for dy (T, m),
  // x (T, n) of one float dtype and index vectors rows/cols (int32 or int64, one dtype, length
  // nnz); out has dy's dtype, sums accumulate in float32 (double for float64). This is the weight
  // gradient dW = dy^T x of a linear layer sampled at (rows[k], cols[k]), without forming dW.
  // Indices outside [0, m) / [0, n) raise.
  m.def("sddmm(Tensor dy, Tensor x, Tensor rows, Tensor cols) -> Tensor");
  // The same on a row-compressed index set: row_ptr (m + 1, int64, non-decreasing, from 0 to
  // nnz) and cols (nnz, int16/int32/int64); output k of row r (row_ptr[r] <= k < row_ptr[r + 1])
  // is sum_t dy[t, r] * x[t, cols[k]]. SaRA keeps its trainable sets in this form. The CPU kernel
  // checks the layout; the CUDA kernel trusts it (no synchronization) and writes NaN for an output
  // whose column is outside [0, n).
  m.def("sddmm_csr(Tensor dy, Tensor x, Tensor row_ptr, Tensor cols) -> Tensor");
}

