// The body of the CPU SDDMM kernel, compiled once per instruction set: csrc/cpu/sddmm.cpp
// includes this file (no include guard, on purpose) inside a `#pragma GCC target` region and a
// namespace that defines the vector traits `Vf` (float accumulation) and `Vd` (double):
//   acc (the element type), R (a register), W (lanes), zero(), load(p), fma(a, b, c) = a * b + c,
//   sum(r) (a fixed reduction tree), kT16 and t16(src, ls, dst, ld) (16 x 16 transpose, float only).
// Everything below is then compiled for that instruction set, lambdas included.
//
// The algorithm (see sddmm.cpp for the layout): B = x^T (n, Tp) in acc, zero padded to Tp (a
// multiple of kPad) so that every dot product runs over whole registers; then one parallel loop
// over bands of rows: for each block of TB time steps (TB chosen so that n rows of it fit L2), the band's columns of dy are
// transposed into a task buffer A (band rows, tbp), and each output (r, c) of a row r gets
// <A[r], B[c]> over the block, 8 (then 4, then 1) outputs of one row at a time so that the A
// registers are loaded once for 8 B rows. Summation order per output: lanes over t inside a block,
// the fixed reduction tree, then the blocks in order -- independent of the thread count and band
// size.

// dst[c * ld + r] = (acc) src[r * s_r + c * s_c] for r < nr, c < nc: in 16 x 16 tiles (one source
// cache line per row of a tile, one destination line per column), in registers where possible.
template <class V, typename scalar_t>
inline void to_acc_transposed(const scalar_t* src, int64_t s_r, int64_t s_c, int64_t nr,
                              int64_t nc, typename V::acc* dst, int64_t ld) {
  using acc = typename V::acc;
  for (int64_t c0 = 0; c0 < nc; c0 += 16) {
    const int64_t c1 = std::min(nc, c0 + 16);
    for (int64_t r0 = 0; r0 < nr; r0 += 16) {
      const int64_t r1 = std::min(nr, r0 + 16);
      if constexpr (V::kT16 && std::is_same_v<scalar_t, acc>) {
        if (s_c == 1 && c1 - c0 == 16 && r1 - r0 == 16) {
          V::t16(src + r0 * s_r + c0, s_r, dst + c0 * ld + r0, ld);
          continue;
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        acc* d = dst + c * ld;
        const scalar_t* s = src + c * s_c;
        for (int64_t r = r0; r < r1; ++r) d[r] = static_cast<acc>(s[r * s_r]);
      }
    }
  }
}

// o[j] += <a, b[j]> over len (a multiple of V::W) for j < K, a loaded once per step.
template <class V, int K>
inline void dot_k(const typename V::acc* a, const typename V::acc* const* b, int64_t len,
                  typename V::acc* o) {
  typename V::R s[K];
  for (int j = 0; j < K; ++j) s[j] = V::zero();
  for (int64_t t = 0; t < len; t += V::W) {
    const typename V::R av = V::load(a + t);
    for (int j = 0; j < K; ++j) s[j] = V::fma(av, V::load(b[j] + t), s[j]);
  }
  for (int j = 0; j < K; ++j) o[j] += V::sum(s[j]);
}

// One output, two independent accumulator chains (even and odd registers of the block).
template <class V>
inline void dot_1(const typename V::acc* a, const typename V::acc* b, int64_t len,
                  typename V::acc* o) {
  typename V::R s0 = V::zero(), s1 = V::zero();
  int64_t t = 0;
  for (; t + 2 * V::W <= len; t += 2 * V::W) {
    s0 = V::fma(V::load(a + t), V::load(b + t), s0);
    s1 = V::fma(V::load(a + t + V::W), V::load(b + t + V::W), s1);
  }
  if (t < len) s0 = V::fma(V::load(a + t), V::load(b + t), s0);
  *o += V::sum(s0) + V::sum(s1);
}

// Outputs of rows [r_begin, r_end), in bands of R rows, time in blocks of TB (a multiple of kPad).
// abuf: R * min(Tp, TB) values.
template <class V, typename scalar_t, typename col_t>
void sddmm_rows(const scalar_t* dy, int64_t s0, int64_t s1, int64_t T, const typename V::acc* B,
                int64_t Tp, const int64_t* rp, const col_t* cols, int64_t r_begin, int64_t r_end,
                int64_t R, int64_t TB, typename V::acc* out, typename V::acc* abuf) {
  using acc = typename V::acc;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += R) {
    const int64_t r1 = std::min(r_end, r0 + R);
    if (rp[r0] == rp[r1]) continue;
    for (int64_t k = rp[r0]; k < rp[r1]; ++k) out[k] = acc(0);
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
      const int64_t tb = std::min(TB, T - t0), tbp = round_up(tb, kPad);
      // abuf[(r - r0) * tbp + t] = dy[t0 + t, r]
      to_acc_transposed<V, scalar_t>(dy + t0 * s0 + r0 * s1, s0, s1, tb, r1 - r0, abuf, tbp);
      if (tbp > tb)
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t t = tb; t < tbp; ++t) abuf[(r - r0) * tbp + t] = acc(0);
      const acc* Bb = B + t0;
      for (int64_t r = r0; r < r1; ++r) {
        const acc* a = abuf + (r - r0) * tbp;
        int64_t k = rp[r];
        const int64_t ke = rp[r + 1];
        const acc* bp[8];
        for (; k + 8 <= ke; k += 8) {
          for (int j = 0; j < 8; ++j) bp[j] = Bb + static_cast<int64_t>(cols[k + j]) * Tp;
          dot_k<V, 8>(a, bp, tbp, out + k);
        }
        if (k + 4 <= ke) {
          for (int j = 0; j < 4; ++j) bp[j] = Bb + static_cast<int64_t>(cols[k + j]) * Tp;
          dot_k<V, 4>(a, bp, tbp, out + k);
          k += 4;
        }
        for (; k < ke; ++k) dot_1<V>(a, Bb + static_cast<int64_t>(cols[k]) * Tp, tbp, out + k);
      }
    }
  }
}

// The whole op on validated arguments: out (nnz) and B (n, round_up(T, kPad)) in acc.
template <typename scalar_t, typename col_t>
void sddmm_run(const scalar_t* dy, int64_t dy_s0, int64_t dy_s1, const scalar_t* x,
               int64_t x_s0, int64_t x_s1, int64_t T, int64_t m, int64_t n, const int64_t* rp,
               const col_t* cols,
               std::conditional_t<std::is_same_v<scalar_t, double>, double, float>* out,
               decltype(out) B, int64_t R) {
  using V = std::conditional_t<std::is_same_v<scalar_t, double>, Vd, Vf>;
  using acc = typename V::acc;
  const int64_t Tp = round_up(T, kPad);
  // B = x^T, by strips of 16 columns of x.
  const int64_t strips = (n + 15) / 16;
  at::parallel_for(0, strips, std::max<int64_t>(1, 16384 / (16 * Tp)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c0 = i * 16, nc = std::min<int64_t>(16, n - c0);
      to_acc_transposed<V, scalar_t>(x + c0 * x_s1, x_s0, x_s1, T, nc, B + c0 * Tp, Tp);
      for (int64_t c = c0; c < c0 + nc; ++c)
        for (int64_t t = T; t < Tp; ++t) B[c * Tp + t] = acc(0);
    }
  });
  // Time blocks: the block of B that a band reads (n rows of TB values) should stay in L2
  // (about kL2Bytes), so that a B row fetched for one output of the band serves the others.
  const int64_t fit = static_cast<int64_t>(kL2Bytes / sizeof(acc)) / std::max<int64_t>(n, 1);
  const int64_t TB = std::clamp<int64_t>(fit / kPad * kPad, kMinTBlock, kMaxTBlock);
  const int64_t bands = (m + R - 1) / R;
  const int64_t abuf_size = R * std::min(Tp, TB);
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    // One A buffer per task, aligned to a cache line (rows of A are then aligned too).
    std::vector<acc> buf(static_cast<size_t>(abuf_size + 64 / sizeof(acc)));
    acc* a = buf.data();
    while (reinterpret_cast<uintptr_t>(a) % 64 != 0) ++a;
    sddmm_rows<V, scalar_t, col_t>(dy, dy_s0, dy_s1, T, B, Tp, rp, cols, b0 * R,
                                   std::min(m, b1 * R), R, TB, out, a);
  });
}
