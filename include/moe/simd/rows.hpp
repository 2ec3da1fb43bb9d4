#pragma once
// Row movement for dispatch and combine: copy rows, gather rows, and the weighted sum of rows.
#include <algorithm>
#include <cstddef>
#include <cstring>

#include "../core/types.hpp"
#include "arch.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

// dst[0, n) = src[0, n). Rows never overlap. Rows of 1 KiB and more go to std::memcpy, which
// copied 3–4 KiB rows cached in L2 1.4–1.6× faster than this loop (dispatch of 16 tokens, d = 768
// and 1024); shorter rows stay in the loop (the 1 KiB threshold is a guess, not tuned).
template <class Arch, class T>
void copy_row(Arch, const T* src, T* dst, std::size_t n) noexcept {
  if (n * sizeof(T) >= 1024) {
    std::memcpy(dst, src, n * sizeof(T));
    return;
  }
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  std::size_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const B a = B::load_unaligned(src + i);
    const B b = B::load_unaligned(src + i + L);
    a.store_unaligned(dst + i);
    b.store_unaligned(dst + i + L);
  }
  for (; i + L <= n; i += L) B::load_unaligned(src + i).store_unaligned(dst + i);
  for (; i < n; ++i) dst[i] = src[i];
}

// dst row r = src row rows[r], for r in [0, count); rows are n elements long.
template <class Arch, class T>
void gather_rows(Arch arch, const T* src, std::size_t src_stride, const index_t* rows, std::size_t count, T* dst,
                 std::size_t dst_stride, std::size_t n) noexcept {
  for (std::size_t r = 0; r < count; ++r) {
    copy_row(arch, src + static_cast<std::size_t>(rows[r]) * src_stride, dst + r * dst_stride, n);
  }
}

// y[0, n) += w * x[0, n).
template <class Arch, class T>
void axpy(Arch, T w, const T* x, T* y, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  const B vw(w);
  std::size_t i = 0;
  for (; i + L <= n; i += L) simd::fma(vw, B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] = madd(w, x[i], y[i]);
}

// out[0, n) = init[0, n) + sum over j in [0, count) of row_weight[rows[j]] * src row rows[j],
// summed from init (zeros when init is null) in j order and written once (each output chunk is
// accumulated in registers). The fixed order makes the result independent of threads and of where
// the rows came from. out may be init, but no source row.
template <class Arch, class T>
void weighted_row_sum(Arch, const T* src, std::size_t src_stride, const index_t* rows, const T* row_weight,
                      std::size_t count, T* out, std::size_t n, const T* init = nullptr) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  // The rows' addresses and weights, looked up once rather than per vector (up to kMaxRows rows;
  // more, rare, take them in turn from the arrays).
  constexpr std::size_t kMaxRows = 16;
  const T* row[kMaxRows];
  T weight[kMaxRows];
  const std::size_t hoisted = std::min(count, kMaxRows);
  for (std::size_t j = 0; j < hoisted; ++j) {
    const std::size_t r = static_cast<std::size_t>(rows[j]);
    row[j] = src + r * src_stride;
    weight[j] = row_weight[r];
  }
  auto row_at = [&](std::size_t j) { return j < kMaxRows ? row[j] : src + static_cast<std::size_t>(rows[j]) * src_stride; };
  auto weight_at = [&](std::size_t j) { return j < kMaxRows ? weight[j] : row_weight[rows[j]]; };
  auto start = [&](std::size_t i) { return init != nullptr ? B::load_unaligned(init + i) : B(T(0)); };
  std::size_t i = 0;
  // Four vectors at a time: four independent FMA chains instead of one (the chain's latency, not
  // memory, bounded the one-vector loop). Each element still sums its rows in order from init.
  for (; i + 4 * L <= n; i += 4 * L) {
    B a0 = start(i), a1 = start(i + L), a2 = start(i + 2 * L), a3 = start(i + 3 * L);
    for (std::size_t j = 0; j < count; ++j) {
      const B w(weight_at(j));
      const T* p = row_at(j) + i;
      a0 = simd::fma(w, B::load_unaligned(p), a0);
      a1 = simd::fma(w, B::load_unaligned(p + L), a1);
      a2 = simd::fma(w, B::load_unaligned(p + 2 * L), a2);
      a3 = simd::fma(w, B::load_unaligned(p + 3 * L), a3);
    }
    a0.store_unaligned(out + i);
    a1.store_unaligned(out + i + L);
    a2.store_unaligned(out + i + 2 * L);
    a3.store_unaligned(out + i + 3 * L);
  }
  for (; i + L <= n; i += L) {
    B acc = start(i);
    for (std::size_t j = 0; j < count; ++j) acc = simd::fma(B(weight_at(j)), B::load_unaligned(row_at(j) + i), acc);
    acc.store_unaligned(out + i);
  }
  for (; i < n; ++i) {
    T acc = init != nullptr ? init[i] : T(0);
    for (std::size_t j = 0; j < count; ++j) acc = madd(weight_at(j), row_at(j)[i], acc);
    out[i] = acc;
  }
}

}  // namespace simd
MOE_NAMESPACE_END
