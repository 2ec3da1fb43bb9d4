#pragma once
// Zero-computation experts (MoE++, Jin et al. 2024; AdaMoE): experts the router can choose that
// cost no matrix products, so a token can spend a routing slot on "nothing", "myself" or "a
// constant" instead of a full FFN.
//   zero:     E(x) = 0
//   copy:     E(x) = x
//   constant: E(x) = v, or with a mixing gate W_c [2, d] (MoE++): [a1, a2] = softmax(W_c · x),
//             E(x) = a1 · x + a2 · v
#include <cstddef>
#include <utility>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "../simd/rows.hpp"
#include "../simd/softmax.hpp"

MOE_NAMESPACE_BEGIN

enum class ZeroComputeKind { zero, copy, constant };

template <class T>
class ZeroComputeExpert {
 public:
  using Scalar = T;

  static ZeroComputeExpert zero(index_t d) { return ZeroComputeExpert(ZeroComputeKind::zero, d); }
  static ZeroComputeExpert copy(index_t d) { return ZeroComputeExpert(ZeroComputeKind::copy, d); }
  // Outputs `value` [d] for every token.
  static ZeroComputeExpert constant(Vector<T> value) {
    ZeroComputeExpert e(ZeroComputeKind::constant, value.size());
    e.value_ = std::move(value);
    return e;
  }
  // MoE++ constant expert: a1 · x + a2 · value with [a1, a2] = softmax(mix [2, d] · x).
  static ZeroComputeExpert constant(Vector<T> value, Matrix<T> mix) {
    detail::check_dim("ZeroComputeExpert::constant", "mix.rows()", mix.rows(), "2", 2);
    detail::check_dim("ZeroComputeExpert::constant", "mix.cols()", mix.cols(), "value.size()", value.size());
    ZeroComputeExpert e = constant(std::move(value));
    e.mix_ = Weight<T>::own(std::move(mix));
    return e;
  }

  ZeroComputeKind kind() const noexcept { return kind_; }
  index_t d_model() const noexcept { return d_; }
  const Vector<T>& value() const noexcept { return value_; }
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
            T a[2] = {dot(xj, mix_.data(), d), dot(xj, mix_.data() + d, d)};
            simd::softmax(arch, a, a, 2);
            for (std::size_t i = 0; i < d; ++i) yj[i] = a[0] * xj[i] + a[1] * value_[static_cast<index_t>(i)];
          } else {
            std::copy(value_.data(), value_.data() + d, yj);
          }
          break;
      }
    }
  }

 private:
  ZeroComputeExpert(ZeroComputeKind kind, index_t d) : kind_(kind), d_(d) {
    if (d < 1) detail::throw_invalid("ZeroComputeExpert: d_model must be at least 1 (d_model = ", d, ")");
  }
  static T dot(const T* a, const T* b, std::size_t n) noexcept {
    T s(0);
    for (std::size_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }

  ZeroComputeKind kind_;
  index_t d_;
  Vector<T> value_;  // [d] for constant experts
  Weight<T> mix_;    // [2, d] or empty
};

MOE_NAMESPACE_END
