// Backward time against forward time for the MoE layer at the layer benchmark's shapes
// (bench/layer_bench.cpp: Mixtral, d = 1024, d_ff = 3584, E = 8, top-2 renormalized, SwiGLU
// experts, T ∈ {1, 16, 128, 512, 2048}), float.
//
//   BM_TrainStep/T   each iteration times, separately, on the same input and warm workspaces:
//                      forward        MoELayer::forward (inference)
//                      forward_train  MoELayer::forward_train (keeps what backward needs)
//                      backward       MoELayer::backward (dx, router and every expert's gradients)
//                      accumulate     MoELayer::backward_accumulate on the same batch (adds to the
//                                     gradients; experts without tokens untouched)
//                    The benchmark's own time is the backward time (manual timing).
//   BM_MakeGradients  layer.make_gradients(): a zero gradient for every weight (O(parameters),
//                    independent of T); a training loop builds it once (backward only zeroes it)
// Counters (per call, means over the iterations): forward_ms, forward_train_ms, backward_ms,
// accumulate_ms, and the ratios bwd/fwd = backward / forward, bwd/fwd_train = backward /
// forward_train and acc/bwd = accumulate / backward.
// Times are wall time (std::chrono::steady_clock), so that runs on 1 and 2 threads
// (OMP_NUM_THREADS) compare: backward gives whole experts to the threads.
// CI smoke run: backward_bench --benchmark_min_time=0.01
#include <benchmark/benchmark.h>

#include <moe/moe.hpp>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using moe::index_t;
using Mat = moe::Matrix<float>;
using ConstMap = moe::ConstMatrixMap<float>;
using Layer = moe::MoELayer<moe::TopKRouter<float>, moe::SwiGLU<float>>;

constexpr index_t kD = 1024;
constexpr index_t kFF = 3584;
constexpr index_t kE = 8;
constexpr index_t kMaxTokens = 2048;

struct Weights {
  std::vector<float> gate;             // [E, d]
  std::vector<std::vector<float>> w1;  // E × [d_ff, d] gate_proj
  std::vector<std::vector<float>> w3;  // E × [d_ff, d] up_proj
  std::vector<std::vector<float>> w2;  // E × [d, d_ff] down_proj
  Mat x;                               // [kMaxTokens, d]
  Mat dy;                              // [kMaxTokens, d] upstream gradient
};

// nn.Linear init U(-1/sqrt(in), 1/sqrt(in)) from a fixed-seed LCG, as in layer_bench.
const Weights& weights() {
  static const Weights w = [] {
    std::uint64_t state = 2024;
    auto uniform = [&state] {  // [-1, 1)
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      return static_cast<float>(state >> 40) / 8388608.0f - 1.0f;
    };
    auto linear = [&uniform](index_t out, index_t in) {
      std::vector<float> v(static_cast<std::size_t>(out * in));
      const float bound = 1.0f / std::sqrt(static_cast<float>(in));
      for (float& e : v) e = bound * uniform();
      return v;
    };
    Weights out;
    out.gate = linear(kE, kD);
    for (index_t e = 0; e < kE; ++e) {
      out.w1.push_back(linear(kFF, kD));
      out.w3.push_back(linear(kFF, kD));
      out.w2.push_back(linear(kD, kFF));
    }
    out.x.resize(kMaxTokens, kD);
    for (index_t i = 0; i < out.x.size(); ++i) out.x.data()[i] = uniform();
    out.dy.resize(kMaxTokens, kD);
    for (index_t i = 0; i < out.dy.size(); ++i) out.dy.data()[i] = uniform();
    return out;
  }();
  return w;
}

const Layer& layer() {
  static const Layer l = [] {
    const Weights& w = weights();
    std::vector<moe::SwiGLU<float>> experts;
    for (std::size_t e = 0; e < static_cast<std::size_t>(kE); ++e) {
      experts.emplace_back(ConstMap(w.w1[e].data(), kFF, kD), ConstMap(w.w3[e].data(), kFF, kD), ConstMap(w.w2[e].data(), kD, kFF));
    }
    return Layer(moe::TopKRouter<float>(ConstMap(w.gate.data(), kE, kD), moe::presets::mixtral(2)), std::move(experts));
  }();
  return l;
}

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void BM_TrainStep(benchmark::State& state) {
  const index_t T = state.range(0);
  const moe::ConstMatrixRef<float> x = weights().x.topRows(T);    // [T, d], a view
  const moe::ConstMatrixRef<float> dy = weights().dy.topRows(T);  // [T, d]
  Mat y(T, kD), dx(T, kD);                                         // [T, d]
  moe::Workspace<float> ws;
  moe::TrainingWorkspace<float> train;
  Layer::Gradients grads = layer().make_gradients();
  const moe::RouteContext ctx;
  // Warm every workspace.
  layer().forward(x, y, ws);
  layer().forward_train(x, ctx, y, train);
  layer().backward(x, dy, dx, grads, train);

  double forward = 0, forward_train = 0, backward = 0, accumulate = 0;
  for (auto _ : state) {
    const double t0 = seconds();
    layer().forward(x, y, ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    const double t1 = seconds();
    layer().forward_train(x, ctx, y, train);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    const double t2 = seconds();
    layer().backward(x, dy, dx, grads, train);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
    const double t3 = seconds();
    layer().backward_accumulate(x, dy, dx, grads, train);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
    const double t4 = seconds();
    forward += t1 - t0;
    forward_train += t2 - t1;
    backward += t3 - t2;
    accumulate += t4 - t3;
    state.SetIterationTime(t3 - t2);
  }
  const auto n = static_cast<double>(state.iterations());
  state.counters["forward_ms"] = 1e3 * forward / n;
  state.counters["forward_train_ms"] = 1e3 * forward_train / n;
  state.counters["backward_ms"] = 1e3 * backward / n;
  state.counters["bwd/fwd"] = backward / forward;
  state.counters["bwd/fwd_train"] = backward / forward_train;
  state.counters["accumulate_ms"] = 1e3 * accumulate / n;
  state.counters["acc/bwd"] = accumulate / backward;
}

// What backward spends on its gradient buffers alone at this shape, whatever T: a zero Gradients
// set (every expert's weights, 3·d·d_ff values each, plus the router's [E, d]) built by
// make_gradients() (which a training loop calls once, not per step).
void BM_MakeGradients(benchmark::State& state) {
  for (auto _ : state) {
    Layer::Gradients g = layer().make_gradients();
    benchmark::DoNotOptimize(g.router.data());
    benchmark::ClobberMemory();
  }
}

}  // namespace

BENCHMARK(BM_MakeGradients)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TrainStep)->Arg(1)->Arg(16)->Arg(128)->Arg(512)->Arg(2048)->ArgName("T")->UseManualTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
