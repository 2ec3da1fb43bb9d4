#pragma once
// ABI namespace and the overridable throw hook.
//
// Everything lives in `moe::v0` (an inline namespace), so two incompatible versions linked into
// one program fail to link instead of misbehaving.
#define MOE_NAMESPACE_BEGIN \
  namespace moe {           \
  inline namespace v0 {
#define MOE_NAMESPACE_END \
  }                       \
  }

// MOE_THROW(exception) is how every check reports failure. Define it before including moe to
// route errors elsewhere (for example to std::abort in a no-exceptions build).
#ifndef MOE_THROW
#define MOE_THROW(exception) throw exception
#endif

// Threads: define MOE_USE_OPENMP (the moe::openmp CMake target does) to split kernels over
// OpenMP threads. Each output element is still computed by one thread in a fixed order.
#if defined(MOE_USE_OPENMP)
#include <omp.h>
#endif

namespace moe {
inline namespace v0 {
// Threads a parallel kernel may use; scratch sizes scale with it.
inline int max_threads() noexcept {
#if defined(MOE_USE_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace v0
}  // namespace moe
