// Each preset reproduces its reference's routing; expected values derived from the formulas.
#include <catch2/catch.hpp>

#include <limits>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace presets_test {

using namespace moe_test;

namespace {
template <class T>
std::vector<std::pair<index_t, double>> token_choices(const moe::Routing<T>& plan, index_t t) {
  std::vector<std::pair<index_t, double>> out;
  for (index_t j = plan.token_begin[std::size_t(t)]; j < plan.token_begin[std::size_t(t + 1)]; ++j) {
    const index_t a = plan.assignment[std::size_t(j)];
    out.push_back({plan.expert_of_assignment(a), double(plan.weight[std::size_t(a)])});
  }
  return out;
}
// Router whose logits equal x: gate = identity.
moe::RouterOutput<double> route_logits(const moe::TopKOptions& o, const std::vector<std::vector<double>>& logits,
                                       const std::vector<double>& bias = {}, const moe::RouteContext& ctx = {}) {
  const index_t E = index_t(logits[0].size());
  moe::TopKRouter<double> router(moe::Matrix<double>(moe::Matrix<double>::Identity(E, E)), o);
  if (!bias.empty()) router.set_selection_bias(Eigen::Map<const moe::Vector<double>>(bias.data(), E));
  moe::Matrix<double> x(index_t(logits.size()), E);
  for (std::size_t t = 0; t < logits.size(); ++t)
    for (index_t e = 0; e < E; ++e) x(index_t(t), e) = logits[t][std::size_t(e)];
  moe::RouterOutput<double> out;
  router.route(x, ctx, out);
  return out;
}
}  // namespace

TEST_CASE("Preset deepseek_v3: sigmoid, biased selection, top-2-sum groups, renormalized, scaled", "[presets]") {
  // 8 experts in 4 groups of 2, keep 2 groups, k = 3, scale 2.5.
  const std::vector<double> l = {0.2, -1.0, 1.5, 1.4, -0.3, 2.0, 0.1, 0.0};
  const std::vector<double> b = {0.0, 0.0, 0.0, 0.0, 0.0, -0.9, 0.3, 0.3};
  const auto out = route_logits(moe::presets::deepseek_v3(3, 4, 2, 2.5), {l}, b);
  std::vector<double> s(8), sel(8);
  for (std::size_t e = 0; e < 8; ++e) s[e] = sigmoid(l[e]), sel[e] = s[e] + b[e];
  // Group scores (sum of both members, biased): g0 = sel0+sel1, g1 = sel2+sel3, g2 = sel4+sel5, g3 = sel6+sel7.
  const std::vector<double> g = {sel[0] + sel[1], sel[2] + sel[3], sel[4] + sel[5], sel[6] + sel[7]};
  // g0 = σ(.2)+σ(-1) ≈ 0.819, g1 = σ(1.5)+σ(1.4) ≈ 1.620, g2 = σ(-.3)+σ(2)-.9 ≈ 0.407,
  // g3 = σ(.1)+σ(0)+.6 ≈ 1.625: groups 3 and 1 are kept.
  REQUIRE(top_k(g, 2) == std::vector<index_t>{3, 1});
  // Among their experts {2, 3, 6, 7} the biased scores are 0.818, 0.802, 0.825, 0.800: the top 3
  // are 6, 2, 3.
  const std::vector<index_t> chosen = {6, 2, 3};
  const double sum = s[2] + s[3] + s[6] + 1e-20;
  const auto got = token_choices(out.plan, 0);
  REQUIRE(got.size() == 3);
  for (std::size_t j = 0; j < 3; ++j) {
    REQUIRE(got[j].first == chosen[j]);
    REQUIRE(got[j].second == Approx(2.5 * s[std::size_t(chosen[j])] / sum).epsilon(1e-14));  // unbiased score
  }
  // Expert 5 has the largest raw score but its bias sinks its group: excluded, never chosen.
  REQUIRE(out.plan.tokens_of(5) == 0);
}

TEST_CASE("Preset mixtral and qwen2_moe: softmax top-k, renormalized or not", "[presets]") {
  const std::vector<double> l = {0.5, 2.0, -1.0, 1.0};
  const double z = std::exp(0.5) + std::exp(2.0) + std::exp(-1.0) + std::exp(1.0);
  const auto mix = token_choices(route_logits(moe::presets::mixtral(), {l}).plan, 0);
  REQUIRE(mix[0].first == 1);
  REQUIRE(mix[1].first == 3);
  REQUIRE(mix[0].second == Approx(std::exp(2.0) / (std::exp(2.0) + std::exp(1.0))).epsilon(1e-14));
  const auto raw = token_choices(route_logits(moe::presets::qwen2_moe(2, false), {l}).plan, 0);
  REQUIRE(raw[0].second == Approx(std::exp(2.0) / z).epsilon(1e-14));
  REQUIRE(raw[1].second == Approx(std::exp(1.0) / z).epsilon(1e-14));
  const auto norm = token_choices(route_logits(moe::presets::qwen2_moe(2, true), {l}).plan, 0);
  REQUIRE(norm[1].second == Approx(std::exp(1.0) / (std::exp(2.0) + std::exp(1.0))).epsilon(1e-14));
}

TEST_CASE("Preset switch_transformers: top-1 raw probability, per-sequence capacity by position", "[presets]") {
  // 2 experts, 2 sequences of 3 tokens, cf = 1: capacity ceil(1 · 3 · 1 / 2) = 2 per sequence.
  const std::vector<std::vector<double>> logits = {{2, 0}, {1, 0}, {3, 0}, {0, 1}, {5, 0}, {4, 0}};
  const std::vector<index_t> seq = {0, 3, 6};
  const auto out = route_logits(moe::presets::switch_transformers(1.0), logits, {}, moe::RouteContext::with_groups(seq));
  // Sequence 0: tokens 0, 1, 2 all pick expert 0; the third (token 2) is dropped despite the
  // highest probability, because earlier positions win. Sequence 1: tokens 4, 5 fit.
  REQUIRE(out.plan.dropped == std::vector<index_t>{2});
  REQUIRE(out.plan.dropped_weight[0] == Approx(std::exp(3.0) / (std::exp(3.0) + 1.0)).epsilon(1e-14));
  const auto t0 = token_choices(out.plan, 0);
  REQUIRE(t0.size() == 1);
  REQUIRE(t0[0].second == Approx(std::exp(2.0) / (std::exp(2.0) + 1.0)).epsilon(1e-14));  // raw, not renormalized
  REQUIRE(token_choices(out.plan, 5).size() == 1);
}

TEST_CASE("Preset megatron: softmax placement and drop policy", "[presets]") {
  // 3 tokens, 2 experts, k = 1, cf = 1: capacity ceil(1 · 3 · 1 / 2) = 2.
  const std::vector<std::vector<double>> logits = {{0.1, 0}, {2.0, 0}, {1.0, 0}};
  const auto probs = route_logits(moe::presets::megatron(1, true, 1.0, moe::CapacityPriority::score), logits);
  // Drop by probability: expert 0 keeps tokens 1 and 2 (higher probabilities), drops token 0.
  REQUIRE(probs.plan.dropped == std::vector<index_t>{0});
  const auto position = route_logits(moe::presets::megatron(1, true, 1.0, moe::CapacityPriority::position), logits);
  REQUIRE(position.plan.dropped == std::vector<index_t>{2});
  // Pre-softmax (over E) keeps the raw probability; otherwise softmax over the k = 1 chosen is 1.
  REQUIRE(token_choices(probs.plan, 1)[0].second == Approx(std::exp(2.0) / (std::exp(2.0) + 1.0)).epsilon(1e-14));
  const auto post = route_logits(moe::presets::megatron(1, false), logits);
  REQUIRE(token_choices(post.plan, 1)[0].second == 1.0);
  // No renormalization after dropping, k = 2 over 3 experts.
  const auto k2 = route_logits(moe::presets::megatron(2, true, 0.5), {{3, 2, 0}, {3, 2, 0}});
  const double z = std::exp(3.0) + std::exp(2.0) + 1.0;
  // capacity ceil(0.5 · 2 · 2 / 3) = 1: token 1 loses experts 0 and 1 (token 0 has the same probs; ties to the earlier token).
  REQUIRE(k2.plan.dropped == std::vector<index_t>{1});
  REQUIRE(token_choices(k2.plan, 0)[0].second == Approx(std::exp(3.0) / z).epsilon(1e-14));
}

}  // namespace presets_test
