// What the benchmarks share: their fixed-seed weights and their wall-time measurements.
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace moe_bench {

// A 64-bit linear congruential generator (Knuth's MMIX constants): the same numbers on every
// machine and standard library, which std::uniform_real_distribution does not promise.
class Lcg {
 public:
  explicit Lcg(std::uint64_t seed) : state_(seed) {}

  // Uniform in [-1, 1), from the state's top 24 bits.
  float uniform() {
    state_ = state_ * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(state_ >> 40) / 8388608.0f - 1.0f;
  }

  // n values uniform in [-bound, bound).
  void fill(float* out, std::size_t n, float bound) {
    for (std::size_t i = 0; i < n; ++i) out[i] = bound * uniform();
  }

 private:
  std::uint64_t state_;
};

// A [out, in] weight initialized as nn.Linear does, U(-1/√in, 1/√in), row-major.
inline std::vector<float> linear_weight(Lcg& rng, std::ptrdiff_t out, std::ptrdiff_t in) {
  std::vector<float> w(static_cast<std::size_t>(out * in));
  rng.fill(w.data(), w.size(), 1.0f / std::sqrt(static_cast<float>(in)));
  return w;
}

// Wall time of one call of f (std::chrono::steady_clock, so that runs on 1 and 2 threads compare),
// in seconds; the compiler may not move f's stores past the clock.
template <class F>
double wall_seconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  benchmark::ClobberMemory();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace moe_bench
