// The Soft MoE layer (SoftMoELayer) against the same layer written the obvious way with Eigen, and
// its training step. Shape: d = 768, d_ff = 3072, E = 16 ReLU FFN experts with s = 4 slots each
// (S = 64 slots), float, T ∈ {16, 128, 512, 2048} tokens in one group.
//
// Soft MoE's experts see the S slots whatever T is; its three dense mixing products (logits x·Φ,
// slot inputs Dᵀ·x, outputs C·Ỹ, 2·T·S·d FLOPs each) grow with T and at T = 2048 are as much work
// as the experts.
//
//   BM_SoftLayer/T   each iteration times, on the same input and warm workspaces:
//                      forward        SoftMoELayer::forward
//                      naive          the Eigen loop below (its GEMMs on Eigen's own threads)
//                      mix            SoftRouter::route + dispatch + combine alone
//                      backward       SoftMoELayer::backward after forward_train
//                    The benchmark's own time is the forward time (manual timing).
// Counters (ms per call, means over the iterations): forward_ms, naive_ms, mix_ms, backward_ms;
// vs_naive = naive / forward, mix_share = mix / forward, bwd/fwd = backward / forward.
// Times are wall time (std::chrono::steady_clock), so that runs on 1 and 2 threads
// (OMP_NUM_THREADS) compare.
// CI smoke run: soft_bench --benchmark_min_time=0.01 --benchmark_filter=/T:16
#include <benchmark/benchmark.h>

#include <moe/moe.hpp>

#include "bench_support.hpp"

#include <cmath>
#include <cstddef>
#include <vector>

namespace {

using moe::index_t;
using Mat = moe::Matrix<float>;
using ConstMap = moe::ConstMatrixMap<float>;
using Expert = moe::FeedForward<float, moe::ReLU>;
using Layer = moe::SoftMoELayer<Expert>;

constexpr index_t kD = 768;
constexpr index_t kFF = 3072;
constexpr index_t kE = 16;
constexpr index_t kSlots = 4;  // per expert
constexpr index_t kS = kE * kSlots;
constexpr index_t kMaxTokens = 2048;

struct Weights {
  Mat phi;                                // [d, S]
  std::vector<std::vector<float>> w_in;   // E × [d_ff, d]
  std::vector<std::vector<float>> w_out;  // E × [d, d_ff]
  Mat x;                                  // [kMaxTokens, d]
  Mat dy;                                 // [kMaxTokens, d]
};

// nn.Linear init U(-1/sqrt(in), 1/sqrt(in)) from a fixed seed (as layer_bench).
const Weights& weights() {
  static const Weights w = [] {
    moe_bench::Lcg rng(77);
    auto fill = [&rng](Mat& m, index_t rows, index_t cols, float bound) {
      m.resize(rows, cols);
      rng.fill(m.data(), static_cast<std::size_t>(m.size()), bound);
    };
    Weights out;
    fill(out.phi, kD, kS, 1.0f / std::sqrt(static_cast<float>(kD)));
    for (index_t e = 0; e < kE; ++e) {
      out.w_in.push_back(moe_bench::linear_weight(rng, kFF, kD));
      out.w_out.push_back(moe_bench::linear_weight(rng, kD, kFF));
    }
    fill(out.x, kMaxTokens, kD, 1.0f);
    fill(out.dy, kMaxTokens, kD, 1.0f);
    return out;
  }();
  return w;
}

const Layer& layer() {
  static const Layer l = [] {
    const Weights& w = weights();
    std::vector<Expert> experts;
    for (std::size_t e = 0; e < static_cast<std::size_t>(kE); ++e) {
      experts.emplace_back(ConstMap(w.w_in[e].data(), kFF, kD), ConstMap(w.w_out[e].data(), kD, kFF));
    }
    moe::SoftOptions options;
    options.slots_per_expert = kSlots;
    return Layer(moe::SoftRouter<float>(ConstMap(w.phi.data(), kD, kS), kE, options), std::move(experts));
  }();
  return l;
}

// Soft MoE written the obvious way: Eigen products, the two softmaxes as array expressions, each
// expert as two Eigen GEMMs on its slots.
void naive_forward(const moe::ConstMatrixRef<float>& x, Mat& y) {
  const Weights& w = weights();
  const Mat logits = x * w.phi;                                          // [T, S]
  const Eigen::RowVectorXf column_max = logits.colwise().maxCoeff();     // D: softmax over tokens
  Mat D = (logits.rowwise() - column_max).array().exp().matrix();
  const Eigen::RowVectorXf column_sum = D.colwise().sum();
  D = D.array().rowwise() / column_sum.array();
  const Eigen::VectorXf row_max = logits.rowwise().maxCoeff();           // C: softmax over slots
  Mat C = (logits.colwise() - row_max).array().exp().matrix();
  const Eigen::VectorXf row_sum = C.rowwise().sum();
  C = C.array().colwise() / row_sum.array();
  const Mat slots = D.transpose() * x;                                   // [S, d]
  Mat slot_out(kS, kD);
  for (index_t e = 0; e < kE; ++e) {
    const Mat hidden = (slots.middleRows(e * kSlots, kSlots) *
                        ConstMap(w.w_in[std::size_t(e)].data(), kFF, kD).transpose()).cwiseMax(0.0f);
    slot_out.middleRows(e * kSlots, kSlots).noalias() = hidden * ConstMap(w.w_out[std::size_t(e)].data(), kD, kFF).transpose();
  }
  y.noalias() = C * slot_out;
}

void BM_SoftLayer(benchmark::State& state) {
  const index_t T = state.range(0);
  const moe::ConstMatrixRef<float> x = weights().x.topRows(T);    // [T, d], a view
  const moe::ConstMatrixRef<float> dy = weights().dy.topRows(T);  // [T, d]
  Mat y(T, kD), y_naive(T, kD), dx(T, kD);
  moe::SoftWorkspace<float> ws;
  moe::SoftTrainingWorkspace<float> train;
  Layer::Gradients grads = layer().make_gradients();
  moe::SoftRouting<float> routing;
  moe::Buffer<float> slots, mix;
  const moe::simd::default_arch arch;
  auto route_dispatch_combine = [&] {
    layer().router().route(x, routing, arch);
    float* s = slots.ensure(kS * kD);
    moe::dispatch(arch, routing, x.data(), x.outerStride(), kD, s, mix);
    moe::combine(arch, routing, s, kD, y.data(), kD, mix);  // (the slot inputs stand in for the outputs)
  };
  // Warm every workspace.
  layer().forward(x, y, ws);
  naive_forward(x, y_naive);
  route_dispatch_combine();
  layer().forward_train(x, y, train);
  layer().backward(x, dy, dx, grads, train);

  double forward = 0, naive = 0, mixing = 0, backward = 0;
  for (auto _ : state) {
    const double step = moe_bench::wall_seconds([&] { layer().forward(x, y, ws); });
    forward += step;
    naive += moe_bench::wall_seconds([&] { naive_forward(x, y_naive); });
    mixing += moe_bench::wall_seconds(route_dispatch_combine);
    layer().forward_train(x, y, train);
    benchmark::ClobberMemory();
    backward += moe_bench::wall_seconds([&] { layer().backward(x, dy, dx, grads, train); });
    state.SetIterationTime(step);
  }
  const auto n = static_cast<double>(state.iterations());
  state.counters["forward_ms"] = 1e3 * forward / n;
  state.counters["naive_ms"] = 1e3 * naive / n;
  state.counters["mix_ms"] = 1e3 * mixing / n;
  state.counters["backward_ms"] = 1e3 * backward / n;
  state.counters["vs_naive"] = naive / forward;
  state.counters["mix_share"] = mixing / forward;
  state.counters["bwd/fwd"] = backward / forward;
}

}  // namespace

BENCHMARK(BM_SoftLayer)->Arg(16)->Arg(128)->Arg(512)->Arg(2048)->ArgName("T")->UseManualTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
