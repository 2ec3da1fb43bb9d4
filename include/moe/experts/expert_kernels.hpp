#pragma once
// The two ways an expert runs its block of tokens, chosen by the block's token count:
//  - few tokens: streaming kernels (simd/matmul.hpp) read each weight row once;
//  - many tokens: Eigen's packed GEMM, whose packing cost is amortized over the tokens.
#include <cstddef>

#include "../core/types.hpp"
#include "../simd/matmul.hpp"

MOE_NAMESPACE_BEGIN

// Token count at or below which an expert uses the streaming kernels. Measured with
// bench/layer_bench (BM_ExpertKernel): on a 2-core AVX2 machine the streaming kernel wins up to
// about this many tokens for d = 1024, d_ff = 3584.
inline constexpr index_t kStreamingMaxTokens = 16;

namespace detail {

// y [m, n] = x [m, k] · wᵀ, w [n, k]; y rows `ldy` apart.
template <class Arch, class T>
void linear_nt(Arch arch, const T* x, index_t m, index_t k, const ConstMatrixMap<T>& w, T* y, index_t ldy, T* dots) {
  const index_t n = w.rows();
  if (m <= kStreamingMaxTokens) {
    simd::matmul_nt_small_m(arch, x, static_cast<std::size_t>(m), static_cast<std::size_t>(k), w.data(),
                            static_cast<std::size_t>(n), y, static_cast<std::size_t>(ldy), dots);
    return;
  }
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<const Matrix<T>> xm(x, m, k);
  Eigen::Map<Matrix<T>, 0, Stride> ym(y, m, n, Stride(ldy));
  ym.noalias() = xm * w.transpose();
}

}  // namespace detail

MOE_NAMESPACE_END
