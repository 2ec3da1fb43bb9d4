// The auxiliary loss when capacity drops or reroutes choices: it counts c_i before capacity
// (README, "Training"), which the plan no longer holds, so it takes RouterOutput::top_k_ids(). Checked
// against top-k ids computed in the test from the logits, and the loss against its formula.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace capacity_loss_test {

using namespace moe_test;

namespace {

using Ids = moe::Matrix<index_t>;  // [T, k]
using Dm = moe::Matrix<double>;

constexpr index_t kE = 4, kD = 5, kTokens = 32;

// Top-k of each row of `values` (ties to the lower index).
Ids reference_ids(const Mat& values, index_t k) {
  Ids ids(static_cast<index_t>(values.size()), k);
  for (std::size_t t = 0; t < values.size(); ++t) {
    const std::vector<index_t> top = top_k(values[t], k);
    for (index_t j = 0; j < k; ++j) ids(static_cast<index_t>(t), j) = top[std::size_t(j)];
  }
  return ids;
}

// Megatron-Core's switch_load_balancing_loss_func from its formula:
// α · E / (k · T²) · Σ_i (Σ_t p_ti) · c_i, with p = softmax of the logits and c_i the tokens whose ids hold i.
double reference_loss(const Mat& z, const Ids& ids, double alpha) {
  const auto Tn = static_cast<double>(z.size());
  std::vector<double> prob_sum(std::size_t(kE), 0.0), counts(std::size_t(kE), 0.0);
  for (const auto& row : z) {
    const std::vector<double> p = softmax(row);
    for (std::size_t e = 0; e < p.size(); ++e) prob_sum[e] += p[e];
  }
  for (index_t t = 0; t < ids.rows(); ++t)
    for (index_t j = 0; j < ids.cols(); ++j) counts[std::size_t(ids(t, j))] += 1.0;
  double sum = 0;
  for (std::size_t e = 0; e < std::size_t(kE); ++e) sum += prob_sum[e] * counts[e];
  return alpha * double(kE) / (double(ids.cols()) * Tn * Tn) * sum;
}

}  // namespace

TEST_CASE("top_k_ids keeps the pre-capacity choices the auxiliary loss counts", "[losses][capacity]") {
  const auto overflow = GENERATE(moe::OverflowPolicy::drop, moe::OverflowPolicy::reroute);
  CAPTURE(overflow == moe::OverflowPolicy::drop ? "drop" : "reroute");
  moe::TopKOptions o;
  o.k = 2;
  o.capacity_factor = 0.5;  // C = ceil(0.5 · 32 · 2 / 4) = 8 of the 16 choices per expert on average: drops are certain
  o.overflow = overflow;
  const moe::TopKRouter<double> router(random_matrix<double>(kE, kD, 71, 1.5), o);
  const Dm x = random_matrix<double>(kTokens, kD, 72);
  moe::RouterOutput<double> out;
  router.route(x, out);
  REQUIRE(!(out.plan.dropped.empty() && out.plan.rerouted.empty()));

  // The ids are the top-2 of the softmax scores, computed here from the logits.
  const Mat z = to_double(out.logits());
  Mat scores;
  for (const auto& row : z) scores.push_back(softmax(row));
  const Ids expected = reference_ids(scores, 2);
  const Ids ids = out.top_k_ids();
  REQUIRE(ids == expected);

  // The loss from them matches the formula; the plan's surviving choices count fewer.
  Dm grad(kTokens, kE);
  const double loss = moe::load_balancing_loss(out.logits(), out.top_k_ids(), grad, moe::AuxLossOptions::megatron(0.1));
  CHECK(std::fabs(loss - reference_loss(z, expected, 0.1)) <= 1e-12 * std::fabs(loss));
  REQUIRE_THROWS_AS(moe::load_balancing_loss(out.logits(), out.plan, 2, grad), moe::invalid_argument);
  index_t kept = 0;
  for (index_t t = 0; t < kTokens; ++t) kept += out.plan.experts_of(t);
  if (overflow == moe::OverflowPolicy::drop) CHECK(kept < kTokens * 2);

  // The accumulator for the global-batch loss takes them too.
  moe::LoadAccumulator acc(kE, 2);
  acc.add(out.top_k_ids());
  index_t counted = 0;
  for (index_t e = 0; e < kE; ++e) counted += acc.counts()[std::size_t(e)];
  CHECK(counted == kTokens * 2);
}

TEST_CASE("top_k_ids follows the selection bias, not the weights", "[losses][capacity]") {
  moe::TopKOptions o;
  o.k = 2;
  o.score = moe::ScoreFunction::sigmoid;
  o.normalize = true;
  o.capacity_factor = 0.5;
  moe::TopKRouter<double> router(random_matrix<double>(kE, kD, 73, 1.5), o);
  const moe::Vector<double> bias = random_matrix<double>(kE, 1, 74, 0.5).col(0);
  router.set_selection_bias(bias);
  moe::RouterOutput<double> out;
  router.route(random_matrix<double>(kTokens, kD, 75), out);
  REQUIRE(!out.plan.dropped.empty());
  Mat values;  // sigmoid(z) + b
  for (const auto& row : to_double(out.logits())) {
    std::vector<double> v(row.size());
    for (std::size_t e = 0; e < row.size(); ++e) v[e] = sigmoid(row[e]) + bias[index_t(e)];
    values.push_back(v);
  }
  REQUIRE(Ids(out.top_k_ids()) == reference_ids(values, 2));
}

TEST_CASE("top_k_ids throws when the last route recorded no fixed top-k", "[losses][capacity][errors]") {
  moe::RouterOutput<double> out;
  REQUIRE_THROWS_WITH(out.top_k_ids(), Catch::Contains("RouterOutput::top_k_ids") && Catch::Contains("k = 0"));

  moe::TopKOptions top_p;
  top_p.k = 3;
  top_p.top_p = 0.6;
  moe::TopKRouter<double>(random_matrix<double>(kE, kD, 76), top_p).route(random_matrix<double>(8, kD, 77), out);
  REQUIRE_THROWS_AS(out.top_k_ids(), moe::invalid_argument);
  REQUIRE_THROWS_WITH(out.top_k_ids(), Catch::Contains("k = 0") && Catch::Contains("only TopKRouter without top_p records them"));

  // A top-k route records them; an expert-choice route into the same output clears them.
  moe::TopKOptions plain;
  plain.k = 2;
  moe::TopKRouter<double>(random_matrix<double>(kE, kD, 78), plain).route(random_matrix<double>(8, kD, 79), out);
  REQUIRE(out.top_k_ids().rows() == 8);
  REQUIRE(out.top_k_ids().cols() == 2);
  moe::ExpertChoiceOptions ec;
  ec.capacity_factor = 1.0;
  moe::ExpertChoiceRouter<double>(random_matrix<double>(kE, kD, 80), ec).route(random_matrix<double>(8, kD, 81), out);
  REQUIRE_THROWS_AS(out.top_k_ids(), moe::invalid_argument);

  // A top-k route that threw (a NaN input) records none either, and the message says so.
  moe::Matrix<double> bad = random_matrix<double>(8, kD, 82);
  bad(3, 1) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(moe::TopKRouter<double>(random_matrix<double>(kE, kD, 78), plain).route(bad, out), moe::numeric_error);
  REQUIRE_THROWS_WITH(out.top_k_ids(), Catch::Contains("a route that threw records none"));
}

}  // namespace capacity_loss_test
