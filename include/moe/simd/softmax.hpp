#pragma once
// Row-wise score functions: softmax, sigmoid and log-sum-exp over one contiguous row.
#include <cmath>
#include <cstddef>
#include <limits>

#include "arch.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

// Largest element of x[0, n); -infinity for n == 0.
template <class Arch, class T>
T max_value(Arch, const T* x, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  T m = -std::numeric_limits<T>::infinity();
  std::size_t i = 0;
  if (n >= L) {
    B vm = B::load_unaligned(x);
    for (i = L; i + L <= n; i += L) vm = xsimd::max(vm, B::load_unaligned(x + i));
    m = reduce_max(vm);
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Whether some element of x[0, n) has a property: `lanes` tests a batch (giving a batch_bool),
// `one` an element of the tail. A scalar tail, not for_each_batch's padded copy: rows shorter than
// a vector, over 8 experts, are common, and with the copy top_k's NaN check took ~2 ns more (k =
// 1–2 at n = 8: 1.05–1.13 of the old passes' time against 0.99–1.06).
template <class Arch, class T, class Lanes, class One>
bool any_element(Arch, const T* x, std::size_t n, Lanes lanes, One one) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  xsimd::batch_bool<T, Arch> found(false);
  std::size_t i = 0;
  for (; i + L <= n; i += L) found = found | lanes(B::load_unaligned(x + i));
  bool tail = false;
  for (; i < n; ++i) tail = tail || one(x[i]);
  return tail || xsimd::any(found);
}

// Whether every element of x[0, n) is finite (the routers' check_finite: they scan for the
// first non-finite logit, to name it, only when this says there is one).
template <class Arch, class T>
bool all_finite(Arch arch, const T* x, std::size_t n) noexcept {
  return !any_element(arch, x, n, [](const batch<T, Arch>& v) { return !xsimd::isfinite(v); },
                      [](T v) { return !std::isfinite(v); });
}

// f applied to the last count < L elements of a row: the lanes are padded with `pad` and go through
// the batch kernel of the full ones. Each lane's result depends only on its own input, so equal
// inputs give equal outputs wherever they sit in the row: the scalar std::exp differs from the
// batch exp in the last bit for about 1 input in 10, and two experts with equal logits, one of them
// in the tail, then got unequal scores (and a tie could go to the higher index).
template <class B, class T, class F>
void map_tail(const T* x, T* out, std::size_t count, T pad, F f) noexcept {
  T lanes[B::size];
  for (std::size_t j = 0; j < B::size; ++j) lanes[j] = j < count ? x[j] : pad;
  f(B::load_unaligned(lanes)).store_unaligned(lanes);
  for (std::size_t j = 0; j < count; ++j) out[j] = lanes[j];
}

// out[i] = exp(x[i] - shift); returns the sum of out. `out` may equal `x`.
template <class Arch, class T>
T exp_shifted(Arch, const T* x, T shift, T* out, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  const B vshift(shift);
  auto exp_lanes = [&](const B& v) { return exp_batch(v - vshift); };
  B vsum(T(0));
  std::size_t i = 0;
  for (; i + L <= n; i += L) {
    const B e = exp_lanes(B::load_unaligned(x + i));
    e.store_unaligned(out + i);
    vsum += e;
  }
  T sum = reduce_add(vsum);
  if (i < n) {
    map_tail<B>(x + i, out + i, n - i, shift, exp_lanes);
    for (; i < n; ++i) sum += out[i];
  }
  return sum;
}

// out[i] *= factor.
template <class Arch, class T>
void scale(Arch, T factor, T* out, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  const B vf(factor);
  std::size_t i = 0;
  for (; i + L <= n; i += L) (B::load_unaligned(out + i) * vf).store_unaligned(out + i);
  for (; i < n; ++i) out[i] *= factor;
}

// out = softmax(x), stable (max subtracted). `out` may equal `x`. Finite input is assumed.
template <class Arch, class T>
void softmax(Arch arch, const T* x, T* out, std::size_t n) noexcept {
  if (n == 0) return;
  const T m = max_value(arch, x, n);
  const T sum = exp_shifted(arch, x, m, out, n);
  scale(arch, T(1) / sum, out, n);
}

// log(sum(exp(x))), stable; -infinity for n == 0. `scratch` holds n elements.
template <class Arch, class T>
T log_sum_exp(Arch arch, const T* x, T* scratch, std::size_t n) noexcept {
  if (n == 0) return -std::numeric_limits<T>::infinity();
  const T m = max_value(arch, x, n);
  return m + std::log(exp_shifted(arch, x, m, scratch, n));
}

// out = 1 / (1 + exp(-x)), as e / (1 + e) with e = exp(x) for x < 0: written as 1 / (1 + exp(-x))
// the exp overflows for x below about -88.7 (float) and the result flushes to 0 where it should
// be a denormal. `out` may equal `x`. Saturates to 0 and 1 without overflow; NaN stays NaN.
template <class Arch, class T>
void sigmoid(Arch, const T* x, T* out, std::size_t n) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  const B one(T(1)), zero(T(0));
  auto sigmoid_lanes = [&](const B& v) {
    const B e = exp_batch(B(-xsimd::abs(v)));
    const B s = one / (one + e);
    return xsimd::select(v < zero, e * s, s);
  };
  std::size_t i = 0;
  for (; i + L <= n; i += L) sigmoid_lanes(B::load_unaligned(x + i)).store_unaligned(out + i);
  if (i < n) map_tail<B>(x + i, out + i, n - i, T(0), sigmoid_lanes);
}

}  // namespace simd
MOE_NAMESPACE_END
