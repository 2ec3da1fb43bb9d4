// The MoE layer at the Mixtral shape (d = 1024, d_ff = 3584, E = 8, top-2, SwiGLU experts).
//
//   BM_MoELayer/T          moe::MoELayer::forward with a warm Workspace
//   BM_NaiveEigen/T        the per-expert Eigen loop a user would write by hand, on the same
//                          weights and the same input (checked to agree with the layer)
//   BM_ExpertKernel/moe/m  one SwiGLU expert on m tokens as the layer runs it: SwiGLU::forward,
//                          i.e. moe's blocked kernels (simd::gated_matmul_nt, then simd::matmul_nt)
//   BM_ExpertKernel/eigen/m  the same expert through Eigen's GEMM (noalias products into buffers)
// The BM_ExpertKernel pair shows, per expert token count m, what moe's own kernels (which keep a
// token's bits independent of m) cost or gain against Eigen's packed GEMM.
//
// Counters: tokens/s; GFLOP/s counts the expert matmuls actually done (2·3·d·d_ff per
// token-expert assignment) plus the router (2·d·E per token); weight GB/s (expert kernels) is
// the expert's 3·d·d_ff weights over the time of one call.
// Threads: linked with moe::openmp, both moe and Eigen use OMP_NUM_THREADS threads.
// CI smoke run: layer_bench --benchmark_min_time=0.01
#include <benchmark/benchmark.h>

#include <moe/moe.hpp>

#include "bench_support.hpp"

#include <algorithm>
#include <cstddef>
#include <map>
#include <string>
#include <vector>

namespace {

using moe::index_t;
using Mat = moe::Matrix<float>;
using ConstMap = moe::ConstMatrixMap<float>;
using Arch = moe::simd::default_arch;
using Layer = moe::MoELayer<moe::TopKRouter<float>, moe::SwiGLU<float>>;

constexpr index_t kD = 1024;
constexpr index_t kFF = 3584;
constexpr index_t kE = 8;
constexpr index_t kTopK = 2;
constexpr index_t kMaxTokens = 2048;

// The model's weights in plain buffers, PyTorch layout, nn.Linear init U(-1/sqrt(in), 1/sqrt(in))
// from a fixed-seed LCG; and an input batch of kMaxTokens rows (each benchmark uses the first T).
struct Weights {
  std::vector<float> gate;                 // [E, d]
  std::vector<std::vector<float>> w1;      // E × [d_ff, d] gate_proj
  std::vector<std::vector<float>> w3;      // E × [d_ff, d] up_proj
  std::vector<std::vector<float>> w2;      // E × [d, d_ff] down_proj
  Mat x;                                   // [kMaxTokens, d]

  ConstMap gate_map() const { return ConstMap(gate.data(), kE, kD); }
  ConstMap w1_map(index_t e) const { return ConstMap(w1[static_cast<std::size_t>(e)].data(), kFF, kD); }
  ConstMap w3_map(index_t e) const { return ConstMap(w3[static_cast<std::size_t>(e)].data(), kFF, kD); }
  ConstMap w2_map(index_t e) const { return ConstMap(w2[static_cast<std::size_t>(e)].data(), kD, kFF); }
};

Weights make_weights() {
  moe_bench::Lcg rng(2024);
  Weights w;
  w.gate = moe_bench::linear_weight(rng, kE, kD);
  for (index_t e = 0; e < kE; ++e) {
    w.w1.push_back(moe_bench::linear_weight(rng, kFF, kD));
    w.w3.push_back(moe_bench::linear_weight(rng, kFF, kD));
    w.w2.push_back(moe_bench::linear_weight(rng, kD, kFF));
  }
  w.x.resize(kMaxTokens, kD);
  rng.fill(w.x.data(), static_cast<std::size_t>(w.x.size()), 1.0f);
  return w;
}

const Weights& weights() {
  static const Weights w = make_weights();
  return w;
}

// The library's layer: views on the same buffers (no copy).
const Layer& layer() {
  static const Layer l = [] {
    const Weights& w = weights();
    moe::TopKOptions options;
    options.k = kTopK;
    options.score = moe::ScoreFunction::softmax;
    options.normalize = true;
    std::vector<moe::SwiGLU<float>> experts;
    for (index_t e = 0; e < kE; ++e) experts.emplace_back(w.w1_map(e), w.w3_map(e), w.w2_map(e));
    return Layer(moe::TopKRouter<float>(w.gate_map(), options), std::move(experts));
  }();
  return l;
}

// The loop a user would write with Eigen, the obvious way: router logits, softmax, top-2 with
// renormalization, then expert by expert gather its tokens, three matmuls with SiLU, and add the
// weighted rows back.
void naive_forward(const Weights& w, const moe::ConstMatrixRef<float>& x, Mat& y) {
  const index_t T = x.rows();
  const Mat logits = x * w.gate_map().transpose();  // [T, E]

  std::vector<std::vector<index_t>> expert_tokens(static_cast<std::size_t>(kE));
  std::vector<std::vector<float>> expert_weights(static_cast<std::size_t>(kE));
  for (index_t t = 0; t < T; ++t) {
    Eigen::RowVectorXf p = (logits.row(t).array() - logits.row(t).maxCoeff()).exp();  // [E]
    p /= p.sum();
    index_t first = 0;
    p.maxCoeff(&first);  // the first maximum: ties go to the lower expert
    index_t second = first == 0 ? 1 : 0;
    for (index_t e = 0; e < kE; ++e) {
      if (e != first && p[e] > p[second]) second = e;
    }
    const float sum = p[first] + p[second];
    for (const index_t e : {first, second}) {
      expert_tokens[static_cast<std::size_t>(e)].push_back(t);
      expert_weights[static_cast<std::size_t>(e)].push_back(p[e] / sum);
    }
  }

  y.setZero();
  for (index_t e = 0; e < kE; ++e) {
    const std::vector<index_t>& tokens = expert_tokens[static_cast<std::size_t>(e)];
    const std::vector<float>& gates = expert_weights[static_cast<std::size_t>(e)];
    const auto n = static_cast<index_t>(tokens.size());
    if (n == 0) continue;
    Mat xe(n, kD);  // [n, d]
    for (index_t i = 0; i < n; ++i) xe.row(i) = x.row(tokens[static_cast<std::size_t>(i)]);
    const Mat g = xe * w.w1_map(e).transpose();                                           // [n, d_ff]
    const Mat u = xe * w.w3_map(e).transpose();                                           // [n, d_ff]
    const Mat h = (g.array() / (1.0f + (-g.array()).exp()) * u.array()).matrix();         // [n, d_ff]
    const Mat ye = h * w.w2_map(e).transpose();                                           // [n, d]
    for (index_t i = 0; i < n; ++i) {
      const auto si = static_cast<std::size_t>(i);
      y.row(tokens[si]) += gates[si] * ye.row(i);
    }
  }
}

// Largest |a - b| relative to the largest |b|, per row; returns how many rows exceed `tol`.
index_t rows_differing(const Mat& a, const Mat& b, float tol) {
  const float scale = std::max(b.cwiseAbs().maxCoeff(), 1e-30f);
  index_t count = 0;
  for (index_t r = 0; r < a.rows(); ++r) {
    if ((a.row(r) - b.row(r)).cwiseAbs().maxCoeff() > tol * scale) ++count;
  }
  return count;
}

void set_counters(benchmark::State& state, index_t tokens, index_t assignments, bool router) {
  const double flops = 2.0 * 3.0 * static_cast<double>(kD * kFF) * static_cast<double>(assignments) +
                       (router ? 2.0 * static_cast<double>(kD * kE) * static_cast<double>(tokens) : 0.0);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(1e-9 * flops, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_MoELayer(benchmark::State& state) {
  const index_t T = state.range(0);
  const moe::ConstMatrixRef<float> x = weights().x.topRows(T);  // [T, d], a view
  Mat y(T, kD);                                                  // [T, d]
  moe::Workspace<float> ws;
  layer().forward(x, y, ws);  // warm the workspace: later forwards allocate nothing
  for (auto _ : state) {
    layer().forward(x, y, ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, ws.routing.plan.num_assignments(), true);
}

void BM_NaiveEigen(benchmark::State& state) {
  const index_t T = state.range(0);
  const moe::ConstMatrixRef<float> x = weights().x.topRows(T);  // [T, d], a view
  Mat y(T, kD);                                                  // [T, d]

  // Once per T: the two implementations must agree, or the comparison means nothing. A token
  // whose 2nd and 3rd probabilities tie to rounding may pick a different expert, so allow 1%.
  static std::map<index_t, index_t> checked;  // T -> rows that differ
  if (checked.count(T) == 0) {
    moe::Workspace<float> ws;
    const Mat expected = layer().forward(x, ws);  // [T, d]
    naive_forward(weights(), x, y);
    checked[T] = rows_differing(y, expected, 1e-4f);
  }
  if (checked[T] * 100 > T) {
    state.SkipWithError(("naive and layer outputs differ on " + std::to_string(checked[T]) + " rows").c_str());
    return;
  }

  for (auto _ : state) {
    naive_forward(weights(), x, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, kTopK * T, true);
}

void expert_counters(benchmark::State& state, index_t m) {
  set_counters(state, m, m, false);
  const double weight_bytes = 3.0 * static_cast<double>(kD * kFF * static_cast<index_t>(sizeof(float)));
  state.counters["weight GB/s"] = benchmark::Counter(1e-9 * weight_bytes, benchmark::Counter::kIsIterationInvariantRate);
}

// One SwiGLU expert (expert 0) on m tokens, exactly as the layer runs it.
void BM_ExpertMoe(benchmark::State& state) {
  const index_t m = state.range(0);
  const moe::SwiGLU<float>& expert = layer().experts()[0];
  Mat y(m, kD);  // [m, d]
  std::vector<float> scratch(static_cast<std::size_t>(expert.scratch_size(m)));
  for (auto _ : state) {
    expert.forward(Arch{}, weights().x.data(), m, y.data(), scratch.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  expert_counters(state, m);
}

// The same expert through Eigen's GEMM (GEMV at m = 1), the activation by moe's SIMD kernel.
void BM_ExpertEigen(benchmark::State& state) {
  const index_t m = state.range(0);
  const Weights& w = weights();
  const ConstMap x(w.x.data(), m, kD);       // [m, d]
  Mat hidden(m, kFF), up(m, kFF), y(m, kD);  // [m, d_ff], [m, d_ff], [m, d]
  auto run = [&] {
    hidden.noalias() = x * w.w1_map(0).transpose();
    up.noalias() = x * w.w3_map(0).transpose();
    moe::simd::gated_activate<moe::SiLU>(Arch{}, hidden.data(), up.data(), static_cast<std::size_t>(m * kFF));
    y.noalias() = hidden * w.w2_map(0).transpose();
  };

  // Once per m: both paths must compute the same expert.
  static std::map<index_t, index_t> checked;  // m -> rows that differ
  if (checked.count(m) == 0) {
    const moe::SwiGLU<float>& expert = layer().experts()[0];
    Mat expected(m, kD);  // [m, d]
    std::vector<float> scratch(static_cast<std::size_t>(expert.scratch_size(m)));
    expert.forward(Arch{}, w.x.data(), m, expected.data(), scratch.data());
    run();
    checked[m] = rows_differing(y, expected, 1e-4f);
  }
  if (checked[m] > 0) {
    state.SkipWithError(("Eigen and moe expert outputs differ on " + std::to_string(checked[m]) + " rows").c_str());
    return;
  }

  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  expert_counters(state, m);
}

void layer_args(benchmark::internal::Benchmark* b) {
  for (const index_t T : {1, 16, 128, 512, 2048}) b->Arg(T);
  b->ArgName("T")->Unit(benchmark::kMicrosecond)->UseRealTime();
}

// Tokens per expert: 1 (decode) to 64, then 128 and 512 (what an expert gets at T = 512 and
// T = 2048 with top-2 of 8).
void expert_args(benchmark::internal::Benchmark* b) {
  for (const index_t m : {1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 512}) b->Arg(m);
  b->ArgName("m")->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_MoELayer)->Apply(layer_args);
BENCHMARK(BM_NaiveEigen)->Apply(layer_args);

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("BM_ExpertKernel/moe", BM_ExpertMoe)->Apply(expert_args);
  benchmark::RegisterBenchmark("BM_ExpertKernel/eigen", BM_ExpertEigen)->Apply(expert_args);
  benchmark::AddCustomContext("moe::max_threads", std::to_string(moe::max_threads()));
  benchmark::AddCustomContext("Eigen::nbThreads", std::to_string(Eigen::nbThreads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
