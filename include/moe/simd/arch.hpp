#pragma once
// The only header that includes xsimd. It names the default architecture and hides the
// differences between xsimd versions (Debian 12 ships 8.1: `hadd`, no `reduce_max`).
//
// Every kernel takes the architecture as its first argument (a tag such as xsimd::avx2{}), so two
// translation units built with different -m flags never share one inline kernel body.
#include <xsimd/xsimd.hpp>

#include "../core/config.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

// The best architecture this translation unit was compiled for (-march / -m flags).
using default_arch = xsimd::default_arch;

template <class T, class Arch>
using batch = xsimd::batch<T, Arch>;

template <class T, class Arch>
constexpr std::size_t lanes() noexcept {
  return batch<T, Arch>::size;
}

template <class T, class Arch>
T reduce_add(const batch<T, Arch>& b) noexcept {
  return xsimd::hadd(b);
}

template <class T, class Arch>
T reduce_max(const batch<T, Arch>& b) noexcept {
  alignas(64) T tmp[batch<T, Arch>::size];
  b.store_aligned(tmp);
  T m = tmp[0];
  for (std::size_t i = 1; i < batch<T, Arch>::size; ++i) m = tmp[i] > m ? tmp[i] : m;
  return m;
}

}  // namespace simd
MOE_NAMESPACE_END
