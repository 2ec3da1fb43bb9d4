// Denormal inputs against normal inputs, on the same kernels and the same weights.
//
//   BM_DenormalExpert/m   one SwiGLU expert (d = 512, d_ff = 1024) on m tokens, SwiGLU::forward
//   BM_DenormalLayer/T    MoELayer::forward (top-2 of 8 SwiGLU experts, d = 512, d_ff = 1024)
//
// Each iteration runs the kernel once on normal inputs (uniform in [-1, 1]) and once on denormal
// inputs (uniform magnitudes in [1e-39, 1e-38], below FLT_MIN = 1.2e-38, random signs), timing
// each. Counters: normal_us and denormal_us per call, and ratio = denormal / normal. The issue's
// bound is ratio <= 2 (x86 pays its denormal penalty per instruction that reads or writes one;
// the products of a denormal input with the weights are denormal or zero).
// CI smoke run: numerics_bench --benchmark_min_time=0.01
#include <benchmark/benchmark.h>

#include <moe/moe.hpp>

#include "bench_support.hpp"

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using moe::index_t;
using Mat = moe::Matrix<float>;
using Arch = moe::simd::default_arch;

constexpr index_t kD = 512, kFF = 1024, kE = 8;

Mat uniform(index_t rows, index_t cols, std::uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  Mat m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
  return m;
}

// Magnitudes in [1e-39, 1e-38]: every element is a float denormal.
Mat denormal(index_t rows, index_t cols, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(1e-39f, 1e-38f);
  std::bernoulli_distribution sign(0.5);
  Mat m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = sign(rng) ? u(rng) : -u(rng);
  return m;
}

moe::SwiGLU<float> expert(std::uint32_t seed) {
  return moe::SwiGLU<float>(uniform(kFF, kD, seed, 0.05f), uniform(kFF, kD, seed + 1, 0.05f), uniform(kD, kFF, seed + 2, 0.05f));
}

void report(benchmark::State& state, double normal, double slow) {
  const auto n = static_cast<double>(state.iterations());
  state.counters["normal_us"] = 1e6 * normal / n;
  state.counters["denormal_us"] = 1e6 * slow / n;
  state.counters["ratio"] = slow / normal;
}

void BM_DenormalExpert(benchmark::State& state) {
  const index_t m = state.range(0);
  const moe::SwiGLU<float> e = expert(1);
  const Mat x_normal = uniform(m, kD, 2, 1.0f), x_denormal = denormal(m, kD, 3);
  Mat y(m, kD);
  std::vector<float> scratch(static_cast<std::size_t>(e.scratch_size(m)));
  double normal = 0, slow = 0;
  for (auto _ : state) {
    normal += moe_bench::wall_seconds([&] { e.forward(Arch{}, x_normal.data(), m, y.data(), scratch.data()); });
    benchmark::DoNotOptimize(y.data());
    slow += moe_bench::wall_seconds([&] { e.forward(Arch{}, x_denormal.data(), m, y.data(), scratch.data()); });
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  report(state, normal, slow);
}
BENCHMARK(BM_DenormalExpert)->Arg(1)->Arg(16)->Arg(128)->Unit(benchmark::kMicrosecond);

void BM_DenormalLayer(benchmark::State& state) {
  const index_t T = state.range(0);
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t i = 0; i < kE; ++i) experts.push_back(expert(10 + 3 * static_cast<std::uint32_t>(i)));
  const moe::MoELayer layer(moe::TopKRouter<float>(uniform(kE, kD, 4, 0.05f), moe::presets::mixtral(2)), experts);
  const Mat x_normal = uniform(T, kD, 5, 1.0f), x_denormal = denormal(T, kD, 6);
  Mat y(T, kD);
  moe::Workspace<float> ws;
  layer.forward(x_normal, y, ws);  // warm the workspace
  double normal = 0, slow = 0;
  for (auto _ : state) {
    normal += moe_bench::wall_seconds([&] { layer.forward(x_normal, y, ws); });
    benchmark::DoNotOptimize(y.data());
    slow += moe_bench::wall_seconds([&] { layer.forward(x_denormal, y, ws); });
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  report(state, normal, slow);
}
BENCHMARK(BM_DenormalLayer)->Arg(16)->Arg(128)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
