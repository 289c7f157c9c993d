// FTOPS_DISPATCH_FLOAT_TYPES / FTOPS_DISPATCH_INDEX_TYPES: AT_DISPATCH_FLOATING_TYPES_AND2(kHalf,
// kBFloat16, ...) and AT_DISPATCH_INDEX_TYPES, minus torch's error formatting. The AT_ macros'
// default case formats its NotImplementedError with c10::str (an inline std::ostringstream), which
// is what crashed on the GPU test machine (see check.h); ours builds the same message as a string.
// Same shape: the body is a lambda that sees `scalar_t` (float, double, at::Half, at::BFloat16)
// or `index_t` (int32_t, int64_t).
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

#include "check.h"

namespace ftops {
namespace check_detail {

// The error AT_DISPATCH raises: NotImplementedError `"name" not implemented for 'Half'`.
[[noreturn]] C10_NOINLINE inline void dispatch_fail(const char* func, const char* file,
                                                    uint32_t line, const char* name,
                                                    c10::ScalarType t) {
  throw c10::NotImplementedError({func, file, line},
                                 cat('"', name, "\" not implemented for '", t, "'"));
}

}  // namespace check_detail
}  // namespace ftops

#define FTOPS_PRIVATE_DISPATCH_CASE(ENUM, TYPE, HINT, ...) \
  case ENUM: {                                             \
    using HINT = TYPE;                                     \
    return __VA_ARGS__();                                  \
  }

// The cases come last (variadic): the lambda bodies inside them contain commas.
#define FTOPS_PRIVATE_DISPATCH_SWITCH(TYPE, NAME, ...)                                    \
  const ::c10::ScalarType ftops_dispatch_type_ = (TYPE);                                  \
  switch (ftops_dispatch_type_) {                                                         \
    __VA_ARGS__                                                                           \
    default:                                                                              \
      ::ftops::check_detail::dispatch_fail(__func__, __FILE__,                            \
                                           static_cast<uint32_t>(__LINE__), NAME,         \
                                           ftops_dispatch_type_);                         \
  }

#define FTOPS_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                          \
  [&] {                                                                                      \
    FTOPS_PRIVATE_DISPATCH_SWITCH(                                                           \
        TYPE, NAME,                                                                          \
        FTOPS_PRIVATE_DISPATCH_CASE(::c10::ScalarType::Double, double, scalar_t, __VA_ARGS__) \
        FTOPS_PRIVATE_DISPATCH_CASE(::c10::ScalarType::Float, float, scalar_t, __VA_ARGS__)   \
        FTOPS_PRIVATE_DISPATCH_CASE(::c10::ScalarType::Half, ::c10::Half, scalar_t,           \
                                    __VA_ARGS__)                                             \
        FTOPS_PRIVATE_DISPATCH_CASE(::c10::ScalarType::BFloat16, ::c10::BFloat16, scalar_t,   \
                                    __VA_ARGS__))                                            \
  }()

#define FTOPS_DISPATCH_INDEX_TYPES(TYPE, NAME, ...)                                          \
  [&] {                                                                                      \
    FTOPS_PRIVATE_DISPATCH_SWITCH(                                                           \
        TYPE, NAME,                                                                          \
        FTOPS_PRIVATE_DISPATCH_CASE(::c10::ScalarType::Int, int32_t, index_t, __VA_ARGS__)    \
        FTOPS_PRIVATE_DISPATCH_CASE(::c10::ScalarType::Long, int64_t, index_t, __VA_ARGS__))  \
  }()
