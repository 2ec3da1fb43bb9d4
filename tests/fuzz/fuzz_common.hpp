#pragma once
// Shared by the libFuzzer targets in this directory: decoding shapes, options and values from the
// fuzzer's bytes, and the invariants every Routing plan must satisfy.
//
// Values come in two kinds. Moderate values are finite with |v| <= kModerate; for them every
// component must produce finite results and must not throw moe::numeric_error. Special values
// (NaN, ±Inf, ±1e30, FLT_MAX, denormals, ...) may make a component throw moe::numeric_error or
// return non-finite numbers, but never crash, read or write out of bounds, or break a plan's
// structure.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include <moe/core/types.hpp>
#include <moe/routing/context.hpp>
#include <moe/routing/routing.hpp>

namespace moe_fuzz {

using moe::index_t;

// A one-line description of the case being run, printed when an invariant fails.
inline std::string& case_description() {
  static std::string text;
  return text;
}

[[noreturn]] inline void fail(const char* file, int line, const char* what) {
  std::fprintf(stderr, "\ncase: %s\n%s:%d: fuzz invariant violated: %s\n", case_description().c_str(), file, line, what);
  std::fflush(stderr);
  __builtin_trap();
}

// Traps (a crash libFuzzer records, with the input that caused it) when the condition is false.
#define MOE_FUZZ_CHECK(...)                                                \
  do {                                                                     \
    if (!(__VA_ARGS__)) ::moe_fuzz::fail(__FILE__, __LINE__, #__VA_ARGS__); \
  } while (false)

inline std::size_t sz(index_t i) { return static_cast<std::size_t>(i); }

// The fuzzer's entry point: the input's first byte picks the scalar type of RUN<T>(fdp).
#define MOE_FUZZ_FLOAT_AND_DOUBLE(RUN)                                                \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { \
    FuzzedDataProvider fdp(data, size);                                               \
    if (fdp.ConsumeBool()) {                                                          \
      RUN<double>(fdp);                                                               \
    } else {                                                                          \
      RUN<float>(fdp);                                                                \
    }                                                                                 \
    return 0;                                                                         \
  }

// Largest magnitude of a "moderate" value.
inline constexpr double kModerate = 16.0;

template <class T>
bool is_moderate(T v) {
  return std::isfinite(v) && std::fabs(v) <= static_cast<T>(kModerate);
}

// Same value, or both NaN (bitwise sign/payload differences of NaN ignored).
template <class T>
bool same_value(T a, T b) {
  return (std::isnan(a) && std::isnan(b)) || (a == b && std::signbit(a) == std::signbit(b));
}

// SplitMix64: the values of a "random" fill come from a seed the fuzzer chooses, so a short input
// still reaches large, non-degenerate shapes.
struct Rng {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
};

// The special values, indexed by the low four bits of `which`.
template <class T>
T special_value(unsigned which) {
  using L = std::numeric_limits<T>;
  switch (which % 16u) {
    case 0: return L::quiet_NaN();
    case 1: return L::infinity();
    case 2: return -L::infinity();
    case 3: return static_cast<T>(1e30);
    case 4: return static_cast<T>(-1e30);
    case 5: return L::denorm_min();
    case 6: return -L::denorm_min();
    case 7: return L::min() / T(4);  // a denormal of T
    case 8: return L::max();
    case 9: return L::lowest();
    case 10: return L::min();
    case 11: return T(0);
    case 12: return -T(0);
    case 13: return static_cast<T>(1e15);
    case 14: return static_cast<T>(-1e-30);
    default: return static_cast<T>(88.75);  // just past expf's overflow threshold
  }
}

// One value from one byte: a multiple of 1/8 in [-16, 15.875] (ties are likely, on purpose), or
// with `special` a special value for the top 16 byte values.
template <class T>
T byte_value(std::uint8_t b, bool special) {
  if (special && b >= 0xF0) return special_value<T>(b);
  return static_cast<T>(static_cast<std::int8_t>(b)) / T(8);
}

// Fills v[0, n) in a way the fuzzer chooses; clears `moderate` if any value is not moderate.
template <class T>
void fill(FuzzedDataProvider& fdp, T* v, index_t n, bool special, bool& moderate) {
  const int mode = fdp.ConsumeIntegralInRange<int>(0, special ? 4 : 2);
  if (mode == 0) {  // explicit bytes (zeros once the input runs out)
    for (index_t i = 0; i < n; ++i) v[i] = byte_value<T>(fdp.ConsumeIntegral<std::uint8_t>(), special);
  } else if (mode == 1 || mode == 3) {  // seeded uniform [-a, a); mode 3 plants special values
    static const double amplitudes[] = {1.0 / 64, 1.0, 4.0, kModerate};
    const double a = amplitudes[fdp.ConsumeIntegralInRange<int>(0, 3)];
    Rng rng{fdp.ConsumeIntegral<std::uint64_t>()};
    for (index_t i = 0; i < n; ++i) v[i] = static_cast<T>(a * (2.0 * rng.uniform() - 1.0));
    if (mode == 3 && n > 0) {
      const int planted = fdp.ConsumeIntegralInRange<int>(1, 4);
      for (int p = 0; p < planted; ++p) {
        const auto at = fdp.ConsumeIntegralInRange<index_t>(0, n - 1);
        v[at] = special_value<T>(fdp.ConsumeIntegral<std::uint8_t>());
      }
    }
  } else if (mode == 2) {  // one value everywhere: every comparison is a tie
    const T c = byte_value<T>(fdp.ConsumeIntegral<std::uint8_t>(), special);
    for (index_t i = 0; i < n; ++i) v[i] = c;
  } else {  // seeded special values everywhere
    Rng rng{fdp.ConsumeIntegral<std::uint64_t>()};
    for (index_t i = 0; i < n; ++i) v[i] = special_value<T>(static_cast<unsigned>(rng.next()));
  }
  for (index_t i = 0; i < n; ++i) moderate = moderate && is_moderate(v[i]);
}

template <class T>
moe::Matrix<T> matrix(FuzzedDataProvider& fdp, index_t rows, index_t cols, bool special, bool& moderate) {
  moe::Matrix<T> m(rows, cols);
  fill(fdp, m.data(), rows * cols, special, moderate);
  return m;
}

// A double option from a palette the fuzzer indexes: mostly ordinary values, some extreme or invalid.
inline double pick(FuzzedDataProvider& fdp, std::initializer_list<double> palette) {
  const auto i = fdp.ConsumeIntegralInRange<std::size_t>(0, palette.size() - 1);
  return palette.begin()[i];
}

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
inline constexpr double kInf = std::numeric_limits<double>::infinity();
inline constexpr double kDenorm = std::numeric_limits<double>::denorm_min();

// A size in [lo, hi], usually at most lo + 8: small cases run many times faster under the
// sanitizers, and the large ones still come up.
inline index_t size_in(FuzzedDataProvider& fdp, index_t lo, index_t hi) {
  if (fdp.ConsumeIntegralInRange<int>(0, 3) != 0) return fdp.ConsumeIntegralInRange<index_t>(lo, std::min(hi, lo + 8));
  return fdp.ConsumeIntegralInRange<index_t>(lo, hi);
}

// An index in [lo, hi] most of the time; otherwise one just outside it (or -1).
inline index_t index_in(FuzzedDataProvider& fdp, index_t lo, index_t hi) {
  const auto b = fdp.ConsumeIntegral<std::uint8_t>();
  if (b < 0xF0 && hi >= lo) return lo + static_cast<index_t>(b) % (hi - lo + 1);
  switch (b % 3) {
    case 0: return lo - 1;
    case 1: return hi + 1;
    default: return -1;
  }
}

// Routing groups for a batch of T tokens: none, a valid partition of [0, T) (empty groups
// allowed), or, rarely, boundaries that do not partition it. `valid` is cleared for the last.
struct Groups {
  std::vector<index_t> boundaries;  // empty: no groups
  bool invalid = false;
  // The group boundaries the routing holds for a batch of T tokens: no groups, or {0} of an empty
  // batch, is the single group {0, T}.
  std::vector<index_t> bounds(index_t T) const {
    return boundaries.size() < 2 ? std::vector<index_t>{0, T} : boundaries;
  }
};

inline Groups groups(FuzzedDataProvider& fdp, index_t T) {
  Groups g;
  const int mode = fdp.ConsumeIntegralInRange<int>(0, 15);
  if (mode < 7) return g;  // no groups
  if (mode < 15) {
    const int count = fdp.ConsumeIntegralInRange<int>(1, 8);
    g.boundaries.push_back(0);
    for (int i = 1; i < count; ++i) g.boundaries.push_back(fdp.ConsumeIntegralInRange<index_t>(0, T));
    g.boundaries.push_back(T);
    std::sort(g.boundaries.begin() + 1, g.boundaries.end() - 1);
    return g;
  }
  // Invalid: a wrong start, a decrease, a wrong end, or a lone boundary.
  switch (fdp.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: g.boundaries = {1, T}; break;
    case 1: g.boundaries = {0, T + 1, T}; break;
    case 2: g.boundaries = {0, T + 1}; break;
    default: g.boundaries = {0}; break;
  }
  // {1, T} with T = 1 is a valid partition after all; {0} (no groups) only of an empty batch.
  const auto& b = g.boundaries;
  bool ok = (b.size() >= 2 && b.front() == 0 && b.back() == T) || (b.size() == 1 && b[0] == 0 && T == 0);
  for (std::size_t i = 1; i < b.size(); ++i) ok = ok && b[i - 1] <= b[i];
  g.invalid = !ok;
  return g;
}

// Token ids: none (null) or T int64 values (small, negative or extreme).
inline std::vector<std::int64_t> token_ids(FuzzedDataProvider& fdp, index_t T) {
  std::vector<std::int64_t> ids;
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) return ids;
  ids.resize(sz(T));
  const int mode = fdp.ConsumeIntegralInRange<int>(0, 2);
  Rng rng{fdp.ConsumeIntegral<std::uint64_t>()};
  for (auto& id : ids) {
    if (mode == 0) id = fdp.ConsumeIntegralInRange<std::int64_t>(-2, 40);
    else if (mode == 1) id = static_cast<std::int64_t>(rng.next() % 50);
    else id = static_cast<std::int64_t>(rng.next());
  }
  return ids;
}

// The ctx for `groups` and `ids` (both must outlive it). Not for invalid single-boundary groups
// built with with_groups: callers that want to reach that check call with_groups themselves.
inline moe::RouteContext context(const Groups& g, const std::vector<std::int64_t>& ids) {
  moe::RouteContext ctx;
  if (!g.boundaries.empty()) ctx = moe::RouteContext::with_groups(g.boundaries);
  ctx.token_ids = ids.empty() ? nullptr : ids.data();
  return ctx;
}

// The structure every plan must have (routing.hpp): both CSRs consistent with each other.
// `distinct`: a token appears at most once per expert (true for every router).
template <class T>
void check_plan(const moe::Routing<T>& p, index_t num_tokens, index_t num_experts, bool distinct = true) {
  MOE_FUZZ_CHECK(p.num_tokens == num_tokens);
  MOE_FUZZ_CHECK(p.num_experts == num_experts);
  const index_t A = p.num_assignments();
  MOE_FUZZ_CHECK(p.expert_begin.size() == sz(num_experts + 1));
  MOE_FUZZ_CHECK(p.weight.size() == sz(A));
  MOE_FUZZ_CHECK(p.assignment.size() == sz(A));
  MOE_FUZZ_CHECK(p.token_begin.size() == sz(num_tokens + 1));
  MOE_FUZZ_CHECK(p.expert_begin[0] == 0);
  MOE_FUZZ_CHECK(p.expert_begin[sz(num_experts)] == A);
  MOE_FUZZ_CHECK(p.token_begin[0] == 0);
  MOE_FUZZ_CHECK(p.token_begin[sz(num_tokens)] == A);
  for (index_t e = 0; e < num_experts; ++e) {
    MOE_FUZZ_CHECK(p.expert_begin[sz(e)] <= p.expert_begin[sz(e + 1)]);
    for (index_t a = p.expert_begin[sz(e)]; a < p.expert_begin[sz(e + 1)]; ++a) {
      const index_t t = p.token[sz(a)];
      MOE_FUZZ_CHECK(t >= 0 && t < num_tokens);
      if (a > p.expert_begin[sz(e)]) {
        const index_t prev = p.token[sz(a - 1)];
        MOE_FUZZ_CHECK(distinct ? prev < t : prev <= t);  // tokens ascending inside each expert
      }
      MOE_FUZZ_CHECK(p.expert_of_assignment(a) == e);
    }
  }
  // The token CSR is a permutation of the expert CSR, each token's entries pointing at its own rows.
  std::vector<char> seen(sz(A), 0);
  for (index_t t = 0; t < num_tokens; ++t) {
    MOE_FUZZ_CHECK(p.token_begin[sz(t)] <= p.token_begin[sz(t + 1)]);
    MOE_FUZZ_CHECK(p.experts_of(t) == p.token_begin[sz(t + 1)] - p.token_begin[sz(t)]);
    for (index_t j = p.token_begin[sz(t)]; j < p.token_begin[sz(t + 1)]; ++j) {
      const index_t a = p.assignment[sz(j)];
      MOE_FUZZ_CHECK(a >= 0 && a < A);
      MOE_FUZZ_CHECK(!seen[sz(a)]);
      seen[sz(a)] = 1;
      MOE_FUZZ_CHECK(p.token[sz(a)] == t);
    }
  }
  for (index_t e = 0; e < num_experts; ++e) MOE_FUZZ_CHECK(p.tokens_of(e) == p.expert_begin[sz(e + 1)] - p.expert_begin[sz(e)]);
  MOE_FUZZ_CHECK(p.dropped_weight.size() == p.dropped.size());
  for (std::size_t i = 0; i < p.dropped.size(); ++i) {
    MOE_FUZZ_CHECK(p.dropped[i] >= 0 && p.dropped[i] < num_tokens);
    MOE_FUZZ_CHECK(i == 0 || p.dropped[i - 1] < p.dropped[i]);
  }
  for (std::size_t i = 0; i < p.rerouted.size(); ++i) {
    MOE_FUZZ_CHECK(p.rerouted[i] >= 0 && p.rerouted[i] < num_tokens);
    MOE_FUZZ_CHECK(i == 0 || p.rerouted[i - 1] < p.rerouted[i]);
  }
}

// Token t's (expert, weight) pairs in the plan's rank order.
template <class T>
struct Choice {
  index_t expert;
  T weight;
};
template <class T>
std::vector<Choice<T>> choices_of(const moe::Routing<T>& p, index_t t) {
  std::vector<Choice<T>> out;
  for (index_t j = p.token_begin[sz(t)]; j < p.token_begin[sz(t + 1)]; ++j) {
    const index_t a = p.assignment[sz(j)];
    out.push_back({p.expert_of_assignment(a), p.weight[sz(a)]});
  }
  return out;
}

template <class M>
bool all_finite(const M& m) {
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j)
      if (!std::isfinite(m(i, j))) return false;
  return true;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index_t i = 0; i < a.rows(); ++i)
    for (index_t j = 0; j < a.cols(); ++j)
      if (!same_value(a(i, j), b(i, j))) return false;
  return true;
}

template <class T>
bool same_values(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same_value(a[i], b[i])) return false;
  return true;
}

// Two plans with the same content, bit for bit.
template <class T>
bool same_plan(const moe::Routing<T>& a, const moe::Routing<T>& b) {
  return a.num_tokens == b.num_tokens && a.num_experts == b.num_experts && a.expert_begin == b.expert_begin &&
         a.token == b.token && same_values(a.weight, b.weight) && a.token_begin == b.token_begin &&
         a.assignment == b.assignment && a.dropped == b.dropped && same_values(a.dropped_weight, b.dropped_weight) &&
         a.rerouted == b.rerouted;
}

}  // namespace moe_fuzz
