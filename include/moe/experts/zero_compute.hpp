#pragma once
// Zero-computation experts (MoE++, Jin et al. 2024; AdaMoE): experts the router can choose that
// cost no matrix products, so a token can spend a routing slot on "nothing", "myself" or "a
// constant" instead of a full FFN.
//   zero:     E(x) = 0
//   copy:     E(x) = x
//   constant: E(x) = v, or with a mixing gate W_c [2, d] (MoE++): [a1, a2] = softmax(W_c · x),
//             E(x) = a1 · x + a2 · v
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "../simd/rows.hpp"

MOE_NAMESPACE_BEGIN

enum class ZeroComputeKind { zero, copy, constant };

template <class T>
class ZeroComputeExpert {
 public:
  using Scalar = T;

  // Gradients of the learned parts (constant experts only; empty otherwise).
  struct Gradient {
    Vector<T> value;  // [d]
    Matrix<T> mix;    // [2, d] when the expert mixes
    template <class F>
    void for_each(F f) { f(value); f(mix); }
    template <class F>
    void for_each(F f) const { f(value); f(mix); }
  };

  static ZeroComputeExpert zero(index_t d) { return ZeroComputeExpert(ZeroComputeKind::zero, d); }
  static ZeroComputeExpert copy(index_t d) { return ZeroComputeExpert(ZeroComputeKind::copy, d); }
  // Outputs `value` [d] for every token (a copy of it).
  static ZeroComputeExpert constant(Vector<T> value) {
    const index_t d = value.size();
    if (d < 1) detail::throw_invalid("ZeroComputeExpert::constant: value must hold d_model >= 1 elements (value.size() = ", d, ")");
    return with_value(Weight<T>::own(Matrix<T>(std::move(value).transpose())), d);
  }
  // MoE++ constant expert: a1 · x + a2 · value with [a1, a2] = softmax(mix [2, d] · x) (copies).
  static ZeroComputeExpert constant(Vector<T> value, Matrix<T> mix) {
    const index_t d = value.size();
    return with_mix("ZeroComputeExpert::constant", constant(std::move(value)), Weight<T>::own(std::move(mix)), d);
  }
  // As the two above, viewing the caller's buffers, which must outlive the expert: an optimizer
  // that updates them in place (from Gradient::value and ::mix) is seen by the next forward.
  // (Named, not overloads: an Eigen Map converts to Vector and Matrix, which would copy it.)
  static ZeroComputeExpert constant_view(ConstVectorMap<T> value) {
    return with_value(Weight<T>::view(value.data(), 1, value.size()), value.size());
  }
  static ZeroComputeExpert constant_view(ConstVectorMap<T> value, ConstMatrixMap<T> mix) {
    return with_mix("ZeroComputeExpert::constant_view", constant_view(value), Weight<T>::view(mix), value.size());
  }

  ZeroComputeKind kind() const noexcept { return kind_; }
  index_t d_model() const noexcept { return d_; }
  ConstVectorMap<T> value() const noexcept { return ConstVectorMap<T>(value_.data(), value_.cols()); }
  bool mixes() const noexcept { return mix_.rows() == 2; }

  // y [m, d] = E(x [m, d]); contiguous rows.
  template <class Arch>
  void forward(Arch arch, const T* x, index_t m, T* y) const noexcept {
    const auto d = static_cast<std::size_t>(d_);
    for (index_t j = 0; j < m; ++j) {
      const T* xj = x + static_cast<std::size_t>(j) * d;
      T* yj = y + static_cast<std::size_t>(j) * d;
      switch (kind_) {
        case ZeroComputeKind::zero: std::fill(yj, yj + d, T(0)); break;
        case ZeroComputeKind::copy: simd::copy_row(arch, xj, yj, d); break;
        case ZeroComputeKind::constant:
          if (mixes()) {
            T a[2];
            mix_weights(xj, a);
            for (std::size_t i = 0; i < d; ++i) yj[i] = a[0] * xj[i] + a[1] * value_.data()[i];
          } else {
            std::copy(value_.data(), value_.data() + d, yj);
          }
          break;
      }
    }
  }

  Gradient zero_gradient() const {
    Gradient g;
    if (kind_ == ZeroComputeKind::constant) g.value = Vector<T>::Zero(d_);
    if (mixes()) g.mix = Matrix<T>::Zero(2, d_);
    return g;
  }

  // Given dy [m, d]: dx [m, d], and the value/mix gradients added to `grad`. m = 0 (null pointers
  // allowed) adds nothing: Eigen's column sums over a null map would offset a null pointer.
  void backward(const T* x, index_t m, const T* dy, T* dx, Gradient& grad) const {
    if (m == 0) return;
    const ConstMatrixMap<T> X(x, m, d_), dY(dy, m, d_);
    MatrixMap<T> dX(dx, m, d_);
    switch (kind_) {
      case ZeroComputeKind::zero: dX.setZero(); break;
      case ZeroComputeKind::copy: dX = dY; break;
      case ZeroComputeKind::constant:
        if (!mixes()) {
          dX.setZero();
          grad.value += dY.colwise().sum().transpose();
          break;
        }
        for (index_t j = 0; j < m; ++j) {
          T a[2];
          mix_weights(x + j * d_, a);
          const T da0 = dY.row(j).dot(X.row(j)), da1 = dY.row(j).dot(value_.map().row(0));
          const T mean = a[0] * da0 + a[1] * da1;
          const T dz0 = a[0] * (da0 - mean), dz1 = a[1] * (da1 - mean);
          grad.mix.row(0) += dz0 * X.row(j);
          grad.mix.row(1) += dz1 * X.row(j);
          grad.value += a[1] * dY.row(j).transpose();
          dX.row(j) = a[0] * dY.row(j) + dz0 * mix_.map().row(0) + dz1 * mix_.map().row(1);
        }
        break;
    }
  }

 private:
  ZeroComputeExpert(ZeroComputeKind kind, index_t d) : kind_(kind), d_(d) {
    detail::check_positive("ZeroComputeExpert", "d_model", d);
  }
  static ZeroComputeExpert with_value(Weight<T> value, index_t d) {
    ZeroComputeExpert e(ZeroComputeKind::constant, d);
    e.value_ = std::move(value);
    return e;
  }
  static ZeroComputeExpert with_mix(const char* where, ZeroComputeExpert e, Weight<T> mix, index_t d) {
    detail::check_value(where, "mix.rows()", mix.rows(), 2);
    detail::check_dim(where, "mix.cols()", mix.cols(), "value.size()", d);
    e.mix_ = std::move(mix);
    return e;
  }
  // [a1, a2] = softmax(mix · x) for one token row.
  void mix_weights(const T* x, T* a) const noexcept {
    const auto d = static_cast<std::size_t>(d_);
    const T z0 = dot(x, mix_.data(), d), z1 = dot(x, mix_.data() + d, d);
    const T top = std::max(z0, z1);
    const T e0 = std::exp(z0 - top), e1 = std::exp(z1 - top);
    a[0] = e0 / (e0 + e1);
    a[1] = e1 / (e0 + e1);
  }
  static T dot(const T* a, const T* b, std::size_t n) noexcept {
    T s(0);
    for (std::size_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }

  ZeroComputeKind kind_;
  index_t d_;
  Weight<T> value_;  // [1, d] for constant experts, empty otherwise
  Weight<T> mix_;    // [2, d] or empty
};

MOE_NAMESPACE_END
