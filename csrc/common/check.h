// FTOPS_CHECK(cond, pieces...): TORCH_CHECK's call shape and message, built without iostreams.
//
// Why: on the GPU test machine (GCC 13.3, torch 2.11.0+cu130) every multi-piece TORCH_CHECK in our
// library segfaulted instead of raising: TORCH_CHECK formats its pieces with c10::str, i.e. an
// std::ostringstream instantiated inline in *our* .so, and it crashed in
// std::ostream::_M_insert<long> (a libstdc++/locale mix-up between our build and the process;
// torch's own, out-of-line formatting was fine). So our code never streams: a failed check joins
// its pieces into one std::string with std::to_string / snprintf / torch's string functions and
// hands that string to c10::detail::torchCheckFail, which is what TORCH_CHECK calls too (same
// c10::Error, same Python RuntimeError, same message). tests/test_build.py checks that _C.so
// imports no iostream symbols.
//
// Pieces format exactly as `operator<<` would: integers in decimal, floating point like "%g"
// (ostream's default precision 6), ScalarType as c10::toString ("Float"), Device as "cuda:0",
// DeviceType lower case ("cpu"), Layout by name ("Strided"), IntArrayRef as "[2, 3]".
#pragma once
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace ftops {
namespace check_detail {

inline void append(std::string& s, const char* v) { s += v != nullptr ? v : "(null)"; }
inline void append(std::string& s, std::string_view v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }

// Integers (not bool, not char: say which you mean). std::to_string uses no locale.
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>,
                                       int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

// Floating point as ostream's default would print it ("%g", 6 significant digits).
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
void append(std::string& s, T v) {
  char buf[32];
  const int n = std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s.append(buf, n > 0 ? static_cast<size_t>(n) : 0);
}

inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::DeviceType v) {
  s += c10::DeviceTypeName(v, /*lower_case=*/true);
}

inline void append(std::string& s, c10::Layout v) {
  switch (v) {
    case c10::kStrided: s += "Strided"; return;
    case c10::kSparse: s += "Sparse"; return;
    case c10::kSparseCsr: s += "SparseCsr"; return;
    case c10::kSparseCsc: s += "SparseCsc"; return;
    case c10::kSparseBsr: s += "SparseBsr"; return;
    case c10::kSparseBsc: s += "SparseBsc"; return;
    case c10::kMkldnn: s += "Mkldnn"; return;
    case c10::kJagged: s += "Jagged"; return;
    default:
      s += "Layout(";
      s += std::to_string(static_cast<int>(v));
      s += ")";
  }
}

// Sizes, strides and other lists: "[2, 3]".
template <typename T>
void append(std::string& s, c10::ArrayRef<T> v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    append(s, v[i]);
  }
  s += ']';
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

// Out of line and cold, so the formatting code stays off the checked paths.
template <typename... Args>
[[noreturn]] C10_NOINLINE void check_fail(const char* func, const char* file, uint32_t line,
                                          const Args&... args) {
  c10::detail::torchCheckFail(func, file, line, cat(args...));
}

}  // namespace check_detail
}  // namespace ftops

// Like FTOPS_CHECK(cond, pieces...): on failure raises c10::Error (Python RuntimeError) whose
// message is the pieces joined. The pieces are only evaluated and formatted when cond is false.
#define FTOPS_CHECK(cond, ...)                                                       \
  do {                                                                               \
    if (C10_UNLIKELY(!(cond))) {                                                     \
      ::ftops::check_detail::check_fail(__func__, __FILE__,                          \
                                        static_cast<uint32_t>(__LINE__), __VA_ARGS__); \
    }                                                                                \
  } while (0)

namespace ftops {

// Every coeffs[i] finite: a NaN or infinite coefficient would write NaN into every element it
// touches. Names the list and the first bad entry.
inline void check_finite(const char* op, const char* arg, c10::ArrayRef<double> values) {
  for (size_t i = 0; i < values.size(); ++i) {
    FTOPS_CHECK(std::isfinite(values[i]), op, ": ", arg, "[", i, "] must be finite, got ",
                values[i]);
  }
}

// One tensor argument of an op, for check_no_overlap: which list and index it is, and whether the
// op writes it.
struct MemArg {
  const at::Tensor* t;
  const char* list;
  size_t k;
  bool written;
};

// Refuses two arguments whose memory overlaps when the op writes at least one of them: an in-place
// op whose output is also another of its arguments (a parameter passed as its own moment or
// gradient, a tensor listed twice, a view into another argument) silently computes something
// else. Compares the byte ranges the tensors span, so disjoint views of one buffer are fine and a
// partial overlap is caught, whatever the storage objects. Zero-size tensors own no memory.
// One sort and one sweep: O(n log n) for n tensors. `args` holds defined strided tensors of one
// device (checked before).
inline void check_no_overlap(const char* op, const std::vector<MemArg>& args) {
  struct Range {
    uintptr_t begin, end;
    size_t arg;
  };
  std::vector<Range> ranges;
  ranges.reserve(args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    const at::Tensor& t = *args[i].t;
    if (t.numel() == 0) continue;
    int64_t last = 0;  // offset of the last element, in elements (non-negative strides)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    ranges.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()), i});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  // Sweep: every earlier range that reaches past this one's start overlaps it; keep the one that
  // reaches furthest, over all ranges and over written ones.
  const Range* far_all = nullptr;
  const Range* far_written = nullptr;
  for (const Range& r : ranges) {
    const Range* hit = nullptr;
    if (far_written != nullptr && far_written->end > r.begin) {
      hit = far_written;
    } else if (args[r.arg].written && far_all != nullptr && far_all->end > r.begin) {
      hit = far_all;
    }
    if (hit != nullptr) {
      const MemArg& a = args[std::min(hit->arg, r.arg)];
      const MemArg& b = args[std::max(hit->arg, r.arg)];
      FTOPS_CHECK(false, op, ": ", a.list, "[", a.k, "] and ", b.list, "[", b.k,
                  "] share memory; a tensor this op writes must not overlap any other argument");
    }
    if (far_all == nullptr || r.end > far_all->end) far_all = &r;
    if (args[r.arg].written && (far_written == nullptr || r.end > far_written->end)) {
      far_written = &r;
    }
  }
}

}  // namespace ftops
