// One expert's forward, as the layer runs it for each expert, under this tree's headers (`moe`)
// and under a baseline's (`moe_base`), in one binary, the two called in turn within every
// iteration: each pair of calls sees the same moment of the machine. On the shared machines moe
// is measured on, a row's speed moves by 10–40% within minutes, so two binaries run one after the
// other (or even one binary's rows interleaved) compare moments as much as code.
//
// The baseline is the headers of the git revision in the CMake cache variable MOE_COMPARE_BASE
// (this tree's own when empty, as in CI's smoke run: an A/A run that shows the noise floor),
// renamed to namespace moe_base by bench/compare/base_headers.cmake. It must have this tree's
// expert interface (forward(arch, x, m, y, scratch)).
//   cmake --preset release -DMOE_COMPARE_BASE=HEAD && cmake --build --preset release --target compare_bench
//   OMP_PROC_BIND=true build/release/bench/compare_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
//   S/m/threads  S1 or S2's SwiGLU expert, or S3's ReLU FFN (the shapes of shapes_bench), on m
//                tokens; each call takes the next of the shape's E experts, whose weights together
//                far exceed the L3, so they come cold (the baseline's experts run E/2 behind)
// Counters: this_ms and base_ms per call, this/base (their sums' ratio), and max_diff, how far the
// two sides' outputs differ on one expert (0 when a change keeps the bits). After the runs the
// binary prints them as a table (medians over repetitions).
#include <benchmark/benchmark.h>

#include <moe/moe.hpp>
#include <moe_base/moe.hpp>

#include "bench_support.hpp"

#if defined(MOE_USE_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using index_t = moe::index_t;
using ConstMap = moe::ConstMatrixMap<float>;  // (Eigen's type: the baseline's alias names it too)
using Buffer = std::vector<float, moe::HugePageAllocator<float>>;

using moe_bench::kShapes;
using moe_bench::Shape;
const index_t kTokenCounts[] = {1, 2, 4, 8, 12, 16, 32, 64, 96, 128, 192, 512};
constexpr index_t kMaxTokens = 512;

// A shape's E experts' weights, nn.Linear's initialization, fixed seed; both sides view the same.
struct Weights {
  index_t per_expert;
  Buffer w;
  explicit Weights(const Shape& s) : per_expert(s.matrices() * s.d * s.ff) {
    w.resize(static_cast<std::size_t>(per_expert * s.E));
    moe_bench::Lcg rng(7);
    rng.fill(w.data(), w.size(), 1.0f / std::sqrt(static_cast<float>(s.d)));
  }
  const float* matrix(index_t expert, index_t which, const Shape& s) const {
    return w.data() + expert * per_expert + which * s.d * s.ff;
  }
};
const Weights& weights(int shape) {
  static std::map<int, Weights> all;
  auto it = all.find(shape);
  if (it == all.end()) it = all.emplace(shape, Weights(kShapes[shape])).first;
  return it->second;
}

// The shape's experts as Gated or Plain (one namespace's SwiGLU and ReLU FFN) views of `weights`.
template <class Expert>
std::vector<Expert> make_experts(int shape) {
  const Shape& s = kShapes[shape];
  const Weights& w = weights(shape);
  std::vector<Expert> experts;
  for (index_t e = 0; e < s.E; ++e) {
    if constexpr (std::is_constructible<Expert, ConstMap, ConstMap, ConstMap>::value) {
      experts.emplace_back(ConstMap(w.matrix(e, 0, s), s.ff, s.d), ConstMap(w.matrix(e, 1, s), s.ff, s.d),
                           ConstMap(w.matrix(e, 2, s), s.d, s.ff));
    } else {
      experts.emplace_back(ConstMap(w.matrix(e, 0, s), s.ff, s.d), ConstMap(w.matrix(e, 1, s), s.d, s.ff));
    }
  }
  return experts;
}

void set_threads(int threads) {
#if defined(MOE_USE_OPENMP)
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

// The shape's experts in one namespace's types (SwiGLU or ReLU FFN), built once.
template <int kShape, class Gated, class Plain>
const auto& experts() {
  using Expert = std::conditional_t<kShapes[kShape].gated, Gated, Plain>;
  static const std::vector<Expert> all = make_experts<Expert>(kShape);
  return all;
}

// Each iteration runs one expert of each side, in turn (which goes first alternates), and times
// each: the pair sees the same moment of the machine. The two sides take experts E/2 apart, so
// neither finds the other's weights in cache.
template <int kShape>
void BM_Pair(benchmark::State& state, index_t m, int threads) {
  const Shape& s = kShapes[kShape];
  set_threads(threads);
  const auto& mine = experts<kShape, moe::SwiGLU<float>, moe::FeedForward<float, moe::ReLU>>();
  const auto& base = experts<kShape, moe_base::SwiGLU<float>, moe_base::FeedForward<float, moe_base::ReLU>>();
  Buffer x(static_cast<std::size_t>(kMaxTokens * s.d)), y(x.size());
  moe_bench::Lcg(11).fill(x.data(), x.size(), 1.0f);
  // 64-byte aligned, as the layer's workspace is.
  Buffer scratch(static_cast<std::size_t>(std::max(mine.front().scratch_size(m), base.front().scratch_size(m))));
  // The two sides on the same expert first: their outputs should have the same bits unless the
  // change means to round otherwise (max_diff, relative to the output's largest magnitude).
  Buffer y_base(y.size());
  mine[0].forward(moe::simd::default_arch{}, x.data(), m, y.data(), scratch.data());
  base[0].forward(moe_base::simd::default_arch{}, x.data(), m, y_base.data(), scratch.data());
  double largest = 0, diff = 0;
  for (std::size_t i = 0; i < static_cast<std::size_t>(m * s.d); ++i) {
    largest = std::max(largest, std::fabs(static_cast<double>(y_base[i])));
    diff = std::max(diff, std::fabs(static_cast<double>(y[i]) - static_cast<double>(y_base[i])));
  }
  state.counters["max_diff"] = largest > 0 ? diff / largest : diff;
  const std::size_t E = mine.size();
  double mine_seconds = 0, base_seconds = 0;
  std::size_t e = 0;
  bool mine_first = true;
  for (auto _ : state) {
    const auto run_mine = [&] { mine[e].forward(moe::simd::default_arch{}, x.data(), m, y.data(), scratch.data()); };
    const auto run_base = [&] {
      base[(e + E / 2) % E].forward(moe_base::simd::default_arch{}, x.data(), m, y.data(), scratch.data());
    };
    double first = 0, second = 0;
    if (mine_first) {
      first = moe_bench::wall_seconds(run_mine), second = moe_bench::wall_seconds(run_base);
      mine_seconds += first, base_seconds += second;
    } else {
      first = moe_bench::wall_seconds(run_base), second = moe_bench::wall_seconds(run_mine);
      base_seconds += first, mine_seconds += second;
    }
    state.SetIterationTime(first + second);
    mine_first = !mine_first;
    e = (e + 1) % E;
  }
  const double calls = static_cast<double>(state.iterations());
  state.counters["this_ms"] = 1e3 * mine_seconds / calls;
  state.counters["base_ms"] = 1e3 * base_seconds / calls;
  state.counters["this/base"] = mine_seconds / base_seconds;
}

// Keeps each row's median (or single-run) counters by row name.
class Collector : public benchmark::ConsoleReporter {
 public:
  std::map<std::string, std::map<std::string, double>> rows;
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (!moe_bench::summary_run(r)) continue;
      auto& row = rows[r.run_name.function_name];
      for (const auto& [counter, value] : r.counters) row[counter] = value.value;
    }
  }
};

template <int kShape>
void register_shape(int max_threads) {
  for (const index_t m : kTokenCounts) {
    for (int threads = 1; threads <= max_threads; ++threads) {
      const std::string row = std::string(kShapes[kShape].name) + "/" + std::to_string(m) + "/" + std::to_string(threads);
      benchmark::RegisterBenchmark(row.c_str(), BM_Pair<kShape>, m, threads)->UseManualTime();
    }
  }
}

void print_summary(const Collector& collector) {
  std::printf("\nThis tree against the baseline (%s): ms per call, and this / base (medians)\n", MOE_COMPARE_BASE_NAME);
  std::printf("%-12s %10s %10s %10s %10s\n", "S/m/threads", "this", "base", "this/base", "max diff");
  for (const auto& [name, counters] : collector.rows) {
    std::printf("%-12s %10.4f %10.4f %10.3f %10.2g\n", name.c_str(), counters.at("this_ms"), counters.at("base_ms"),
                counters.at("this/base"), counters.at("max_diff"));
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const int max_threads = std::min(2, moe::max_threads());
  register_shape<0>(max_threads);
  register_shape<1>(max_threads);
  register_shape<2>(max_threads);
  Collector collector;
  if (benchmark::RunSpecifiedBenchmarks(&collector) == 0) {
    std::fprintf(stderr, "compare_bench: no row matched --benchmark_filter\n");
    return 1;
  }
  print_summary(collector);
  benchmark::Shutdown();
  return 0;
}
