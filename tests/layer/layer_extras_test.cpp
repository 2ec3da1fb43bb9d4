// Zero-computation experts, shared experts, the dropped-token policy and routing statistics,
// against per-token double references.
#include <catch2/catch.hpp>

#include <limits>
#include <memory>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace layer_extras_test {

using namespace moe_test;

namespace {

struct Model {
  index_t d = 11, ff = 9, E_ffn = 3;
  std::vector<moe::Matrix<double>> wg, wu, wd;
  Model() {
    for (index_t e = 0; e < E_ffn + 2; ++e) {  // two extra for shared experts
      wg.push_back(random_matrix<double>(ff, d, 10 + std::uint32_t(e), 0.4));
      wu.push_back(random_matrix<double>(ff, d, 20 + std::uint32_t(e), 0.4));
      wd.push_back(random_matrix<double>(d, ff, 30 + std::uint32_t(e), 0.4));
    }
  }
  moe::SwiGLU<double> expert(index_t e) const { return moe::SwiGLU<double>(wg[std::size_t(e)], wu[std::size_t(e)], wd[std::size_t(e)]); }
  std::vector<double> ref(index_t e, const std::vector<double>& x) const {
    return swiglu(to_double(wg[std::size_t(e)]), to_double(wu[std::size_t(e)]), to_double(wd[std::size_t(e)]), x);
  }
};

}  // namespace

TEST_CASE("Zero-computation experts take routing slots and cost no products", "[layer][zero_compute]") {
  const Model m;
  const index_t E = m.E_ffn + 3;  // + zero, copy, constant (mixed, MoE++)
  const moe::Matrix<double> gate = random_matrix<double>(E, m.d, 5, 2.0);
  const moe::Matrix<double> constant = random_matrix<double>(m.d, 1, 6);
  const moe::Matrix<double> mix = random_matrix<double>(2, m.d, 7);
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < m.E_ffn; ++e) experts.push_back(m.expert(e));
  std::vector<moe::ZeroComputeExpert<double>> zc = {moe::ZeroComputeExpert<double>::zero(m.d), moe::ZeroComputeExpert<double>::copy(m.d),
                                                    moe::ZeroComputeExpert<double>::constant(constant.col(0), mix)};
  moe::TopKOptions o;
  o.k = 2;
  moe::MoELayer layer(moe::TopKRouter<double>(gate, o), experts, zc);
  const moe::Matrix<double> x = random_matrix<double>(60, m.d, 8);
  moe::Workspace<double> ws;
  const moe::Matrix<double> y = layer.forward(x, ws);
  for (index_t e = m.E_ffn; e < E; ++e) REQUIRE(ws.routing.plan.tokens_of(e) > 0);  // every kind is exercised

  const Mat xd = to_double(x), gd = to_double(gate);
  for (index_t t = 0; t < x.rows(); ++t) {
    const std::vector<double> p = softmax(linear(gd, xd[std::size_t(t)]));
    std::vector<double> ref(std::size_t(m.d), 0.0);
    for (index_t e : top_k(p, 2)) {
      std::vector<double> out(std::size_t(m.d), 0.0);
      if (e < m.E_ffn) {
        out = m.ref(e, xd[std::size_t(t)]);
      } else if (e == m.E_ffn + 1) {
        out = xd[std::size_t(t)];
      } else if (e == m.E_ffn + 2) {
        const std::vector<double> a = softmax(linear(to_double(mix), xd[std::size_t(t)]));
        for (index_t i = 0; i < m.d; ++i) out[std::size_t(i)] = a[0] * xd[std::size_t(t)][std::size_t(i)] + a[1] * constant(i, 0);
      }
      for (index_t i = 0; i < m.d; ++i) ref[std::size_t(i)] += p[std::size_t(e)] * out[std::size_t(i)];
    }
    for (index_t i = 0; i < m.d; ++i) REQUIRE(y(t, i) == Approx(ref[std::size_t(i)]).epsilon(1e-12).margin(1e-12));
  }
  // The plain constant expert outputs its vector.
  std::vector<double> out(std::size_t(m.d));
  moe::ZeroComputeExpert<double>::constant(constant.col(0)).forward(moe::simd::default_arch{}, x.data(), 1, out.data());
  for (index_t i = 0; i < m.d; ++i) REQUIRE(out[std::size_t(i)] == constant(i, 0));

  REQUIRE_THROWS_WITH(moe::MoELayer(moe::TopKRouter<double>(gate, o), experts),
                      Catch::Contains("experts.size() + zero_compute.size() = 3") && Catch::Contains("router.num_experts() = 6"));
  REQUIRE_THROWS_WITH(moe::ZeroComputeExpert<double>::constant(constant.col(0), random_matrix<double>(3, m.d, 1)), Catch::Contains("mix.rows() = 3"));
  REQUIRE_THROWS_WITH(moe::ZeroComputeExpert<double>::zero(0), Catch::Contains("d_model = 0"));
}

// constant_view reads the caller's buffers: the same bits as the copying constant, forward and
// backward, and an update to the buffers is what the next forward uses.
TEST_CASE("ZeroComputeExpert::constant_view sees its buffers as they are updated", "[layer][zero_compute]") {
  const Model m;
  const index_t E = m.E_ffn + 2;  // + a plain and a mixed constant expert
  const moe::Matrix<double> gate = random_matrix<double>(E, m.d, 5, 2.0);
  moe::Vector<double> value = random_matrix<double>(m.d, 1, 6).col(0), value2 = random_matrix<double>(m.d, 1, 16).col(0);
  moe::Matrix<double> mix = random_matrix<double>(2, m.d, 7);
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < m.E_ffn; ++e) experts.push_back(m.expert(e));
  moe::TopKOptions o;
  o.k = 2;
  auto copying = [&] {
    return moe::MoELayer(moe::TopKRouter<double>(gate, o), experts,
                         {moe::ZeroComputeExpert<double>::constant(value2), moe::ZeroComputeExpert<double>::constant(value, mix)});
  };
  const moe::MoELayer viewing(moe::TopKRouter<double>(gate, o), experts,
                              {moe::ZeroComputeExpert<double>::constant_view(moe::ConstVectorMap<double>(value2.data(), m.d)),
                               moe::ZeroComputeExpert<double>::constant_view(moe::ConstVectorMap<double>(value.data(), m.d),
                                                                             moe::ConstMatrixMap<double>(mix.data(), 2, m.d))});
  const moe::Matrix<double> x = random_matrix<double>(40, m.d, 8), dy = random_matrix<double>(40, m.d, 9);
  auto run = [&](const auto& layer, moe::Matrix<double>& y, moe::Matrix<double>& dx) {
    moe::TrainingWorkspace<double> ws;
    y.resize(x.rows(), m.d);
    dx.resize(x.rows(), m.d);
    layer.forward_train(x, y, ws);
    for (index_t e = m.E_ffn; e < E; ++e) REQUIRE(ws.routing.plan.tokens_of(e) > 0);
    auto grads = layer.make_gradients();
    layer.backward(x, dy, dx, grads, ws);
    return grads;
  };
  for (int step = 0; step < 2; ++step) {
    CAPTURE(step);
    moe::Matrix<double> y_copy, dx_copy, y_view, dx_view;
    const auto g_copy = run(copying(), y_copy, dx_copy);
    const auto g_view = run(viewing, y_view, dx_view);
    REQUIRE(y_view == y_copy);
    REQUIRE(dx_view == dx_copy);
    for (std::size_t z = 0; z < 2; ++z) {
      REQUIRE(g_view.zero_compute[z].value == g_copy.zero_compute[z].value);
      REQUIRE(g_view.zero_compute[z].mix == g_copy.zero_compute[z].mix);
    }
    REQUIRE(g_copy.zero_compute[1].mix.size() == 2 * m.d);
    // An optimizer step in place; the copying layer is rebuilt from the new values above.
    value -= 0.5 * g_view.zero_compute[1].value;
    value2 -= 0.5 * g_view.zero_compute[0].value;
    mix -= 0.5 * g_view.zero_compute[1].mix;
    REQUIRE(viewing.zero_compute_experts()[1].value() == value);
  }
  REQUIRE_THROWS_WITH(moe::ZeroComputeExpert<double>::constant_view(moe::ConstVectorMap<double>(value.data(), m.d),
                                                                    moe::ConstMatrixMap<double>(mix.data(), 1, m.d)),
                      Catch::Contains("constant_view") && Catch::Contains("mix.rows() = 1"));
  REQUIRE_THROWS_WITH(moe::ZeroComputeExpert<double>::constant_view(moe::ConstVectorMap<double>(value.data(), m.d),
                                                                    moe::ConstMatrixMap<double>(mix.data(), 2, m.d - 1)),
                      Catch::Contains("mix.cols() = 10") && Catch::Contains("value.size() = 11"));
  REQUIRE_THROWS_WITH(moe::ZeroComputeExpert<double>::constant_view(moe::ConstVectorMap<double>(value.data(), 0)),
                      Catch::Contains("d_model = 0"));
}

TEST_CASE("Shared experts are added to every token, optionally sigmoid-gated", "[layer][shared]") {
  const Model m;
  const moe::Matrix<double> gate = random_matrix<double>(m.E_ffn, m.d, 5, 2.0);
  const moe::Matrix<double> shared_gate = random_matrix<double>(1, m.d, 9);
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < m.E_ffn; ++e) experts.push_back(m.expert(e));
  const bool gated = GENERATE(false, true);
  moe::TopKOptions o = moe::presets::qwen2_moe(2, true);
  moe::MoELayer layer(moe::TopKRouter<double>(gate, o), experts);
  layer.set_shared_experts({m.expert(m.E_ffn), m.expert(m.E_ffn + 1)},
                           gated ? moe::Weight<double>::own(shared_gate) : moe::Weight<double>());
  const moe::Matrix<double> x = random_matrix<double>(23, m.d, 8);
  moe::Workspace<double> ws;
  // In place: shared experts must read x before combine writes y. Contiguous rows, which the
  // shared experts read where they are, or rows d + 5 apart, which they read from a copy.
  const index_t row_gap = GENERATE(index_t(0), index_t(5));
  moe::Matrix<double> rows = moe::Matrix<double>::Constant(x.rows(), m.d + row_gap, -3.0);
  rows.leftCols(m.d) = x;
  moe::MatrixRef<double> y = rows.leftCols(m.d);
  REQUIRE(y.outerStride() == m.d + row_gap);
  layer.forward(y, y, ws);
  if (row_gap > 0) REQUIRE((rows.rightCols(row_gap).array() == -3.0).all());  // the gap untouched
  const Mat xd = to_double(x);
  for (index_t t = 0; t < x.rows(); ++t) {
    const std::vector<double> p = softmax(linear(to_double(gate), xd[std::size_t(t)]));
    const std::vector<index_t> chosen = top_k(p, 2);
    const double sum = p[std::size_t(chosen[0])] + p[std::size_t(chosen[1])];
    const double g = gated ? sigmoid(linear(to_double(shared_gate), xd[std::size_t(t)])[0]) : 1.0;
    std::vector<double> ref(std::size_t(m.d), 0.0);
    for (index_t e : chosen) {
      const std::vector<double> out = m.ref(e, xd[std::size_t(t)]);
      for (index_t i = 0; i < m.d; ++i) ref[std::size_t(i)] += p[std::size_t(e)] / sum * out[std::size_t(i)];
    }
    for (index_t s = m.E_ffn; s < m.E_ffn + 2; ++s) {
      const std::vector<double> out = m.ref(s, xd[std::size_t(t)]);
      for (index_t i = 0; i < m.d; ++i) ref[std::size_t(i)] += g * out[std::size_t(i)];
    }
    for (index_t i = 0; i < m.d; ++i) REQUIRE(y(t, i) == Approx(ref[std::size_t(i)]).epsilon(1e-12).margin(1e-12));
  }
  // backward on the same strided x (the shared experts then read a copy) gives the bits of
  // contiguous x (which they read in place); their gradients' values: tests/layer/backward_test.cpp.
  const moe::Matrix<double> dy = random_matrix<double>(x.rows(), m.d, 11);
  auto train = [&](const moe::ConstMatrixRef<double>& input, moe::Matrix<double>& dx) {
    moe::TrainingWorkspace<double> tws;
    moe::Matrix<double> out(x.rows(), m.d);
    layer.forward_train(input, out, tws);  // (no RouteContext: the overload without one)
    auto grads = layer.make_gradients();
    layer.backward(input, dy, dx, grads, tws);
    return grads;
  };
  moe::Matrix<double> dx_contiguous(x.rows(), m.d), dx_strided(x.rows(), m.d);
  const auto g_contiguous = train(x, dx_contiguous);
  rows.leftCols(m.d) = x;
  const auto g_strided = train(rows.leftCols(m.d), dx_strided);
  REQUIRE(dx_strided == dx_contiguous);
  REQUIRE(g_strided.shared_gate == g_contiguous.shared_gate);
  for (std::size_t s = 0; s < 2; ++s) {
    std::vector<moe::Matrix<double>> strided, contiguous;
    g_strided.shared[s].for_each([&](const moe::Matrix<double>& w) { strided.push_back(w); });
    g_contiguous.shared[s].for_each([&](const moe::Matrix<double>& w) { contiguous.push_back(w); });
    REQUIRE(strided == contiguous);
  }
  REQUIRE_THROWS_WITH(layer.set_shared_experts({m.expert(0)}, moe::Weight<double>::own(random_matrix<double>(2, m.d, 1))),
                      Catch::Contains("gate.rows() = 2"));
}

TEST_CASE("Switch: a dropped token leaves the layer as probability times its input", "[layer][switch]") {
  const Model m;
  const index_t E = m.E_ffn, Tn = 16;
  moe::Matrix<double> gate = random_matrix<double>(E, m.d, 5, 0.3);
  gate.row(0).setConstant(1.0);  // expert 0 is popular for positive inputs, so it overflows
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < E; ++e) experts.push_back(m.expert(e));
  moe::MoELayer layer(moe::TopKRouter<double>(gate, moe::presets::switch_transformers(1.0)), experts);
  layer.set_dropped_tokens(moe::DroppedTokens::pass_through);
  const moe::Matrix<double> x = random_matrix<double>(Tn, m.d, 8).cwiseAbs();
  // Two sequences of 8 tokens: capacity ceil(1.0 · 8 · 1 / 3) = 3 per expert and sequence.
  const std::vector<index_t> sequences = {0, 8, 16};
  moe::Workspace<double> ws;
  moe::Matrix<double> y(Tn, m.d);
  layer.forward(x, moe::RouteContext::with_groups(sequences), y, ws);
  REQUIRE_FALSE(ws.routing.plan.dropped.empty());

  const Mat xd = to_double(x);
  for (index_t s = 0; s < 2; ++s) {
    std::vector<index_t> load(std::size_t(E), 0);
    for (index_t t = 8 * s; t < 8 * s + 8; ++t) {
      const std::vector<double> p = softmax(linear(to_double(gate), xd[std::size_t(t)]));
      const index_t e = top_k(p, 1)[0];
      const bool kept = load[std::size_t(e)]++ < 3;  // earlier positions win
      const std::vector<double> out = kept ? m.ref(e, xd[std::size_t(t)]) : xd[std::size_t(t)];
      for (index_t i = 0; i < m.d; ++i) REQUIRE(y(t, i) == Approx(p[std::size_t(e)] * out[std::size_t(i)]).epsilon(1e-12).margin(1e-12));
    }
  }
}

TEST_CASE("Routing statistics match their definitions", "[balance][stats]") {
  const std::vector<index_t> begin = {0, 2, 3, 4, 6};
  const std::vector<index_t> experts = {0, 1, 0, 0, 2, 0};
  const std::vector<double> weights(6, 0.5);
  moe::Routing<double> plan;
  moe::build_routing(4, 4, begin.data(), experts.data(), weights.data(), plan);
  plan.dropped = {1};
  plan.rerouted = {0, 3};
  moe::Matrix<double> scores(4, 4);  // two uniform rows (entropy log 4), two one-hot rows (0)
  scores << 0.25, 0.25, 0.25, 0.25, 1.0, 0.0, 0.0, 0.0, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0, 1.0, 0.0;
  const moe::RoutingStats s = moe::routing_stats(plan, moe::ConstMatrixMap<double>(scores.data(), 4, 4));
  REQUIRE(s.load == std::vector<index_t>{4, 1, 1, 0});
  REQUIRE(s.assignments == 6);
  REQUIRE(s.dropped_tokens == 1);
  REQUIRE(s.rerouted_tokens == 2);
  REQUIRE(s.imbalance == Approx(4.0 / 1.5).epsilon(1e-12));
  REQUIRE(s.load_entropy == Approx(-(4.0 / 6) * std::log(4.0 / 6) - 2 * (1.0 / 6) * std::log(1.0 / 6)).epsilon(1e-12));
  REQUIRE(s.mean_score_entropy == Approx(std::log(4.0) / 2).epsilon(1e-12));
  const moe::Routing<double> empty;
  REQUIRE(moe::routing_stats(empty).imbalance == 0);
  // Fewer tokens than experts: the score entropy is a mean over the tokens (2), not the experts (4).
  const std::vector<index_t> two_begin = {0, 1, 2}, two_experts = {1, 3};
  moe::Routing<double> two;
  moe::build_routing(2, 4, two_begin.data(), two_experts.data(), weights.data(), two);
  moe::Matrix<double> two_scores(2, 4);
  two_scores << 0.25, 0.25, 0.25, 0.25, 0.5, 0.5, 0.0, 0.0;
  double entropy_sum = 0;
  for (index_t t = 0; t < 2; ++t)
    for (index_t e = 0; e < 4; ++e)
      if (two_scores(t, e) > 0) entropy_sum -= two_scores(t, e) * std::log(two_scores(t, e));
  REQUIRE(moe::routing_stats(two, moe::ConstMatrixMap<double>(two_scores.data(), 2, 4)).mean_score_entropy ==
          Approx(entropy_sum / 2).epsilon(1e-12));
  // An empty batch over 3 experts: every load 0, nothing to measure.
  moe::Routing<double> no_tokens;
  no_tokens.clear(3);
  const moe::RoutingStats none = moe::routing_stats(no_tokens, moe::ConstMatrixMap<double>(nullptr, 0, 3));
  REQUIRE(none.load == std::vector<index_t>{0, 0, 0});
  REQUIRE(none.assignments == 0);
  REQUIRE(none.imbalance == 0);
  REQUIRE(none.load_entropy == 0);
  REQUIRE(none.mean_score_entropy == 0);
  // Scores of another shape than the plan's [tokens, experts] are refused.
  REQUIRE_THROWS_WITH(moe::routing_stats(plan, moe::ConstMatrixMap<double>(scores.data(), 2, 4)),
                      Catch::Contains("routing_stats") && Catch::Contains("scores.rows() = 2") && Catch::Contains("plan.num_tokens = 4"));
  REQUIRE_THROWS_WITH(moe::routing_stats(plan, moe::ConstMatrixMap<double>(scores.data(), 4, 3)),
                      Catch::Contains("scores.cols() = 3") && Catch::Contains("plan.num_experts = 4"));
  // So are scores that are no probabilities, NaN included (its entropy term was skipped).
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), -0.25, 1.5}) {
    moe::Matrix<double> wrong = scores;
    wrong(1, 2) = bad;
    REQUIRE_THROWS_AS(moe::routing_stats(plan, moe::ConstMatrixMap<double>(wrong.data(), 4, 4)), moe::numeric_error);
    REQUIRE_THROWS_WITH(moe::routing_stats(plan, moe::ConstMatrixMap<double>(wrong.data(), 4, 4)),
                        Catch::Contains("routing_stats: scores(1, 2) is not a probability"));
  }
}

TEST_CASE("A copied workspace or routing keeps its own batch, after its source routes again or is gone",
          "[layer][workspace]") {
  // Their logits and scores used to be views into the source's buffers: a copy kept for a later
  // backward saw the source's next batch (wrong router gradients), or freed memory.
  const Model m;
  const moe::Matrix<double> gate = random_matrix<double>(m.E_ffn, m.d, 5, 2.0);
  moe::TopKOptions o;
  o.k = 2;
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < m.E_ffn; ++e) experts.push_back(m.expert(e));
  const moe::MoELayer layer(moe::TopKRouter<double>(gate, o), experts);
  const moe::Matrix<double> x1 = random_matrix<double>(7, m.d, 8), x2 = random_matrix<double>(7, m.d, 9);
  const moe::Matrix<double> dy = random_matrix<double>(7, m.d, 10);
  moe::Matrix<double> y(7, m.d), dx_ref(7, m.d), dx(7, m.d);
  auto g_ref = layer.make_gradients(), g = layer.make_gradients();
  moe::TrainingWorkspace<double> fresh;
  layer.forward_train(x1, y, fresh);
  layer.backward(x1, dy, dx_ref, g_ref, fresh);

  SECTION("the source routes the next batch") {
    moe::TrainingWorkspace<double> ws;
    layer.forward_train(x1, y, ws);
    moe::TrainingWorkspace<double> kept = ws;
    layer.forward_train(x2, y, ws);
    layer.backward(x1, dy, dx, g, kept);
  }
  SECTION("the source is destroyed") {
    auto ws = std::make_unique<moe::TrainingWorkspace<double>>();
    layer.forward_train(x1, y, *ws);
    moe::TrainingWorkspace<double> kept = *ws;
    ws.reset();
    layer.backward(x1, dy, dx, g, kept);
  }
  CHECK(dx == dx_ref);
  CHECK(g.router == g_ref.router);
  for (index_t e = 0; e < m.E_ffn; ++e) CHECK(g.experts[std::size_t(e)].w_gate == g_ref.experts[std::size_t(e)].w_gate);

  // Soft routing: its logits, dispatch and combine weights.
  moe::SoftOptions so;
  so.slots_per_expert = 2;
  const moe::SoftRouter<double> soft(random_matrix<double>(m.d, 2 * m.E_ffn, 11), m.E_ffn, so);
  moe::SoftRouting<double> expected, routing;
  soft.route(x1, expected);
  soft.route(x1, routing);
  const moe::SoftRouting<double> kept = routing;
  soft.route(x2, routing);
  CHECK(kept.logits() == expected.logits());
  CHECK(kept.dispatch_weights() == expected.dispatch_weights());
  CHECK(kept.combine_weights() == expected.combine_weights());
}

namespace {

// A router type written outside moe, to its contract alone (README, "Your own router type"): top-1
// by logit (ties to the lower expert), weighted by the sigmoid of that logit. Its backward has no
// scratch parameter, so the layer's call for such routers runs too.
template <class T>
class ArgmaxSigmoidRouter {
 public:
  using Scalar = T;
  explicit ArgmaxSigmoidRouter(moe::Matrix<T> weight) : weight_(std::move(weight)) {}
  index_t num_experts() const { return weight_.rows(); }
  index_t d_model() const { return weight_.cols(); }
  std::uint64_t config_fingerprint() const { return 0xa5a5; }

  template <class Arch>
  void route(const moe::ConstMatrixRef<T>& x, const moe::RouteContext&, moe::RouterOutput<T>& out, Arch) const {
    const index_t T_ = x.rows(), E = num_experts();
    out.reshape(T_, E, config_fingerprint());
    out.mutable_logits() = x * weight_.transpose();
    out.mutable_scores() = out.logits().unaryExpr([](T z) { return T(1) / (T(1) + std::exp(-z)); });
    std::vector<index_t> begin(static_cast<std::size_t>(T_ + 1)), chosen(static_cast<std::size_t>(T_));
    std::vector<T> weight(static_cast<std::size_t>(T_));
    for (index_t t = 0; t < T_; ++t) {
      index_t best = 0;
      for (index_t e = 1; e < E; ++e)
        if (out.logits()(t, e) > out.logits()(t, best)) best = e;
      begin[std::size_t(t)] = t;
      chosen[std::size_t(t)] = best;
      weight[std::size_t(t)] = out.scores()(t, best);
    }
    begin[std::size_t(T_)] = T_;
    moe::build_routing(T_, E, begin.data(), chosen.data(), weight.data(), out.plan);
  }

  template <class Arch>
  void backward(const moe::ConstMatrixRef<T>& x, const moe::RouterOutput<T>& out, const T* grad_weight, const T*,
                const T* extra_dlogits, moe::MatrixRef<T> dx, moe::MatrixRef<T> dweight, Arch) const {
    const index_t T_ = x.rows(), E = num_experts();
    moe::Matrix<T> dlogits = moe::Matrix<T>::Zero(T_, E);
    if (extra_dlogits != nullptr) dlogits = moe::ConstMatrixMap<T>(extra_dlogits, T_, E);
    for (index_t a = 0; a < out.plan.num_assignments(); ++a) {
      const index_t t = out.plan.token[a], e = out.plan.expert_of_assignment(a);
      const T s = out.scores()(t, e);
      dlogits(t, e) += grad_weight[a] * s * (T(1) - s);
    }
    dweight += dlogits.transpose() * x;
    dx += dlogits * weight_;
  }

 private:
  moe::Matrix<T> weight_;
};

// Forward members only: a router for inference.
struct InferenceOnlyRouter {
  using Scalar = float;
  index_t num_experts() const { return 2; }
  index_t d_model() const { return 4; }
  template <class Arch>
  void route(const moe::ConstMatrixRef<float>&, const moe::RouteContext&, moe::RouterOutput<float>&, Arch) const {}
};
struct NoRouteRouter {
  using Scalar = float;
  index_t num_experts() const { return 2; }
  index_t d_model() const { return 4; }
};

}  // namespace

TEST_CASE("A router type of your own: the contract, forward against a reference, gradients against differences",
          "[layer][router_concept][backward]") {
  STATIC_REQUIRE(moe::is_training_router_v<moe::TopKRouter<float>>);
  STATIC_REQUIRE(moe::is_training_router_v<moe::ExpertChoiceRouter<double>>);
  STATIC_REQUIRE(moe::is_training_router_v<moe::HashRouter<float>>);
  STATIC_REQUIRE(moe::is_training_router_v<ArgmaxSigmoidRouter<double>>);
  STATIC_REQUIRE(moe::is_router_v<InferenceOnlyRouter>);
  STATIC_REQUIRE_FALSE(moe::is_training_router_v<InferenceOnlyRouter>);
  STATIC_REQUIRE_FALSE(moe::is_router_v<NoRouteRouter>);
  STATIC_REQUIRE_FALSE(moe::is_router_v<moe::SwiGLU<float>>);

  const Model m;
  const index_t T_ = 20;
  const moe::Matrix<double> gate = random_matrix<double>(m.E_ffn, m.d, 41, 1.5), x = random_matrix<double>(T_, m.d, 42);
  const moe::Matrix<double> dy = random_matrix<double>(T_, m.d, 43), extra = random_matrix<double>(T_, m.E_ffn, 44);
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < m.E_ffn; ++e) experts.push_back(m.expert(e));
  const auto layer_with = [&](const moe::Matrix<double>& w) { return moe::MoELayer(ArgmaxSigmoidRouter<double>(w), experts); };

  // Forward: y_t = σ(z_te) · expert_e(x_t), e = argmax_e z_te, z_t = W x_t.
  const auto layer = layer_with(gate);
  moe::TrainingWorkspace<double> ws;
  moe::Matrix<double> y(T_, m.d);
  layer.forward_train(x, y, ws);
  const Mat xd = to_double(x), gd = to_double(gate);
  Mat ref;
  std::vector<index_t> used(std::size_t(m.E_ffn), 0);
  for (index_t t = 0; t < T_; ++t) {
    const std::vector<double> z = linear(gd, xd[std::size_t(t)]);
    const index_t e = top_k(z, 1)[0];
    ++used[std::size_t(e)];
    std::vector<double> row = m.ref(e, xd[std::size_t(t)]);
    for (double& v : row) v *= sigmoid(z[std::size_t(e)]);
    ref.push_back(row);
  }
  for (index_t e = 0; e < m.E_ffn; ++e) REQUIRE(used[std::size_t(e)] > 0);  // every expert takes tokens
  REQUIRE(max_relative_error(y, ref) < 1e-13);

  // Gradients of L = Σ dy ⊙ y + Σ extra ⊙ logits against central differences.
  const auto loss = [&](const moe::Matrix<double>& w, const moe::Matrix<double>& input) {
    moe::Workspace<double> w_ws;
    const auto l = layer_with(w);
    const moe::Matrix<double> out = l.forward(input, w_ws);
    return (dy.array() * out.array()).sum() + (extra.array() * (input * w.transpose()).array()).sum();
  };
  auto grads = layer.make_gradients();
  moe::Matrix<double> dx(T_, m.d);
  layer.backward(x, dy, dx, grads, ws, extra);
  const double h = 1e-6;
  double worst_router = 0, worst_dx = 0;
  for (index_t e = 0; e < m.E_ffn; ++e)
    for (index_t c = 0; c < m.d; ++c) {
      moe::Matrix<double> up = gate, down = gate;
      up(e, c) += h;
      down(e, c) -= h;
      worst_router = std::max(worst_router, std::fabs((loss(up, x) - loss(down, x)) / (2 * h) - grads.router(e, c)));
    }
  for (index_t t = 0; t < T_; ++t)
    for (index_t c = 0; c < m.d; ++c) {
      moe::Matrix<double> up = x, down = x;
      up(t, c) += h;
      down(t, c) -= h;
      worst_dx = std::max(worst_dx, std::fabs((loss(gate, up) - loss(gate, down)) / (2 * h) - dx(t, c)));
    }
  REQUIRE(worst_router < 1e-7 * std::max(1.0, grads.router.cwiseAbs().maxCoeff()));
  REQUIRE(worst_dx < 1e-7 * std::max(1.0, dx.cwiseAbs().maxCoeff()));
  REQUIRE(grads.router.cwiseAbs().maxCoeff() > 0.1);  // the router's part is there to check
}

TEST_CASE("reserve leaves the results as they were and no forward_train to pair with", "[layer][reserve]") {
  const Model m;
  const index_t T_ = 20;
  const moe::Matrix<double> gate = random_matrix<double>(m.E_ffn, m.d, 51, 1.5), x = random_matrix<double>(T_, m.d, 52);
  const moe::Matrix<double> dy = random_matrix<double>(T_, m.d, 53);
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < m.E_ffn; ++e) experts.push_back(m.expert(e));
  moe::TopKOptions o = moe::presets::mixtral(2);
  o.capacity_factor = 1.0;  // (tokens dropped, passed through)
  moe::MoELayer layer(moe::TopKRouter<double>(gate, o), experts);
  layer.set_shared_experts({m.expert(m.E_ffn)});
  layer.set_dropped_tokens(moe::DroppedTokens::pass_through);

  // Forward: a reserved workspace and a fresh one give the same bits.
  moe::Workspace<double> fresh, reserved;
  layer.reserve(reserved, 2 * T_, 2);
  REQUIRE(reserved.routing.plan.num_tokens == 0);  // an empty batch's routing
  const moe::Matrix<double> y_fresh = layer.forward(x, fresh), y_reserved = layer.forward(x, reserved);
  REQUIRE(y_reserved == y_fresh);
  REQUIRE_FALSE(fresh.routing.plan.dropped.empty());  // (the pass-through runs)

  // Training: the reserve's own zero batch cannot be taken for a forward_train of x, even one of
  // as many tokens; after a forward_train, the same gradients as from a fresh workspace.
  moe::TrainingWorkspace<double> train_fresh, train_reserved;
  layer.reserve(train_reserved, T_);
  auto grads_fresh = layer.make_gradients(), grads_reserved = layer.make_gradients();
  moe::Matrix<double> dx_fresh(T_, m.d), dx_reserved(T_, m.d), y(T_, m.d);
  REQUIRE_THROWS_WITH(layer.backward(x, dy, dx_reserved, grads_reserved, train_reserved),
                      Catch::Contains("needs the workspace of a forward_train"));
  layer.forward_train(x, y, train_fresh);
  layer.backward(x, dy, dx_fresh, grads_fresh, train_fresh);
  layer.forward_train(x, y, train_reserved);
  layer.backward(x, dy, dx_reserved, grads_reserved, train_reserved);
  REQUIRE(dx_reserved == dx_fresh);
  REQUIRE(grads_reserved.router == grads_fresh.router);
  for (index_t e = 0; e < m.E_ffn; ++e) {
    REQUIRE(grads_reserved.experts[std::size_t(e)].w_gate == grads_fresh.experts[std::size_t(e)].w_gate);
    REQUIRE(grads_reserved.experts[std::size_t(e)].w_up == grads_fresh.experts[std::size_t(e)].w_up);
    REQUIRE(grads_reserved.experts[std::size_t(e)].w_down == grads_fresh.experts[std::size_t(e)].w_down);
  }

  // The bounds reserve sizes by: top-k's k per token, tokens · E for a router without its own.
  REQUIRE(layer.max_assignments(T_) == 2 * T_);
  REQUIRE(moe::MoELayer(ArgmaxSigmoidRouter<double>(gate), experts).max_assignments(T_, 3) == T_ * m.E_ffn);
}

}  // namespace layer_extras_test
