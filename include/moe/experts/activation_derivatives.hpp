#pragma once
// Derivatives of the activations in activations.hpp, for the backward pass (scalar, any T).
#include <cmath>

#include "activations.hpp"

MOE_NAMESPACE_BEGIN

template <class Activation>
struct ActivationDerivative;  // specialized for each activation below

template <>
struct ActivationDerivative<ReLU> {
  template <class T>
  static T apply(T x) noexcept {
    return x > T(0) ? T(1) : T(0);
  }
};

// d/dx [x Φ(x)] = Φ(x) + x φ(x).
template <>
struct ActivationDerivative<GELU> {
  template <class T>
  static T apply(T x) noexcept {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
    const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
    return cdf + x * pdf;
  }
};

// d/dx [0.5 x (1 + tanh(u))], u = c (x + a x³).
template <>
struct ActivationDerivative<GELUTanh> {
  template <class T>
  static T apply(T x) noexcept {
    const T c = T(0.79788456080286535588), a = T(0.044715);
    const T th = std::tanh(c * (x + a * x * x * x));
    const T sech2 = T(1) - th * th;  // 0 once tanh saturates, where x · x may overflow: 0 · inf
    if (sech2 == T(0)) return T(0.5) * (T(1) + th);
    return T(0.5) * (T(1) + th) + T(0.5) * x * sech2 * c * (T(1) + T(3) * a * x * x);
  }
};

// d/dx [x σ(x)] = σ(x) (1 + x (1 − σ(x))).
template <>
struct ActivationDerivative<SiLU> {
  template <class T>
  static T apply(T x) noexcept {
    const T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
  }
};

MOE_NAMESPACE_END
