// Batch isolation under attack ("Buffer Overflow in Mixture of Experts"; "Stealing User Prompts
// from Mixture of Experts"): with routing that depends on the whole batch, an adversary sharing a
// batch can change a victim's output. First each attack is reproduced without routing groups;
// then, with one group per request, the victim's output is shown bit-identical whatever the
// adversary sends.
#include <catch2/catch.hpp>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace isolation_test {

using namespace moe_test;

namespace {

constexpr index_t kD = 16, kFF = 24, kE = 4, kVictim = 6;

std::vector<moe::SwiGLU<float>> make_experts() {
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < kE; ++e) {
    experts.emplace_back(random_matrix<float>(kFF, kD, 1 + std::uint32_t(e), 0.3), random_matrix<float>(kFF, kD, 11 + std::uint32_t(e), 0.3),
                         random_matrix<float>(kD, kFF, 21 + std::uint32_t(e), 0.3));
  }
  return experts;
}

// The victim's rows of layer(adversary ++ victim), with or without one routing group per request.
template <class Layer, class Workspace>
moe::Matrix<float> victim_output(const Layer& layer, Workspace& ws, const moe::Matrix<float>& adversary,
                                 const moe::Matrix<float>& victim, bool grouped) {
  moe::Matrix<float> x(adversary.rows() + victim.rows(), kD);
  x << adversary, victim;
  moe::Matrix<float> y(x.rows(), kD);
  const std::vector<index_t> groups = {0, adversary.rows(), x.rows()};
  if (grouped) {
    layer.forward(x, moe::RouteContext::with_groups(groups), y, ws);
  } else {
    layer.forward(x, y, ws);
  }
  return y.bottomRows(victim.rows());
}

// An adversary that floods the expert the victim likes most: copies of the victim's own tokens,
// scaled up so they outrank the victim for that expert.
moe::Matrix<float> flooding_adversary(const moe::Matrix<float>& victim, index_t copies, float gain) {
  moe::Matrix<float> a(copies * victim.rows(), kD);
  for (index_t c = 0; c < copies; ++c) a.middleRows(c * victim.rows(), victim.rows()) = gain * victim;
  return a;
}

template <class Layer, class Workspace>
void check_attack_and_defence(const Layer& layer, Workspace& ws, const char* name) {
  CAPTURE(name);
  const moe::Matrix<float> victim = random_matrix<float>(kVictim, kD, 77);
  const moe::Matrix<float> benign = random_matrix<float>(kVictim, kD, 78);
  // Attack: without groups the flood changes the victim's output.
  const moe::Matrix<float> clean = victim_output(layer, ws, benign, victim, false);
  const moe::Matrix<float> attacked = victim_output(layer, ws, flooding_adversary(victim, 3, 4.0f), victim, false);
  REQUIRE(clean != attacked);
  // Defence: with groups, any adversary (flooding, random, any size, empty) leaves the victim's bits alone.
  const moe::Matrix<float> reference = victim_output(layer, ws, moe::Matrix<float>(0, kD), victim, true);
  const std::vector<moe::Matrix<float>> adversaries = {benign, flooding_adversary(victim, 3, 4.0f), flooding_adversary(victim, 7, -9.0f),
                                                       random_matrix<float>(1, kD, 5, 100.0), random_matrix<float>(50, kD, 6, 1e3)};
  for (const auto& adversary : adversaries) {
    CAPTURE(adversary.rows());
    REQUIRE(victim_output(layer, ws, adversary, victim, true) == reference);
  }
}

}  // namespace

TEST_CASE("Capacity routing: cross-batch influence without groups, none with groups", "[security][isolation]") {
  moe::TopKOptions o = moe::presets::mixtral(2);
  o.capacity_factor = 1.0;
  const auto priority = GENERATE(moe::CapacityPriority::position, moe::CapacityPriority::score);
  const auto overflow = GENERATE(moe::OverflowPolicy::drop, moe::OverflowPolicy::reroute);
  o.capacity_priority = priority;
  o.overflow = overflow;
  // Position priority only lets earlier tokens win, and the adversary comes first.
  moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(kE, kD, 3), o), make_experts());
  moe::Workspace<float> ws;
  check_attack_and_defence(layer, ws, "top-k with capacity");
}

TEST_CASE("Expert-choice routing: cross-batch influence without groups, none with groups", "[security][isolation]") {
  moe::ExpertChoiceOptions o;
  o.capacity_factor = 1.0;
  moe::MoELayer layer(moe::ExpertChoiceRouter<float>(random_matrix<float>(kE, kD, 3), o), make_experts());
  moe::Workspace<float> ws;
  check_attack_and_defence(layer, ws, "expert choice");
}

TEST_CASE("Soft routing: cross-batch influence without groups, none with groups", "[security][isolation]") {
  moe::SoftOptions o;
  o.slots_per_expert = 2;
  moe::SoftMoELayer layer(moe::SoftRouter<float>(random_matrix<float>(kD, kE * 2, 3), kE, o), make_experts());
  moe::SoftWorkspace<float> ws;
  check_attack_and_defence(layer, ws, "soft");
}

}  // namespace isolation_test
