// Built with moe::openmp: outputs and gradients are bit-identical on 1 and 2 threads and on
// repeated runs.
#include <catch2/catch.hpp>

#include <omp.h>

#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../support/reference.hpp"

using namespace moe_test;

namespace {
// forward_train and backward of `layer` on `threads` threads into dx and g (whose values backward
// must overwrite); returns the batch's routing plan.
template <class Layer, class S>
moe::Routing<S> train_step(const Layer& layer, int threads, const moe::Matrix<S>& x, const moe::Matrix<S>& dy, moe::Matrix<S>& dx,
                           typename Layer::Gradients& g) {
  omp_set_num_threads(threads);
  moe::TrainingWorkspace<S> ws;
  moe::Matrix<S> y(x.rows(), x.cols());
  dx.resize(x.rows(), x.cols());
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  layer.backward(x, dy, dx, g, ws);
  return ws.routing.plan;
}

// Whether two gradient sets of a gated-expert layer hold the same bits: router, routed and shared
// experts, shared gate.
template <class Grads>
bool same_gradients(const Grads& a, const Grads& b) {
  auto same_expert = [](const auto& p, const auto& q) { return p.w_gate == q.w_gate && p.w_up == q.w_up && p.w_down == q.w_down; };
  bool same = a.router == b.router && a.shared_gate == b.shared_gate && a.experts.size() == b.experts.size() &&
              a.shared.size() == b.shared.size();
  for (std::size_t e = 0; same && e < a.experts.size(); ++e) same = same_expert(a.experts[e], b.experts[e]);
  for (std::size_t e = 0; same && e < a.shared.size(); ++e) same = same_expert(a.shared[e], b.shared[e]);
  return same;
}
}  // namespace

// Built with OpenMP, moe lives in its own inline namespace: linked beside a part of the program
// built without (moe::v0), each keeps its own max_threads and thread_index (core/config.hpp).
TEST_CASE("An OpenMP build of moe has its own ABI namespace", "[threads]") {
  STATIC_REQUIRE(std::is_same<moe::Buffer<float>, moe::v0_openmp::Buffer<float>>::value);
}

TEST_CASE("Forward and backward bits do not depend on the thread count", "[threads][determinism]") {
  REQUIRE(moe::max_threads() >= 1);
  // T · d over 65,536: dispatch, combine and the shared expert's rows are split over the threads too.
  const index_t d = 96, ff = 200, E = 6, Tn = 700;
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<float>(ff, d, 1 + std::uint32_t(e), 0.1), random_matrix<float>(ff, d, 20 + std::uint32_t(e), 0.1),
                         random_matrix<float>(d, ff, 40 + std::uint32_t(e), 0.1));
  }
  moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), moe::presets::mixtral(2)), experts);
  layer.set_shared_experts({experts[0]}, moe::Weight<float>::own(random_matrix<float>(1, d, 7)));
  const moe::Matrix<float> x = random_matrix<float>(Tn, d, 5), dy = random_matrix<float>(Tn, d, 6);

  auto run = [&](int threads, moe::Matrix<float>& y, moe::Matrix<float>& dx, decltype(layer.make_gradients())& g) {
    omp_set_num_threads(threads);
    moe::TrainingWorkspace<float> ws;
    y.resize(Tn, d);
    dx.resize(Tn, d);
    layer.forward_train(x, moe::RouteContext{}, y, ws);
    g = layer.make_gradients();
    layer.backward(x, dy, dx, g, ws);
  };
  moe::Matrix<float> y1, dx1, y2, dx2, y3, dx3;
  auto g1 = layer.make_gradients(), g2 = g1, g3 = g1;
  run(1, y1, dx1, g1);
  run(2, y2, dx2, g2);
  run(2, y3, dx3, g3);
  REQUIRE(y1 == y2);
  REQUIRE(dx1 == dx2);
  REQUIRE(same_gradients(g1, g2));
  REQUIRE(y2 == y3);
  REQUIRE(dx2 == dx3);
  // backward_accumulate onto those gradients: the same bits on 1 and 2 threads.
  auto accumulate = [&](int threads, decltype(layer.make_gradients())& g) {
    omp_set_num_threads(threads);
    moe::TrainingWorkspace<float> ws;
    moe::Matrix<float> y(Tn, d), dx(Tn, d);
    layer.forward_train(x, moe::RouteContext{}, y, ws);
    layer.backward_accumulate(x, dy, dx, g, ws);
  };
  auto a1 = g1, a2 = g1;
  accumulate(1, a1);
  accumulate(2, a2);
  REQUIRE_FALSE(a1.router == g1.router);
  REQUIRE(same_gradients(a1, a2));
  // A permuted batch (dropless top-k has no cross-token dependence): rows permute bit for bit.
  moe::Workspace<float> ws;
  const moe::Matrix<float> x_rev = x.colwise().reverse();
  const moe::Matrix<float> y_rev = layer.forward(x_rev, ws);
  REQUIRE(moe::Matrix<float>(y_rev.colwise().reverse()) == y1);
  omp_set_num_threads(2);
}

TEST_CASE("Backward on 2 threads overwrites every gradient, including experts without tokens", "[threads][determinism]") {
  // 3 tokens, top-1 over 6 experts and 2 zero-computation ones, plus 2 gated shared experts: most
  // experts get no token, and the routed and shared experts' gradients are zeroed by the threads
  // that take them.
  const index_t d = 40, ff = 56, E = 6, Tn = 3;
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<double>(ff, d, 1 + std::uint32_t(e), 0.2), random_matrix<double>(ff, d, 20 + std::uint32_t(e), 0.2),
                         random_matrix<double>(d, ff, 40 + std::uint32_t(e), 0.2));
  }
  std::vector<moe::ZeroComputeExpert<double>> zero_compute = {
      moe::ZeroComputeExpert<double>::copy(d),
      moe::ZeroComputeExpert<double>::constant(random_matrix<double>(1, d, 70).row(0).transpose(), random_matrix<double>(2, d, 71))};
  moe::TopKOptions options;
  options.k = 1;
  moe::MoELayer layer(moe::TopKRouter<double>(random_matrix<double>(E + 2, d, 99), options), experts, zero_compute);
  layer.set_shared_experts({experts[0], experts[1]}, moe::Weight<double>::own(random_matrix<double>(1, d, 7)));  // jobs of their own
  const moe::Matrix<double> x = random_matrix<double>(Tn, d, 5), dy = random_matrix<double>(Tn, d, 6);

  moe::Matrix<double> dx1, dx2;
  auto g1 = layer.make_gradients(), g2 = g1;
  // Stale values everywhere on the 2-thread run: backward overwrites them.
  for (auto& e : g2.experts) e.for_each([](auto& m) { m.setConstant(7.0); });
  for (auto& e : g2.zero_compute) e.for_each([](auto& m) { m.setConstant(7.0); });
  for (auto& e : g2.shared) e.for_each([](auto& m) { m.setConstant(7.0); });
  g2.router.setConstant(7.0);
  g2.shared_gate.setConstant(7.0);
  const auto plan = train_step(layer, 1, x, dy, dx1, g1);
  train_step(layer, 2, x, dy, dx2, g2);
  index_t idle = 0;
  for (index_t e = 0; e < E; ++e) {
    const auto& a = g1.experts[std::size_t(e)];
    const auto& b = g2.experts[std::size_t(e)];
    REQUIRE(a.w_gate == b.w_gate);
    REQUIRE(a.w_up == b.w_up);
    REQUIRE(a.w_down == b.w_down);
    if (plan.tokens_of(e) == 0) {
      ++idle;
      REQUIRE(b.w_gate.isZero(0.0));
      REQUIRE(b.w_up.isZero(0.0));
      REQUIRE(b.w_down.isZero(0.0));
    } else {
      REQUIRE_FALSE(b.w_down.isZero(0.0));
    }
  }
  REQUIRE(idle >= 3);  // 3 tokens reach at most 3 of the 6 experts
  for (std::size_t z = 0; z < g1.zero_compute.size(); ++z) {
    REQUIRE(g1.zero_compute[z].value == g2.zero_compute[z].value);
    REQUIRE(g1.zero_compute[z].mix == g2.zero_compute[z].mix);
  }
  for (std::size_t sh = 0; sh < g1.shared.size(); ++sh) {
    REQUIRE(g1.shared[sh].w_gate == g2.shared[sh].w_gate);
    REQUIRE(g1.shared[sh].w_up == g2.shared[sh].w_up);
    REQUIRE(g1.shared[sh].w_down == g2.shared[sh].w_down);
    REQUIRE_FALSE(g2.shared[sh].w_down.isZero(0.0));
  }
  REQUIRE(g1.shared_gate == g2.shared_gate);
  REQUIRE(g1.router == g2.router);
  REQUIRE(dx1 == dx2);
  omp_set_num_threads(2);
}

TEST_CASE("Backward gradients of experts with hundreds of tokens do not depend on the thread count",
          "[threads][determinism]") {
  // About 500 tokens per expert: deep enough that an Eigen GEMM split over 2 threads would block its
  // depth differently (and round differently) from one thread. Two experts run on the threads, each
  // with Eigen on its own thread; a lone expert runs with Eigen held to one thread.
  const index_t d = 48, ff = 72, Tn = 1024;
  for (const index_t E : {index_t(2), index_t(1)}) {
    CAPTURE(E);
    std::vector<moe::FeedForward<double, moe::ReLU>> experts;
    for (index_t e = 0; e < E; ++e) {
      experts.emplace_back(random_matrix<double>(ff, d, 1 + std::uint32_t(e), 0.2), random_matrix<double>(d, ff, 60 + std::uint32_t(e), 0.2));
    }
    moe::TopKOptions options;
    options.k = 1;
    const moe::MoELayer layer(moe::TopKRouter<double>(random_matrix<double>(E, d, 99), options), experts);
    const moe::Matrix<double> x = random_matrix<double>(Tn, d, 5), dy = random_matrix<double>(Tn, d, 6);
    moe::Matrix<double> dx1, dx2;
    auto g1 = layer.make_gradients(), g2 = g1;
    const auto plan = train_step(layer, 1, x, dy, dx1, g1);
    train_step(layer, 2, x, dy, dx2, g2);
    for (index_t e = 0; e < E; ++e) REQUIRE(plan.tokens_of(e) >= 300);
    for (std::size_t e = 0; e < g1.experts.size(); ++e) {
      REQUIRE(g1.experts[e].w_in == g2.experts[e].w_in);
      REQUIRE(g1.experts[e].w_out == g2.experts[e].w_out);
    }
    REQUIRE(g1.router == g2.router);
    REQUIRE(dx1 == dx2);
  }
  omp_set_num_threads(2);
}

TEST_CASE("Products of many tokens (the lane-split product) do not depend on the thread count",
          "[threads][determinism]") {
  // With AVX-512 or AVX2, float products of 200 tokens on rows of 1,040 elements are packed once by the
  // calling thread and their panels shared by the team (simd::lane_rows); 200 rows are four panels
  // on two threads, the last a partial one.
  const std::size_t m = 200, k = 1040, n = 200;
  using Arch = moe::simd::default_arch;
  const moe::Matrix<float> x = random_matrix<float>(index_t(m), index_t(k), 7);
  const moe::Matrix<float> w_gate = random_matrix<float>(index_t(n), index_t(k), 8);
  const moe::Matrix<float> w_up = random_matrix<float>(index_t(n), index_t(k), 9);
  auto products = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<float> y(m * n), h(m * n);
    moe::simd::matmul_nt(Arch{}, x.data(), m, k, w_gate.data(), n, y.data(), n);
    moe::simd::gated_matmul_nt<moe::SiLU>(Arch{}, x.data(), m, k, w_gate.data(), w_up.data(), n, h.data(), n);
    y.insert(y.end(), h.begin(), h.end());
    return y;
  };
  CHECK(moe::simd::lane_split<Arch, float>(m, k, n) == moe::simd::has_lane_product<Arch, float>());
  const std::vector<float> one = products(1), two = products(2);
  REQUIRE(one == two);
  REQUIRE(one == products(2));
  omp_set_num_threads(2);
}

TEST_CASE("Soft MoE forward and backward bits do not depend on the thread count", "[threads][determinism][soft]") {
  const index_t d = 96, ff = 150, E = 4, slots = 2, Tn = 130;
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<float>(ff, d, 1 + std::uint32_t(e), 0.1), random_matrix<float>(ff, d, 20 + std::uint32_t(e), 0.1),
                         random_matrix<float>(d, ff, 40 + std::uint32_t(e), 0.1));
  }
  moe::SoftOptions options;
  options.slots_per_expert = slots;
  options.normalized = true;
  const moe::SoftMoELayer<moe::SwiGLU<float>> layer(moe::SoftRouter<float>(random_matrix<float>(d, E * slots, 99), E, options),
                                                    experts);
  const moe::Matrix<float> x = random_matrix<float>(Tn, d, 5), dy = random_matrix<float>(Tn, d, 6);
  const std::vector<index_t> groups = {0, 50, 130};  // two sequences
  auto run = [&](int threads, moe::Matrix<float>& y, moe::Matrix<float>& dx, decltype(layer.make_gradients())& g) {
    omp_set_num_threads(threads);
    moe::SoftTrainingWorkspace<float> ws;
    y.resize(Tn, d);
    dx.resize(Tn, d);
    layer.forward_train(x, moe::RouteContext::with_groups(groups), y, ws);
    g = layer.make_gradients();
    if (threads > 1) {  // stale values everywhere: backward overwrites them (each expert on its thread)
      for (auto& e : g.experts) e.for_each([](auto& m) { m.setConstant(7.0f); });
      g.phi.setConstant(7.0f);
    }
    layer.backward(x, dy, dx, g, ws);
  };
  moe::Matrix<float> y1, dx1, y2, dx2;
  auto g1 = layer.make_gradients(), g2 = g1;
  run(1, y1, dx1, g1);
  run(2, y2, dx2, g2);
  REQUIRE(y1 == y2);
  REQUIRE(dx1 == dx2);
  REQUIRE(g1.phi == g2.phi);
  REQUIRE(g1.scale == g2.scale);
  for (std::size_t e = 0; e < g1.experts.size(); ++e) {
    REQUIRE(g1.experts[e].w_gate == g2.experts[e].w_gate);
    REQUIRE(g1.experts[e].w_up == g2.experts[e].w_up);
    REQUIRE(g1.experts[e].w_down == g2.experts[e].w_down);
  }
  omp_set_num_threads(2);
}

TEST_CASE("Threads take whole experts only when the work shares out evenly", "[threads][schedule]") {
  index_t loads[4];
  const std::vector<index_t> equal(16, 100);
  REQUIRE(moe::detail::share_out_experts(equal.data(), 16, 2, loads));
  REQUIRE_FALSE(moe::detail::share_out_experts(equal.data(), 16, 1, loads));   // one thread
  REQUIRE(moe::detail::share_out_experts(equal.data(), 8, 2, loads));
  REQUIRE(moe::detail::share_out_experts(equal.data(), 6, 2, loads));          // 3 : 3
  REQUIRE(moe::detail::share_out_experts(equal.data(), 2, 2, loads));          // one each
  REQUIRE_FALSE(moe::detail::share_out_experts(equal.data(), 1, 2, loads));    // fewer experts than threads
  REQUIRE_FALSE(moe::detail::share_out_experts(equal.data(), 7, 2, loads));    // 4 : 3
  REQUIRE_FALSE(moe::detail::share_out_experts(equal.data(), 3, 4, loads));
  REQUIRE_FALSE(moe::detail::share_out_experts(equal.data(), 15, 4, loads));   // 4 : 4 : 4 : 3
  // One expert busier than all the others together: a longest-first split is 2000 : 1500.
  std::vector<index_t> skewed(16, 100);
  skewed[0] = 2000;
  REQUIRE_FALSE(moe::detail::share_out_experts(skewed.data(), 16, 2, loads));
  // 2 × 32 + 15 × 16 = 304 split 160 : 144 is 5% over even (152): too uneven.
  std::vector<index_t> costs(17, 16);
  costs[0] = costs[1] = 32;
  REQUIRE_FALSE(moe::detail::share_out_experts(costs.data(), 17, 2, loads));
  costs.push_back(16);  // 18 experts: 160 : 160
  REQUIRE(moe::detail::share_out_experts(costs.data(), 18, 2, loads));
  // An expert's cost: reading its weights (as much as 8 tokens' arithmetic) plus its tokens' arithmetic,
  // so that among memory-bound experts more tokens still come first.
  REQUIRE(moe::detail::expert_cost(200, 3) == 200 * (8 + 3));
  REQUIRE(moe::detail::expert_cost(200, 20) == 200 * (8 + 20));
  REQUIRE(moe::detail::expert_cost(200, 8) > moe::detail::expert_cost(200, 1));
}

TEST_CASE("Forward and backward bits do not depend on the thread count when threads take whole experts",
          "[threads][determinism][schedule]") {
  const index_t d = 48, ff = 64, E = 32, Tn = 256;
  std::vector<moe::FeedForward<double, moe::GELU>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<double>(ff, d, 1 + std::uint32_t(e), 0.2), random_matrix<double>(d, ff, 60 + std::uint32_t(e), 0.2));
  }
  moe::TopKOptions options;
  options.k = 2;
  moe::MoELayer layer(moe::TopKRouter<double>(random_matrix<double>(E, d, 99), options), experts);
  const moe::Matrix<double> x = random_matrix<double>(Tn, d, 5), dy = random_matrix<double>(Tn, d, 6);

  // The routing of this batch takes the by-expert path on 2 threads (and not on 1).
  moe::Workspace<double> probe;
  layer.forward(x, probe);
  const auto& plan = probe.routing.plan;
  std::vector<index_t> costs;
  for (index_t e = 0; e < E; ++e)
    if (plan.tokens_of(e) > 0) costs.push_back(moe::detail::expert_cost(ff, plan.tokens_of(e)));
  std::sort(costs.rbegin(), costs.rend());
  index_t loads[2];
  REQUIRE(moe::detail::share_out_experts(costs.data(), static_cast<index_t>(costs.size()), 2, loads));

  auto run = [&](int threads, moe::Matrix<double>& y, moe::Matrix<double>& dx, decltype(layer.make_gradients())& g) {
    omp_set_num_threads(threads);
    moe::TrainingWorkspace<double> ws;
    y.resize(Tn, d);
    dx.resize(Tn, d);
    layer.forward_train(x, moe::RouteContext{}, y, ws);
    g = layer.make_gradients();
    layer.backward(x, dy, dx, g, ws);
  };
  moe::Matrix<double> y1, dx1, y2, dx2;
  auto g1 = layer.make_gradients(), g2 = g1;
  run(1, y1, dx1, g1);
  run(2, y2, dx2, g2);
  REQUIRE(y1 == y2);
  REQUIRE(dx1 == dx2);
  REQUIRE(g1.router == g2.router);
  for (std::size_t e = 0; e < g1.experts.size(); ++e) {
    REQUIRE(g1.experts[e].w_in == g2.experts[e].w_in);
    REQUIRE(g1.experts[e].w_out == g2.experts[e].w_out);
  }
  // Plain forward on 2 threads: the same bits, and the plain reference (softmax, top-2 by
  // score, GELU FFN, weighted sum; doubles) within rounding.
  moe::Workspace<double> ws;
  const moe::Matrix<double> y_fwd = layer.forward(x, ws);
  REQUIRE(y_fwd == y1);
  const Mat router = to_double(layer.router().weight());
  double worst = 0;
  for (index_t t = 0; t < Tn; ++t) {
    const std::vector<double> xt(x.row(t).data(), x.row(t).data() + d);
    const std::vector<double> p = softmax(linear(router, xt));
    std::vector<double> yt(static_cast<std::size_t>(d), 0.0);
    for (const index_t e : top_k(p, 2)) {
      std::vector<double> h = linear(to_double(experts[std::size_t(e)].w_in()), xt);
      for (double& v : h) v = gelu(v);
      const std::vector<double> out = linear(to_double(experts[std::size_t(e)].w_out()), h);
      for (index_t c = 0; c < d; ++c) yt[std::size_t(c)] += p[std::size_t(e)] * out[std::size_t(c)];
    }
    for (index_t c = 0; c < d; ++c) worst = std::max(worst, std::abs(yt[std::size_t(c)] - y_fwd(t, c)));
  }
  REQUIRE(worst <= 1e-12);
  omp_set_num_threads(2);
}

namespace {
// A FeedForward whose forward and forward_saving throw (they hide the base's).
struct ThrowingExpert : moe::FeedForward<float> {
  using moe::FeedForward<float>::FeedForward;
  template <class Arch>
  void forward(Arch, const float*, index_t m, float*, float*) const {
    throw std::runtime_error("expert failed on " + std::to_string(m) + " tokens");
  }
  template <class Arch>
  void forward_saving(Arch arch, const float* x, index_t m, float* y, float*, float* scratch) const {
    forward(arch, x, m, y, scratch);
  }
};
}  // namespace

TEST_CASE("An expert's exception on the threads reaches the caller", "[threads][errors]") {
  // 4 experts, 2 tokens each (a hash table), 2 threads: equal costs, so the threads take whole
  // experts, each expert's forward inside the layer's parallel region.
  const index_t d = 16, ff = 24, E = 4, Tn = 8;
  std::vector<ThrowingExpert> experts;
  for (index_t e = 0; e < E; ++e)
    experts.emplace_back(random_matrix<float>(ff, d, 1 + std::uint32_t(e), 0.2), random_matrix<float>(d, ff, 9 + std::uint32_t(e), 0.2));
  const index_t cost = moe::detail::expert_cost(ff, 2), costs[] = {cost, cost, cost, cost};
  index_t loads[2];
  REQUIRE(moe::detail::share_out_experts(costs, E, 2, loads));
  moe::MoELayer layer(moe::HashRouter<float>::with_table(E, d, {0, 1, 2, 3, 0, 1, 2, 3}), experts);
  omp_set_num_threads(2);
  moe::RouteContext ctx;
  const std::vector<std::int64_t> ids = {0, 1, 2, 3, 4, 5, 6, 7};
  ctx.token_ids = ids.data();
  const moe::Matrix<float> x = random_matrix<float>(Tn, d, 5);
  moe::Matrix<float> y(Tn, d);
  moe::Workspace<float> ws;
  REQUIRE_THROWS_WITH(layer.forward(x, ctx, y, ws), "expert failed on 2 tokens");
  moe::TrainingWorkspace<float> tws;
  REQUIRE_THROWS_WITH(layer.forward_train(x, ctx, y, tws), "expert failed on 2 tokens");
}

TEST_CASE("for_each_ahead runs every item once and tells each thread its next item", "[threads][schedule]") {
  for (const std::ptrdiff_t n : {0, 1, 2, 3, 17, 200}) {
    CAPTURE(n);
    std::vector<std::vector<std::pair<std::ptrdiff_t, std::ptrdiff_t>>> calls(2);  // per thread: (item, next)
    omp_set_num_threads(2);
    moe::for_each_ahead(n, true, [&](std::ptrdiff_t i, std::ptrdiff_t next) {
      calls[std::size_t(omp_get_thread_num())].emplace_back(i, next);
    });
    std::vector<int> runs(std::size_t(n), 0);
    for (const auto& own : calls) {
      for (std::size_t c = 0; c < own.size(); ++c) {
        ++runs[std::size_t(own[c].first)];
        // `next` is the item this thread ran after this one, or n after its last.
        REQUIRE(own[c].second == (c + 1 < own.size() ? own[c + 1].first : n));
      }
    }
    for (const int r : runs) REQUIRE(r == 1);
  }
}

TEST_CASE("parallel_for_balanced gives each thread a run of items of near-equal cost", "[threads][schedule]") {
  // Items of uneven cost, as the tokens of an expert-choice plan: the first ones dear.
  auto cost_of = [](std::ptrdiff_t i) -> std::ptrdiff_t { return i < 20 ? 9 : i % 3; };
  for (const std::ptrdiff_t n : {0, 1, 2, 3, 17, 200}) {
    CAPTURE(n);
    std::vector<std::ptrdiff_t> before(std::size_t(n) + 1, 0);  // cost of items [0, i)
    for (std::ptrdiff_t i = 0; i < n; ++i) before[std::size_t(i) + 1] = before[std::size_t(i)] + cost_of(i);
    auto cost_before = [&](std::ptrdiff_t i) { return before[std::size_t(i)]; };
    for (const bool parallel : {false, true}) {
      CAPTURE(parallel);
      omp_set_num_threads(2);
      std::vector<std::vector<std::ptrdiff_t>> items(2);  // per thread, in the order run
      moe::parallel_for_balanced(n, parallel, cost_before,
                                 [&](std::ptrdiff_t i) { items[std::size_t(omp_get_thread_num())].push_back(i); });
      // Every item once, thread 0 taking a leading run and thread 1 the rest, each in order.
      std::vector<std::ptrdiff_t> all = items[0];
      all.insert(all.end(), items[1].begin(), items[1].end());
      std::vector<std::ptrdiff_t> expected(static_cast<std::size_t>(n));
      for (std::ptrdiff_t i = 0; i < n; ++i) expected[std::size_t(i)] = i;
      REQUIRE(all == expected);
      if (!parallel || n < 2) {
        REQUIRE(items[1].empty());
        continue;
      }
      // The split lies where the running cost first reaches half the total.
      const std::ptrdiff_t split = std::ptrdiff_t(items[0].size());
      REQUIRE(2 * before[std::size_t(split)] >= before[std::size_t(n)]);
      REQUIRE((split == 0 || 2 * before[std::size_t(split) - 1] < before[std::size_t(n)]));
    }
  }
}

TEST_CASE("Dispatch and combine of an uneven plan give the same rows on 1 and 2 threads", "[threads][determinism]") {
  // As under expert choice: the first 40 tokens have all 16 experts, the rest 0 to 2, so the
  // threads' runs of tokens are far from equal counts.
  const index_t Tn = 300, E = 16, d = 230;
  std::vector<index_t> begin(std::size_t(Tn) + 1, 0), experts;
  std::vector<float> weights;
  for (index_t t = 0; t < Tn; ++t) {
    const index_t count = t < 40 ? E : t % 3;
    for (index_t j = 0; j < count; ++j) {
      experts.push_back((t + j) % E);
      weights.push_back(0.01f * float((t * 7 + j) % 13) - 0.05f);
    }
    begin[std::size_t(t) + 1] = static_cast<index_t>(experts.size());
  }
  moe::Routing<float> plan;
  moe::build_routing(Tn, E, begin.data(), experts.data(), weights.data(), plan);
  const index_t A = plan.num_assignments();
  REQUIRE(A * d > 65536);  // large enough for dispatch and combine to open a parallel region
  REQUIRE(Tn * d > 65536);
  const moe::Matrix<float> x = random_matrix<float>(Tn, d, 3);

  auto run = [&](int threads, std::vector<float>& buffer, moe::Matrix<float>& y) {
    omp_set_num_threads(threads);
    buffer.assign(std::size_t(A * d), -1.0f);
    y = moe::Matrix<float>::Constant(Tn, d, -1.0f);
    moe::dispatch(moe::simd::default_arch{}, plan, x.data(), d, d, buffer.data());
    // Combine the dispatched rows as the experts' outputs: y row t = (Σ its weights) · x row t.
    moe::combine(moe::simd::default_arch{}, plan, buffer.data(), d, y.data(), d);
  };
  std::vector<float> buffer1, buffer2;
  moe::Matrix<float> y1, y2;
  run(1, buffer1, y1);
  run(2, buffer2, y2);
  omp_set_num_threads(2);
  REQUIRE(buffer1 == buffer2);
  REQUIRE(y1 == y2);
  for (index_t a = 0; a < A; ++a)
    for (index_t i = 0; i < d; ++i) REQUIRE(buffer2[std::size_t(a * d + i)] == x(plan.token[std::size_t(a)], i));
  for (index_t t = 0; t < Tn; ++t) {
    for (index_t i = 0; i < d; ++i) {
      double want = 0;
      for (index_t c = begin[std::size_t(t)]; c < begin[std::size_t(t) + 1]; ++c) want += double(weights[std::size_t(c)]) * double(x(t, i));
      REQUIRE(double(y2(t, i)) == Approx(want).epsilon(1e-6).margin(1e-6));  // a few float ulps
    }
  }
}

TEST_CASE("Blocked products give the same bits on 1 and 2 threads across many panels", "[threads][determinism][simd]") {
  // k = 1024 floats: 48 weight rows per L2 panel, so n = 200 is 5 panels (the last partial), each
  // thread fetching the next panel it claimed while its later token blocks run; m covers one
  // block, near-equal blocks (13, 33) and blocks of 5 (70).
  using Arch = moe::simd::default_arch;
  const std::size_t k = 1024, n = 200;
  const moe::Matrix<float> w = random_matrix<float>(index_t(n), index_t(k), 3), w_up = random_matrix<float>(index_t(n), index_t(k), 4);
  for (const std::size_t m : {std::size_t(5), std::size_t(13), std::size_t(33), std::size_t(70)}) {
    CAPTURE(m);
    const moe::Matrix<float> x = random_matrix<float>(index_t(m), index_t(k), 5 + std::uint32_t(m));
    auto products = [&](int threads, std::vector<float>& y, std::vector<float>& h) {
      omp_set_num_threads(threads);
      y.assign(m * n, 0.0f);
      h.assign(m * n, 0.0f);
      moe::simd::matmul_nt(Arch{}, x.data(), m, k, w.data(), n, y.data(), n);
      moe::simd::gated_matmul_nt<moe::SiLU>(Arch{}, x.data(), m, k, w.data(), w_up.data(), n, h.data(), n);
    };
    std::vector<float> y1, h1, y2, h2;
    products(1, y1, h1);
    products(2, y2, h2);
    REQUIRE(y1 == y2);
    REQUIRE(h1 == h2);
    // Against a double reference, so the equal bits are also right ones: within the standard
    // bound for a float sum of k products, k · 2⁻²⁴ · Σ|x_i w_i|.
    for (std::size_t j = 0; j < m; ++j)
      for (std::size_t r = 0; r < n; ++r) {
        double dot = 0, magnitude = 0;
        for (std::size_t i = 0; i < k; ++i) {
          const double p = double(x(index_t(j), index_t(i))) * double(w(index_t(r), index_t(i)));
          dot += p;
          magnitude += std::abs(p);
        }
        REQUIRE(std::abs(dot - double(y1[j * n + r])) <= double(k) * 0x1p-24 * magnitude);
      }
  }
  omp_set_num_threads(2);
}

TEST_CASE("even_panel_rows shares the rows out in panels of equal size, as many as a multiple of the threads",
          "[threads][schedule]") {
  using moe::simd::even_panel_rows;
  // One thread: the panels stay as they are.
  REQUIRE(even_panel_rows(48, 64, 8, 1) == 48);
  // 64 rows in panels of at most 48 are 2 panels: 2 threads get 32 rows each (not 48 and 16).
  REQUIRE(even_panel_rows(48, 64, 8, 2) == 32);
  // 128 rows are 3 such panels, rounded up to 4 for 2 threads: 32 rows each.
  REQUIRE(even_panel_rows(48, 128, 8, 2) == 32);
  // 16 rows in one panel of 32: 2 panels of 8, one per thread.
  REQUIRE(even_panel_rows(32, 16, 8, 2) == 8);
  // 1024 rows in panels of at most 96 are 11 panels, rounded up to 12: 86 rows each, and 88 in
  // multiples of 8 (11 panels of 88 and one of 56).
  REQUIRE(even_panel_rows(96, 1024, 8, 2) == 88);
  for (const int threads : {2, 3, 4})
    for (const std::size_t granule : {std::size_t(8), std::size_t(16)})
      for (std::size_t panel = granule; panel <= 12 * granule; panel += granule)
        for (std::size_t n = 1; n <= 600; ++n) {
          CAPTURE(threads, granule, panel, n);
          const std::size_t rows = even_panel_rows(panel, n, granule, threads);
          REQUIRE(rows >= granule);
          REQUIRE(rows <= panel);
          REQUIRE(rows % granule == 0);
          // Never more panels than the count rounded up to a multiple of the threads ...
          const auto t = std::size_t(threads);
          const std::size_t before = (n + panel - 1) / panel, after = (n + rows - 1) / rows;
          REQUIRE(after <= (before + t - 1) / t * t);
          // ... each within a granule of the exact share of that many.
          REQUIRE(rows < (n + after - 1) / after + granule);
        }
}

TEST_CASE(
    "matmul_nt and gated_matmul_nt give the same bits on 1 and 2 threads where panels are evened out or the tokens split",
    "[threads][determinism]") {
  using moe::simd::default_arch;
  // n = 64 rows of 1024 are panels of 48 and 16 rows on one thread and of 32 and 32 on two (k =
  // 1024, m = 16: 2^20 multiply-adds, worth a second thread); n = 16 rows of 4096 at m = 128 are
  // one panel on one thread and two on two; 160 rows at m = 1 (640 KiB of weights) 48 · 3 + 16 and
  // 40 · 4. n = 8 rows are one panel on any thread count, so matmul_nt's threads split the tokens
  // (37 = 19 + 18, 128 = 64 + 64); the gated product's 16-pair granule keeps them on one thread.
  // Each product also against a plain double dot product.
  struct Shape {
    std::size_t m, n, k;
  };
  for (const Shape s : {Shape{16, 64, 1024}, Shape{128, 16, 4096}, Shape{1, 160, 1024}, Shape{37, 8, 4096},
                        Shape{128, 8, 1024}}) {
    CAPTURE(s.m, s.n, s.k);
    REQUIRE(moe::worth_threads<float>(s.m, s.n, s.k));
    const moe::Matrix<float> x = random_matrix<float>(index_t(s.m), index_t(s.k), 1);
    const moe::Matrix<float> w = random_matrix<float>(index_t(s.n), index_t(s.k), 2);
    const moe::Matrix<float> w_up = random_matrix<float>(index_t(s.n), index_t(s.k), 3);
    std::vector<float> y[2], h[2];
    for (const int threads : {1, 2}) {
      omp_set_num_threads(threads);
      auto& yt = y[threads - 1];
      auto& ht = h[threads - 1];
      yt.assign(s.m * s.n, 0.0f);
      ht.assign(s.m * s.n, 0.0f);
      moe::simd::matmul_nt(default_arch{}, x.data(), s.m, s.k, w.data(), s.n, yt.data(), s.n);
      moe::simd::gated_matmul_nt<moe::SiLU>(default_arch{}, x.data(), s.m, s.k, w.data(), w_up.data(), s.n, ht.data(),
                                            s.n);
    }
    REQUIRE(y[0] == y[1]);
    REQUIRE(h[0] == h[1]);
    double worst = 0;
    for (std::size_t j = 0; j < s.m; ++j)
      for (std::size_t r = 0; r < s.n; ++r) {
        double dot = 0;
        for (std::size_t c = 0; c < s.k; ++c) dot += double(x.data()[j * s.k + c]) * double(w.data()[r * s.k + c]);
        worst = std::max(worst, std::abs(double(y[1][j * s.n + r]) - dot));
      }
    // That the split computes the product at all (kernels_test bounds each element's rounding);
    // here k roundings, of partial sums near √k in size and of random sign, come to about k · eps
    // (2.4e-4 at k = 4096).
    REQUIRE(worst <= 1e-3);
  }
}

TEST_CASE("A top-k route computes each token as it would alone, on 1 and 2 threads, across token runs and blocks",
          "[threads][determinism][routing]") {
  // E = 256 experts of width 64 and T = 300: the product is worth a second thread, so two runs of
  // 150 tokens, each in blocks of 128 logit rows (32,768 logits) and 22. Group-limited sigmoid
  // routing with a selection bias (DeepSeek-V3) and softmax after top-k with capacity (Megatron).
  const index_t E = 256, d = 64, Tn = 300;
  REQUIRE(moe::worth_threads<float>(std::size_t(Tn), std::size_t(E), std::size_t(d)));
  moe::Vector<float> bias = random_matrix<float>(E, 1, 11, 0.01).col(0);
  moe::TopKOptions capped = moe::presets::megatron(4, false, 1.0);
  for (const moe::TopKOptions& options : {moe::presets::deepseek_v3(), capped}) {
    moe::TopKRouter<float> router(random_matrix<float>(E, d, 12), options);
    if (options.expert_groups > 1) router.set_selection_bias(bias);
    const moe::Matrix<float> x = random_matrix<float>(Tn, d, 13);
    moe::RouterOutput<float> out[2];
    for (const int threads : {1, 2}) {
      omp_set_num_threads(threads);
      router.route(x, out[threads - 1]);
    }
    omp_set_num_threads(2);
    REQUIRE(out[0].logits() == out[1].logits());
    REQUIRE(out[0].scores() == out[1].scores());
    REQUIRE(out[0].plan.token == out[1].plan.token);
    REQUIRE(out[0].plan.weight == out[1].plan.weight);
    REQUIRE(out[0].plan.dropped == out[1].plan.dropped);
    REQUIRE(out[0].top_k_ids() == out[1].top_k_ids());
    // Each token at the edges of the runs and blocks, routed alone: the same logits, scores and
    // choices (capacity aside, which depends on the batch: its pre-capacity ids), bit for bit.
    for (const index_t t : {index_t(0), index_t(127), index_t(128), index_t(149), index_t(150), index_t(277),
                            index_t(278), index_t(299)}) {
      CAPTURE(t);
      moe::RouterOutput<float> alone;
      router.route(x.row(t), alone);
      REQUIRE(alone.logits().row(0) == out[1].logits().row(t));
      REQUIRE(alone.scores().row(0) == out[1].scores().row(t));
      REQUIRE(alone.top_k_ids().row(0) == out[1].top_k_ids().row(t));
    }
  }
}

TEST_CASE("A top-k route names the first non-finite logit in token order, whichever run or block holds it",
          "[threads][errors][routing]") {
  const index_t E = 256, d = 64, Tn = 300;  // as above: runs of 150 tokens, blocks of 128 and 22
  moe::TopKRouter<float> router(random_matrix<float>(E, d, 12), moe::presets::mixtral());
  for (const int threads : {1, 2}) {
    omp_set_num_threads(threads);
    CAPTURE(threads);
    const moe::Matrix<float> clean = random_matrix<float>(Tn, d, 13);
    moe::RouterOutput<float> out;
    // One non-finite token alone, first and last of the runs and blocks.
    for (const index_t t : {index_t(0), index_t(127), index_t(128), index_t(149), index_t(150), index_t(277),
                            index_t(278), index_t(299)}) {
      moe::Matrix<float> x = clean;
      x(t, 5) = std::numeric_limits<float>::infinity();
      REQUIRE_THROWS_WITH(router.route(x, out),
                          Catch::Contains("logit is not finite (token = " + std::to_string(t) + ", expert = 0,"));
      REQUIRE(out.plan.num_assignments() == 0);
    }
    // Several, in both runs: the first in token order.
    moe::Matrix<float> x = clean;
    x(280, 5) = std::numeric_limits<float>::infinity();
    x(200, 0) = std::numeric_limits<float>::quiet_NaN();
    x(140, 3) = -std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_WITH(router.route(x, out), Catch::Contains("logit is not finite (token = 140, expert = 0,"));
    x(3, 0) = std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_WITH(router.route(x, out), Catch::Contains("logit is not finite (token = 3, expert = 0,"));
    router.route(clean, out);
    REQUIRE(out.plan.num_assignments() == 2 * Tn);
  }
  omp_set_num_threads(2);
}
