// Exact undo of a perturbation pass, shared by the CPU and CUDA kernels of zo_undo_axpby_.
//
// A perturbation pass maps each unperturbed value t (in the parameter dtype T) to
//     F(t) = round_up_ties(t + a),   a = 0 + u * z     (computed in acc_t: float32, double for
// float64), where round_up_ties is round-to-nearest with ties toward +infinity (not to even):
// unlike ties-to-even it commutes with shifts by a whole number of ulps, so F is injective
// wherever t and F(t) have the same spacing (RNE makes two neighbours collide at every exact
// tie, which for float32 params and |a| ~ |t|/8 happens for 1 element in 8). F is monotone
// non-decreasing, so the values t with F(t) == p form an interval; the undo takes
//     base = +0          when F(0) == p (p carries no information about t beyond "close to 0"),
//            q = T(p - a) when F(q) == p,
//            the neighbour of q on the side where F(q) misses p, when that one maps to p,
//            q            otherwise (p was not produced by F: nothing better is known),
// then returns base's neighbour on the side of the exact p - a instead when that is a preimage and
// has more trailing zero bits (a canonical member of a merged interval; see
// undo_prefer_simpler). Wherever F is injective at t (t and t +- 1 ulp map to different
// values) the undo returns t bit for bit; where rounding merged several t into one p (|a|
// crossing into a coarser binade, |a| >> |t|) it returns one of them, never one with the
// wrong sign.
//
// Everything is IEEE +, -, *, compares and integer ops on the bit patterns, with no contraction
// into FMAs (CPU: -ffp-contract=off; CUDA: --fmad=false), so CPU and CUDA agree bit for bit.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "philox.h"

namespace ftops {

// Bit access for the four parameter dtypes.
template <typename T>
struct FBits;

template <>
struct FBits<float> {
  using U = uint32_t;
  static constexpr U kSign = 0x80000000u;
  FTOPS_HD static U get(float x) { return float_to_bits(x); }
  FTOPS_HD static float make(U b) { return bits_to_float(b); }
  FTOPS_HD static float to_f(U b) { return bits_to_float(b); }
  FTOPS_HD static U from_f(float f) { return float_to_bits(f); }
};

template <>
struct FBits<double> {
  using U = uint64_t;
  static constexpr U kSign = 0x8000000000000000ull;
  FTOPS_HD static U get(double x) {
#if defined(__CUDA_ARCH__)
    return static_cast<U>(__double_as_longlong(x));
#else
    U b;
    std::memcpy(&b, &x, sizeof b);
    return b;
#endif
  }
  FTOPS_HD static double make(U b) {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(static_cast<long long>(b));
#else
    double x;
    std::memcpy(&x, &b, sizeof x);
    return x;
#endif
  }
  FTOPS_HD static double to_f(U b) { return make(b); }
  FTOPS_HD static U from_f(double f) { return get(f); }
};

// c ? x : y on bit patterns (any unsigned type), as mask arithmetic. In the long loops of the
// undo GCC (12) threads jumps through `?:` selects (the NaN tests especially) and the loops,
// with branches inside, no longer vectorize; the mask form stays branch-free. Same value.
template <typename U>
FTOPS_HD U select_bits(bool c, U x, U y) {
  return static_cast<U>(y ^ ((x ^ y) & static_cast<U>(U(0) - static_cast<U>(c))));
}

// Conversions between the half types' bits and float32, branch-free (so that the CPU loops
// vectorize, which c10's conversions with their NaN branches do not) and bit-identical to
// c10's (IEEE round to nearest even; exact widening). fp16 ones: the FP16 library's
// algorithms that c10 itself falls back to (they need no denormal flushing, which neither
// the CPU build nor the CUDA build (no --use_fast_math) enables).
FTOPS_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

FTOPS_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select_bits<uint32_t>(f != f, 0x7fc0u, r));
}

FTOPS_HD float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t mag = select_bits<uint32_t>(two_w < (1u << 27), float_to_bits(denormalized),
                                             float_to_bits(normalized));
  return bits_to_float(sign | mag);
}

FTOPS_HD uint16_t float_to_half_bits(float f) {
  const uint32_t w = float_to_bits(f);
  float base = (bits_to_float(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = select_bits<uint32_t>(bias < 0x71000000u, 0x71000000u, bias);
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) |
                               select_bits<uint32_t>(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

template <>
struct FBits<c10::Half> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  FTOPS_HD static U get(c10::Half x) { return x.x; }
  FTOPS_HD static c10::Half make(U b) { return c10::Half(b, c10::Half::from_bits()); }
  FTOPS_HD static float to_f(U b) { return half_bits_to_float(b); }
  FTOPS_HD static U from_f(float f) { return float_to_half_bits(f); }
};

template <>
struct FBits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  FTOPS_HD static U get(c10::BFloat16 x) { return x.x; }
  FTOPS_HD static c10::BFloat16 make(U b) { return c10::BFloat16(b, c10::BFloat16::from_bits()); }
  FTOPS_HD static float to_f(U b) { return bf16_bits_to_float(b); }
  FTOPS_HD static U from_f(float f) { return float_to_bf16_bits(f); }
};

// The bit pattern k representable values above (k < 0: below) the value with bits b, through
// the sign-magnitude -> two's complement order map (-0 and +0 are both 0; results that would
// be -0 come back as +0). Stepping past the largest finite value gives inf, then NaN patterns:
// harmless, since a NaN never equals a finite result.
template <typename T>
FTOPS_HD typename FBits<T>::U step_bits(typename FBits<T>::U b, int k) {
  // Branch-free (plain integer arithmetic, so the CPU loops stay vectorized).
  using U = typename FBits<T>::U;
  constexpr U S = FBits<T>::kSign;
  constexpr int kTop = 8 * sizeof(U) - 1;
  const U neg = static_cast<U>(b >> kTop);
  const U mask = static_cast<U>(U(0) - neg);
  const U mag = static_cast<U>(b & static_cast<U>(~S));
  const U o = static_cast<U>(static_cast<U>(mag ^ mask) - mask);  // two's complement order
  const U o2 = static_cast<U>(o + static_cast<U>(k));
  const U neg2 = static_cast<U>(o2 >> kTop);
  const U mask2 = static_cast<U>(U(0) - neg2);
  const U mag2 = static_cast<U>(static_cast<U>(o2 ^ mask2) - mask2);
  return static_cast<U>(mag2 | static_cast<U>(neg2 << kTop));
}

// round(v + t) to scalar_t, to nearest with ties toward +infinity. For float32/float64 the
// exact sum is v + t (TwoSum gives its rounding error exactly); for half types it is the
// float32 sum (which is what the kernels round, as zo_axpby_ does). A tie rounded to nearest
// even went down iff the error e is > 0 and s + 2e is the next representable value above s
// (for a smaller e > 0, s + 2e lies strictly between s and that value).
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U round_up_ties_bits(acc_t v, acc_t t) {
  using B = FBits<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const acc_t s = v + t;
    const acc_t bb = s - v;
    const acc_t err = (v - (s - bb)) + (t - bb);  // (v + t) - s, exactly
    const acc_t w = s + (err + err);
    const bool tie = (err > acc_t(0)) & (w - s == err + err);
    return B::get(tie ? w : s);
  } else {
    const acc_t y = v + t;
    const auto sb = B::from_f(y);  // ties to even
    const acc_t sf = B::to_f(sb);
    const acc_t e = y - sf;  // exact
    const acc_t w = sf + (e + e);  // exact: both are multiples of e's ulp, and small
    const auto wb = B::from_f(w);
    const bool tie = (e > acc_t(0)) & (B::to_f(wb) == w);
    return select_bits<typename B::U>(tie, wb, sb);
  }
}

// F(0) = round_up_ties(0 + a).
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U round_up_ties_of_zero_bits(acc_t a) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return FBits<scalar_t>::get(acc_t(0) + a);  // exact
  } else {
    return round_up_ties_bits<scalar_t, acc_t>(acc_t(0), a);
  }
}

// The perturbation offset a for undo coefficient u and noise z, as the kernels' noise sum
// computes it for a single seed (acc starts at 0).
template <typename acc_t>
FTOPS_HD acc_t undo_offset(acc_t u, float z) {
  return acc_t(0) + u * static_cast<acc_t>(z);
}

// r = pv - a rounded, and its rounding error exactly (TwoSum): for float32 params r is q itself,
// so only the error tells on which side of q the exact p - a lies.
template <typename acc_t>
FTOPS_HD acc_t sub_err(acc_t pv, acc_t a, acc_t r) {
  const acc_t na = -a;
  const acc_t bb = r - pv;
  return (pv - (r - bb)) + (na - bb);
}

// How "simple" a value is: its lowest set magnitude bit (more trailing zeros: a coarser grid
// point), zero the simplest of all.
template <typename T>
FTOPS_HD typename FBits<T>::U simplicity(typename FBits<T>::U b) {
  using U = typename FBits<T>::U;
  constexpr U S = FBits<T>::kSign;
  const U m = static_cast<U>(b & static_cast<U>(~S));
  const U low = static_cast<U>(m & static_cast<U>(U(0) - m));
  const U is_zero = static_cast<U>(m == U(0));
  return static_cast<U>(low | static_cast<U>(S & static_cast<U>(U(0) - is_zero)));
}

// The last step of the undo: `base` (a preimage of pb unless !base_ok) or its neighbour on the
// side of p - a (= r + r_err exactly), whichever is the simpler preimage. Where rounding
// merged values (the preimages form an interval of 2 or more), this picks a canonical member,
// so that an element
// that lost information once is mapped to the same value when it loses it again instead of
// random-walking (at most a 1-ulp change per element from a binade crossing, not a drift).
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U undo_prefer_simpler(typename FBits<scalar_t>::U base,
                                                         bool base_ok, acc_t r, acc_t r_err,
                                                         acc_t a, typename FBits<scalar_t>::U pb) {
  using B = FBits<scalar_t>;
  using U = typename B::U;
  const acc_t bv = B::to_f(base);
  // sign of the exact (p - a) - base: r - bv is exact, and |r_err| <= ulp(r)/2 only decides it
  // when r == bv (one compare: a compound condition here defeats the CPU vectorizer)
  const bool up = (r - bv) + r_err > acc_t(0);
  const U nb = step_bits<scalar_t>(base, up ? 1 : -1);
  const bool n_ok = round_up_ties_bits<scalar_t, acc_t>(B::to_f(nb), a) == pb;
  const bool take = n_ok & (!base_ok | (simplicity<scalar_t>(nb) > simplicity<scalar_t>(base)));
  return select_bits<U>(take, nb, base);
}

// Recovers t from p = round_up_ties(t + a) (see the top of this file); returns the bits.
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U zo_undo_bits(typename FBits<scalar_t>::U pb, acc_t a) {
  using B = FBits<scalar_t>;
  using U = typename B::U;
  const acc_t pv = B::to_f(pb);
  const acc_t r = pv - a;
  const U qb = B::from_f(r);
  const U fq = round_up_ties_bits<scalar_t, acc_t>(B::to_f(qb), a);
  const bool q_ok = fq == pb;
  // F is monotone: if F(q) is below p, the preimage lies above q.
  const bool go_up = B::to_f(fq) < pv;
  const U cb = step_bits<scalar_t>(qb, go_up ? 1 : -1);
  const bool c_ok =
      round_up_ties_bits<scalar_t, acc_t>(B::to_f(cb), a) == pb;
  const bool zero_ok = round_up_ties_of_zero_bits<scalar_t, acc_t>(a) == pb;
  const U base = select_bits<U>(zero_ok, U(0), select_bits<U>(!q_ok & c_ok, cb, qb));
  return undo_prefer_simpler<scalar_t, acc_t>(base, zero_ok | q_ok | c_ok, r,
                                              sub_err<acc_t>(pv, a, r), a, pb);
}

// The same result without the search for q's neighbour, valid where `miss` comes back false
// (q or 0 is a preimage: all but a handful of elements per million); elsewhere call
// zo_undo_bits.
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U zo_undo_bits_fast(typename FBits<scalar_t>::U pb, acc_t a,
                                                       bool& miss) {
  using B = FBits<scalar_t>;
  using U = typename B::U;
  const acc_t pv = B::to_f(pb);
  const acc_t r = pv - a;
  const U qb = B::from_f(r);
  const bool q_ok = round_up_ties_bits<scalar_t, acc_t>(B::to_f(qb), a) == pb;
  const bool zero_ok = round_up_ties_of_zero_bits<scalar_t, acc_t>(a) == pb;
  miss = !q_ok & !zero_ok;
  return undo_prefer_simpler<scalar_t, acc_t>(select_bits<U>(zero_ok, U(0), qb), true, r,
                                              sub_err<acc_t>(pv, a, r), a, pb);
}

// The pass's own change from the recovered value v: v + (acc - d v), rounded once, either to
// nearest even (as zo_axpby_) or with ties up (a perturbation that a later pass will undo).
template <typename scalar_t, typename acc_t, bool kInvertible>
FTOPS_HD typename FBits<scalar_t>::U zo_apply_bits(acc_t v, acc_t acc, acc_t d) {
  const acc_t t = acc - d * v;
  if constexpr (kInvertible) {
    return round_up_ties_bits<scalar_t, acc_t>(v, t);
  } else {
    return FBits<scalar_t>::from_f(v + t);
  }
}

}  // namespace ftops
