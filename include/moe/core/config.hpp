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
