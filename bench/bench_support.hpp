// What the benchmarks share: their fixed-seed weights, wall-time measurements, issue 6's model
// shapes, and which runs a summary reads.
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

// Issue 6's model shapes, measured by shapes_bench (the layer) and compare_bench (one expert).
struct Shape {
  const char* name;
  std::ptrdiff_t d, ff, E, k;
  bool gated;  // SwiGLU (3 matrices) or ReLU FFN (2)
  constexpr std::ptrdiff_t matrices() const { return gated ? 3 : 2; }
  constexpr double expert_params() const { return static_cast<double>(matrices() * d * ff); }
};
inline constexpr Shape kShapes[] = {
    {"S1", 1024, 3584, 8, 2, true}, {"S2", 1024, 512, 64, 6, true}, {"S3", 768, 3072, 32, 1, false}};

// Whether a summary reads this run: a row's median over repetitions, or its only run (not one
// that failed).
inline bool summary_run(const benchmark::BenchmarkReporter::Run& r) {
  if (r.error_occurred) return false;
  using Run = benchmark::BenchmarkReporter::Run;
  return (r.run_type == Run::RT_Iteration && r.repetitions <= 1) ||
         (r.run_type == Run::RT_Aggregate && r.aggregate_name == "median");
}

}  // namespace moe_bench
