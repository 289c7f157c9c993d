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
};

template <>
struct FBits<c10::Half> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  FTOPS_HD static U get(c10::Half x) { return x.x; }
  FTOPS_HD static c10::Half make(U b) { return c10::Half(b, c10::Half::from_bits()); }
};

template <>
struct FBits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U kSign = 0x8000u;
  FTOPS_HD static U get(c10::BFloat16 x) { return x.x; }
  FTOPS_HD static c10::BFloat16 make(U b) { return c10::BFloat16(b, c10::BFloat16::from_bits()); }
};

// The bit pattern k representable values above (k < 0: below) the value with bits b, through
// the sign-magnitude -> two's complement order map (-0 and +0 are both 0; results that would
// be -0 come back as +0). Stepping past the largest finite value gives inf, then NaN patterns:
// harmless, since a NaN never equals a finite result.
template <typename T>
FTOPS_HD typename FBits<T>::U step_bits(typename FBits<T>::U b, int k) {
  using U = typename FBits<T>::U;
  constexpr U S = FBits<T>::kSign;
  const U mag = static_cast<U>(b & static_cast<U>(~S));
  const U o = (b & S) ? static_cast<U>(U(0) - mag) : mag;
  const U o2 = static_cast<U>(o + static_cast<U>(k));
  return (o2 & S) ? static_cast<U>(S | static_cast<U>(U(0) - o2)) : o2;
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
    const scalar_t s = static_cast<scalar_t>(y);  // ties to even
    const acc_t sf = static_cast<acc_t>(s);
    const acc_t e = y - sf;  // exact
    const acc_t w = sf + (e + e);  // exact: both are multiples of e's ulp, and small
    const scalar_t ws = static_cast<scalar_t>(w);
    const bool tie = (e > acc_t(0)) & (static_cast<acc_t>(ws) == w);
    return tie ? B::get(ws) : B::get(s);
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
  return m == U(0) ? S : low;
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
  const acc_t bv = static_cast<acc_t>(B::make(base));
  const bool up = (r > bv) | ((r == bv) & (r_err > acc_t(0)));
  const U nb = step_bits<scalar_t>(base, up ? 1 : -1);
  const bool n_ok = round_up_ties_bits<scalar_t, acc_t>(static_cast<acc_t>(B::make(nb)), a) == pb;
  const bool take = n_ok & (!base_ok | (simplicity<scalar_t>(nb) > simplicity<scalar_t>(base)));
  return take ? nb : base;
}

// Recovers t from p = round_up_ties(t + a) (see the top of this file); returns the bits.
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U zo_undo_bits(scalar_t p, acc_t a) {
  using B = FBits<scalar_t>;
  using U = typename B::U;
  const U pb = B::get(p);
  const acc_t pv = static_cast<acc_t>(p);
  const acc_t r = pv - a;
  const scalar_t q = static_cast<scalar_t>(r);
  const U qb = B::get(q);
  const U fq = round_up_ties_bits<scalar_t, acc_t>(static_cast<acc_t>(q), a);
  const bool q_ok = fq == pb;
  // F is monotone: if F(q) is below p, the preimage lies above q.
  const bool go_up = static_cast<acc_t>(B::make(fq)) < pv;
  const U cb = step_bits<scalar_t>(qb, go_up ? 1 : -1);
  const bool c_ok =
      round_up_ties_bits<scalar_t, acc_t>(static_cast<acc_t>(B::make(cb)), a) == pb;
  const bool zero_ok = round_up_ties_of_zero_bits<scalar_t, acc_t>(a) == pb;
  const U base = zero_ok ? U(0) : ((!q_ok & c_ok) ? cb : qb);
  return undo_prefer_simpler<scalar_t, acc_t>(base, zero_ok | q_ok | c_ok, r,
                                              sub_err<acc_t>(pv, a, r), a, pb);
}

// The same result without the search for q's neighbour, valid where `miss` comes back false
// (q or 0 is a preimage: all but a handful of elements per million); elsewhere call
// zo_undo_bits.
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U zo_undo_bits_fast(scalar_t p, acc_t a, bool& miss) {
  using B = FBits<scalar_t>;
  using U = typename B::U;
  const U pb = B::get(p);
  const acc_t pv = static_cast<acc_t>(p);
  const acc_t r = pv - a;
  const scalar_t q = static_cast<scalar_t>(r);
  const U qb = B::get(q);
  const bool q_ok = round_up_ties_bits<scalar_t, acc_t>(static_cast<acc_t>(q), a) == pb;
  const bool zero_ok = round_up_ties_of_zero_bits<scalar_t, acc_t>(a) == pb;
  miss = !q_ok & !zero_ok;
  return undo_prefer_simpler<scalar_t, acc_t>(zero_ok ? U(0) : qb, true, r,
                                              sub_err<acc_t>(pv, a, r), a, pb);
}

// The pass's own change from the recovered value v: v + (acc - d v), rounded once, either to
// nearest even (as zo_axpby_) or with ties up (a perturbation that a later pass will undo).
template <typename scalar_t, typename acc_t, bool kInvertible>
FTOPS_HD scalar_t zo_apply_value(acc_t v, acc_t acc, acc_t d) {
  const acc_t t = acc - d * v;
  if constexpr (kInvertible) {
    return FBits<scalar_t>::make(round_up_ties_bits<scalar_t, acc_t>(v, t));
  } else {
    return static_cast<scalar_t>(v + t);
  }
}

}  // namespace ftops
