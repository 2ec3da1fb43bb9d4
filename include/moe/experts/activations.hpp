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

// c ? a : b for a scalar, lane by lane for a batch (both sides are evaluated).
template <class T>
T choose(bool c, T a, T b) noexcept {
  return c ? a : b;
}
template <class T, class Arch>
xsimd::batch<T, Arch> choose(const xsimd::batch_bool<T, Arch>& c, const xsimd::batch<T, Arch>& a,
                             const xsimd::batch<T, Arch>& b) noexcept {
  return xsimd::select(c, a, b);
}

}  // namespace detail

// max(x, 0), NaN kept: x < 0 ? 0 : x, written out because std::max(x, 0) and the SIMD max
// instructions (which return their second operand when either is NaN) disagree on NaN.
struct ReLU {
  static constexpr const char* name = "relu";
  template <class V>
  static V apply(const V& x) noexcept {
    return detail::choose(x < V(0), V(0), x);
  }
};

namespace detail {

// f(x) for a batch, with x clamped to [-bound, bound] first, where f has already reached its limits
// to the last bit, and NaN lanes kept out of f and passed through: xsimd's erfc calls its exp,
// whose double version converts to int64 with a scalar cast on AVX2 (undefined for NaN, ±inf and
// huge lanes), and its double erfc returns NaN beyond |x| ≈ 1.4e62.
template <class T, class Arch, class F>
xsimd::batch<T, Arch> saturating(const xsimd::batch<T, Arch>& x, T bound, F f) noexcept {
  using B = xsimd::batch<T, Arch>;
  const auto is_nan = xsimd::isnan(x);
  const B clamped = xsimd::select(is_nan, B(T(0)), xsimd::min(xsimd::max(x, B(-bound)), B(bound)));
  return xsimd::select(is_nan, x, f(clamped));
}

template <class T>
T erfc_of(T x) noexcept {
  return std::erfc(x);
}
template <class T, class Arch>
xsimd::batch<T, Arch> erfc_of(const xsimd::batch<T, Arch>& x) noexcept {
  // xsimd's erfc is 2 from -3.9 (float) and -5.9 (double) down, and 0 from 9.37 and 26.62 up (its
  // exp(-x²) flushes what would be denormal): clamping at ±11 and ±28 changes no result.
  return saturating(x, sizeof(T) == sizeof(float) ? T(11) : T(28), [](const auto& v) { return xsimd::erfc(v); });
}

// σ(z) = 1 / (1 + e^-z) and its slope σ(z) (1 − σ(z)), both from e = e^-|z| ≤ 1: σ = 1 / (1 + e)
// for z ≥ 0 and e / (1 + e) below, σ (1 − σ) = e / (1 + e)² on both sides. Neither cancels (1 − σ
// does for z > 0) nor overflows (e^-z does below z ≈ -88.7 in float, where σ is still a denormal).
template <class V>
struct Logistic {
  V value, slope;
};
template <class V>
Logistic<V> logistic(const V& z) noexcept {
  const auto negative = z < V(0);
  const V e = exp_of(choose(negative, z, V(-z)));
  const V r = V(1) / (V(1) + e);
  return {choose(negative, e * r, r), e * r * r};
}

// 2u for tanh GELU, u = √(2/π) (x + 0.044715 x³): 0.5 (1 + tanh(u)) = σ(2u).
template <class V>
V tanh_gelu_2u(const V& x) noexcept {
  return constant<V>(1.59576912160573071176) * (x + constant<V>(0.044715) * x * x * x);
}

}  // namespace detail

// Exact GELU: x · Φ(x) = 0.5 · x · (1 + erf(x / √2)) (PyTorch approximate='none'), evaluated as
// 0.5 · x · erfc(-x / √2): for x < 0, 1 + erf cancels (float GELU(-5) was 4% off, and -0 from
// x = -5.54 on), while erfc keeps its relative precision into the tail.
struct GELU {
  static constexpr const char* name = "gelu";
  template <class V>
  static V apply(const V& x) noexcept {
    return V(0.5) * x * detail::erfc_of(x * detail::constant<V>(-0.70710678118654752440));
  }
};

// Tanh GELU: 0.5 · x · (1 + tanh(u)), u = √(2/π) · (x + 0.044715 x³) (PyTorch approximate='tanh'),
// evaluated as x · σ(2u) (detail::logistic): for x < 0, 1 + tanh cancels (float GELUTanh(-5) was
// 30% off, and -0 from x = -5.16 on).
struct GELUTanh {
  static constexpr const char* name = "gelu_tanh";
  template <class V>
  static V apply(const V& x) noexcept {
    return x * detail::logistic(detail::tanh_gelu_2u(x)).value;
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

// x[0, n) = act(x[0, n)), the last n mod L elements through the batch form too (for_each_batch):
// an element's result does not depend on its position in the row.
template <class Activation, class Arch, class T>
void activate(Arch, T* x, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  for_each_batch<B>(n, [](T* p) { Activation::apply(B::load_unaligned(p)).store_unaligned(p); }, x);
}

// gate[0, n) = act(gate) ⊙ up, the tail as in activate.
template <class Activation, class Arch, class T>
void gated_activate(Arch, T* gate, const T* up, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  for_each_batch<B>(
      n, [](T* g, const T* u) { (Activation::apply(B::load_unaligned(g)) * B::load_unaligned(u)).store_unaligned(g); },
      gate, up);
}

}  // namespace simd

MOE_NAMESPACE_END
