#pragma once
// Activation functions, each usable on a scalar and on an xsimd batch with the same formula.
#include <cmath>
#include <cstddef>
#include <type_traits>

#include "../simd/arch.hpp"

MOE_NAMESPACE_BEGIN

namespace detail {

// The scalar type of V: V itself, or a batch's value_type.
template <class V, class = void>
struct scalar_of {
  using type = V;
};
template <class V>
struct scalar_of<V, std::void_t<typename V::value_type>> {
  using type = typename V::value_type;
};

// The constant c as a V. A batch's constructor takes its scalar type, so a double argument
// would narrow implicitly (a -Wfloat-conversion error for float batches); cast explicitly.
template <class V>
V constant(double c) noexcept {
  return V(static_cast<typename scalar_of<V>::type>(c));
}

// e^x for a scalar (std::exp) or a batch (simd::exp_batch: xsimd::exp without its undefined
// behaviour on NaN, ±inf and huge double lanes).
template <class T>
T exp_of(T x) noexcept {
  return std::exp(x);
}
template <class T, class Arch>
xsimd::batch<T, Arch> exp_of(const xsimd::batch<T, Arch>& x) noexcept {
  return simd::exp_batch(x);
}

}  // namespace detail

// max(x, 0).
struct ReLU {
  static constexpr const char* name = "relu";
  template <class V>
  static V apply(const V& x) noexcept {
    using std::max;
    using xsimd::max;
    return max(x, V(0));
  }
};

// Exact GELU: x · Φ(x) = 0.5 · x · (1 + erf(x / √2)) (PyTorch approximate='none').
struct GELU {
  static constexpr const char* name = "gelu";
  template <class V>
  static V apply(const V& x) noexcept {
    using std::erf;
    using xsimd::erf;
    return V(0.5) * x * (V(1) + erf(x * detail::constant<V>(0.70710678118654752440)));
  }
};

// Tanh GELU: 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³))) (PyTorch approximate='tanh').
struct GELUTanh {
  static constexpr const char* name = "gelu_tanh";
  template <class V>
  static V apply(const V& x) noexcept {
    using std::tanh;
    using xsimd::tanh;
    const V inner = detail::constant<V>(0.79788456080286535588) * (x + detail::constant<V>(0.044715) * x * x * x);
    return V(0.5) * x * (V(1) + tanh(inner));
  }
};

// SiLU (swish): x · sigmoid(x) = x / (1 + exp(-x)).
struct SiLU {
  static constexpr const char* name = "silu";
  template <class V>
  static V apply(const V& x) noexcept {
    return x / (V(1) + detail::exp_of(V(-x)));
  }
};

namespace simd {

// x[0, n) = act(x[0, n)).
template <class Activation, class Arch, class T>
void activate(Arch, T* x, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  std::size_t i = 0;
  for (; i + L <= n; i += L) Activation::apply(B::load_unaligned(x + i)).store_unaligned(x + i);
  for (; i < n; ++i) x[i] = Activation::apply(x[i]);
}

// gate[0, n) = act(gate) ⊙ up.
template <class Activation, class Arch, class T>
void gated_activate(Arch, T* gate, const T* up, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  std::size_t i = 0;
  for (; i + L <= n; i += L) {
    (Activation::apply(B::load_unaligned(gate + i)) * B::load_unaligned(up + i)).store_unaligned(gate + i);
  }
  for (; i < n; ++i) gate[i] = Activation::apply(gate[i]) * up[i];
}

}  // namespace simd

MOE_NAMESPACE_END
