// Exact undo of a perturbation pass, shared by the CPU and CUDA kernels of zo_undo_axpby_.
//
// A perturbation pass maps each unperturbed value t (in the parameter dtype T) to
//     F(t) = round_up_ties(t + a),   a = 0 + u * z     (a in acc_t: float32, double for float64),
// the exact real sum t + a rounded to T to nearest with ties toward +infinity (not to even):
// unlike ties-to-even that commutes with shifts by a whole number of ulps, so F is injective
// wherever t and F(t) have the same spacing (RNE makes two neighbours collide at every exact
// tie, which for float32 params and |a| ~ |t|/8 happens for 1 element in 8).
//
// F is monotone, so the values t with F(t) == p form a range [lo, hi], found exactly from the
// real thresholds p - a -+ half the spacings around p. The undo returns the range's simplest
// member: +0 if the range holds 0, else the one with the most trailing zero bits. So
//  * wherever F is injective at t (the range is {t}) it returns t bit for bit;
//  * where rounding merged several values (a perturbation pushed t into a coarser binade, or
//    |a| >> |t|), the result is a function of the range alone, never of the wrong sign, and a
//    simplest value stays put under later ranges narrower than its grid: an element that lost
//    information moves to a nearby coarse grid point and stays there, instead of random-walking
//    over many perturb/undo cycles (bench/bench_mezo.py measures this drift);
//  * a p that F cannot produce (the range is empty: the parameter changed between the passes)
//    gives the nearest value to p - a; NaN stays;
//  * p = +-inf (a perturbation overflowed) gets the simplest finite value that overflows to it,
//    if there is one (else it stays inf).
//
// Everything is IEEE +, -, *, compares and integer ops on the bit patterns, with no contraction
// into FMAs (CPU: -ffp-contract=off; CUDA: --fmad=false), so CPU and CUDA agree bit for bit.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "float_bits.h"
#include "philox.h"

namespace ftops {

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

// round(s + err) to bfloat16 with ties toward +infinity, for s + err exact (|err| at most half
// an ulp of s), on the sign-magnitude bits: the magnitude rounds half up for s > 0 and half down
// for s < 0 (both toward +inf); only where s is exactly a midpoint can err change that, and then
// err < 0 means the exact sum lies below it (one step down in value). Overflow is exact too: a
// sum just below the midpoint past the largest value rounds to it, not to inf. A zero keeps
// the sign of s (as float32 -> bfloat16 conversion does); NaN gives c10's NaN.
FTOPS_HD uint16_t bf16_round_up_ties(float s, float err) {
  const uint32_t b = float_to_bits(s);
  const uint32_t neg = b >> 31;
  const uint32_t mag = b & 0x7fffffffu;
  const uint32_t r = (mag + 0x8000u - neg) >> 16;
  const bool below_midpoint = ((mag & 0xffffu) == 0x8000u) & (err < 0.0f);
  const uint32_t down = neg + neg - 1u;  // one step down in value: magnitude +1 if s < 0, else -1
  const uint32_t bits = (r + select_bits<uint32_t>(below_midpoint, down, 0u)) | (neg << 15);
  return select_bits<uint16_t>(s != s, 0x7fc0u, static_cast<uint16_t>(bits));
}

// round(v + t) to scalar_t, to nearest with ties toward +infinity, of the exact sum v + t
// (TwoSum gives the rounding error of the acc_t sum s exactly). float32/float64: a tie rounded
// to nearest even went down iff the error is > 0 and s + 2 err is the next value above s. Half
// types: s lies on a 16-bit midpoint iff its mirror w = 2 s - RNE(s) is representable; only
// there can the exact sum round differently from s, and its error says to which side (a
// float32 s that is not a midpoint is at least one float32 ulp, more than |err|, away from it).
// Rounding the exact sum makes F a function of the real t + a alone, so its preimages are the
// values in a half-open real interval (zo_undo_bits relies on that).
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U round_up_ties_bits(acc_t v, acc_t t) {
  using B = FBits<scalar_t>;
  const acc_t s = v + t;
  const acc_t bb = s - v;
  const acc_t err = (v - (s - bb)) + (t - bb);  // (v + t) - s, exactly
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const acc_t w = s + (err + err);
    const bool tie = (err > acc_t(0)) & (w - s == err + err);
    return B::get(tie ? w : s);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return bf16_round_up_ties(s, err);
  } else {
    const auto sb = B::from_f(s);  // ties to even
    const acc_t sf = B::to_f(sb);
    const acc_t e = s - sf;  // exact
    const acc_t w = sf + (e + e);  // exact: both are multiples of e's ulp, and small
    const auto wb = B::from_f(w);
    // on a midpoint (or e == 0, where wb == sb): the side of the exact sum decides
    const bool tie = B::to_f(wb) == w;
    const bool to_w = tie & ((e > acc_t(0)) == (err >= acc_t(0)));
    // At the midpoint past the largest value (+-65520) s rounds to inf and the mirror is
    // inf - inf: the exact sum decides there too (just below 65520 is 65504, -65520 is -65504).
    static_assert(std::is_same_v<scalar_t, c10::Half>, "float16 is the only other type");
    constexpr uint16_t kMax = B::kInf - 1u, kNegMax = kMax | B::kSign;
    const bool top = (s == 65520.0f) & (err < 0.0f);
    const bool bottom = (s == -65520.0f) & (err >= 0.0f);
    return select_bits<uint16_t>(top, kMax, select_bits<uint16_t>(
        bottom, kNegMax, select_bits<uint16_t>(to_w, wb, sb)));
  }
}

// The perturbation offset a for undo coefficient u and noise z, as the kernels' noise sum
// computes it for a single seed (acc starts at 0).
template <typename acc_t>
FTOPS_HD acc_t undo_offset(acc_t u, float z) {
  return acc_t(0) + u * static_cast<acc_t>(z);
}

// The error of s = x + y exactly (TwoSum).
template <typename acc_t>
FTOPS_HD acc_t two_sum_err(acc_t x, acc_t y, acc_t s) {
  const acc_t bb = s - x;
  return (x - (s - bb)) + (y - bb);
}

// The value of T nearest to (pv + off) - a, where pv, off and a are exact in acc_t: within one
// representable value of the exact result (two TwoSums carry the errors of both subtractions,
// so the only roundings left are the last add and, for half types, float32 -> T).
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U nearest_bits(acc_t pv, acc_t off, acc_t a) {
  const acc_t s = pv - a;
  const acc_t e = two_sum_err<acc_t>(pv, -a, s);
  const acc_t x = s + off;
  const acc_t e2 = two_sum_err<acc_t>(s, off, x);
  return FBits<scalar_t>::from_f(x + (e + e2));
}

// Order of bit patterns as signed integers (-0 and +0 both 0), for compares.
template <typename T>
FTOPS_HD auto ordinal(typename FBits<T>::U b) {
  using U = typename FBits<T>::U;
  using S = std::make_signed_t<std::conditional_t<(sizeof(U) < 4), uint32_t, U>>;
  constexpr int kTop = 8 * sizeof(U) - 1;
  const S mag = static_cast<S>(b & static_cast<U>(~FBits<T>::kSign));
  const S neg = static_cast<S>(b >> kTop);
  return static_cast<S>((mag ^ -neg) + neg);  // neg ? -mag : mag
}

// The pattern with ordinal o (0 gives +0).
template <typename T>
FTOPS_HD typename FBits<T>::U from_ordinal(decltype(ordinal<T>(0)) o) {
  using U = typename FBits<T>::U;
  using S = decltype(o);
  constexpr int kTop = 8 * sizeof(U) - 1;
  const S neg = static_cast<S>(o < 0);
  const U mag = static_cast<U>((o ^ -neg) + neg);
  return static_cast<U>(mag | static_cast<U>(static_cast<U>(neg) << kTop));
}

// Value order of two patterns that are not NaN (-0 == +0): float32/float64 compare as floats
// (a free reinterpretation), the half types as ordinals (cheaper than widening).
template <typename T>
FTOPS_HD bool value_le(typename FBits<T>::U x, typename FBits<T>::U y) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return FBits<T>::to_f(x) <= FBits<T>::to_f(y);
  } else {
    return ordinal<T>(x) <= ordinal<T>(y);
  }
}

// The magnitude with the most trailing zero bits in [a, b] (a <= b): b with the bits below the
// highest bit where a and b differ cleared, or a itself if a is already zero from that bit down.
template <typename U>
FTOPS_HD U simplest_magnitude(U a, U b) {
  U m = static_cast<U>(a ^ b);  // smear the highest differing bit downwards
  m = static_cast<U>(m | (m >> 1));
  m = static_cast<U>(m | (m >> 2));
  m = static_cast<U>(m | (m >> 4));
  m = static_cast<U>(m | (m >> 8));
  if constexpr (sizeof(U) > 2) m = static_cast<U>(m | (m >> 16));
  if constexpr (sizeof(U) > 4) m = static_cast<U>(m | (m >> 32));
  return select_bits<U>((a & m) == U(0), a, static_cast<U>(b & static_cast<U>(~(m >> 1))));
}

// The simplest value with a pattern in [lo, hi] (lo <= hi in value order): +0 if the range
// holds 0, else the magnitude with the most trailing zero bits (a coarsest grid point; a
// power of two beats its binade), with the range's sign. In a range of magnitudes [A, B]
// that is B with the bits below the highest bit where A and B differ cleared, or A itself
// if A is already zero from that bit down.
template <typename T>
FTOPS_HD typename FBits<T>::U simplest_bits(typename FBits<T>::U lo, typename FBits<T>::U hi) {
  using U = typename FBits<T>::U;
  constexpr U S = FBits<T>::kSign;
  const U lo_mag = static_cast<U>(lo & static_cast<U>(~S));
  const U hi_mag = static_cast<U>(hi & static_cast<U>(~S));
  // (compares of values, not tests of sign bits: a bool made from an integer's bit stops
  // GCC's vectorizer)
  const bool has_zero = value_le<T>(lo, U(0)) & value_le<T>(U(0), hi);
  // same sign otherwise: magnitudes A <= B
  const bool negative = !value_le<T>(U(0), hi);
  const U a = select_bits<U>(negative, hi_mag, lo_mag);
  const U b = select_bits<U>(negative, lo_mag, hi_mag);
  return select_bits<U>(has_zero, U(0), static_cast<U>(simplest_magnitude<U>(a, b) | (hi & S)));
}

// The preimage range of p for float32/float64, where F rounds in T itself. The thresholds
// B = (p - a) -+ half a spacing are computed with both subtractions' errors carried (TwoSum),
// so g = the T nearest B is floor(B) or ceil(B): the sum of the carried errors is rounded only
// where it is far below B's spacing, and where B nearly cancels every step is exact (Sterbenz).
// One evaluation of F per end then decides between g and its neighbour.
template <typename scalar_t, typename acc_t>
FTOPS_HD void preimage_range_by_search(typename FBits<scalar_t>::U pb, acc_t pv, acc_t off_lo,
                                       acc_t off_hi, acc_t a, typename FBits<scalar_t>::U& lo,
                                       typename FBits<scalar_t>::U& hi) {
  using U = typename FBits<scalar_t>::U;
  // lo = the least t with F(t) >= p (t >= B_lo)
  const U gl = nearest_bits<scalar_t, acc_t>(pv, off_lo, a);
  const U f_gl = round_up_ties_bits<scalar_t, acc_t>(FBits<scalar_t>::to_f(gl), a);
  lo = select_bits<U>(value_le<scalar_t>(pb, f_gl), gl, step_bits<scalar_t>(gl, 1));
  // hi = the greatest t with F(t) <= p (t < B_hi)
  const U gh = nearest_bits<scalar_t, acc_t>(pv, off_hi, a);
  const U f_gh = round_up_ties_bits<scalar_t, acc_t>(FBits<scalar_t>::to_f(gh), a);
  hi = select_bits<U>(value_le<scalar_t>(f_gh, pb), gh, step_bits<scalar_t>(gh, -1));
}

// The preimage range of p for the half types, from its thresholds directly: F(t) >= p iff
// t >= m_lo - a and F(t) <= p iff t < m_hi - a (ties go up), with m_lo = p - spacing below/2,
// m_hi = p + spacing above/2, both exact in float32 (a 16-bit midpoint needs at most 12 bits).
// With B = m - a held exactly as s + e (s = fl(m - a), e its TwoSum error) and c = the T nearest
// s: B lies within half a T-spacing (plus |e|, far less) of c, so the least T >= B is c when
// c - s >= e (c - s is exact) and the next value up otherwise, and the greatest T < B is c when
// c - s < e and the next value down otherwise. No evaluation of F.
template <typename scalar_t>
FTOPS_HD void preimage_range_by_thresholds(float pv, float off_lo, float off_hi, float a,
                                           typename FBits<scalar_t>::U& lo,
                                           typename FBits<scalar_t>::U& hi) {
  using U = typename FBits<scalar_t>::U;
  using B = FBits<scalar_t>;
  const float m_lo = pv + off_lo;  // exact
  const float s_lo = m_lo - a;
  const float e_lo = two_sum_err<float>(m_lo, -a, s_lo);
  const U c_lo = B::from_f(s_lo);
  const float d_lo = B::to_f(c_lo) - s_lo;  // exact
  lo = select_bits<U>(d_lo >= e_lo, c_lo, step_bits<scalar_t>(c_lo, 1));
  const float m_hi = pv + off_hi;  // exact
  const float s_hi = m_hi - a;
  const float e_hi = two_sum_err<float>(m_hi, -a, s_hi);
  const U c_hi = B::from_f(s_hi);
  const float d_hi = B::to_f(c_hi) - s_hi;  // exact
  hi = select_bits<U>(d_hi < e_hi, c_hi, step_bits<scalar_t>(c_hi, -1));
}

// zo_undo_bits for bfloat16, in float32 ordinals: about half the instructions of the generic
// path (no conversions, no steps to neighbours), the same result. bfloat16 is float32 without
// its low 16 bits, so in float32 ordinals the bfloat16 values are exactly the multiples of 2^16
// (a bfloat16 ordinal times 2^16) and the midpoint between neighbours is the ordinal midpoint,
// binade edges included.
// With P = p's ordinal times 2^16, the thresholds p -+ half a spacing are the float32 values of
// ordinals P -+ 2^15; for +inf the lower one is the overflow threshold (max + half a spacing),
// for -inf the upper one its mirror. The preimage interval [m_lo - a, m_hi - a) is held exactly
// as s + e pairs (TwoSum); its least and greatest bfloat16 are shifts of s's ordinal: s lies
// strictly between two grid points (e is too small to cross one) unless its low 16 ordinal bits
// are 0, and then the sign of e decides. The simplest member is taken on ordinals too.
FTOPS_HD uint16_t bf16_undo_bits(uint16_t pb_in, float a) {
  constexpr int32_t kMax = 0x7f7f;  // ordinal of the largest finite value
  const bool pos_inf = pb_in == 0x7f80u;
  const bool neg_inf = pb_in == 0xff80u;
  const int32_t op = ordinal<c10::BFloat16>(pb_in) * 65536;  // NaN: replaced at the end
  const float m_lo = bits_to_float(from_ordinal<float>(op - 0x8000));
  const float m_hi = bits_to_float(from_ordinal<float>(op + 0x8000));
  // least bfloat16 >= m_lo - a
  const float s_lo = m_lo - a;
  const float e_lo = two_sum_err<float>(m_lo, -a, s_lo);
  const int32_t ol = ordinal<float>(float_to_bits(s_lo));
  const int32_t lo = (static_cast<int32_t>(static_cast<uint32_t>(ol) + 0xffffu) >> 16) +
                     static_cast<int32_t>(((ol & 0xffff) == 0) & (e_lo > 0.0f));
  // greatest bfloat16 < m_hi - a
  const float s_hi = m_hi - a;
  const float e_hi = two_sum_err<float>(m_hi, -a, s_hi);
  const int32_t oh = ordinal<float>(float_to_bits(s_hi));
  const int32_t hi = (static_cast<int32_t>(static_cast<uint32_t>(oh) - 1u) >> 16) +
                     static_cast<int32_t>(((oh & 0xffff) == 0) & (e_hi > 0.0f));
  // (selects as select_bits: GCC turns `?:` on these into branches and the CPU loop stops
  // vectorizing, 5x slower)
  const auto sel = [](bool c, int32_t x, int32_t y) {
    return static_cast<int32_t>(
        select_bits<uint32_t>(c, static_cast<uint32_t>(x), static_cast<uint32_t>(y)));
  };
  const int32_t lo_c = sel(neg_inf, -kMax, lo);
  const int32_t hi_c = sel(pos_inf, kMax, hi);
  // the simplest member as simplest_bits takes it, on ordinals (cheaper than back to patterns)
  const bool has_zero = (lo_c <= 0) & (hi_c >= 0);
  const bool negative = hi_c < 0;
  const auto A = static_cast<uint32_t>(sel(negative, -hi_c, lo_c));  // magnitudes A <= B
  const auto B = static_cast<uint32_t>(sel(negative, -lo_c, hi_c));
  const uint16_t r = select_bits<uint16_t>(
      has_zero, 0u, static_cast<uint16_t>(simplest_magnitude<uint32_t>(A, B) | (negative << 15)));
  // empty range (p is not a value F produces): the nearest value to p - a (inf stays)
  const uint16_t empty = select_bits<uint16_t>(
      pos_inf | neg_inf, pb_in, float_to_bf16_bits(bf16_bits_to_float(pb_in) - a));
  const bool is_nan = (pb_in & 0x7fffu) > 0x7f80u;
  return select_bits<uint16_t>(is_nan, pb_in, select_bits<uint16_t>(lo_c <= hi_c, r, empty));
}

// Recovers t from p = F(t) = round_up_ties(t + a) (see the top of this file); returns the bits.
// F is monotone, so its preimages of p form a range [lo, hi]; the result is the range's
// simplest member. Branch-free.
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U zo_undo_bits(typename FBits<scalar_t>::U pb_in, acc_t a) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return bf16_undo_bits(pb_in, a);
  using B = FBits<scalar_t>;
  using U = typename B::U;
  constexpr U kMax = static_cast<U>(B::kInf - 1u), kNegMax = static_cast<U>(kMax | B::kSign);
  // +-inf is what a perturbation that overflowed produced: its finite preimages run from the
  // overflow threshold (+-max -+ half the spacing there, minus a) to +-max.
  const bool pos_inf = pb_in == B::kInf;
  const bool neg_inf = pb_in == static_cast<U>(B::kInf | B::kSign);
  const U pb = select_bits<U>(pos_inf, kMax, select_bits<U>(neg_inf, kNegMax, pb_in));
  const acc_t pv = B::to_f(pb);
  const acc_t below = B::to_f(step_bits<scalar_t>(pb, -1));
  const acc_t above = B::to_f(step_bits<scalar_t>(pb, 1));
  // half the spacings (exact); at +-max the one beyond is inf: use the other one
  const acc_t down_raw = (pv - below) * acc_t(0.5);
  const acc_t up_raw = (above - pv) * acc_t(0.5);
  const acc_t half_down = down_raw - down_raw == acc_t(0) ? down_raw : up_raw;
  const acc_t half_up = up_raw - up_raw == acc_t(0) ? up_raw : down_raw;
  // thresholds p - half_down (lower) and p + half_up (upper), or for +inf the lower one at
  // the overflow threshold above max (for -inf the upper one below -max)
  const acc_t off_lo = pos_inf ? half_up : -half_down;
  const acc_t off_hi = neg_inf ? -half_down : half_up;
  U lo, hi;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    preimage_range_by_search<scalar_t, acc_t>(pb_in, pv, off_lo, off_hi, a, lo, hi);
  } else {
    preimage_range_by_thresholds<scalar_t>(pv, off_lo, off_hi, a, lo, hi);
  }
  const U lo_inf = select_bits<U>(neg_inf, kNegMax, lo);
  const U hi_inf = select_bits<U>(pos_inf, kMax, hi);
  // An empty range (p is not a value F produces, e.g. the parameter was changed between the
  // passes) gets the nearest value to p - a (inf: stays); NaN stays.
  const bool found = value_le<scalar_t>(lo_inf, hi_inf);
  const U r = select_bits<U>(found, simplest_bits<scalar_t>(lo_inf, hi_inf),
                             select_bits<U>(pos_inf | neg_inf, pb_in, B::from_f(pv - a)));
  const acc_t p_in = B::to_f(pb_in);
  return select_bits<U>(p_in == p_in, r, pb_in);
}

// The undo's shortcut where it applies: if p is not the lowest value of its binade and its
// preimage t lies in the same binade (and is not its lowest value either), every value near
// t has p's spacing h, F moves them by whole spacings, and t = p - r with r = a rounded to a
// multiple of h, ties up (t + a must lie in [p - h/2, p + h/2)), is the only preimage. `ok`
// says whether that holds; then the result equals zo_undo_bits' (the range is {t}); else the
// caller takes zo_undo_bits. It holds for most elements (84% of fp32 weights ~ N(0, 0.02)
// perturbed by 1e-3 z), which a GPU warp exploits by handing only the others to the exact path.
// All in float32, where every value of T is exact: r = (a + big) - big with big = 1.5 * 2^23 h
// (a + big then lies in big's binade, whose spacing is h, while |a| < 2^22 h; the guard
// |a| < 2^(e-1) <= 2^22 h, e = p's exponent, keeps it there), corrected where a lies exactly
// halfway (to even went down). In the CUDA kernel's loop (sm_90) the shortcut and its checks
// for 4 elements take 135 SASS instructions for bf16, 124 for fp32, 143 for fp16 (the previous
// version, k = floor(a/h + 1/2) and a subtraction of ordinals: 171, 151, 172). float64: never ok.
template <typename scalar_t, typename acc_t>
FTOPS_HD typename FBits<scalar_t>::U zo_undo_shortcut_bits(typename FBits<scalar_t>::U pb, acc_t a,
                                                           bool& ok) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    ok = false;
    return pb;
  } else {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    constexpr bool kHalf = std::is_same_v<scalar_t, c10::Half>;
    constexpr uint32_t kMant = kFloat ? 23 : kHalf ? 10 : 7;  // T's mantissa bits
    // float32 exponent fields E of the values of T this handles: T-normal and finite (float16:
    // 113..142), and h / 2 = 2^(E - 127 - kMant - 1) and big normal float32s
    constexpr uint32_t kEmin = kHalf ? 113 : kMant + 2;
    constexpr uint32_t kEmax = kHalf ? 142 : kFloat ? 254 : 238;
    const float pv = FBits<scalar_t>::to_f(pb);  // exact
    const uint32_t P = float_to_bits(pv);
    const uint32_t E = (P >> 23) & 0xffu;
    const bool e_ok = E - kEmin <= kEmax - kEmin;  // unsigned: kEmin <= E <= kEmax
    const uint32_t Es = select_bits<uint32_t>(e_ok, E, kEmin);  // keeps the constants normal
    const float half_h = bits_to_float((Es - kMant - 1u) << 23);
    const float big = bits_to_float(((Es + 23u - kMant) << 23) | 0x400000u);
    const float guard = bits_to_float((Es - 1u) << 23);  // 2^(e-1)
    const float af = a;  // acc_t is float32 for these types
    const float r0 = (af + big) - big;  // a to a multiple of h, ties to even
    const float r = r0 + select_float(af - r0 == half_h, half_h + half_h, 0.0f);  // ties up
    const float t = pv - r;  // exact where ok (a multiple of h in p's binade)
    const uint32_t T = float_to_bits(t);
    // (T ^ P) < 2^23: t has p's sign and exponent; nonzero mantissas: neither is the lowest
    // value of the binade (whose spacing below is h / 2)
    ok = e_ok & (af < guard) & (-guard < af) & ((P & 0x7fffffu) != 0u) & ((T ^ P) < (1u << 23)) &
         ((T & 0x7fffffu) != 0u);
    if constexpr (kFloat) {
      return T;
    } else if constexpr (kHalf) {
      // exact where ok: t is a float16 normal (rebias the exponent, drop 13 zero bits)
      return static_cast<uint16_t>(((T >> 16) & 0x8000u) | (((T & 0x7fffffffu) >> 13) - (112u << 10)));
    } else {
      return static_cast<uint16_t>(T >> 16);  // exact: t's low 16 bits are 0 where ok
    }
  }
}

// Whether zo_undo_axpby_ takes zo_undo_shortcut_bits where it holds and zo_undo_bits only for
// the other elements (the same results either way): yes unless FTOPS_ZO_UNDO_SHORTCUT=0 (the
// exact path everywhere, for tests and comparisons). Both kernels gather the exact-path
// elements into full vectors: a CUDA warp in shared memory (csrc/cuda/zo.cu), the CPU per 1024
// elements (csrc/cpu/zo.cpp). Measured faster on both: CPU fp32 undo 4.2 -> 2.7 ms per 2M;
// H100 undo + perturbation per 67M fp32/bf16/fp16 0.63/0.59/0.77 -> 0.56/0.57/0.64 ms. Read once.
inline bool zo_undo_shortcut_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FTOPS_ZO_UNDO_SHORTCUT");
    return v == nullptr || v[0] != '0';
  }();
  return enabled;
}

// d * v, but 0 when d is 0 even for v = +-inf (0 * inf is NaN: without this an inf weight
// turned NaN at any pass without weight decay). The same value for every finite v.
// (A select on the bits: with `?:` GCC moves d * v under a branch, and the half-type loops
// stopped vectorizing without AVX-512.)
template <typename acc_t>
FTOPS_HD acc_t decay_term(acc_t d, acc_t v) {
  using B = FBits<acc_t>;
  return B::make(select_bits<typename B::U>(d == acc_t(0), 0u, B::get(d * v)));
}

// v + t rounded once to scalar_t, either to nearest even (as zo_axpby_) or with ties up (a
// perturbation that a later pass will undo).
template <typename scalar_t, typename acc_t, bool kInvertible>
FTOPS_HD typename FBits<scalar_t>::U zo_round_bits(acc_t v, acc_t t) {
  if constexpr (kInvertible) {
    return round_up_ties_bits<scalar_t, acc_t>(v, t);
  } else {
    return FBits<scalar_t>::from_f(v + t);
  }
}

// The pass's own change from the recovered value v: v + (acc - d v), rounded once (zo_round_bits).
// (The CUDA kernels apply it 4 elements at a time, with the same results: apply_group in
// csrc/cuda/zo.cu.)
template <typename scalar_t, typename acc_t, bool kInvertible>
FTOPS_HD typename FBits<scalar_t>::U zo_apply_bits(acc_t v, acc_t acc, acc_t d) {
  return zo_round_bits<scalar_t, acc_t, kInvertible>(v, acc - decay_term<acc_t>(d, v));
}

}  // namespace ftops
