// TopKRouter against a plain double reference, plan invariants, ties and errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <set>
#include <vector>

#include "../support/reference.hpp"
#include "../support/router_gradient.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace top_k_test {

using namespace moe_test;

namespace {

struct RefChoice {
  std::vector<index_t> experts;
  std::vector<double> weights;
};

// The router's documented math, written plainly, on one token's logits.
RefChoice reference_top_k(const std::vector<double>& logits, const moe::TopKOptions& o, const std::vector<double>& bias) {
  const index_t E = index_t(logits.size());
  std::vector<double> scores(logits.size());
  if (o.score == moe::ScoreFunction::softmax) {
    scores = softmax(logits);
  } else {
    for (std::size_t e = 0; e < logits.size(); ++e) scores[e] = sigmoid(logits[e]);
  }
  const bool on_logits = o.softmax_placement == moe::SoftmaxPlacement::after_top_k;
  std::vector<double> selection = on_logits ? logits : scores;
  for (index_t e = 0; e < E && !bias.empty(); ++e) selection[std::size_t(e)] += bias[std::size_t(e)];
  RefChoice c;
  c.experts = top_k(selection, o.k);
  for (index_t e : c.experts) c.weights.push_back(on_logits ? logits[std::size_t(e)] : scores[std::size_t(e)]);
  if (on_logits) c.weights = softmax(c.weights);
  if (o.normalize) {
    double sum = 0;
    for (double w : c.weights) sum += w;
    if (o.score == moe::ScoreFunction::sigmoid) sum += 1e-20;
    for (double& w : c.weights) w /= sum;
  }
  for (double& w : c.weights) w *= o.scale;
  return c;
}

// Invariants every Routing plan satisfies, whatever the router.
template <class T>
void check_plan_invariants(const moe::Routing<T>& plan) {
  const index_t E = plan.num_experts, Tn = plan.num_tokens, A = plan.num_assignments();
  REQUIRE(index_t(plan.expert_begin.size()) == E + 1);
  REQUIRE(index_t(plan.token_begin.size()) == Tn + 1);
  REQUIRE(plan.expert_begin[0] == 0);
  REQUIRE(plan.expert_begin[std::size_t(E)] == A);
  REQUIRE(plan.token_begin[0] == 0);
  REQUIRE(plan.token_begin[std::size_t(Tn)] == A);
  REQUIRE(index_t(plan.assignment.size()) == A);
  for (index_t e = 0; e < E; ++e) {
    REQUIRE(plan.expert_begin[std::size_t(e)] <= plan.expert_begin[std::size_t(e + 1)]);
    for (index_t a = plan.expert_begin[std::size_t(e)] + 1; a < plan.expert_begin[std::size_t(e + 1)]; ++a)
      REQUIRE(plan.token[std::size_t(a - 1)] < plan.token[std::size_t(a)]);  // ascending, no duplicates
  }
  std::vector<int> seen(std::size_t(A), 0);
  for (index_t t = 0; t < Tn; ++t) {
    std::set<index_t> experts;
    for (index_t j = plan.token_begin[std::size_t(t)]; j < plan.token_begin[std::size_t(t + 1)]; ++j) {
      const index_t a = plan.assignment[std::size_t(j)];
      REQUIRE(a >= 0);
      REQUIRE(a < A);
      REQUIRE(plan.token[std::size_t(a)] == t);
      ++seen[std::size_t(a)];
      experts.insert(plan.expert_of_assignment(a));
    }
    REQUIRE(index_t(experts.size()) == plan.experts_of(t));  // a token never meets an expert twice
  }
  for (int s : seen) REQUIRE(s == 1);  // the token CSR is a permutation of the expert CSR
}

template <class T>
void check_router_against_reference(index_t Tn, index_t d, index_t E, const moe::TopKOptions& o, bool with_bias,
                                    std::uint32_t seed) {
  const moe::Matrix<T> W = random_matrix<T>(E, d, seed, 0.5);
  const moe::Matrix<T> x = random_matrix<T>(Tn, d, seed + 1);
  moe::TopKRouter<T> router(moe::ConstMatrixMap<T>(W.data(), E, d), o);
  std::vector<double> bias;
  if (with_bias) {
    const moe::Matrix<T> b = random_matrix<T>(E, 1, seed + 2, 0.3);
    router.set_selection_bias(moe::Vector<T>(b.col(0)));
    for (index_t e = 0; e < E; ++e) bias.push_back(double(b(e, 0)));
  }
  moe::RouterOutput<T> out;
  router.route(x, out);
  const auto& plan = out.plan;
  check_plan_invariants(plan);
  REQUIRE(out.logits().rows() == Tn);
  REQUIRE(out.logits().cols() == E);

  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  const Mat Wd = to_double(W), xd = to_double(x);
  for (index_t t = 0; t < Tn; ++t) {
    const std::vector<double> ref_logits = linear(Wd, xd[std::size_t(t)]);
    for (index_t e = 0; e < E; ++e) {
      REQUIRE(double(out.logits()(t, e)) == Approx(ref_logits[std::size_t(e)]).margin(tol * 10).epsilon(tol));
    }
    // Selection and weights from the router's own logits, so near-ties rounded differently in
    // float cannot flip the reference's choice.
    std::vector<double> logits(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) logits[std::size_t(e)] = double(out.logits()(t, e));
    const RefChoice ref = reference_top_k(logits, o, bias);
    REQUIRE(plan.experts_of(t) == o.k);
    for (index_t j = 0; j < o.k; ++j) {
      const index_t a = plan.assignment[std::size_t(plan.token_begin[std::size_t(t)] + j)];
      CHECK(plan.expert_of_assignment(a) == ref.experts[std::size_t(j)]);
      CHECK(double(plan.weight[std::size_t(a)]) == Approx(ref.weights[std::size_t(j)]).epsilon(tol).margin(tol));
    }
    const std::vector<double> ref_scores =
        o.score == moe::ScoreFunction::softmax ? softmax(logits) : [&] {
          std::vector<double> s(logits.size());
          for (std::size_t e = 0; e < s.size(); ++e) s[e] = sigmoid(logits[e]);
          return s;
        }();
    for (index_t e = 0; e < E; ++e) CHECK(double(out.scores()(t, e)) == Approx(ref_scores[std::size_t(e)]).epsilon(tol).margin(tol));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("TopKRouter matches the reference for every option", "[routing][top_k]", float, double) {
  const index_t E = GENERATE(1, 3, 8, 17);
  const index_t k = GENERATE_COPY(filter([E](index_t v) { return v <= E; }, values<index_t>({1, 2, 3, 8, 17})));
  const index_t Tn = GENERATE(0, 1, 7, 33);
  const index_t d = 13;
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  const auto placement = GENERATE(moe::SoftmaxPlacement::before_top_k, moe::SoftmaxPlacement::after_top_k);
  if (score == moe::ScoreFunction::sigmoid && placement == moe::SoftmaxPlacement::after_top_k) return;
  const bool normalize = GENERATE(false, true);
  const bool with_bias = GENERATE(false, true);
  moe::TopKOptions o;
  o.k = k;
  o.score = score;
  o.softmax_placement = placement;
  o.normalize = normalize;
  o.scale = normalize ? 2.5 : 1.0;
  CAPTURE(E, k, Tn, int(score), int(placement), normalize, with_bias);
  check_router_against_reference<TestType>(Tn, d, E, o, with_bias, std::uint32_t(E * 1000 + k * 10 + Tn));
}

TEMPLATE_TEST_CASE("Normalized sigmoid weights keep the 1e-20 of their denominator where the scores are tiny",
                   "[routing][top_k]", float, double) {
  // Logits near -50 give sigmoid scores near 1e-22, below the denominator's 1e-20 (DeepSeek-V3,
  // Megatron-Core): the weights are then far from summing to 1, and the reference shows how far.
  using T = TestType;
  moe::TopKOptions o;
  o.k = 2;
  o.score = moe::ScoreFunction::sigmoid;
  o.normalize = true;
  o.scale = 2.5;
  moe::Matrix<T> x(2, 4);
  x << T(-50), T(-51), T(-60), T(-70), T(-52), T(-55), T(-49), T(-80);
  moe::RouterOutput<T> out;
  moe::TopKRouter<T>(moe::Matrix<T>::Identity(4, 4), o).route(x, out);
  for (index_t t = 0; t < 2; ++t) {
    std::vector<double> logits(4);
    for (index_t e = 0; e < 4; ++e) logits[std::size_t(e)] = double(out.logits()(t, e));
    const RefChoice ref = reference_top_k(logits, o, {});
    CAPTURE(t);
    REQUIRE(out.plan.experts_of(t) == 2);
    for (index_t j = 0; j < 2; ++j) {
      const index_t a = out.plan.assignment[out.plan.token_begin[t] + j];
      CHECK(out.plan.expert_of_assignment(a) == ref.experts[std::size_t(j)]);
      CHECK(double(out.plan.weight[a]) == Approx(ref.weights[std::size_t(j)]).epsilon(1e-5));
    }
    CHECK(ref.weights[0] + ref.weights[1] < 0.5 * o.scale);  // the case this test is about
  }
}

TEST_CASE("TopKRouter breaks ties toward the lower expert index", "[routing][top_k]") {
  // Experts 1, 2 and 4 share one weight row, so their logits are equal for every token.
  const index_t E = 5, d = 6;
  moe::Matrix<double> W = random_matrix<double>(E, d, 7, 0.1);
  W.row(2) = W.row(1);
  W.row(4) = W.row(1);
  W.row(1) *= 1.0;  // keep the tie exact
  // A strong shared direction makes experts 1, 2, 4 the best three for x = row 1 scaled.
  moe::Matrix<double> x(2, d);
  x.row(0) = 10.0 * W.row(1);
  x.row(1) = -10.0 * W.row(1);
  for (const auto placement : {moe::SoftmaxPlacement::before_top_k, moe::SoftmaxPlacement::after_top_k}) {
    moe::TopKOptions o;
    o.k = 2;
    o.softmax_placement = placement;
    moe::TopKRouter<double> router(W, o);
    moe::RouterOutput<double> out;
    router.route(x, out);
    // Token 0: the three tied experts lead; the lower two (1, 2) win, in that order.
    const auto& p = out.plan;
    REQUIRE(p.expert_of_assignment(p.assignment[0]) == 1);
    REQUIRE(p.expert_of_assignment(p.assignment[1]) == 2);
    REQUIRE(p.weight[std::size_t(p.assignment[0])] == p.weight[std::size_t(p.assignment[1])]);
  }
}

TEMPLATE_TEST_CASE("TopKRouter breaks ties below the row maximum toward the lower index, the tail included",
                   "[routing][top_k]", float, double) {
  // Expert E - 1 (in the scores' SIMD tail) copies expert 0's weight row (in the SIMD body): equal
  // logits, which are rarely the row's maximum, must give bit-equal scores and weights.
  using T = TestType;
  const index_t E = index_t(moe::simd::lanes<T, moe::simd::default_arch>()) + 1, d = 6, Tn = 400;
  moe::Matrix<T> W = random_matrix<T>(E, d, 7);
  W.row(E - 1) = W.row(0);
  const moe::Matrix<T> x = random_matrix<T>(Tn, d, 8, 3.0);
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  moe::TopKOptions o;
  o.k = 2;
  o.score = score;
  moe::TopKRouter<T> router(W, o);
  moe::RouterOutput<T> out;
  router.route(x, out);
  const auto& p = out.plan;
  index_t ties_chosen = 0;
  for (index_t t = 0; t < Tn; ++t) {
    CAPTURE(int(score), t);
    REQUIRE(out.scores()(t, E - 1) == out.scores()(t, 0));
    T weight_first = -1, weight_last = -1;
    for (index_t j = p.token_begin[t]; j < p.token_begin[t + 1]; ++j) {
      const index_t a = p.assignment[std::size_t(j)], e = p.expert_of_assignment(a);
      if (e == 0) weight_first = p.weight[std::size_t(a)];
      if (e == E - 1) weight_last = p.weight[std::size_t(a)];
    }
    if (weight_last >= 0) REQUIRE(weight_first == weight_last);  // E - 1 only with 0, at the same weight
    ties_chosen += weight_first >= 0 && weight_last < 0;
  }
  REQUIRE(ties_chosen > 0);  // the tie was decided (by index) in some rows
}

TEST_CASE("Selection bias changes the choice, never the weights", "[routing][top_k]") {
  const index_t E = 4, d = 5;
  const moe::Matrix<double> W = random_matrix<double>(E, d, 3);
  const moe::Matrix<double> x = random_matrix<double>(6, d, 4);
  moe::TopKOptions o;
  o.k = 1;
  o.score = moe::ScoreFunction::sigmoid;
  moe::TopKRouter<double> router(W, o);
  moe::Vector<double> bias = moe::Vector<double>::Zero(E);
  bias[3] = 10.0;  // sigmoid scores are < 1, so expert 3 wins every token
  router.set_selection_bias(bias);
  moe::RouterOutput<double> out;
  router.route(x, out);
  REQUIRE(out.plan.tokens_of(3) == 6);
  for (index_t t = 0; t < 6; ++t) {
    const index_t a = out.plan.assignment[std::size_t(t)];
    REQUIRE(out.plan.weight[std::size_t(a)] == out.scores()(t, 3));  // raw score, no bias
  }
}

// Extreme inputs the fuzzer found (tests/fuzz/top_k_router.cpp): each once gave no expert or a
// NaN weight. The router is the identity (W = I), so x holds the logits directly.
TEST_CASE("TopKRouter stays finite and routes every token on extreme options", "[routing][top_k][numerics]") {
  const index_t E = 4;
  const moe::Matrix<float> I = moe::Matrix<float>::Identity(E, E);
  SECTION("a positive top_p that rounds to 0 in float still picks the best expert") {
    moe::TopKOptions o;
    o.k = 3;
    o.top_p = 1e-300;
    moe::TopKRouter<float> router(I, o);
    const moe::Matrix<float> x = random_matrix<float>(5, E, 8);
    moe::RouterOutput<float> out;
    router.route(x, out);
    for (index_t t = 0; t < 5; ++t) {
      index_t best = 0;
      x.row(t).maxCoeff(&best);
      REQUIRE(out.plan.token_begin[t + 1] - out.plan.token_begin[t] == 1);
      REQUIRE(out.plan.expert_of_assignment(out.plan.assignment[std::size_t(out.plan.token_begin[t])]) == best);
    }
  }
  SECTION("chosen probabilities that all underflow to 0 give weight 0, not 0/0") {
    moe::TopKOptions o;
    o.k = 1;
    o.normalize = true;
    moe::TopKRouter<float> router(I, o);
    moe::Vector<float> bias = moe::Vector<float>::Zero(E);
    bias[1] = 10.0f;  // selects expert 1, whose probability e^-200 / Σ is 0 in float
    router.set_selection_bias(bias);
    moe::Matrix<float> x(1, E);
    x << 0.0f, -200.0f, -200.0f, -200.0f;
    moe::RouterOutput<float> out;
    router.route(x, out);
    REQUIRE(out.plan.tokens_of(1) == 1);
    REQUIRE(out.plan.weight[0] == 0.0f);
  }
  SECTION("softmax after top-k with a bias that ranks a low logit first does not overflow") {
    moe::TopKOptions o;
    o.k = 2;
    o.softmax_placement = moe::SoftmaxPlacement::after_top_k;
    moe::TopKRouter<float> router(I, o);
    moe::Vector<float> bias = moe::Vector<float>::Zero(E);
    bias[0] = 1000.0f;  // expert 0 (logit 0) ranks first, expert 1 (logit 200) second
    router.set_selection_bias(bias);
    moe::Matrix<float> x(1, E);
    x << 0.0f, 200.0f, -5.0f, -6.0f;
    moe::RouterOutput<float> out;
    router.route(x, out);
    REQUIRE(out.plan.num_assignments() == 2);
    float sum = 0;
    for (const float w : out.plan.weight) {
      REQUIRE(std::isfinite(w));
      sum += w;
    }
    REQUIRE(sum == Approx(1.0f).epsilon(1e-6));
    REQUIRE(out.plan.weight[std::size_t(out.plan.expert_begin[1])] == Approx(1.0f).epsilon(1e-6));  // e^0 / (e^-200 + e^0)
  }
}

TEST_CASE("TopKRouter rejects bad input with named values", "[routing][top_k][errors]") {
  const moe::Matrix<float> W = random_matrix<float>(4, 3, 1);
  moe::TopKOptions o;
  o.k = 0;
  REQUIRE_THROWS_AS(moe::TopKRouter<float>(W, o), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::TopKRouter<float>(W, o), Catch::Contains("k = 0") && Catch::Contains("num_experts = 4"));
  o.k = 5;
  REQUIRE_THROWS_WITH(moe::TopKRouter<float>(W, o), Catch::Contains("k = 5") && Catch::Contains("num_experts = 4"));
  o.k = 1;
  o.score = moe::ScoreFunction::sigmoid;
  o.softmax_placement = moe::SoftmaxPlacement::after_top_k;
  REQUIRE_THROWS_AS(moe::TopKRouter<float>(W, o), moe::invalid_argument);
  o = moe::TopKOptions{};
  o.scale = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_WITH(moe::TopKRouter<float>(W, o), Catch::Contains("scale"));
  REQUIRE_THROWS_WITH(moe::TopKRouter<float>(moe::Matrix<float>(0, 3)), Catch::Contains("num_experts = 0"));

  moe::TopKRouter<float> router(W);
  moe::RouterOutput<float> out;
  const moe::Matrix<float> wrong_width = random_matrix<float>(2, 4, 2);
  REQUIRE_THROWS_AS(router.route(wrong_width, out), moe::invalid_argument);
  REQUIRE_THROWS_WITH(router.route(wrong_width, out), Catch::Contains("x.cols() = 4") && Catch::Contains("d_model = 3"));

  moe::Matrix<float> x = random_matrix<float>(3, 3, 2);
  x(1, 2) = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_AS(router.route(x, out), moe::numeric_error);
  REQUIRE_THROWS_WITH(router.route(x, out), Catch::Contains("token = 1") && Catch::Contains("not finite"));
  x(1, 2) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(router.route(x, out), moe::numeric_error);

  REQUIRE_THROWS_WITH(router.set_selection_bias(moe::Vector<float>::Zero(3)),
                      Catch::Contains("bias.size() = 3") && Catch::Contains("num_experts = 4"));
  moe::Vector<float> nan_bias = moe::Vector<float>::Zero(4);
  nan_bias[2] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(router.set_selection_bias(nan_bias), Catch::Contains("bias[2]"));

  // Groups that do not partition the batch.
  const std::vector<index_t> bad_groups = {0, 2};
  const moe::Matrix<float> x3 = random_matrix<float>(3, 3, 5);
  REQUIRE_THROWS_WITH(router.route(x3, moe::RouteContext::with_groups(bad_groups), out),
                      Catch::Contains("group_begin[num_groups] = 2") && Catch::Contains("tokens = 3"));
}

TEST_CASE("An empty batch routes to an empty plan", "[routing][top_k]") {
  const moe::Matrix<float> W = random_matrix<float>(4, 3, 1);
  moe::TopKOptions o;
  o.k = 2;
  moe::TopKRouter<float> router(W, o);
  moe::RouterOutput<float> out;
  router.route(moe::Matrix<float>(0, 3), out);
  REQUIRE(out.plan.num_assignments() == 0);
  REQUIRE(out.plan.num_tokens == 0);
  check_plan_invariants(out.plan);
  // With the boundaries of no sequence ({0}, which with_groups accepts), as a loop over sequences
  // builds them for a batch of none, and with a capacity that counts per group.
  o.capacity_factor = 1.0;
  const moe::TopKRouter<float> capped(W, o);
  capped.route(moe::Matrix<float>(0, 3), moe::RouteContext::with_groups({0}), out);
  REQUIRE(out.plan.num_tokens == 0);
  check_plan_invariants(out.plan);
  REQUIRE_THROWS_WITH(capped.route(random_matrix<float>(2, 3, 2), moe::RouteContext::with_groups({0}), out),
                      Catch::Contains("num_groups must be at least 1 for a non-empty batch (num_groups = 0, tokens = 2)"));
}

TEST_CASE("Router backward with a reused scratch gives the bits of one without", "[routing][backward]") {
  // The layers pass their workspace's buffer; a caller without one gets backward's own. A buffer
  // left full of NaN by earlier use must not leak into the gradients.
  const index_t T = 37, d = 12, E = 6;
  const moe::Matrix<float> x = random_matrix<float>(T, d, 3);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(T));
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int64_t>(t * 7);
  moe::RouteContext ctx;
  ctx.token_ids = ids.data();
  ctx.training = true;
  moe::Buffer<float> scratch;
  float* dirty = scratch.ensure(4096);
  std::fill(dirty, dirty + 4096, std::numeric_limits<float>::quiet_NaN());
  const moe::simd::default_arch arch;
  auto check_same_bits = [&](const auto& router, const moe::RouterOutput<float>& out) {
    std::vector<float> grad_weight(out.plan.weight.size());
    for (std::size_t a = 0; a < grad_weight.size(); ++a) grad_weight[a] = 0.25f * float(a % 5) - 0.5f;
    moe::Matrix<float> dx = moe::Matrix<float>::Zero(T, d), dw = moe::Matrix<float>::Zero(E, d);
    moe::Matrix<float> dx_scratch = dx, dw_scratch = dw;
    router.backward(x, out, grad_weight.data(), nullptr, nullptr, dx, dw);
    router.backward(x, out, grad_weight.data(), nullptr, nullptr, dx_scratch, dw_scratch, arch, &scratch);
    REQUIRE(dx.norm() > 0);
    REQUIRE(dw.norm() > 0);
    CHECK(dx_scratch == dx);
    CHECK(dw_scratch == dw);
  };
  SECTION("top-k with capacity and training jitter") {
    moe::TopKOptions o;
    o.k = 2;
    o.normalize = true;
    o.capacity_factor = 1.0;
    o.jitter = 0.05;
    const moe::TopKRouter<float> router(random_matrix<float>(E, d, 4), o);
    moe::RouterOutput<float> out;
    router.route(x, ctx, out);
    REQUIRE(out.input_jittered);
    check_same_bits(router, out);
  }
  SECTION("expert choice") {
    moe::ExpertChoiceOptions o;
    o.capacity_factor = 2.0;
    const moe::ExpertChoiceRouter<float> router(random_matrix<float>(E, d, 5), o);
    moe::RouterOutput<float> out;
    router.route(x, ctx, out);
    check_same_bits(router, out);
  }
  for (const bool normalized : {false, true}) {
    DYNAMIC_SECTION("Soft, normalized = " << normalized) {
      moe::SoftOptions o;
      o.slots_per_expert = 2;
      o.normalized = normalized;
      o.scale = 1.5;
      const index_t S = 2 * E;
      const moe::SoftRouter<float> router(random_matrix<float>(d, S, 6), E, o);
      moe::SoftRouting<float> routing;
      router.route(x, routing);
      const moe::Matrix<float> dD = random_matrix<float>(T, S, 7), dC = random_matrix<float>(T, S, 8);
      moe::Matrix<float> dx = moe::Matrix<float>::Zero(T, d), dphi = moe::Matrix<float>::Zero(d, S);
      moe::Matrix<float> dx_scratch = dx, dphi_scratch = dphi;
      const float dscale = router.backward(x, routing, dD.data(), dC.data(), dx, dphi);
      const float dscale_scratch = router.backward(x, routing, dD.data(), dC.data(), dx_scratch, dphi_scratch, arch, &scratch);
      REQUIRE(dx.norm() > 0);
      REQUIRE(dphi.norm() > 0);
      CHECK(dx_scratch == dx);
      CHECK(dphi_scratch == dphi);
      CHECK(dscale_scratch == dscale);
    }
  }
}

// The router's own backward (the layer tests reach it only through the whole layer), for each
// score, normalization, selection, capacity and jitter option, with the lost-weight term and
// with the logit term.
TEST_CASE("TopKRouter backward matches central differences for every option", "[routing][top_k][backward]") {
  constexpr index_t E = 8;
  struct Case {
    const char* name;
    moe::TopKOptions o;
  };
  std::vector<Case> cases;
  auto add = [&](const char* name, auto&& set) {
    moe::TopKOptions o;
    o.k = 2;
    set(o);
    cases.push_back({name, o});
  };
  add("softmax", [](moe::TopKOptions&) {});
  add("softmax, normalized, scaled", [](moe::TopKOptions& o) { o.normalize = true; o.scale = 2.5; });
  add("softmax after top-k", [](moe::TopKOptions& o) { o.softmax_placement = moe::SoftmaxPlacement::after_top_k; o.k = 3; });
  add("sigmoid", [](moe::TopKOptions& o) { o.score = moe::ScoreFunction::sigmoid; o.k = 3; });
  add("sigmoid, normalized, grouped", [](moe::TopKOptions& o) {
    o.score = moe::ScoreFunction::sigmoid; o.normalize = true; o.scale = 2.5; o.expert_groups = 4; o.selected_groups = 2;
  });
  add("top-p", [](moe::TopKOptions& o) { o.k = 4; o.top_p = 0.45; });
  add("every expert, normalized", [](moe::TopKOptions& o) { o.k = E; o.normalize = true; });
  add("capacity, dropping", [](moe::TopKOptions& o) { o.capacity_factor = 0.75; });
  add("capacity by score, renormalized", [](moe::TopKOptions& o) {
    o.capacity_factor = 0.75; o.capacity_priority = moe::CapacityPriority::score; o.normalize = true;
    o.renormalize_after_drop = true;
  });
  add("capacity, rerouting", [](moe::TopKOptions& o) { o.capacity_factor = 0.75; o.overflow = moe::OverflowPolicy::reroute; });
  add("jitter", [](moe::TopKOptions& o) { o.jitter = 0.2; o.jitter_seed = 11; o.normalize = true; });

  RouterGradientCheck check(E);
  for (const Case& c : cases) {
    for (const RouterLoss loss : {RouterLoss::with_lost_weight, RouterLoss::with_logits}) {
      CAPTURE(c.name, int(loss));
      moe::Matrix<double> W = check.W0;
      const moe::TopKRouter<double> router(moe::ConstMatrixMap<double>(W.data(), W.rows(), W.cols()), c.o);  // views W
      const moe::RouterOutput<double>& out = check.run(router, W, loss);
      const moe::Routing<double>& plan = out.plan;
      CHECK(out.input_jittered == (c.o.jitter > 0));
      if (c.o.capacity_factor > 0) CHECK(!plan.dropped.empty());  // the cases test what they name
      if (c.o.overflow == moe::OverflowPolicy::reroute) CHECK(!plan.rerouted.empty());
      if (c.o.top_p > 0) CHECK(plan.num_assignments() < plan.num_tokens * c.o.k);
    }
  }
}

}  // namespace top_k_test
