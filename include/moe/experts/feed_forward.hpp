#pragma once
// Plain feed-forward expert: y = act(x · w_inᵀ) · w_outᵀ.
//   w_in  [d_ff, d]   (PyTorch fc1 / w1)
//   w_out [d, d_ff]   (PyTorch fc2 / w2)
#include <cstddef>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "activations.hpp"
#include "../simd/matmul.hpp"

MOE_NAMESPACE_BEGIN

template <class T, class Activation = ReLU>
class FeedForward {
 public:
  using Scalar = T;
  using activation_type = Activation;

  // Views the caller's weights (no copy); they must outlive the expert.
  FeedForward(ConstMatrixMap<T> w_in, ConstMatrixMap<T> w_out) : FeedForward(Weight<T>::view(w_in), Weight<T>::view(w_out)) {}
  // Owns its weights.
  FeedForward(Matrix<T> w_in, Matrix<T> w_out) : FeedForward(Weight<T>::own(std::move(w_in)), Weight<T>::own(std::move(w_out))) {}
  FeedForward(Weight<T> w_in, Weight<T> w_out) : w_in_(std::move(w_in)), w_out_(std::move(w_out)) {
    detail::check_dim("FeedForward", "w_out.rows()", w_out_.rows(), "w_in.cols() (d)", w_in_.cols());
    detail::check_dim("FeedForward", "w_out.cols()", w_out_.cols(), "w_in.rows() (d_ff)", w_in_.rows());
  }

  index_t d_model() const noexcept { return w_in_.cols(); }
  index_t d_ff() const noexcept { return w_in_.rows(); }
  ConstMatrixMap<T> w_in() const noexcept { return w_in_.map(); }
  ConstMatrixMap<T> w_out() const noexcept { return w_out_.map(); }

  // Scratch elements forward() needs for `tokens` rows.
  index_t scratch_size(index_t tokens) const noexcept { return tokens * d_ff(); }

  // y [m, d] = expert(x [m, d]); x and y are contiguous rows. `scratch` holds scratch_size(m).
  template <class Arch>
  void forward(Arch arch, const T* x, index_t m, T* y, T* scratch) const {
    const auto d = static_cast<std::size_t>(d_model()), ff = static_cast<std::size_t>(d_ff());
    const auto rows = static_cast<std::size_t>(m);
    T* hidden = scratch;  // [m, d_ff]
    simd::matmul_nt(arch, x, rows, d, w_in_.data(), ff, hidden, ff);
    // Row by row, so an element's activation path (SIMD body or scalar tail) does not depend on m.
    for (std::size_t j = 0; j < rows; ++j) simd::activate<Activation>(arch, hidden + j * ff, ff);
    simd::matmul_nt(arch, hidden, rows, ff, w_out_.data(), d, y, d);
  }

 private:
  Weight<T> w_in_;
  Weight<T> w_out_;
};

MOE_NAMESPACE_END
