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
#include "expert_kernels.hpp"

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
  index_t scratch_size(index_t tokens) const noexcept { return 2 * tokens * d_ff() + 2 * tokens * max_threads(); }

  // y [m, d] = expert(x [m, d]); x and y are contiguous rows. `scratch` holds scratch_size(m).
  template <class Arch>
  void forward(Arch arch, const T* x, index_t m, T* y, T* scratch) const {
    const index_t d = d_model();
    const index_t ff = d_ff();
    T* hidden = scratch;           // [m, d_ff]
    T* up = hidden + m * ff;       // [m, d_ff], GEMM path only
    T* dots = up + m * ff;
    if (m <= kStreamingMaxTokens) {
      // One pass over w_gate and w_up with the activation fused in.
      simd::gated_matmul_nt_small_m<Arch, T, Activation>(arch, x, static_cast<std::size_t>(m), static_cast<std::size_t>(d),
                                                          w_gate_.data(), w_up_.data(), static_cast<std::size_t>(ff), hidden,
                                                          static_cast<std::size_t>(ff), dots);
    } else {
      detail::linear_nt(arch, x, m, d, w_gate(), hidden, ff, dots);
      detail::linear_nt(arch, x, m, d, w_up(), up, ff, dots);
      simd::gated_activate<Activation>(arch, hidden, up, static_cast<std::size_t>(m * ff));
    }
    detail::linear_nt(arch, hidden, m, ff, w_down(), y, d, dots);
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
