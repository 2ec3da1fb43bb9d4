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
//   BM_DxProduct/m, BM_WeightGradient/m   one product of an expert's backward on m tokens, moe's
//                    kernel and Eigen's GEMM on the same operands, called in turn in each
//                    iteration (the order alternating), the operands warm:
//                      dx [m, d] = d_gate [m, d_ff] · W_gate [d_ff, d]       simd::matmul_nn
//                      dW_gate [d_ff, d] = d_gateᵀ · x [m, d]               simd::matmul_tn, d_gate packed
//                    The benchmark's time is moe's; counters moe_GFLOP/s, eigen_GFLOP/s and
//                    moe/eigen (time ratio, below 1 where moe is faster).
// Counters (per call, means over the iterations): forward_ms, forward_train_ms, backward_ms,
// accumulate_ms, and the ratios bwd/fwd = backward / forward, bwd/fwd_train = backward /
// forward_train and acc/bwd = accumulate / backward.
// Times are wall time (std::chrono::steady_clock), so that runs on 1 and 2 threads
// (OMP_NUM_THREADS) compare: backward gives whole experts to the threads.
// CI smoke run: backward_bench --benchmark_min_time=0.01
#include <benchmark/benchmark.h>

#include <moe/moe.hpp>

#include "bench_support.hpp"

#include <cstddef>
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

// nn.Linear init U(-1/sqrt(in), 1/sqrt(in)) from a fixed seed, as in layer_bench.
const Weights& weights() {
  static const Weights w = [] {
    moe_bench::Lcg rng(2024);
    Weights out;
    out.gate = moe_bench::linear_weight(rng, kE, kD);
    for (index_t e = 0; e < kE; ++e) {
      out.w1.push_back(moe_bench::linear_weight(rng, kFF, kD));
      out.w3.push_back(moe_bench::linear_weight(rng, kFF, kD));
      out.w2.push_back(moe_bench::linear_weight(rng, kD, kFF));
    }
    out.x.resize(kMaxTokens, kD);
    rng.fill(out.x.data(), static_cast<std::size_t>(out.x.size()), 1.0f);
    out.dy.resize(kMaxTokens, kD);
    rng.fill(out.dy.data(), static_cast<std::size_t>(out.dy.size()), 1.0f);
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
    forward += moe_bench::wall_seconds([&] {
      layer().forward(x, y, ws);
      benchmark::DoNotOptimize(y.data());
    });
    forward_train += moe_bench::wall_seconds([&] {
      layer().forward_train(x, ctx, y, train);
      benchmark::DoNotOptimize(y.data());
    });
    const double step = moe_bench::wall_seconds([&] {
      layer().backward(x, dy, dx, grads, train);
      benchmark::DoNotOptimize(dx.data());
    });
    backward += step;
    accumulate += moe_bench::wall_seconds([&] {
      layer().backward_accumulate(x, dy, dx, grads, train);
      benchmark::DoNotOptimize(dx.data());
    });
    state.SetIterationTime(step);
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

// Times ours() (moe's kernel), then theirs() (Eigen's), the other way round on odd iterations, and
// reports as above.
template <class Ours, class Theirs>
void time_against_eigen(benchmark::State& state, Ours&& ours, Theirs&& theirs) {
  const double flops = 2.0 * static_cast<double>(state.range(0) * kFF * kD);  // both products
  ours();
  theirs();
  double moe_seconds = 0, eigen_seconds = 0;
  bool moe_first = true;
  for (auto _ : state) {
    if (!moe_first) eigen_seconds += moe_bench::wall_seconds(theirs);
    const double seconds = moe_bench::wall_seconds(ours);
    if (moe_first) eigen_seconds += moe_bench::wall_seconds(theirs);
    moe_seconds += seconds;
    moe_first = !moe_first;
    state.SetIterationTime(seconds);
  }
  const auto n = static_cast<double>(state.iterations());
  state.counters["moe_GFLOP/s"] = 1e-9 * flops * n / moe_seconds;
  state.counters["eigen_GFLOP/s"] = 1e-9 * flops * n / eigen_seconds;
  state.counters["moe/eigen"] = moe_seconds / eigen_seconds;
}

// d_gate [rows, d_ff], a gradient of the gate projection's output: uniform in [-1, 1].
Mat gate_gradient(index_t rows) {
  moe_bench::Lcg rng(7);
  Mat d_gate(rows, kFF);
  rng.fill(d_gate.data(), static_cast<std::size_t>(d_gate.size()), 1.0f);
  return d_gate;
}

void BM_DxProduct(benchmark::State& state) {
  const index_t rows = state.range(0);
  const auto m = static_cast<std::size_t>(rows);
  const Mat d_gate = gate_gradient(rows);
  Mat dx(rows, kD);
  const ConstMap w_gate(weights().w1[0].data(), kFF, kD);
  time_against_eigen(
      state,
      [&] {
        moe::simd::matmul_nn(moe::simd::default_arch{}, d_gate.data(), m, kFF, w_gate.data(), kD, dx.data(), false);
        benchmark::DoNotOptimize(dx.data());
      },
      [&] {
        dx.noalias() = d_gate * w_gate;
        benchmark::DoNotOptimize(dx.data());
      });
}

void BM_WeightGradient(benchmark::State& state) {
  const index_t rows = state.range(0);
  const auto m = static_cast<std::size_t>(rows);
  const Mat d_gate = gate_gradient(rows);
  Mat grad(kFF, kD);
  const auto x = weights().x.topRows(rows);
  std::vector<float> packing(moe::simd::tn_packing_size(m, kFF));
  time_against_eigen(
      state,
      [&] {
        moe::simd::matmul_tn(moe::simd::default_arch{}, d_gate.data(), m, kFF, x.data(), kD, grad.data(), false,
                             packing.data());
        benchmark::DoNotOptimize(grad.data());
      },
      [&] {
        grad.noalias() = d_gate.transpose() * x;
        benchmark::DoNotOptimize(grad.data());
      });
}

}  // namespace

BENCHMARK(BM_DxProduct)->Arg(16)->Arg(64)->Arg(128)->Arg(256)->Arg(512)->Arg(1024)->Arg(2048)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_WeightGradient)->Arg(16)->Arg(64)->Arg(128)->Arg(256)->Arg(512)->Arg(1024)->Arg(2048)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MakeGradients)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TrainStep)->Arg(1)->Arg(16)->Arg(128)->Arg(512)->Arg(2048)->ArgName("T")->UseManualTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
