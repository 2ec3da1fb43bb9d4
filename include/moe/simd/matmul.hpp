#pragma once
// Matrix products in the PyTorch nn.Linear layout: y = x · wᵀ with x [m, k] (token rows) and
// w [n, k] (weight rows), so every output element is the dot product of two contiguous rows.
//
// Each element is summed in one fixed order — SIMD lanes across k in steps of the lane count,
// the lanes reduced, then the k % L tail added in order — whatever m is, whichever block the
// element falls in and whichever thread computes it. So a token's output bits never depend on
// which other tokens share its batch or its expert (batch isolation, DESIGN.md §6), nor on the
// thread count. A packed GEMM (Eigen's) does not promise this: its blocking, and so its rounding,
// changes with m.
//
// Blocking: weight rows are taken in panels that fit in L2 and every token is run against a
// panel before moving on, so the weights stream from memory once per call; within a panel, a
// register block of kTokenBlock tokens × kRowBlock rows shares each load. For a handful of tokens
// this is one pass over the weights (memory bound, as it must be); for many it is compute bound.
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "../core/config.hpp"
#include "arch.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

inline constexpr std::size_t kTokenBlock = 4;             // token rows per register block
inline constexpr std::size_t kRowBlock = 8;               // weight rows per block when one token is left
inline constexpr std::size_t kPanelBytes = 192 * 1024;    // weight panel kept in L2

// out[j * ldo + r] = dot(x row j, w row r) for j < MB, r < NB; rows given by pointers.
template <std::size_t MB, std::size_t NB, class Arch, class T>
void dot_block(Arch, const T* const* x, const T* const* w, std::size_t k, T* out, std::size_t ldo) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  B acc[MB][NB];
  for (std::size_t j = 0; j < MB; ++j)
    for (std::size_t r = 0; r < NB; ++r) acc[j][r] = B(T(0));
  std::size_t i = 0;
  for (; i + L <= k; i += L) {
    B wv[NB];
    for (std::size_t r = 0; r < NB; ++r) wv[r] = B::load_unaligned(w[r] + i);
    for (std::size_t j = 0; j < MB; ++j) {
      const B xv = B::load_unaligned(x[j] + i);
      for (std::size_t r = 0; r < NB; ++r) acc[j][r] = xsimd::fma(xv, wv[r], acc[j][r]);
    }
  }
  for (std::size_t j = 0; j < MB; ++j) {
    for (std::size_t r = 0; r < NB; ++r) {
      T sum = reduce_add(acc[j][r]);
      // The k % L tail, in order; std::fma so every caller rounds it the same way.
      for (std::size_t q = 0; q + 1 < L && i + q < k; ++q) sum = std::fma(x[j][i + q], w[r][i + q], sum);
      out[j * ldo + r] = sum;
    }
  }
}

// y [m, r0:r1) = x [m, k] · w[r0:r1)ᵀ for one panel of weight rows. A block holds mb tokens and
// kRowBlock / mb weight rows (8 accumulators whatever mb is, enough to hide the FMA latency).
template <class Arch, class T>
void panel_product(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t r0,
                   std::size_t r1, T* y, std::size_t ldy) noexcept {
  T out[kTokenBlock * kRowBlock];
  const T* xr[kTokenBlock];
  const T* wr[kRowBlock];
  for (std::size_t j = 0; j < m; j += kTokenBlock) {
    const std::size_t mb = std::min(kTokenBlock, m - j);
    const std::size_t rows_per_block = mb == 1 ? 8 : mb == 2 ? 4 : 2;
    for (std::size_t q = 0; q < kTokenBlock; ++q) xr[q] = x + (j + std::min(q, mb - 1)) * ldx;
    for (std::size_t r = r0; r < r1; r += rows_per_block) {
      const std::size_t nb = std::min(rows_per_block, r1 - r);
      for (std::size_t q = 0; q < nb; ++q) wr[q] = w + (r + q) * k;
      if (nb == rows_per_block) {
        switch (mb) {
          case 4: dot_block<4, 2>(arch, xr, wr, k, out, nb); break;
          case 3: dot_block<3, 2>(arch, xr, wr, k, out, nb); break;
          case 2: dot_block<2, 4>(arch, xr, wr, k, out, nb); break;
          default: dot_block<1, 8>(arch, xr, wr, k, out, nb); break;
        }
      } else {  // the panel's last rows, one at a time
        for (std::size_t q = 0; q < nb; ++q) {
          switch (mb) {
            case 4: dot_block<4, 1>(arch, xr, wr + q, k, out + q, nb); break;
            case 3: dot_block<3, 1>(arch, xr, wr + q, k, out + q, nb); break;
            case 2: dot_block<2, 1>(arch, xr, wr + q, k, out + q, nb); break;
            default: dot_block<1, 1>(arch, xr, wr + q, k, out + q, nb); break;
          }
        }
      }
      for (std::size_t a = 0; a < mb; ++a)
        for (std::size_t b = 0; b < nb; ++b) y[(j + a) * ldy + r + b] = out[a * nb + b];
    }
  }
}
static_assert(kTokenBlock == 4 && kRowBlock == 8, "panel_product's block table assumes 4 tokens and 8 rows");

// Weight rows per L2 panel for rows of k elements (at least one register block).
template <class T>
std::size_t panel_rows(std::size_t k) noexcept {
  const std::size_t rows = kPanelBytes / (std::max<std::size_t>(k, 1) * sizeof(T));
  return std::max(kRowBlock, rows - rows % kRowBlock);
}

// y [m, n] = x [m, k] · w [n, k]ᵀ; x rows `ldx` apart, y rows `ldy` apart. Threads
// (MOE_USE_OPENMP) split the weight panels.
template <class Arch, class T>
void matmul_nt_strided(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t n,
                       T* y, std::size_t ldy) noexcept {
  if (m == 0 || n == 0) return;
  const std::size_t panel = panel_rows<T>(k);
  const auto panels = static_cast<std::ptrdiff_t>((n + panel - 1) / panel);
#if defined(MOE_USE_OPENMP)
#pragma omp parallel for schedule(static) if (panels > 1 && m * n * k > 32768)
#endif
  for (std::ptrdiff_t p = 0; p < panels; ++p) {
    const std::size_t r0 = static_cast<std::size_t>(p) * panel, r1 = std::min(n, r0 + panel);
    panel_product(arch, x, ldx, m, k, w, r0, r1, y, ldy);
  }
}

// y [m, n] = x [m, k] · w [n, k]ᵀ with contiguous x rows.
template <class Arch, class T>
void matmul_nt(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w, std::size_t n, T* y,
               std::size_t ldy) noexcept {
  matmul_nt_strided(arch, x, k, m, k, w, n, y, ldy);
}

// Gated projection: h [m, n] = act(x · w_gateᵀ) ⊙ (x · w_upᵀ), both weights [n, k]; h rows `ldh`
// apart. Gate row r and up row r form one register block, so the activation is applied while the
// two dots are in registers and the [m, n] gate and up products are never stored.
template <class Activation, class Arch, class T>
void gated_matmul_nt(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w_gate, const T* w_up, std::size_t n,
                     T* h, std::size_t ldh) noexcept {
  if (m == 0 || n == 0) return;
  const std::size_t panel = std::max<std::size_t>(panel_rows<T>(k) / 2, 1);
  const auto panels = static_cast<std::ptrdiff_t>((n + panel - 1) / panel);
#if defined(MOE_USE_OPENMP)
#pragma omp parallel for schedule(static) if (panels > 1 && m * n * k > 16384)
#endif
  for (std::ptrdiff_t p = 0; p < panels; ++p) {
    const std::size_t r0 = static_cast<std::size_t>(p) * panel, r1 = std::min(n, r0 + panel);
    // A block pairs gate row r with up row r, for kRowBlock / (2 · mb) consecutive r (8
    // accumulators whatever mb is); the panel's last rows go one pair at a time.
    T out[kTokenBlock * kRowBlock];
    const T* xr[kTokenBlock];
    const T* wr[kRowBlock];
    for (std::size_t j = 0; j < m; j += kTokenBlock) {
      const std::size_t mb = std::min(kTokenBlock, m - j);
      const std::size_t pairs_per_block = mb == 1 ? 4 : mb == 2 ? 2 : 1;
      for (std::size_t q = 0; q < kTokenBlock; ++q) xr[q] = x + (j + std::min(q, mb - 1)) * k;
      for (std::size_t r = r0; r < r1; r += pairs_per_block) {
        const std::size_t pairs = std::min(pairs_per_block, r1 - r);
        for (std::size_t q = 0; q < pairs; ++q) {
          wr[2 * q] = w_gate + (r + q) * k;
          wr[2 * q + 1] = w_up + (r + q) * k;
        }
        if (pairs == pairs_per_block) {
          switch (mb) {
            case 4: dot_block<4, 2>(arch, xr, wr, k, out, 2); break;
            case 3: dot_block<3, 2>(arch, xr, wr, k, out, 2); break;
            case 2: dot_block<2, 4>(arch, xr, wr, k, out, 4); break;
            default: dot_block<1, 8>(arch, xr, wr, k, out, 8); break;
          }
        } else {
          for (std::size_t q = 0; q < pairs; ++q) {
            switch (mb) {
              case 4: dot_block<4, 2>(arch, xr, wr + 2 * q, k, out + 2 * q, 2 * pairs); break;
              case 3: dot_block<3, 2>(arch, xr, wr + 2 * q, k, out + 2 * q, 2 * pairs); break;
              case 2: dot_block<2, 2>(arch, xr, wr + 2 * q, k, out + 2 * q, 2 * pairs); break;
              default: dot_block<1, 2>(arch, xr, wr + 2 * q, k, out + 2 * q, 2 * pairs); break;
            }
          }
        }
        for (std::size_t a = 0; a < mb; ++a)
          for (std::size_t q = 0; q < pairs; ++q) {
            const T gate = out[a * 2 * pairs + 2 * q], up = out[a * 2 * pairs + 2 * q + 1];
            h[(j + a) * ldh + r + q] = Activation::apply(gate) * up;
          }
      }
    }
  }
}

}  // namespace simd
MOE_NAMESPACE_END
