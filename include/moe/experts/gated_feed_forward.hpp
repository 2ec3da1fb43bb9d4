#pragma once
// Gated feed-forward expert (GLU family): y = (act(x · w_gateᵀ) ⊙ (x · w_upᵀ)) · w_downᵀ.
//   w_gate [d_ff, d]   (Mixtral w1, Hugging Face gate_proj)
//   w_up   [d_ff, d]   (Mixtral w3, up_proj)
//   w_down [d, d_ff]   (Mixtral w2, down_proj)
// SwiGLU is GatedFeedForward<T, SiLU>; GeGLU is GatedFeedForward<T, GELU>.
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

template <class T, class Activation = SiLU>
class GatedFeedForward {
 public:
  using Scalar = T;
  using activation_type = Activation;

  // Weight gradients, shaped like the weights.
  struct Gradient {
    Matrix<T> w_gate;  // [d_ff, d]
    Matrix<T> w_up;    // [d_ff, d]
    Matrix<T> w_down;  // [d, d_ff]
    template <class F>
    void for_each(F f) { f(w_gate); f(w_up); f(w_down); }
    template <class F>
    void for_each(F f) const { f(w_gate); f(w_up); f(w_down); }
  };

  // Views the caller's weights (no copy); they must outlive the expert.
  GatedFeedForward(ConstMatrixMap<T> w_gate, ConstMatrixMap<T> w_up, ConstMatrixMap<T> w_down)
      : GatedFeedForward(Weight<T>::view(w_gate), Weight<T>::view(w_up), Weight<T>::view(w_down)) {}
  // Owns its weights.
  GatedFeedForward(Matrix<T> w_gate, Matrix<T> w_up, Matrix<T> w_down)
      : GatedFeedForward(Weight<T>::own(std::move(w_gate)), Weight<T>::own(std::move(w_up)),
                         Weight<T>::own(std::move(w_down))) {}
  GatedFeedForward(Weight<T> w_gate, Weight<T> w_up, Weight<T> w_down)
      : w_gate_(std::move(w_gate)), w_up_(std::move(w_up)), w_down_(std::move(w_down)) {
    detail::check_dim("GatedFeedForward", "w_up.rows()", w_up_.rows(), "w_gate.rows() (d_ff)", w_gate_.rows());
    detail::check_dim("GatedFeedForward", "w_up.cols()", w_up_.cols(), "w_gate.cols() (d)", w_gate_.cols());
    detail::check_dim("GatedFeedForward", "w_down.rows()", w_down_.rows(), "w_gate.cols() (d)", w_gate_.cols());
    detail::check_dim("GatedFeedForward", "w_down.cols()", w_down_.cols(), "w_gate.rows() (d_ff)", w_gate_.rows());
    detail::check_positive("GatedFeedForward", "w_gate.cols() (d)", w_gate_.cols());
    detail::check_positive("GatedFeedForward", "w_gate.rows() (d_ff)", w_gate_.rows());
  }

  index_t d_model() const noexcept { return w_gate_.cols(); }
  index_t d_ff() const noexcept { return w_gate_.rows(); }
  ConstMatrixMap<T> w_gate() const noexcept { return w_gate_.map(); }
  ConstMatrixMap<T> w_up() const noexcept { return w_up_.map(); }
  ConstMatrixMap<T> w_down() const noexcept { return w_down_.map(); }

  // Scratch elements forward() needs for `tokens` rows.
  index_t scratch_size(index_t tokens) const noexcept { return tokens * d_ff(); }

  // y [m, d] = expert(x [m, d]); x and y are contiguous rows. `scratch` holds scratch_size(m).
  template <class Arch>
  void forward(Arch arch, const T* x, index_t m, T* y, T* scratch) const {
    const auto d = static_cast<std::size_t>(d_model()), ff = static_cast<std::size_t>(d_ff());
    const auto rows = static_cast<std::size_t>(m);
    T* hidden = scratch;  // [m, d_ff]: act(gate) ⊙ up, fused in one pass over w_gate and w_up
    simd::gated_matmul_nt<Activation>(arch, x, rows, d, w_gate_.data(), w_up_.data(), ff, hidden, ff);
    simd::matmul_nt(arch, hidden, rows, ff, w_down_.data(), d, y, d);
  }

  // Zero gradients of the right shapes.
  Gradient zero_gradient() const {
    return {Matrix<T>::Zero(d_ff(), d_model()), Matrix<T>::Zero(d_ff(), d_model()), Matrix<T>::Zero(d_model(), d_ff())};
  }
  // Elements per token that forward_saving keeps for backward: the gate and up pre-activations.
  index_t saved_size(index_t tokens) const noexcept { return 2 * tokens * d_ff(); }

  // forward() that also keeps what backward needs in `saved` (saved_size(m)). Same output bits.
  template <class Arch>
  void forward_saving(Arch arch, const T* x, index_t m, T* y, T* saved, T* scratch) const {
    const auto d = static_cast<std::size_t>(d_model()), ff = static_cast<std::size_t>(d_ff());
    const auto rows = static_cast<std::size_t>(m);
    T* gate = saved;             // [m, d_ff]
    T* up = saved + rows * ff;   // [m, d_ff]
    T* hidden = scratch;         // [m, d_ff]
    simd::matmul_nt(arch, x, rows, d, w_gate_.data(), ff, gate, ff);
    simd::matmul_nt(arch, x, rows, d, w_up_.data(), ff, up, ff);
    simd::gated_hidden_rows<Activation>(arch, gate, up, rows, ff, hidden);
    simd::matmul_nt(arch, hidden, rows, ff, w_down_.data(), d, y, d);
  }

  // Scratch elements backward() needs for `tokens` rows: two hidden buffers, and room for the
  // weight gradients' products to pack their x (simd::tn_packing_size).
  index_t backward_scratch_size(index_t tokens) const noexcept {
    return tokens * (2 * d_ff() + std::max(d_model(), d_ff()));
  }

  // Given dy [m, d] (the gradient of this expert's output rows) and what forward_saving kept:
  // dx [m, d] = ∂/∂x, and the weight gradients, added to `grad` when `accumulate` and written over
  // it otherwise (m > 0). `scratch` holds backward_scratch_size(m). Every product is a chain of
  // FMAs in a fixed order (simd::matmul_nn, matmul_tn): a token's row of dx does not depend on
  // the other tokens, and no bit depends on the threads.
  template <class Arch>
  void backward(const T* x, index_t m, const T* dy, const T* saved, T* dx, Gradient& grad, Arch arch, T* scratch,
                bool accumulate) const {
    const auto rows = static_cast<std::size_t>(m), d = static_cast<std::size_t>(d_model()),
               ff = static_cast<std::size_t>(d_ff());
    const T* gate = saved;             // [m, d_ff] pre-activations
    const T* up = saved + rows * ff;   // [m, d_ff]
    T* hidden = scratch;               // [m, d_ff] act(gate) ⊙ up, then ∂L/∂gate
    T* d_hidden = scratch + rows * ff; // [m, d_ff] dy · w_down, then ∂L/∂up
    T* packing = d_hidden + rows * ff; // [m, max(d, d_ff)]
    constexpr auto gradient = simd::YStore::past_caches;  // (read by the optimizer, after the whole backward)
    simd::gated_hidden_rows<Activation>(arch, gate, up, rows, ff, hidden);
    simd::matmul_tn(arch, dy, rows, d, hidden, ff, grad.w_down.data(), accumulate, packing, gradient);  // [d, d_ff] dyᵀ · hidden
    simd::matmul_nn(arch, dy, rows, d, w_down_.data(), ff, d_hidden, false);
    for (std::size_t j = 0; j < rows; ++j) {
      simd::gated_activation_backward<Activation>(arch, gate + j * ff, up + j * ff, d_hidden + j * ff, hidden + j * ff, ff);
    }
    simd::matmul_tn(arch, hidden, rows, ff, x, d, grad.w_gate.data(), accumulate, packing, gradient);  // [d_ff, d] d_gateᵀ · x
    simd::matmul_tn(arch, d_hidden, rows, ff, x, d, grad.w_up.data(), accumulate, packing, gradient);  // [d_ff, d] d_upᵀ · x
    simd::matmul_nn(arch, hidden, rows, ff, w_gate_.data(), d, dx, false);
    simd::matmul_nn(arch, d_hidden, rows, ff, w_up_.data(), d, dx, true);
  }

  // backward() on scratch of its own, adding to `grad`.
  template <class Arch = simd::default_arch>
  void backward(const T* x, index_t m, const T* dy, const T* saved, T* dx, Gradient& grad, Arch arch = {}) const {
    Buffer<T> scratch;
    backward(x, m, dy, saved, dx, grad, arch, scratch.ensure(backward_scratch_size(m)), true);
  }

 private:
  Weight<T> w_gate_;
  Weight<T> w_up_;
  Weight<T> w_down_;
};

template <class T>
using SwiGLU = GatedFeedForward<T, SiLU>;
template <class T>
using GeGLU = GatedFeedForward<T, GELU>;

MOE_NAMESPACE_END
