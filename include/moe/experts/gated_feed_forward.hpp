#pragma once
// Gated feed-forward expert (GLU family): y = (act(x · w_gateᵀ) ⊙ (x · w_upᵀ)) · w_downᵀ.
//   w_gate [d_ff, d]   (Mixtral w1, Hugging Face gate_proj)
//   w_up   [d_ff, d]   (Mixtral w3, up_proj)
//   w_down [d, d_ff]   (Mixtral w2, down_proj)
// SwiGLU is GatedFeedForward<T, SiLU>; GeGLU is GatedFeedForward<T, GELU>.
#include <cstddef>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "activations.hpp"
#include "../simd/matmul.hpp"

MOE_NAMESPACE_BEGIN

template <class T, class Activation = SiLU>
class GatedFeedForward {
 public:
  using Scalar = T;
  using activation_type = Activation;

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
