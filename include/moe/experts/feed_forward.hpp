#pragma once
// Plain feed-forward expert: y = act(x · w_inᵀ) · w_outᵀ.
//   w_in  [d_ff, d]   (PyTorch fc1 / w1)
//   w_out [d, d_ff]   (PyTorch fc2 / w2)
#include <algorithm>
#include <cstddef>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "../core/workspace.hpp"
#include "activation_derivatives.hpp"
#include "activations.hpp"
#include "../simd/matmul.hpp"
#include "../simd/matmul_nn.hpp"

MOE_NAMESPACE_BEGIN

template <class T, class Activation = ReLU>
class FeedForward {
 public:
  using Scalar = T;
  using activation_type = Activation;

  // Weight gradients, shaped like the weights.
  struct Gradient {
    Matrix<T> w_in;   // [d_ff, d]
    Matrix<T> w_out;  // [d, d_ff]
    template <class F>
    void for_each(F f) { f(w_in); f(w_out); }
    template <class F>
    void for_each(F f) const { f(w_in); f(w_out); }
  };

  // Views the caller's weights (no copy); they must outlive the expert.
  FeedForward(ConstMatrixMap<T> w_in, ConstMatrixMap<T> w_out) : FeedForward(Weight<T>::view(w_in), Weight<T>::view(w_out)) {}
  // Owns its weights.
  FeedForward(Matrix<T> w_in, Matrix<T> w_out) : FeedForward(Weight<T>::own(std::move(w_in)), Weight<T>::own(std::move(w_out))) {}
  FeedForward(Weight<T> w_in, Weight<T> w_out) : w_in_(std::move(w_in)), w_out_(std::move(w_out)) {
    detail::check_dim("FeedForward", "w_out.rows()", w_out_.rows(), "w_in.cols() (d)", w_in_.cols());
    detail::check_dim("FeedForward", "w_out.cols()", w_out_.cols(), "w_in.rows() (d_ff)", w_in_.rows());
    detail::check_positive("FeedForward", "w_in.cols() (d)", w_in_.cols());
    detail::check_positive("FeedForward", "w_in.rows() (d_ff)", w_in_.rows());
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
    // Row by row; an element's result depends only on its value (simd::for_each_batch), not on m.
    for (std::size_t j = 0; j < rows; ++j) simd::activate<Activation>(arch, hidden + j * ff, ff);
    simd::matmul_nt(arch, hidden, rows, ff, w_out_.data(), d, y, d);
  }

  // Zero gradients of the right shapes.
  Gradient zero_gradient() const { return {Matrix<T>::Zero(d_ff(), d_model()), Matrix<T>::Zero(d_model(), d_ff())}; }
  // Elements per token that forward_saving keeps for backward: the pre-activations.
  index_t saved_size(index_t tokens) const noexcept { return tokens * d_ff(); }

  // forward() that also keeps what backward needs in `saved` (saved_size(m)). Same output bits.
  template <class Arch>
  void forward_saving(Arch arch, const T* x, index_t m, T* y, T* saved, T* scratch) const {
    const auto d = static_cast<std::size_t>(d_model()), ff = static_cast<std::size_t>(d_ff());
    const auto rows = static_cast<std::size_t>(m);
    simd::matmul_nt(arch, x, rows, d, w_in_.data(), ff, saved, ff);
    std::copy(saved, saved + rows * ff, scratch);
    for (std::size_t j = 0; j < rows; ++j) simd::activate<Activation>(arch, scratch + j * ff, ff);
    simd::matmul_nt(arch, scratch, rows, ff, w_out_.data(), d, y, d);
  }

  // Scratch elements backward() needs for `tokens` rows: the hidden rows, and room for the weight
  // gradients' products to pack their x (simd::tn_packing_size).
  index_t backward_scratch_size(index_t tokens) const noexcept { return tokens * (d_ff() + std::max(d_model(), d_ff())); }

  // Given dy [m, d] and what forward_saving kept: dx [m, d], and the weight gradients, added to
  // `grad` when `accumulate` and written over it otherwise (m > 0). `scratch` holds
  // backward_scratch_size(m). Every product is a chain of FMAs in a fixed order (simd::matmul_nn,
  // matmul_tn): a token's row of dx does not depend on the other tokens, and no bit depends on the threads.
  template <class Arch>
  void backward(const T* x, index_t m, const T* dy, const T* saved, T* dx, Gradient& grad, Arch arch, T* scratch,
                bool accumulate) const {
    const auto rows = static_cast<std::size_t>(m), d = static_cast<std::size_t>(d_model()),
               ff = static_cast<std::size_t>(d_ff());
    T* hidden = scratch;                // [m, d_ff] act(pre), then ∂L/∂pre
    T* packing = scratch + rows * ff;   // [m, max(d, d_ff)]
    constexpr auto gradient = simd::YStore::past_caches;  // (read by the optimizer, after the whole backward)
    std::copy(saved, saved + rows * ff, hidden);
    for (std::size_t j = 0; j < rows; ++j) simd::activate<Activation>(arch, hidden + j * ff, ff);
    simd::matmul_tn(arch, dy, rows, d, hidden, ff, grad.w_out.data(), accumulate, packing, gradient);  // [d, d_ff] dyᵀ · hidden
    simd::matmul_nn(arch, dy, rows, d, w_out_.data(), ff, hidden, false);                              // dy · w_out
    for (std::size_t j = 0; j < rows; ++j) simd::activation_backward<Activation>(arch, saved + j * ff, hidden + j * ff, ff);
    simd::matmul_tn(arch, hidden, rows, ff, x, d, grad.w_in.data(), accumulate, packing, gradient);    // [d_ff, d] d_preᵀ · x
    simd::matmul_nn(arch, hidden, rows, ff, w_in_.data(), d, dx, false);
  }

  // backward() on scratch of its own, adding to `grad`.
  template <class Arch = simd::default_arch>
  void backward(const T* x, index_t m, const T* dy, const T* saved, T* dx, Gradient& grad, Arch arch = {}) const {
    Buffer<T> scratch;
    backward(x, m, dy, saved, dx, grad, arch, scratch.ensure(backward_scratch_size(m)), true);
  }

 private:
  Weight<T> w_in_;
  Weight<T> w_out_;
};

MOE_NAMESPACE_END
