#pragma once
// Top-k selection over one row in the library's total order: larger value first, and on equal
// values the lower index first. Every router breaks ties this way (README, "Guarantees").
#include <algorithm>
#include <cstddef>
#include <limits>

#include "../core/types.hpp"
#include "softmax.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

// True when (va, ia) comes before (vb, ib) in the selection order: the larger value first, equal
// values by the lower index. NaN ranks after every number (and NaNs by index), so this is a strict
// total order on (value, index) pairs whatever the values: sorting with it is always defined.
template <class T>
constexpr bool ranks_before(T va, index_t ia, T vb, index_t ib) noexcept {
  if (va > vb) return true;
  if (va < vb) return false;
  if (va == vb) return ia < ib;
  const bool a_nan = va != va, b_nan = vb != vb;  // at least one is NaN
  return a_nan == b_nan ? ia < ib : b_nan;
}

// For k at or below this, selection is k vectorized max passes; above it, a partial sort.
inline constexpr std::size_t kTopKPassLimit = 8;

// Whether x[0, n) holds a NaN. (xsimd::isnan, not v != v: xsimd's != is an ordered compare,
// false for NaN lanes, unlike C++'s.)
template <class Arch, class T>
bool any_nan(Arch arch, const T* x, std::size_t n) noexcept {
  return any_element(arch, x, n, [](const batch<T, Arch>& v) { return xsimd::isnan(v); }, [](T v) { return v != v; });
}

// Writes the indices of the k best values of x[0, n) to out[0, k), best first, in the order of
// ranks_before (NaN values last). Requires k <= n. Scratch: `values` and `indices`, n elements each.
template <class Arch, class T>
void top_k(Arch arch, const T* x, std::size_t n, std::size_t k, index_t* out, T* values, index_t* indices) noexcept {
  if (k == 0) return;
  // The max passes assume no NaN (a NaN lane can hide the maximum and match no element); a row
  // with NaN takes the partial sort, whose order puts NaN last.
  if (k <= kTopKPassLimit && !any_nan(arch, x, n)) {
    // k passes: vectorized max over a copy, then the first index holding it that is not taken,
    // found a vector at a time, then among that vector's lanes. Taken entries are set to -inf;
    // the explicit `taken` test keeps real -inf values correct. (The search and the NaN check were
    // scalar loops: one row, n = 256, k = 1–8, 0.39–0.60 of the time; n ≤ 64 0.62–1.08; bench/README,
    // "Session 41". One scan keeping a sorted list of the k best so far was slower at n = 32–64:
    // its early vectors hold several entrants each, a mispredicted branch apiece.)
    std::copy(x, x + n, values);
    using B = batch<T, Arch>;
    constexpr std::size_t L = B::size;
    for (std::size_t pass = 0; pass < k; ++pass) {
      const T best = max_value(arch, values, n);
      // The first vector holding `best` by a vector compare, then its lanes one by one.
      std::size_t from = 0;
      while (from + L <= n && !xsimd::any(B::load_unaligned(values + from) == B(best))) from += L;
      for (std::size_t i = from; i < n; ++i) {
        if (values[i] != best) continue;
        const bool taken = std::find(out, out + pass, static_cast<index_t>(i)) != out + pass;
        if (taken) continue;
        out[pass] = static_cast<index_t>(i);
        values[i] = -std::numeric_limits<T>::infinity();
        break;
      }
    }
    return;
  }
  for (std::size_t i = 0; i < n; ++i) indices[i] = static_cast<index_t>(i);
  std::partial_sort(indices, indices + k, indices + n,
                    [x](index_t a, index_t b) { return ranks_before(x[a], a, x[b], b); });
  std::copy(indices, indices + k, out);
}

// The sum of the k largest values of x[0, n), added largest first: the values of top_k's choices
// in their order, so the same sum, without the indices (a group score of group-limited routing
// needs none). Requires k <= n. Each pass takes the largest value below the last one, as many
// times as it occurs (up to k in all); NaN ranks after every number, as in top_k, so a row with
// fewer than k numbers sums a NaN.
template <class Arch, class T>
T sum_of_top(Arch arch, const T* x, std::size_t n, std::size_t k) noexcept {
  if (any_nan(arch, x, n)) {
    std::size_t numbers = 0;
    for (std::size_t i = 0; i < n; ++i) numbers += x[i] == x[i] ? 1 : 0;
    if (numbers < k) return std::numeric_limits<T>::quiet_NaN();
  }
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  const T lowest = -std::numeric_limits<T>::infinity();
  T sum(0), below = std::numeric_limits<T>::infinity();
  bool first = true;
  for (std::size_t taken = 0; taken < k;) {
    // The largest value below `below` (all of them on the first pass: +inf is a value too),
    // then how many elements hold it. NaN lanes fail every compare and count nowhere.
    const B vbelow(below);
    B vm(lowest);
    std::size_t i = 0;
    for (; i + L <= n; i += L) {
      const B v = B::load_unaligned(x + i);
      vm = xsimd::max(vm, xsimd::select(first ? v == v : v < vbelow, v, B(lowest)));
    }
    T m = reduce_max(vm);
    for (std::size_t j = i; j < n; ++j) m = (first ? x[j] == x[j] : x[j] < below) && x[j] > m ? x[j] : m;
    const B vmax(m);
    B vcount(T(0));
    for (i = 0; i + L <= n; i += L) vcount += xsimd::select(B::load_unaligned(x + i) == vmax, B(T(1)), B(T(0)));
    std::size_t count = static_cast<std::size_t>(reduce_add(vcount));
    for (std::size_t j = i; j < n; ++j) count += x[j] == m ? 1 : 0;
    for (std::size_t c = 0; c < count && taken < k; ++c, ++taken) sum += m;
    below = m;
    first = false;
  }
  return sum;
}

// The k indices top_k chooses, in ascending index order: the same set (ranks_before is a strict
// total order, so the k best are unique), for callers that do not need them ranked. Where k is
// at least n / kTopKPartitionShare it partitions (std::nth_element, O(n) on average) instead of
// ranking the k. Random rows, the two called in alternating order, medians with the ascending
// sort, n = 4,096: k = 1,024 252 → 84 µs, 256 81 → 48, 128 45 → 43; at k = 16–64 partitioning
// took 1.4–3.2× as long (the partial sort's heap rejects most values in one comparison); n = 128,
// k = 16–64: 0.44–0.75 of the time.
inline constexpr std::size_t kTopKPartitionShare = 32;
template <class Arch, class T>
void top_k_set(Arch arch, const T* x, std::size_t n, std::size_t k, index_t* out, T* values, index_t* indices) noexcept {
  if (k <= kTopKPassLimit || k * kTopKPartitionShare < n) {
    top_k(arch, x, n, k, out, values, indices);
  } else {
    for (std::size_t i = 0; i < n; ++i) indices[i] = static_cast<index_t>(i);
    if (k < n)
      std::nth_element(indices, indices + k, indices + n,
                       [x](index_t a, index_t b) { return ranks_before(x[a], a, x[b], b); });
    std::copy(indices, indices + k, out);
  }
  std::sort(out, out + k);
}

}  // namespace simd
MOE_NAMESPACE_END
