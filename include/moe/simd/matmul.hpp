#pragma once
// Streaming matrix products for few tokens: y = x · wᵀ with x [m, k] and w [n, k] (PyTorch
// nn.Linear layout). Each weight row is read from memory once and dotted with all m token rows
// while it sits in L1, so for small m the cost is one pass over the weights. A packed GEMM
// (Eigen) would copy the whole weight into panels first, which costs more than the product
// when m is a handful of tokens.
//
// Every output element is one dot product summed in a fixed order, so results do not depend on
// how rows are split among threads.
#include <cstddef>

#include "../core/types.hpp"
#include "arch.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

// Token rows handled per pass over a weight row (register blocking).
inline constexpr std::size_t kTokenBlock = 4;

// out[j] = dot(w, x row j) for j < MB, x rows `ldx` apart.
template <std::size_t MB, class Arch, class T>
void dot_token_block(Arch, const T* w, const T* x, std::size_t ldx, std::size_t k, T* out) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  B acc[MB];
  for (std::size_t j = 0; j < MB; ++j) acc[j] = B(T(0));
  std::size_t i = 0;
  for (; i + L <= k; i += L) {
    const B wv = B::load_unaligned(w + i);
    for (std::size_t j = 0; j < MB; ++j) acc[j] = xsimd::fma(wv, B::load_unaligned(x + j * ldx + i), acc[j]);
  }
  for (std::size_t j = 0; j < MB; ++j) out[j] = reduce_add(acc[j]);
  for (; i < k; ++i) {
    for (std::size_t j = 0; j < MB; ++j) out[j] += w[i] * x[j * ldx + i];
  }
}

// out[j] = dot(w, x row j) for j < m (any m), in blocks of kTokenBlock.
template <class Arch, class T>
void dot_tokens(Arch arch, const T* w, const T* x, std::size_t ldx, std::size_t m, std::size_t k, T* out) noexcept {
  std::size_t j = 0;
  for (; j + kTokenBlock <= m; j += kTokenBlock) dot_token_block<kTokenBlock>(arch, w, x + j * ldx, ldx, k, out + j);
  switch (m - j) {
    case 3: dot_token_block<3>(arch, w, x + j * ldx, ldx, k, out + j); break;
    case 2: dot_token_block<2>(arch, w, x + j * ldx, ldx, k, out + j); break;
    case 1: dot_token_block<1>(arch, w, x + j * ldx, ldx, k, out + j); break;
    default: break;
  }
}

// y [m, n] = x [m, k] · w [n, k]ᵀ; y rows are `ldy` apart. For m up to a few dozen tokens.
// `dots` is scratch for m elements per thread (m * omp_get_max_threads() when OpenMP is on).
template <class Arch, class T>
void matmul_nt_small_m(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w, std::size_t n, T* y,
                       std::size_t ldy, T* dots) noexcept {
#if defined(MOE_USE_OPENMP)
#pragma omp parallel
#endif
  {
    T* my_dots = dots;
#if defined(MOE_USE_OPENMP)
    my_dots += static_cast<std::size_t>(omp_get_thread_num()) * m;
#pragma omp for schedule(static)
#endif
    for (std::ptrdiff_t r = 0; r < static_cast<std::ptrdiff_t>(n); ++r) {
      const auto row = static_cast<std::size_t>(r);
      dot_tokens(arch, w + row * k, x, k, m, k, my_dots);
      for (std::size_t j = 0; j < m; ++j) y[j * ldy + row] = my_dots[j];
    }
  }
}

// Gated projection for few tokens: h [m, n] = act(x · w_gateᵀ) ⊙ (x · w_upᵀ), both weights [n, k].
// Gate and up rows are read once each, and the activation is applied while the dots are in hand.
// `dots` is scratch for 2·m elements per thread.
template <class Arch, class T, class Activation>
void gated_matmul_nt_small_m(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w_gate, const T* w_up,
                             std::size_t n, T* h, std::size_t ldh, T* dots) noexcept {
#if defined(MOE_USE_OPENMP)
#pragma omp parallel
#endif
  {
    T* gate = dots;
#if defined(MOE_USE_OPENMP)
    gate += static_cast<std::size_t>(omp_get_thread_num()) * 2 * m;
#endif
    T* up = gate + m;
#if defined(MOE_USE_OPENMP)
#pragma omp for schedule(static)
#endif
    for (std::ptrdiff_t r = 0; r < static_cast<std::ptrdiff_t>(n); ++r) {
      const auto row = static_cast<std::size_t>(r);
      dot_tokens(arch, w_gate + row * k, x, k, m, k, gate);
      dot_tokens(arch, w_up + row * k, x, k, m, k, up);
      for (std::size_t j = 0; j < m; ++j) h[j * ldh + row] = Activation::apply(gate[j]) * up[j];
    }
  }
}

}  // namespace simd
MOE_NAMESPACE_END
