// Thread safety: one layer (and one router) shared by several std::threads, each with its own
// workspace, gives the bits of sequential use. Run under ThreadSanitizer by the tsan preset
// (built without OpenMP, whose runtime TSan cannot see into), which also reports any data race.
#include <catch2/catch.hpp>

#include <thread>
#include <vector>

#include "../support/reference.hpp"

using namespace moe_test;

namespace {

constexpr index_t kD = 16, kFF = 24, kE = 4;
constexpr int kThreads = 4, kRounds = 3;

std::vector<moe::SwiGLU<float>> make_experts(index_t n) {
  std::vector<moe::SwiGLU<float>> out;
  for (index_t e = 0; e < n; ++e) {
    const auto s = 200 + 3 * static_cast<std::uint32_t>(e);
    out.emplace_back(random_matrix<float>(kFF, kD, s, 0.3), random_matrix<float>(kFF, kD, s + 1, 0.3),
                     random_matrix<float>(kD, kFF, s + 2, 0.3));
  }
  return out;
}

// Thread i's batch in round r: its own size, values, groups and token ids.
struct Batch {
  moe::Matrix<float> x, dy;
  std::vector<index_t> groups;
  std::vector<std::int64_t> ids;
  moe::RouteContext context() const {
    moe::RouteContext ctx = moe::RouteContext::with_groups(groups);
    ctx.token_ids = ids.data();
    return ctx;
  }
};
Batch make_batch(int thread, int round) {
  const auto seed = static_cast<std::uint32_t>(1000 + 17 * thread + round);
  const index_t T = 9 + 5 * thread + 3 * round;
  Batch b{random_matrix<float>(T, kD, seed), random_matrix<float>(T, kD, seed + 500), {0, T / 2, T}, {}};
  for (index_t t = 0; t < T; ++t) b.ids.push_back(static_cast<std::int64_t>((t * 37 + thread) % 101));
  return b;
}

// What one thread computes for a batch: y and, for layers that train, dx and the router gradient.
struct Result {
  moe::Matrix<float> y, dx, router_grad, plan_weight;
  bool operator==(const Result& o) const {
    return y == o.y && dx == o.dx && router_grad == o.router_grad && plan_weight == o.plan_weight;
  }
};

template <class Layer>
Result run_layer(const Layer& layer, const Batch& b, moe::TrainingWorkspace<float>& ws) {
  Result r;
  r.y.resize(b.x.rows(), kD);
  r.dx.resize(b.x.rows(), kD);
  layer.forward_train(b.x, b.context(), r.y, ws);
  auto grads = layer.make_gradients();
  layer.backward(b.x, b.dy, r.dx, grads, ws);
  r.router_grad = grads.router;
  // The plain forward on the same workspace gives the same bits.
  moe::Matrix<float> y2(b.x.rows(), kD);
  layer.forward(b.x, b.context(), y2, ws);
  if (!(y2 == r.y)) r.y.setConstant(-1.0f);  // turns into a mismatch below
  return r;
}

template <class Router>
Result run_router(const Router& router, const Batch& b, moe::RouterOutput<float>& out) {
  router.route(b.x, b.context(), out);
  Result r;
  r.y = out.scores();
  r.plan_weight = moe::ConstMatrixMap<float>(out.plan.weight.data(), 1, out.plan.num_assignments());
  return r;
}

// Runs f(thread, round, state) for every thread and round, first sequentially, then with all
// threads at once (each with its own state), and compares the results.
template <class State, class F>
void check_concurrent(F f) {
  std::vector<std::vector<Result>> sequential(kThreads), concurrent(kThreads);
  {
    State state;
    for (int i = 0; i < kThreads; ++i)
      for (int r = 0; r < kRounds; ++r) sequential[std::size_t(i)].push_back(f(i, r, state));
  }
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      State state;  // one workspace per thread, reused across rounds
      for (int r = 0; r < kRounds; ++r) concurrent[std::size_t(i)].push_back(f(i, r, state));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) {
    for (int r = 0; r < kRounds; ++r) {
      CAPTURE(i, r);
      REQUIRE(concurrent[std::size_t(i)][std::size_t(r)] == sequential[std::size_t(i)][std::size_t(r)]);
    }
  }
}

}  // namespace

TEST_CASE("One top-k layer used from several threads gives the sequential bits", "[threads][concurrency]") {
  moe::TopKOptions o = moe::presets::mixtral(2);
  o.capacity_factor = 1.0;  // capacity per routing group
  o.overflow = moe::OverflowPolicy::reroute;
  o.jitter = 0.1;
  moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(kE, kD, 3), o), make_experts(kE - 1),
                      {moe::ZeroComputeExpert<float>::constant(moe::Vector<float>::Constant(kD, 0.5f))});
  layer.set_shared_experts(make_experts(1), moe::Weight<float>::own(random_matrix<float>(1, kD, 4)));
  layer.set_dropped_tokens(moe::DroppedTokens::pass_through);
  const auto& shared = layer;
  check_concurrent<moe::TrainingWorkspace<float>>([&](int i, int r, moe::TrainingWorkspace<float>& ws) {
    Batch b = make_batch(i, r);
    Result res = run_layer(shared, b, ws);
    // Training jitter too (keyed by token id: still deterministic).
    moe::RouteContext ctx = b.context();
    ctx.training = true;
    moe::Matrix<float> yt(b.x.rows(), kD);
    shared.forward(b.x, ctx, yt, ws);
    res.plan_weight = yt;
    return res;
  });
}

TEST_CASE("One expert-choice layer used from several threads gives the sequential bits", "[threads][concurrency]") {
  const moe::MoELayer layer(moe::ExpertChoiceRouter<float>(random_matrix<float>(kE, kD, 5), {2.0, true}), make_experts(kE));
  check_concurrent<moe::TrainingWorkspace<float>>(
      [&](int i, int r, moe::TrainingWorkspace<float>& ws) { return run_layer(layer, make_batch(i, r), ws); });
}

TEST_CASE("One hash layer used from several threads gives the sequential bits", "[threads][concurrency]") {
  const moe::MoELayer layer(moe::HashRouter<float>(kE, kD, {2, 9}), make_experts(kE));
  check_concurrent<moe::TrainingWorkspace<float>>(
      [&](int i, int r, moe::TrainingWorkspace<float>& ws) { return run_layer(layer, make_batch(i, r), ws); });
}

TEST_CASE("Routers used from several threads give the sequential bits", "[threads][concurrency]") {
  moe::TopKRouter<float> top_k(random_matrix<float>(kE, kD, 6), moe::presets::deepseek_v3(2, 2, 1, 2.5));
  top_k.set_selection_bias(moe::Vector<float>::LinSpaced(kE, 0.1f, -0.1f));
  const moe::ExpertChoiceRouter<float> expert_choice(random_matrix<float>(kE, kD, 7), {1.0, true});
  const moe::HashRouter<float> hash = moe::HashRouter<float>::balanced(std::vector<double>(101, 1.0), kE, kD);
  check_concurrent<moe::RouterOutput<float>>([&](int i, int r, moe::RouterOutput<float>& out) {
    const Batch b = make_batch(i, r);
    Result res = run_router(top_k, b, out);
    const Result ec = run_router(expert_choice, b, out);
    const Result h = run_router(hash, b, out);
    res.dx = ec.y;
    res.router_grad = ec.plan_weight;
    res.y.conservativeResize(res.y.rows(), res.y.cols() + h.y.cols());
    res.y.rightCols(h.y.cols()) = h.y;
    return res;
  });
}

TEST_CASE("One Soft MoE layer used from several threads gives the sequential bits", "[threads][concurrency][soft]") {
  const moe::SoftMoELayer<moe::SwiGLU<float>> layer(moe::SoftRouter<float>(random_matrix<float>(kD, kE * 2, 8), kE, {2, true, 1.0}),
                                                    make_experts(kE));
  check_concurrent<moe::SoftWorkspace<float>>([&](int i, int r, moe::SoftWorkspace<float>& ws) {
    const Batch b = make_batch(i, r);
    Result res;
    res.y.resize(b.x.rows(), kD);
    layer.forward(b.x, moe::RouteContext::with_groups(b.groups), res.y, ws);
    return res;
  });
}
