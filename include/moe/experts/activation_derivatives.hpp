#pragma once
// Derivatives of the activations in activations.hpp, for the backward pass: each usable on a
// scalar and on an xsimd batch with the same formula, and the row kernels backward runs them in.
#include <cmath>
#include <cstddef>

#include "activations.hpp"

MOE_NAMESPACE_BEGIN

template <class Activation>
struct ActivationDerivative;  // specialized for each activation below

// 1 above 0, else 0 (NaN gives 0).
template <>
struct ActivationDerivative<ReLU> {
  template <class V>
  static V apply(const V& x) noexcept {
    return detail::choose(x > V(0), V(1), V(0));
  }
};

// d/dx [x Φ(x)] = Φ(x) + x φ(x), Φ(x) = 0.5 erfc(-x / √2): 0.5 (1 + erf(x / √2)) cancels for
// x < 0, as in GELU itself.
template <>
struct ActivationDerivative<GELU> {
  template <class V>
  static V apply(const V& x) noexcept {
    const V cdf = V(0.5) * detail::erfc_of(x * detail::constant<V>(-0.70710678118654752440));
    const V pdf = detail::exp_of(V(-0.5) * x * x) * detail::constant<V>(0.39894228040143267794);
    return cdf + x * pdf;
  }
};

// d/dx [x σ(2u)] = σ(2u) + 2 x σ(2u) (1 − σ(2u)) u', u = c (x + a x³): GELUTanh's form, where
// 0.5 (1 + tanh(u)) and 1 − tanh²(u) = 4 σ(2u) (1 − σ(2u)) no longer cancel for x < 0.
template <>
struct ActivationDerivative<GELUTanh> {
  template <class V>
  static V apply(const V& x) noexcept {
    const detail::Logistic<V> s = detail::logistic(detail::tanh_gelu_2u(x));
    const V du = detail::constant<V>(0.79788456080286535588) * (V(1) + detail::constant<V>(3 * 0.044715) * x * x);
    // The slope is 0 once σ saturates, where x · x may overflow: 0 · inf.
    return detail::choose(s.slope == V(0), s.value, s.value + V(2) * x * s.slope * du);
  }
};

// d/dx [x σ(x)] = σ(x) (1 + x (1 − σ(x))).
template <>
struct ActivationDerivative<SiLU> {
  template <class V>
  static V apply(const V& x) noexcept {
    const V s = V(1) / (V(1) + detail::exp_of(V(-x)));
    return s * (V(1) + x * (V(1) - s));
  }
};

namespace simd {

// The gradient through act for one row: d[0, n) = d ⊙ act'(pre), `pre` the pre-activations. The
// last n mod L elements go through the batch form too (for_each_batch): an element's result
// depends only on its own inputs, not on its position in the row or on the other rows.
template <class Activation, class Arch, class T>
void activation_backward(Arch, const T* pre, T* d, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  using Derivative = ActivationDerivative<Activation>;
  for_each_batch<B>(
      n, [](const T* p, T* g) { (B::load_unaligned(g) * Derivative::apply(B::load_unaligned(p))).store_unaligned(g); },
      pre, d);
}

// The gradient through hidden = act(gate) ⊙ up for one row: given dh = ∂L/∂hidden,
// d_gate = dh ⊙ up ⊙ act'(gate), and d_up = dh ⊙ act(gate) written over dh. The tail as above.
template <class Activation, class Arch, class T>
void gated_activation_backward(Arch, const T* gate, const T* up, T* dh, T* d_gate, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  using Derivative = ActivationDerivative<Activation>;
  auto body = [](const T* g_in, const T* u, T* h, T* dg) {
    const B g = B::load_unaligned(g_in), grad = B::load_unaligned(h);
    (grad * B::load_unaligned(u) * Derivative::apply(g)).store_unaligned(dg);
    (grad * Activation::apply(g)).store_unaligned(h);
  };
  for_each_batch<B>(n, body, gate, up, dh, d_gate);
}

}  // namespace simd

MOE_NAMESPACE_END
