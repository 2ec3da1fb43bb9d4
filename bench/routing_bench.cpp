// Every router at T ∈ {1, 128, 4096} tokens × E ∈ {8, 64, 256} experts, d = 1024, float.
//
//   BM_Route/<router>/T:/E:   router.route(x, ctx, out) with a warm RouterOutput / SoftRouting
//                             (logits, scores and the plan; for soft routing logits, D and C)
//
// Routers (weights U(-1/sqrt(d), 1/sqrt(d)), inputs U(-1, 1), fixed-seed LCG):
//   mixtral       TopKRouter, presets::mixtral(2): softmax over E, top-2, renormalized
//   deepseek_v3   TopKRouter, presets::deepseek_v3: sigmoid, selection-only bias (random, ±0.01),
//                 group-limited top-k (group score = top-2 sum), renormalized, × 2.5. The V3
//                 preset (k = 8, 8 groups, 4 kept) is valid for E = 64 and 256 and used there;
//                 at E = 8 one expert per group cannot hold a top-2 group score, so E = 8 uses
//                 k = 2 of 4 groups of 2, 2 groups kept
//   top_p         TopKRouter, dynamic top-p: softmax, experts in descending score until their
//                 cumulative score reaches p = 0.5, at most k_max = 8 (k_max = E when E < 8)
//                 (with these random weights the scores are near uniform: about 3.6 experts per
//                 token at E = 8, and k_max = 8 at E = 64 and 256; see assignments/token)
//   switch        TopKRouter, presets::switch_transformers(1.0): top-1, capacity
//                 ceil(1.0 · T / E) per batch (one routing group), earlier positions win
//   expert_choice ExpertChoiceRouter, capacity_factor 2 (two experts per token on average)
//   hash          HashRouter, random hash of the token id (k = 1, token ids 0..T-1)
//   soft          SoftRouter, plain, one slot per expert (Φ [d, E])
//
// Counters: time/token = CPU time of one route() / T (printed in ns or us, seconds in JSON);
// assignments/token of the plan. CPU time, not wall time: the benchmark is meant for one thread
// (OMP_NUM_THREADS=1), and CPU time is less disturbed on a shared machine.
// CI smoke run: routing_bench --benchmark_min_time=0.01
#include <benchmark/benchmark.h>

#include <moe/moe.hpp>

#include "bench_support.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using moe::index_t;
using Mat = moe::Matrix<float>;
using ConstMap = moe::ConstMatrixMap<float>;

constexpr index_t kD = 1024;
constexpr index_t kMaxTokens = 4096;
constexpr index_t kMaxExperts = 256;

struct Data {
  Mat x;                          // [kMaxTokens, d] router input
  Mat gate;                       // [kMaxExperts, d] router weight, PyTorch layout (first E rows used)
  Mat phi;                        // [d, kMaxExperts] soft slot parameters (first E columns used)
  moe::Vector<float> bias;        // [kMaxExperts] selection-only bias
  std::vector<std::int64_t> ids;  // [kMaxTokens] token ids
};

const Data& data() {
  static const Data d = [] {
    moe_bench::Lcg rng(4096);
    const float bound = 1.0f / std::sqrt(static_cast<float>(kD));
    Data out;
    out.x.resize(kMaxTokens, kD);
    rng.fill(out.x.data(), static_cast<std::size_t>(out.x.size()), 1.0f);
    out.gate.resize(kMaxExperts, kD);
    rng.fill(out.gate.data(), static_cast<std::size_t>(out.gate.size()), bound);
    out.phi.resize(kD, kMaxExperts);
    rng.fill(out.phi.data(), static_cast<std::size_t>(out.phi.size()), bound);
    out.bias.resize(kMaxExperts);
    rng.fill(out.bias.data(), static_cast<std::size_t>(kMaxExperts), 0.01f);
    for (index_t t = 0; t < kMaxTokens; ++t) out.ids.push_back(t);
    return out;
  }();
  return d;
}

ConstMap gate(index_t E) { return ConstMap(data().gate.data(), E, kD); }

moe::TopKOptions deepseek_options(index_t E) {
  return E >= 64 ? moe::presets::deepseek_v3(8, 8, 4, 2.5) : moe::presets::deepseek_v3(2, 4, 2, 2.5);
}

moe::TopKOptions top_p_options(index_t E) {
  moe::TopKOptions o;
  o.k = E < 8 ? E : 8;
  o.top_p = 0.5;
  return o;
}

void set_counters(benchmark::State& state, index_t tokens) {
  // kIsIterationInvariantRate | kInvert: CPU time / (iterations · T), seconds per token; the
  // console prints it with an SI prefix ("412ns", "1.65us"), the JSON output in seconds.
  state.counters["time/token"] = benchmark::Counter(static_cast<double>(tokens),
                                                    benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// Any router that fills a RouterOutput.
template <class Router>
void run_sparse(benchmark::State& state, const Router& router) {
  const index_t T = state.range(0);
  const moe::ConstMatrixRef<float> x = data().x.topRows(T);  // [T, d], a view
  moe::RouteContext ctx;
  ctx.token_ids = data().ids.data();
  moe::RouterOutput<float> out;
  router.route(x, ctx, out);  // warm: later routes allocate nothing
  for (auto _ : state) {
    router.route(x, ctx, out);
    benchmark::DoNotOptimize(out.plan.weight.data());
    benchmark::ClobberMemory();
  }
  state.counters["assignments/token"] = static_cast<double>(out.plan.num_assignments()) / static_cast<double>(T);
  set_counters(state, T);
}

void BM_Mixtral(benchmark::State& state) {
  run_sparse(state, moe::TopKRouter<float>(gate(state.range(1)), moe::presets::mixtral(2)));
}

void BM_DeepSeekV3(benchmark::State& state) {
  const index_t E = state.range(1);
  moe::TopKRouter<float> router(gate(E), deepseek_options(E));
  router.set_selection_bias(data().bias.head(E));
  run_sparse(state, router);
}

void BM_TopP(benchmark::State& state) {
  const index_t E = state.range(1);
  run_sparse(state, moe::TopKRouter<float>(gate(E), top_p_options(E)));
}

void BM_Switch(benchmark::State& state) {
  run_sparse(state, moe::TopKRouter<float>(gate(state.range(1)), moe::presets::switch_transformers(1.0)));
}

void BM_ExpertChoice(benchmark::State& state) {
  moe::ExpertChoiceOptions o;
  o.capacity_factor = 2.0;
  run_sparse(state, moe::ExpertChoiceRouter<float>(gate(state.range(1)), o));
}

void BM_Hash(benchmark::State& state) {
  moe::HashOptions o;
  o.k = 1;
  run_sparse(state, moe::HashRouter<float>(state.range(1), kD, o));
}

void BM_Soft(benchmark::State& state) {
  const index_t T = state.range(0), E = state.range(1);
  const moe::Matrix<float> phi = data().phi.leftCols(E);  // [d, E], one slot per expert
  moe::SoftRouter<float> router(phi, E);
  const moe::ConstMatrixRef<float> x = data().x.topRows(T);  // [T, d], a view
  moe::SoftRouting<float> out;
  router.route(x, out);  // warm
  for (auto _ : state) {
    router.route(x, out);
    benchmark::DoNotOptimize(out.combine_weights().data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (const index_t T : {1, 128, 4096})
    for (const index_t E : {8, 64, 256}) b->Args({T, E});
  b->ArgNames({"T", "E"})->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(BM_Mixtral)->Name("BM_Route/mixtral")->Apply(shapes);
BENCHMARK(BM_DeepSeekV3)->Name("BM_Route/deepseek_v3")->Apply(shapes);
BENCHMARK(BM_TopP)->Name("BM_Route/top_p")->Apply(shapes);
BENCHMARK(BM_Switch)->Name("BM_Route/switch")->Apply(shapes);
BENCHMARK(BM_ExpertChoice)->Name("BM_Route/expert_choice")->Apply(shapes);
BENCHMARK(BM_Hash)->Name("BM_Route/hash")->Apply(shapes);
BENCHMARK(BM_Soft)->Name("BM_Route/soft")->Apply(shapes);

BENCHMARK_MAIN();
